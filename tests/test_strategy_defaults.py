"""Every strategy config, as shipped, trains through the built-in streams without a non-finite loss.

The strategies are discovered from configs/strategy/, so a new method is swept too. Streams: the default digits
(class-IL) at 1 epoch and at the default epochs; permuted and rotated digits (domain-IL, 5 tasks) at 1 epoch,
where a strategy that is not made for domain-IL must refuse with the one-line config error; Split Fashion-MNIST
(the MLP protocol's settings) at 1 epoch on the full data, marked slow.
"""

from __future__ import annotations

import csv
import importlib
import json
import math
from pathlib import Path

import pytest
import yaml
from conftest import needs_fashion_mnist

from incr_cli.cli import main

STRATEGY_DIR = Path(__file__).resolve().parent.parent / "configs" / "strategy"
STRATEGIES = sorted(path.stem for path in STRATEGY_DIR.glob("*.yaml"))
# MER runs s * k SGD steps per batch (10 x 11 by default, about 100 times fine-tuning's work): one meta-batch of
# one memory batch keeps its code path (the inner steps, both Reptile interpolations) at fine-tuning's cost.
CHEAPER = {"mer": ["strategy.batches_per_example=1", "strategy.replay_batches=1"]}
DOMAINS = ["dataset.scenario=domain_il", "dataset.n_tasks=5"]


def strategy_class(name: str):
    target = yaml.safe_load((STRATEGY_DIR / f"{name}.yaml").read_text())["_target_"]
    module, _, attribute = target.rpartition(".")
    return getattr(importlib.import_module(module), attribute)


def train(run_dir: Path, strategy: str, overrides: list[str]) -> int:
    return main(["train", f"hydra.run.dir={run_dir}", "progress=false", "train.on_nonfinite=stop",
                 f"strategy={strategy}", *CHEAPER.get(strategy, []), *overrides])  # fmt: skip


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


@pytest.mark.parametrize("epochs", [1, None], ids=["1_epoch", "default_epochs"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_digits(tmp_path, strategy, epochs):
    overrides = [] if epochs is None else [f"epochs={epochs}"]
    assert train(tmp_path, strategy, overrides) == 0
    assert_trained_finite(tmp_path)


@pytest.mark.parametrize("domains", ["permuted", "rotated"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_domain_il_digits(tmp_path, capsys, strategy, domains):
    status = train(tmp_path, strategy, [*DOMAINS, f"dataset.domains={domains}", "epochs=1"])
    if "domain_il" in strategy_class(strategy).scenarios:
        assert status == 0
        assert_trained_finite(tmp_path)
    else:  # refused before training: exit status 2 and one line naming the scenario, no traceback
        captured = capsys.readouterr()
        message = (captured.err + captured.out).strip()
        assert status == 2
        assert len(message.splitlines()) == 1 and "domain_il" in message, message
        assert not (tmp_path / "metrics.json").exists()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """Fashion-MNIST is read from Debian's folder; data.root only receives the decoded-tensor cache."""
    return tmp_path_factory.mktemp("fashion-data")


@pytest.mark.slow
@needs_fashion_mnist
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fashion_mnist(tmp_path, data_root, strategy):
    # incr's data sets have no subsampling option: the full 60,000 images, one epoch per task.
    overrides = ["experiment=split_fashion_mnist", "epochs=1", f"data.root={data_root}"]
    assert train(tmp_path, strategy, overrides) == 0
    assert_trained_finite(tmp_path)
