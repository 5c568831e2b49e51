"""Atomic checkpoint writes, safe loading, and the random-number state a resumed run needs."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from incr_cli import faults
from incr_cli.errors import DiskFull
from incr_cli.files import atomic_write

FORMAT = "incr-checkpoint"
VERSION = 1

# Keys that change how a run is executed or shown, never its numbers: resume may override these.
RESULT_NEUTRAL_KEYS = (
    "progress",
    "resume",
    "logger",
    "hardware.num_threads",
    "checkpoint.every_steps",
    "checkpoint.every_seconds",
    "checkpoint.keep_last",
    "data.root",
    "data.download",
)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (not incr's, truncated, unsafe, or unwritable)."""


def config_hash(config: dict) -> str:
    """sha256 of the experiment-defining config: the resolved config less the result-neutral keys."""
    defining = json.loads(json.dumps(config, sort_keys=True, default=str))
    for dotted in RESULT_NEUTRAL_KEYS:
        *parents, leaf = dotted.split(".")
        node = defining
        for key in parents:
            node = node.get(key, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    return hashlib.sha256(json.dumps(defining, sort_keys=True).encode()).hexdigest()[:16]


def save(path: Path, state: dict[str, Any]) -> None:
    payload = {"format": FORMAT, "version": VERSION, **state}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getbuffer()

    def write(handle) -> None:
        handle.write(data[: len(data) // 2])
        faults.reach("checkpoint_write")
        handle.write(data[len(data) // 2 :])

    try:
        atomic_write(path, write)
    except DiskFull as error:
        raise CheckpointError(error.strerror) from None


def link(target: Path, name: Path) -> None:
    """Point `name` at the same file as `target` (a hard link, swapped in atomically): no second copy."""
    temporary = name.with_name(f".{name.name}.link-{os.getpid()}")
    temporary.unlink(missing_ok=True)
    os.link(target, temporary)
    os.replace(temporary, name)


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load with `weights_only=True`, so a file carrying pickled code is refused instead of run."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    except Exception as error:  # torch raises many types for truncated, foreign or unsafe files
        reason = (
            "unsafe content refused"
            if "weights_only" in str(error) or "Unsupported global" in str(error)
            else "unreadable or truncated"
        )
        raise CheckpointError(f"{path} is not a usable incr checkpoint ({reason})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an incr checkpoint")
    return state


def candidates(folder: Path) -> list[Path]:
    """Checkpoints to resume from, newest first: last.pt, then step and task checkpoints by age."""
    others = sorted(
        (p for p in folder.glob("*.pt") if p.name != "last.pt"),
        key=lambda p: p.stat().st_mtime_ns,
        reverse=True,
    )
    last = folder / "last.pt"
    ordered, inodes = [], set()
    for path in ([last] if last.is_file() else []) + others:
        if path.stat().st_ino not in inodes:  # last.pt is a hard link to one of the others
            inodes.add(path.stat().st_ino)
            ordered.append(path)
    return ordered


def remove_stale_temporaries(folder: Path) -> None:
    """Temporary files of writes a kill interrupted; the files they were to replace are intact."""
    for stale in folder.glob(".*.tmp-*"):
        stale.unlink(missing_ok=True)
    for stale in folder.glob(".*.link-*"):
        stale.unlink(missing_ok=True)


def rng_state(run_generator: torch.Generator) -> dict[str, Any]:
    """Every generator a run draws from, in forms `weights_only` loading accepts."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": list(random.getstate()[1]),
        "run": run_generator.get_state(),
    }


def restore_rng(state: dict[str, Any], run_generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached"],
        )
    )
    random.setstate((3, tuple(state["python"]), None))
    run_generator.set_state(state["run"])
