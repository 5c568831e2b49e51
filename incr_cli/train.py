"""The Hydra entrypoint of `incr train`: check the composed config, build the run, train it. A single run is
composed once and run as Hydra's run mode runs it (`run_single`); a sweep (-m) goes through `hydra.main`, and
a job of it that fails is recorded as failed while the sweep goes on; its last line counts the jobs that
failed."""

from __future__ import annotations

import copy
import json
import logging
import os
import shlex
import signal
import sys
import traceback
import warnings
from pathlib import Path

import hydra
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from incr_cli.config import check_config, config_dir, register_schema
from incr_cli.console import console, fail
from incr_cli.errors import ConfigError
from incr_cli.precheck import (
    check_job,
    compose_job,
    composing,
    override_key,
    run_overrides,
    sweep_dir,
)

log = logging.getLogger("incr")


def train_job(cfg: DictConfig) -> float | None:
    """One job of `incr train` (a multirun calls it once per combination). Returns the final average
    accuracy, the figure a Hydra sweeper optimises; None for a job of a sweep that failed (Optuna counts it as a
    failed trial)."""
    import torch

    from incr_cli import distributed
    from incr_cli.checkpoint import CheckpointError
    from incr_cli.engine import Interrupted, Run
    from incr_cli.errors import DiskFull
    from incr_cli.step import NonFiniteLoss  # torch loads once the config is known good

    hydra_config = HydraConfig.get()
    in_sweep = hydra_config.mode == RunMode.MULTIRUN
    if not cfg.resume and requeued_by_slurm():
        log.info("requeued by SLURM: resuming from the last checkpoint")
        cfg.resume = True
    choices = hydra_config.runtime.choices
    names = {group: str(choices.get(group)) for group in ("strategy", "dataset", "model")}
    run_dir = Path(hydra_config.runtime.output_dir)
    run = None
    try:
        check_config(cfg)
        if cfg.hardware.distributed:  # every rank works in rank 0's run directory; rank 0 alone writes there
            distributed.start("cuda" if cfg.hardware.device != "cpu" and torch.cuda.is_available() else "cpu")
            run_dir = Path(distributed.broadcast_text(str(run_dir)))
        run = Run(cfg, run_dir, names)
        metrics = run.run()
    except ConfigError as error:
        fail_and_log(str(error))
        sys.exit(2)
    except Interrupted as stop:
        fail_and_log(f"{stop}; continue with: {continue_command(hydra_config, run_dir)}")
        sys.exit(128 + stop.signal_number)
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (loading, the first evaluation, the plots)
        resume = continue_command(hydra_config, run_dir)
        fail_and_log(f"SIGINT received: the last checkpoint is kept; continue with: {resume}")
        sys.exit(128 + signal.SIGINT)
    except Exception as error:
        if run is None:  # building the run failed, not its training: Hydra reports it
            raise
        # a non-finite loss, a full disk, or a fault in a method: the run is marked failed, a sweep goes on
        expected = isinstance(error, (NonFiniteLoss, CheckpointError, DiskFull))
        message = str(error) if expected else f"{type(error).__name__}: {error}"
        record_failure(run, message)
        if not (in_sweep or expected):
            raise  # a fault in the code: Hydra prints its traceback
        fail_and_log(
            message if expected else f"{message} (traceback: {run_dir / 'train.log'})", trace=not expected
        )
        if not in_sweep:
            sys.exit(1)
        return None
    finally:
        distributed.stop()
    return metrics["class_il"]["final_average_accuracy"]


def record_failure(run, message: str) -> None:
    """metrics.json says the run failed and why; its checkpoints stay, for resume to continue from."""
    run.metrics["run"]["status"] = "failed"
    run.metrics["run"]["error"] = message
    try:
        run.write_results()
    except OSError:  # the disk may be what failed (a full one included)
        pass


def fail_and_log(message: str, trace: bool = False) -> None:
    """The one-line error on the console, and the same line (with the traceback when `trace`) in the job's log
    file, train.log: written to the file handlers alone, as the console already shows it."""
    fail(message)
    record = log.makeRecord(
        log.name, logging.ERROR, __file__, 0, message, (), sys.exc_info() if trace else None
    )
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def continue_command(hydra_config: DictConfig, run_dir: Path) -> str:
    """What continues after an interrupt: this run alone, or every unfinished job of its sweep."""
    if hydra_config.mode == RunMode.MULTIRUN:
        return sweep_resume_command(Path(hydra_config.sweep.dir))
    return f"incr resume {run_dir}"


def sweep_resume_command(folder: Path) -> str:
    """The command that continues the sweep in `folder`: the overrides that started it (Hydra keeps them in
    the folder's multirun.yaml), resume=true and the folder."""
    saved = OmegaConf.load(folder / "multirun.yaml").hydra.overrides
    dropped = ("resume", "hydra.sweep.dir", "hydra.mode")  # hydra.mode=MULTIRUN is what -m sets
    kept = [o for o in [*saved.task, *saved.hydra] if override_key(o) not in dropped]
    return shlex.join(["incr", "train", "-m", *kept, "resume=true", f"hydra.sweep.dir={folder}"])


