"""docs/benchmarks.md, shared by the benchmark scripts: each owns the text between its two markers."""

from __future__ import annotations

from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def replace_section(begin: str, end: str, section: str, page: Path = DOCS) -> None:
    """Put `section` (which starts with `begin` and ends with `end`) where the page has those markers, or at
    its end; the rest of the page stays as it is."""
    text = page.read_text()
    if begin in text and end in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    page.write_text(text)


def show_or_write(begin: str, end: str, section: str, write: bool) -> None:
    """A benchmark's last step: its section printed, or (--write) put in the page."""
    if write:
        replace_section(begin, end, section)
    else:
        print(section)
