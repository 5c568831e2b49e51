"""Shared test helpers: run `incr` in-process and read what a run wrote."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from incr_cli.cli import main

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def run_experiment(run_dir: Path, overrides: list[str]) -> dict:
    """`incr train OVERRIDES hydra.run.dir=RUN_DIR`, in this process; returns the run's metrics.json."""
    status = main(["train", f"hydra.run.dir={run_dir}", "progress=false", *overrides])
    assert status == 0
    return json.loads((run_dir / "metrics.json").read_text())


def final_accuracy(metrics: dict) -> float:
    return metrics["class_il"]["final_average_accuracy"]


needs_fashion_mnist = pytest.mark.skipif(
    not FASHION_MNIST.is_dir(), reason="apt-get install dataset-fashion-mnist (.ci/run does)"
)
