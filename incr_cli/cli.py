"""The `incr` command: a dispatcher over subcommands (train, resume, report, eval, predict, export)."""

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
    return run_hydra(argv)


def resume(argv: list[str]) -> int:
    """`incr resume RUN_DIR [OVERRIDES]`: the run's own overrides, plus result-neutral ones (and
    train.on_nonfinite), with resume=true."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from incr_cli.engine import RESUME_MAY_CHANGE
    from incr_cli.precheck import override_key

    if not argv or argv[0].startswith("-"):
        print("usage: incr resume RUN_DIR [OVERRIDES]\n\ncontinue a killed or interrupted run from its last "
              f"good checkpoint; OVERRIDES may only set: {', '.join(RESUME_MAY_CHANGE)}")  # fmt: skip
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
    return train(
        [*original, *overrides, "resume=true", f"hydra.run.dir={run_dir}", "hydra.output_subdir=null"]
    )


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
    return SUBCOMMANDS[command][0](rest)


if __name__ == "__main__":
    sys.exit(main())
