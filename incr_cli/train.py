"""The Hydra entrypoint of `incr train`: check the composed config, build the run, train it."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from incr_cli.config import ConfigError, check_config, config_dir, register_schema
from incr_cli.console import fail


def train_job(cfg: DictConfig) -> float:
    """One job of `incr train` (a multirun calls it once per combination). Returns the final average
    accuracy, the figure a Hydra sweeper optimises."""
    import torch

    from incr_cli import distributed
    from incr_cli.checkpoint import CheckpointError
    from incr_cli.engine import Interrupted, NonFiniteLoss, Run  # torch loads once the config is known good

    hydra_config = HydraConfig.get()
    if not cfg.resume and requeued_by_slurm():
        logging.getLogger("incr").info("requeued by SLURM: resuming from the last checkpoint")
        cfg.resume = True
    choices = hydra_config.runtime.choices
    names = {group: str(choices.get(group)) for group in ("strategy", "dataset", "model")}
    run_dir = Path(hydra_config.runtime.output_dir)
    try:
        check_config(cfg)
        if cfg.hardware.distributed:  # every rank works in rank 0's run directory; rank 0 alone writes there
            distributed.start("cuda" if cfg.hardware.device != "cpu" and torch.cuda.is_available() else "cpu")
            run_dir = Path(distributed.broadcast_text(str(run_dir)))
        run = Run(cfg, run_dir, names)
    except ConfigError as error:
        fail(str(error))
        sys.exit(2)
    try:
        metrics = run.run()
    except Interrupted as stop:
        fail(str(stop))
        sys.exit(128 + stop.signal_number)
    except (NonFiniteLoss, CheckpointError) as error:
        run.metrics["run"]["status"] = "failed"
        run.metrics["run"]["error"] = str(error)
        try:
            run.write_results()
        except (OSError, CheckpointError):  # the disk may be what failed
            pass
        fail(str(error))
        sys.exit(1)
    finally:
        distributed.stop()
    return metrics["class_il"]["final_average_accuracy"]


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


def run_hydra(argv: list[str]) -> None:
    """Hand the arguments to Hydra exactly as `python train.py ARGS` would."""
    register_schema()
    argv = other_rank_arguments(argv)
    main = hydra.main(config_path=str(config_dir()), config_name="train", version_base="1.3")(train_job)
    sys.argv = ["incr train", *argv]
    main()