def sweep_outcome(folder: Path) -> int:
    """The sweep's last line: every job finished (exit status 0), or how many failed, their folders and the
    command that continues them (exit status 1)."""
    jobs = sorted(path.parent for path in folder.glob("*/metrics.json"))
    failed = [
        job for job in jobs if json.loads((job / "metrics.json").read_text())["run"]["status"] != "finished"
    ]
    if not failed:
        console.print(f"sweep finished: {len(jobs)} jobs in {folder}", highlight=False, soft_wrap=True)
        return 0
    fail(
        f"{len(failed)} of {len(jobs)} jobs failed: {', '.join(map(str, failed))} (metrics.json and train.log "
        f"there say why); continue the sweep with: {sweep_resume_command(folder)}"
    )
    return 1


def other_rank_arguments(argv: list[str]) -> list[str]:
    """Under torchrun, ranks above 0 run Hydra too: point their .hydra/ and log at a throwaway folder, so
    that only rank 0's run directory is written (the engine hands every rank rank 0's folder)."""
    if int(os.environ.get("RANK", "0")) == 0:
        return argv
    import atexit
    import shutil
    import tempfile

    scratch = tempfile.mkdtemp(prefix=f"incr-rank{os.environ['RANK']}-")
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    kept = [a for a in argv if not a.startswith(("hydra.run.dir=", "hydra.output_subdir="))]
    return [*kept, f"hydra.run.dir={scratch}", "hydra.output_subdir=null"]


def requeued_by_slurm() -> bool:
    """SLURM sets SLURM_RESTART_COUNT when it requeues a job (after preemption, or submitit's requeue on
    timeout); the job then reruns with the same overrides and output folder, so it continues that run."""
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0


def run_hydra(argv: list[str]) -> int:
    """Hand the arguments to Hydra exactly as `python train.py ARGS` would; returns the exit status (a sweep's:
    1 when a job failed)."""
    register_schema()
    argv = other_rank_arguments(argv)
    folder = sweep_dir(argv)
    if folder is not None and "hydra.sweep.dir" not in map(override_key, argv):
        argv = [*argv, f"hydra.sweep.dir={folder}"]  # the configured timestamp, fixed: read again at the end
    main = hydra.main(config_path=str(config_dir()), config_name="train", version_base="1.3")(train_job)
    sys.argv = ["incr train", *argv]
    main()
    return 0 if folder is None else sweep_outcome(folder)


def run_single(argv: list[str]) -> int:
    """A run without -m, as `hydra.main` runs it (the same run directory, .hydra/ files, logging and
    callbacks), from one composition of its config: `hydra.main` would compose it twice more, once to read
    hydra.mode and once to run. ConfigError (one line) before anything is written when the config does not
    compose or fails the checks; a fault in the code prints its traceback and exits with status 1, as Hydra's
    does."""
    from hydra.core.utils import JobStatus, configure_log, run_job
    from hydra.types import HydraContext

    argv = other_rank_arguments(argv)
    with composing():
        cfg = compose_job(run_overrides(argv), with_hydra=True)
        check_job(without_hydra(cfg), argv)
        configure_log(cfg.hydra.hydra_logging, cfg.hydra.verbose)
        callbacks = JobCallbacks(cfg)
        callbacks.on_run_start(config=cfg, config_name="train")
        context = HydraContext(config_loader=GlobalHydra.instance().config_loader(), callbacks=callbacks)
        outcome = run_job(train_job, cfg, "hydra.run.dir", None, context)
        callbacks.on_run_end(config=cfg, config_name="train", job_return=outcome)
    if outcome.status == JobStatus.COMPLETED:
        return 0
    try:
        outcome.return_value  # noqa: B018  (raises the job's exception, after Hydra's line naming its overrides)
    except Exception as error:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        traceback.print_exception(error)
    sys.exit(1)


def without_hydra(cfg: DictConfig) -> DictConfig:
    """A copy of the job's config without Hydra's node: what the job itself receives."""
    job = copy.deepcopy(cfg)
    with read_write(job), open_dict(job):
        del job["hydra"]
    return job


class JobCallbacks:
    """The callbacks of hydra.callbacks, called as Hydra calls them: in order at a start, in reverse order at
    an end, a callback's own error a warning."""

    def __init__(self, cfg: DictConfig):
        from hydra.utils import instantiate

        self.callbacks = [instantiate(c) for c in (OmegaConf.select(cfg, "hydra.callbacks") or {}).values()]

    def _notify(self, event: str, reverse: bool, **arguments) -> None:
        for callback in reversed(self.callbacks) if reverse else self.callbacks:
            try:
                getattr(callback, event)(**arguments)
            except Exception as error:
                warnings.warn(f"Callback {type(callback).__name__}.{event} raised {error!r}", stacklevel=2)

    def on_run_start(self, **arguments) -> None:
        self._notify("on_run_start", False, **arguments)

    def on_run_end(self, **arguments) -> None:
        self._notify("on_run_end", True, **arguments)

    def on_job_start(self, **arguments) -> None:
        self._notify("on_job_start", False, **arguments)

    def on_job_end(self, **arguments) -> None:
        self._notify("on_job_end", True, **arguments)
