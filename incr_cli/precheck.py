"""Compose and check every job of an `incr train` command before Hydra starts any of them."""

from __future__ import annotations

import argparse
import itertools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from incr_cli.config import check_config, config_dir, register_schema, to_container
from incr_cli.errors import ConfigError

# Flags after which Hydra prints or inspects instead of training.
INSPECTION_FLAGS = {
    "--help",
    "-h",
    "--hydra-help",
    "--cfg",
    "-c",
    "--info",
    "-i",
    "--shell-completion",
    "-sc",
    "--version",
    "--resolve",
    "-p",
    "--package",
}


def _hydra_setting(argv: list[str], key: str) -> str | None:
    for argument in argv:
        if argument.startswith(f"{key}="):
            return argument.split("=", 1)[1]
    return None


def job_overrides(argv: list[str]) -> list[list[str]] | None:
    """The override list of every job the command would run; None when it only inspects."""
    if INSPECTION_FLAGS & set(argv):
        if _multirun(argv) and {"--cfg", "-c", "--info", "-i"} & set(argv):
            raise ConfigError("--cfg/--info show one job's config: drop -m (--multirun) to inspect it")
        return None
    args = _arguments(argv)
    parsed = OverridesParser.create().parse_overrides(args.overrides)
    sweeps = [o.input_line for o in parsed if o.is_sweep_override()]
    if sweeps and not args.multirun:
        raise ConfigError(f"{sweeps[0]} lists several values; add -m (--multirun) to run one job per value")
    # Hydra's own settings (launcher, output folders) are checked by Hydra itself; the search path stays, as it
    # can add config groups' choices (a data set of the user's own).
    ours = [o for o in parsed if o.get_key_element() == "hydra.searchpath" or not _hydra_key(o)]
    if not args.multirun:
        return [[o.input_line for o in ours]]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(
            "under torchrun (hardware=ddp) incr trains one run: drop -m and start one torchrun per run"
        )
    return [list(job) for job in itertools.product(*map(_values, ours))]


def _hydra_key(override: Override) -> bool:
    return override.get_key_element().lstrip("+~").startswith("hydra")


def _arguments(argv: list[str]) -> argparse.Namespace:
    """The command line as `incr train` hands it to Hydra: overrides and the flags that take part in a run."""
    parser = argparse.ArgumentParser(prog="incr train", add_help=False, allow_abbrev=False)
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--multirun", "-m", action="store_true")
    parser.add_argument("--run", "-r", action="store_true")
    for flags in (("--config-path", "-cp"), ("--config-name", "-cn"), ("--config-dir", "-cd")):
        parser.add_argument(*flags)
    parser.add_argument("--experimental-rerun")
    return parser.parse_args(argv)


def _values(override: Override) -> list[str]:
    """`key=value` for each value an override sweeps over (one for a plain override), as Hydra's basic sweeper
    spells the jobs."""
    key = override.get_key_element()
    if not override.is_sweep_override():
        return [f"{key}={override.get_value_element_as_str()}"]
    if not override.is_discrete_sweep():
        raise ConfigError(
            f"{override.input_line}: an interval sweep needs a sweeper plugin (e.g. hydra/sweeper=optuna)"
        )
    return [f"{key}={value}" for value in override.sweep_string_iterator()]


def check_command(argv: list[str]) -> None:
    """Raises ConfigError (one line) for the first job whose config is unknown, mistyped or invalid."""
    try:
        jobs = job_overrides(argv)
    except HydraException as error:
        raise ConfigError(_one_line(error)) from None
    if jobs is None:
        return
    saved: dict[int, Path] | None = None  # the config files of the run or sweep that resume=true continues
    with composing():
        for number, overrides in enumerate(jobs):
            saved = check_job(compose_job(overrides), argv, number, saved)


@contextmanager
def composing() -> Iterator[None]:
    """Hydra's compose API over incr's configs, with the job name `hydra.main` gives them (train: the run's
    log is train.log)."""
    register_schema()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(config_dir()), job_name="train", version_base="1.3"):
            yield
    finally:
        GlobalHydra.instance().clear()


def compose_job(overrides: list[str], with_hydra: bool = False) -> DictConfig:
    """One job's config (`with_hydra`: Hydra's own node too, as a run needs it); ConfigError when it does not
    compose."""
    try:
        return compose("train", overrides=overrides, return_hydra_config=with_hydra)
    except MissingConfigException as error:
        raise ConfigError(_unknown_choice(error)) from None
    except (HydraException, OmegaConfBaseException) as error:
        raise ConfigError(_one_line(error)) from None


