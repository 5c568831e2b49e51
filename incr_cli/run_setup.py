"""Building a run's data and loggers, and finding the checkpoint it resumes from: what `engine.Run` does
before its loop. The network and the method are built in build.py, shared with `incr eval`."""

from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from incr_cli import checkpoint
from incr_cli.config import to_container
from incr_cli.data.sources import load_source
from incr_cli.data.stream import Stream, build_stream
from incr_cli.data.streamed import place
from incr_cli.errors import ConfigError
from incr_cli.loggers import RunLoggers

log = logging.getLogger("incr")

# What a resume may change: the result-neutral keys, and the non-finite policy, which changes nothing before
# the non-finite loss it is changed to get past (`incr resume RUN_DIR train.on_nonfinite=skip_batch`).
RESUME_MAY_CHANGE = (*checkpoint.RESULT_NEUTRAL_KEYS, "train.on_nonfinite")


def resume_hash(config: dict) -> str:
    """The config hash less `train.on_nonfinite` as well: the same for a run and any resumption of it."""
    train = {key: value for key, value in config.get("train", {}).items() if key != "on_nonfinite"}
    return checkpoint.config_hash({**config, "train": train})


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_stream(cfg: DictConfig, device: torch.device) -> tuple[Stream, dict]:
    """The data set cut into tasks, on the device (its images streamed when they exceed the device budget,
    hardware.device_data_gb); and the config as trained, with what loading filled in
    (dataset=image_folder's computed mean and std): checkpoints carry it to `incr eval` and `incr predict`."""
    source = load_source(cfg.dataset.name, cfg.data, cfg.dataset)
    config = to_container(cfg)
    return place(build_stream(source, cfg.dataset), device, cfg.hardware), config


def open_loggers(cfg: DictConfig, run_dir: Path, config: dict, position, writes: bool) -> RunLoggers:
    """The run's loggers (CSV, TensorBoard, MLflow, W&B), picking up where the run resumes from (`position`)."""
    # Rows logged after the checkpoint resumed from are dropped: that stretch is trained again. A mid-task
    # checkpoint at step S precedes anything logged at S (an epoch that ended at S is logged after it).
    resumed = position.step - (1 if position.started else 0) if cfg.resume else None
    run_id = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]
    return RunLoggers(cfg.logger, run_dir, config, run_id, resumed, write=writes)


def newest_checkpoint(run_dir: Path, device: torch.device) -> tuple[Path, dict] | None:
    """The newest checkpoint of the run that loads, with its path; an unusable one is named and skipped.
    None (said in the log) when there is none: the run starts from the beginning."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        log.info("resume=true but %s holds no checkpoint yet: starting from the beginning", run_dir)
        return None
    checkpoint.remove_stale_temporaries(folder)
    for path in checkpoint.candidates(folder):
        try:
            return path, checkpoint.load(path, map_location=device)
        except checkpoint.CheckpointError as error:
            log.warning("%s; falling back to an earlier checkpoint", error)
    log.warning("no usable checkpoint in %s: starting from the beginning", folder)
    return None


def check_same_experiment(path: Path, state: dict, config_hash: str, config: dict) -> None:
    """Refuse a checkpoint of another experiment: a resume may change only RESUME_MAY_CHANGE."""
    if state["config_hash"] != config_hash and (
        "config" not in state or resume_hash(state["config"]) != resume_hash(config)
    ):
        raise ConfigError(
            f"{path} was written by a different experiment (config hash {state['config_hash']}, now "
            f"{config_hash}); resume may only change {', '.join(RESUME_MAY_CHANGE)}"
        )


def resumed_metrics(state: dict, run_dir: Path, all_tasks_trained: bool) -> dict:
    """The checkpoint's metrics. The last checkpoint precedes the final bookkeeping: once every task is
    trained, metrics.json says whether that bookkeeping happened (status finished)."""
    saved = state["metrics"]
    written = run_dir / "metrics.json"
    if all_tasks_trained and written.is_file():
        saved["run"]["status"] = json.loads(written.read_text())["run"]["status"]
    return saved
