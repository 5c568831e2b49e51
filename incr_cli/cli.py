"""The `incr` command: a dispatcher over subcommands (train, resume, report, eval, predict, export)."""

from __future__ import annotations

import gc
import os
import re
import sys
from collections.abc import Callable

from incr_cli import __version__
from incr_cli.console import fail
from incr_cli.errors import ConfigError


def train(argv: list[str]) -> int:
    from incr_cli.precheck import check_command, single_run
    from incr_cli.train import run_hydra, run_single

    try:
        if single_run(argv):
            return run_single(argv)
        check_command(argv)
    except ConfigError as error:
        fail(str(error))
        return 2
    return run_hydra(argv)


def resume(argv: list[str]) -> int:
    """`incr resume RUN_DIR [OVERRIDES]`: the run's own overrides, plus result-neutral ones (and
    train.on_nonfinite), with resume=true."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from incr_cli.engine import RESUME_MAY_CHANGE
    from incr_cli.precheck import override_key

    if not argv or argv[0].startswith("-"):
        print(
            "usage: incr resume RUN_DIR [OVERRIDES]\n\ncontinue a killed or interrupted run from its last "
            f"good checkpoint; OVERRIDES may only set: {', '.join(RESUME_MAY_CHANGE)}"
        )
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    run_dir, overrides = Path(argv[0]), argv[1:]
    saved = run_dir / ".hydra" / "overrides.yaml"
    if not saved.is_file():
        fail(f"{run_dir} is not an incr run directory (no .hydra/overrides.yaml)")
        return 2
    new_keys = {override_key(o) for o in overrides}
    for key in new_keys:
        if key not in RESUME_MAY_CHANGE:
            fail(f"{key} would change the run's results; resume accepts only: {', '.join(RESUME_MAY_CHANGE)}")
            return 2
    original = [
        o for o in OmegaConf.load(saved) if override_key(o) not in new_keys | {"resume", "hydra.run.dir"}
    ]
    # The run's .hydra/ files stay as the original command wrote them.
    folder = f"hydra.run.dir={hydra_value(str(run_dir))}"  # quoted when Hydra's grammar needs it
    return train([*original, *overrides, "resume=true", folder, "hydra.output_subdir=null"])


def report(argv: list[str]) -> int:
    from incr_cli.report import ReportError, parse_args
    from incr_cli.report import report as write_report

    args = parse_args(argv)
    try:
        write_report(args)
    except ReportError as error:
        fail(str(error))
        return 2
    return 0


def evaluate(argv: list[str]) -> int:
    from incr_cli.inference import eval_command

    return eval_command(argv)


def predict(argv: list[str]) -> int:
    from incr_cli.inference import predict_command

    return predict_command(argv)


def export(argv: list[str]) -> int:
    from incr_cli.inference import export_command

    return export_command(argv)


# name -> (function taking the remaining arguments, one-line description)
SUBCOMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "train": (
        train,
        "train a model on a stream of tasks; Hydra overrides, e.g. strategy=replay dataset=digits",
    ),
    "resume": (resume, "continue a killed run from its last good checkpoint: incr resume RUN_DIR"),
    "report": (report, "tables and figures over runs, grouped over seeds: incr report DIR..."),
    "eval": (evaluate, "accuracy of a checkpoint on a test stream: incr eval RUN_DIR [dataset=...]"),
    "predict": (predict, "class names and probabilities of image files: incr predict CHECKPOINT IMAGES..."),
    "export": (export, "a TorchScript or ONNX model file: incr export CHECKPOINT --format torchscript|onnx"),
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
    return SUBCOMMANDS[command][0](expand_home(rest))


def console_main() -> int:
    """The `incr` executable and `python -m incr_cli`: main(), then every object frozen out of the garbage
    collector, so that the interpreter's exit frees them without tracing them for cycles first. After a run
    that trace walks the millions of objects torch's compiler stack leaves (about 1.5 s on a 2-core machine);
    what is left to do at exit (atexit handlers, flushing the log) still runs. Tests call main() itself."""
    try:
        return main()
    finally:
        gc.freeze()


# `$HOME` and `${HOME}`, not `$HOMEDIR`; `${oc.env:HOME}` is OmegaConf's own and stays
HOME_VARIABLE = re.compile(r"\$(?:HOME\b|\{HOME\})")


def expand_home(argv: list[str]) -> list[str]:
    """`~`, `~user`, `$HOME` and `${HOME}` in path arguments expanded, as a shell expands a word that starts
    with `~`. A shell leaves `key=~/data` alone, and Hydra's override grammar then refuses the `~`; `$HOME`
    it would keep as text, and `${HOME}` it reads as an interpolation of a config key HOME, which incr's
    config has not. Expanded: `key=VALUE` (each value of a sweep `key=A,B`, quoted ones too),
    `--option=VALUE`, and a bare `~` or `~/...` (a bare `~key` is Hydra's delete override and stays)."""
    return [_expand_argument(argument) for argument in argv]


def _expand_argument(argument: str) -> str:
    key, equals, value = argument.partition("=")
    if not equals:
        return _expand_path(argument) if argument == "~" or argument.startswith("~/") else argument
    if argument.startswith("-"):
        return f"{key}={_expand_path(value)}"
    parts = value.split(",")  # a sweep's values; a path with a comma is one to Hydra too
    expanded = [_expand_path(part) for part in parts]
    if expanded == parts:
        return argument
    return f"{key}={','.join(map(hydra_value, expanded))}"


def _expand_path(text: str) -> str:
    quote = text[0] if len(text) > 1 and text[0] in "'\"" and text[-1] == text[0] else ""
    inner = text[len(quote) : len(text) - len(quote)]
    if inner.startswith("~"):
        inner = os.path.expanduser(inner)
    if "HOME" in os.environ:
        inner = HOME_VARIABLE.sub(lambda _: os.environ["HOME"], inner)
    return f"{quote}{inner}{quote}"


def hydra_value(text: str) -> str:
    """`text` as one string value of a Hydra override: as it is when Hydra's grammar reads it so, else quoted
    (a path with brackets, parentheses, `=` or `#`): in single quotes, or double ones for a path with a single
    quote, which YAML (`incr eval` reads its overrides with OmegaConf) then reads alike. Hydra escapes the
    quote, and the backslashes just before it, with a backslash."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    if text[:1] in ("'", '"'):  # the user's own quotes
        return text
    try:
        parsed = OverridesParser.create().parse_override(f"key={text}")
        if not parsed.is_sweep_override() and parsed.value() == text:
            return text
    except HydraException:
        pass
    quote = '"' if "'" in text and '"' not in text else "'"
    escaped = re.sub(rf"(\\*){quote}", lambda m: m.group(1) * 2 + "\\" + quote, text)
    return quote + re.sub(r"(\\+)$", lambda m: m.group(1) * 2, escaped) + quote


if __name__ == "__main__":
    sys.exit(main())