def check_job(
    cfg: DictConfig, argv: list[str], number: int = 0, saved: dict[int, Path] | None = None
) -> dict[int, Path] | None:
    """Checks job `number` of the command (its config without Hydra's node; check_config fills in values found
    on disk, so pass a copy that is not saved). Returns the saved configs of the folder resume=true names,
    read once for a sweep."""
    composed = to_container(cfg)  # as the run's .hydra/config.yaml holds it, before check_config fills in
    # values found on disk (dataset=image_folder's num_classes and input_shape)
    check_config(cfg, ranks_start_later=submitted_to_slurm(argv))
    if cfg.resume:
        saved = _saved_configs(argv) if saved is None else saved
        _check_resumable(saved.get(number), composed, _multirun(argv))
    return saved


def single_run(argv: list[str]) -> bool:
    """Whether the command trains one job of incr's own config: no -m, no flag that inspects or names
    another config."""
    if INSPECTION_FLAGS & set(argv):
        return False
    args = _arguments(argv)
    other_config = args.config_path or args.config_name or args.config_dir or args.experimental_rerun
    return not (args.multirun or other_config or "hydra.mode" in map(override_key, args.overrides))


def run_overrides(argv: list[str]) -> list[str]:
    """The overrides of a single run's command line, as Hydra's run mode composes them."""
    return [*_arguments(argv).overrides, "hydra.mode=RUN"]


def _saved_configs(argv: list[str]) -> dict[int, Path]:
    """The .hydra/config.yaml of each job in the folder that resume=true names, by job number (a single run is
    job 0). Read before Hydra starts, because Hydra rewrites a folder's .hydra/ files as soon as it does."""
    multirun = _multirun(argv)
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    folder = _hydra_setting(argv, key)
    if folder is None:
        what = "sweep to continue>" if multirun else "run to continue> (or: incr resume RUN_DIR)"
        raise ConfigError(f"resume=true needs {key}=<the folder of the {what}")
    if not multirun:
        saved = Path(folder) / ".hydra" / "config.yaml"
        return {0: saved} if saved.is_file() else {}
    # a job's number is its place in the sweep; Hydra names its folder from it (hydra.sweep.subdir)
    return {
        OmegaConf.load(hydra_file).hydra.job.num: hydra_file.with_name("config.yaml")
        for hydra_file in Path(folder).glob("*/.hydra/hydra.yaml")
        if hydra_file.with_name("config.yaml").is_file()
    }


def _check_resumable(saved: Path | None, composed: dict, multirun: bool) -> None:
    """resume=true refuses a config that would change the results of the run it continues."""
    if saved is None:  # nothing ran there yet: the run starts from the beginning
        return
    from incr_cli.engine import RESUME_MAY_CHANGE, resume_hash

    if resume_hash(to_container(OmegaConf.load(saved))) != resume_hash(composed):
        sweep = " (a sweep resumes with the command that started it, plus resume=true)" if multirun else ""
        raise ConfigError(
            f"{saved.parent.parent} was made with a different config{sweep}; resume may only change: "
            f"{', '.join(RESUME_MAY_CHANGE)}"
        )


def sweep_dir(argv: list[str]) -> Path | None:
    """The folder a training sweep (-m) writes its jobs into; None when the command is no sweep or only
    inspects. hydra.sweep.dir when the command sets it, else the configured one (a timestamp) resolved now, for
    run_hydra to hand to Hydra, so that the folder is known when the sweep ends."""
    jobs = job_overrides(argv)
    if jobs is None or not _multirun(argv):
        return None
    given = _hydra_setting(argv, "hydra.sweep.dir")
    if given is not None:
        return Path(given)
    with composing():
        return Path(compose("train", overrides=jobs[0], return_hydra_config=True).hydra.sweep.dir)


def submitted_to_slurm(argv: list[str]) -> bool:
    """A sweep that Hydra's submitit launcher sends to SLURM: its jobs' ranks start there, not here."""
    return _multirun(argv) and any(
        override_key(o) == "hydra/launcher" and o.partition("=")[2] == "slurm"
        for o in _arguments(argv).overrides
    )


def _multirun(argv: list[str]) -> bool:
    return "-m" in argv or "--multirun" in argv


def override_key(override: str) -> str:
    """The dotted key an override sets: `+strategy.x=1` -> strategy.x."""
    return override.split("=", 1)[0].lstrip("+~")


def _unknown_choice(error: MissingConfigException) -> str:
    missing = str(error.missing_cfg_file or "")
    if error.options and "/" in missing:
        group, name = missing.rsplit("/", 1)
        return f"unknown {group} '{name}'; valid: {', '.join(sorted(error.options))}"
    return _one_line(error)


def _one_line(error: BaseException) -> str:
    text = str(error)
    cause = error.__cause__
    if cause is not None and str(cause) and str(cause) not in text:
        text = f"{text}: {cause}"
    # OmegaConf appends 'full_key: ..., object_type=...' lines; the first lines say what is wrong.
    lines = [
        line.strip()
        for line in text.splitlines()
        if line.strip() and not line.strip().startswith("object_type")
    ]
    return " ".join(lines)
