"""Every strategy config, as shipped, trains through the default digits stream (class-IL) at 1 epoch and at the
default epochs without a non-finite loss. The strategies are discovered from configs/strategy/, so a new method is
swept too; tests/test_strategy_streams.py takes them through the other built-in streams."""

from __future__ import annotations

import csv
import importlib
import json
import math
from pathlib import Path

import pytest
import yaml

from incr_cli.cli import main

STRATEGY_DIR = Path(__file__).resolve().parent.parent / "configs" / "strategy"
STRATEGIES = sorted(path.stem for path in STRATEGY_DIR.glob("*.yaml"))
# MER runs s * k SGD steps per batch (10 x 11 by default, about 100 times fine-tuning's work): one meta-batch of
# one memory batch keeps its code path (the inner steps, both Reptile interpolations) at fine-tuning's cost.
# X-DER's SupCon term adds two strong views of 64 + 64 samples to every step: 8 + 8 keep its code path.
CHEAPER = {
    "mer": ["strategy.batches_per_example=1", "strategy.replay_batches=1"],
    "xder": ["strategy.simclr_batch_size=8"],
}


def strategy_class(name: str):
    target = yaml.safe_load((STRATEGY_DIR / f"{name}.yaml").read_text())["_target_"]
    module, _, attribute = target.rpartition(".")
    return getattr(importlib.import_module(module), attribute)


def train(run_dir: Path, strategy: str, overrides: list[str]) -> int:
    return main(
        [
            "train",
            f"hydra.run.dir={run_dir}",
            "progress=false",
            "train.on_nonfinite=stop",
            f"strategy={strategy}",
            *CHEAPER.get(strategy, []),
            *overrides,
        ]
    )


def assert_trained_finite(run_dir: Path, scenario: str = "class_il") -> None:
    """The run finished; every epoch's loss and every accuracy figure is a finite number."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["run"]["status"] == "finished"
    with open(run_dir / "scalars.csv") as handle:
        losses = [float(row["value"]) for row in csv.DictReader(handle) if row["name"] == "epoch/loss"]
    assert losses and all(math.isfinite(loss) for loss in losses), losses
    figures = metrics[scenario]
    matrix = figures["accuracy_matrix"]
    assert len(matrix) == metrics["run"]["n_tasks"]
    values = [
        *(a for row in matrix for a in row),
        *figures["average_accuracy"],
        figures["final_average_accuracy"],
    ]
    if figures.get("average_forgetting") is not None:
        values.append(figures["average_forgetting"])
    assert all(math.isfinite(v) and -1.0 <= v <= 1.0 for v in values), figures


# the default epochs (10 per task) are the slow half of the sweep: run with `-m slow`, and in CI
@pytest.mark.parametrize(
    "epochs", [1, pytest.param(None, marks=pytest.mark.slow)], ids=["1_epoch", "default_epochs"]
)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_digits(tmp_path, strategy, epochs):
    overrides = [] if epochs is None else [f"epochs={epochs}"]
    assert train(tmp_path, strategy, overrides) == 0
    assert_trained_finite(tmp_path)
