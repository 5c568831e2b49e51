"""Every regulariser with nothing but its YAML defaults on incr's default digits stream (5 tasks of 2 classes,
MLP, SGD lr 0.05 momentum 0.9, batch 32): it trains to the end without a non-finite loss, and its task-IL
accuracy ends clearly above fine-tuning's, whether trained in task-IL or in class-IL."""

from __future__ import annotations

import pytest
from conftest import run_experiment

pytestmark = pytest.mark.slow  # 15 runs of the default stream: run with `-m slow`, and in CI

REGULARISERS = ("ewc", "online_ewc", "si", "mas", "rwalk")
SETTINGS = ["seed=0", "hardware=cpu", "hardware.num_threads=1"]
TASK_IL_MARGIN = 0.01  # task-IL accuracy over fine-tuning's (0.956 here), trained in task-IL
CLASS_IL_RUN_MARGIN = 0.05  # the same figure when trained in class-IL


@pytest.fixture(scope="module")
def finetune_task_il(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("finetune_task_il")
    return run_experiment(root, ["strategy=finetune", "dataset.scenario=task_il", *SETTINGS])["task_il"]


@pytest.fixture(scope="module")
def finetune_class_il(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("finetune_class_il")
    return run_experiment(root, ["strategy=finetune", *SETTINGS])["task_il"]


@pytest.mark.parametrize("strategy", REGULARISERS)
def test_defaults_beat_finetune_in_task_il(tmp_path, finetune_task_il, strategy):
    metrics = run_experiment(tmp_path, [f"strategy={strategy}", "dataset.scenario=task_il", *SETTINGS])
    assert metrics["run"]["status"] == "finished"
    margin = metrics["task_il"]["final_average_accuracy"] - finetune_task_il["final_average_accuracy"]
    assert margin >= TASK_IL_MARGIN


@pytest.mark.parametrize("strategy", REGULARISERS)
def test_defaults_finish_one_epoch_per_task_in_class_il(tmp_path, strategy):
    # one epoch leaves the model unsure, so its Fisher and path integrals are large: the stiffest case
    metrics = run_experiment(tmp_path, [f"strategy={strategy}", "epochs=1", *SETTINGS])
    assert metrics["run"]["status"] == "finished"
    assert len(metrics["class_il"]["accuracy_matrix"]) == 5


@pytest.mark.slow
@pytest.mark.parametrize("strategy", REGULARISERS)
def test_defaults_finish_the_default_stream_in_class_il_and_keep_old_tasks(
    tmp_path, finetune_class_il, strategy
):
    metrics = run_experiment(tmp_path, [f"strategy={strategy}", *SETTINGS])
    assert metrics["run"]["status"] == "finished"
    assert len(metrics["class_il"]["accuracy_matrix"]) == 5
    # trained class-IL, scored within each task: what the penalty kept of the old tasks
    margin = metrics["task_il"]["final_average_accuracy"] - finetune_class_il["final_average_accuracy"]
    assert margin >= CLASS_IL_RUN_MARGIN
