"""The `incr` command: a dispatcher over subcommands (train now; resume, eval, predict, report later)."""

from __future__ import annotations

import sys
from collections.abc import Callable

from incr_cli import __version__
from incr_cli.config import ConfigError
from incr_cli.console import fail


def train(argv: list[str]) -> int:
    from incr_cli.precheck import check_command
    from incr_cli.train import run_hydra

    try:
        check_command(argv)
    except ConfigError as error:
        fail(str(error))
        return 2
    run_hydra(argv)
    return 0


# name -> (function taking the remaining arguments, one-line description)
SUBCOMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "train": (train, "train a model on a stream of tasks; Hydra overrides, e.g. strategy=replay dataset=digits"),
}

USAGE = """usage: incr <command> [arguments]

Continual (incremental) learning of image classifiers.

commands:
{commands}

`incr <command> --help` shows a command's own help (for train: its config groups and their choices)."""


def usage() -> str:
    width = max(len(name) for name in SUBCOMMANDS)
    commands = "\n".join(f"  {name:<{width}}  {text}" for name, (_, text) in SUBCOMMANDS.items())
    return USAGE.format(commands=commands)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"incr {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in SUBCOMMANDS:
        fail(f"unknown command '{command}'; valid: {', '.join(SUBCOMMANDS)}")
        return 2
    return SUBCOMMANDS[command][0](rest)


if __name__ == "__main__":
    sys.exit(main())
