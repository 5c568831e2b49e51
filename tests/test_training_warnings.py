"""A task that learns nothing is reported, not hidden: the log, the console and metrics.json name it, with the
likely causes and the override to try; healthy runs report nothing."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
from conftest import assert_resumes_exactly, run_experiment
from omegaconf import OmegaConf

from incr_cli.data.stream import Task
from incr_cli.engine import Run


def warnings_of(metrics: dict) -> list[list[str]]:
    return [task["warnings"] for task in metrics["per_task"]]


def logged_warnings(run_dir) -> list[str]:
    return [line for line in (run_dir / "train.log").read_text().splitlines() if "[WARNING]" in line]


# ------------------------------------------------------------------ the rules, on a stand-in for the run
def check(task_il: float, loss: tuple | None, n_classes: int = 2, epochs: int = 10, lr=0.05, online=False):
    """Run.training_warnings for task 2 of a stream whose tasks have `n_classes` classes each."""
    cfg = OmegaConf.create(
        {
            "evaluate_on": "test",
            "optimizer": {"lr": lr},
            "dataset": {"normalize": False},
            "train": {"online": online},
        }
    )
    run = SimpleNamespace(
        cfg=cfg, epochs=epochs, stream=SimpleNamespace(class_names=[f"c{i}" for i in range(20)])
    )
    task = Task(1, list(range(n_classes, 2 * n_classes)), None, None, None)
    return Run.training_warnings(run, task, [1.0, task_il], loss)


def test_accuracy_at_most_5_points_above_chance_is_reported():
    assert check(0.55, (1.0, 0.2))  # 2 classes: chance 0.5
    assert check(0.0, (1.0, 0.2))  # below chance too
    assert not check(0.56, (1.0, 0.2))
    assert check(0.38, (1.0, 0.2), n_classes=3)  # chance 1/3
    assert not check(0.39, (1.0, 0.2), n_classes=3)


def test_a_task_of_one_class_is_not_judged_by_accuracy():
    assert not check(1.0, (1.0, 0.2), n_classes=1)


def test_a_loss_that_fell_by_less_than_one_percent_is_reported():
    # (mean of the first epoch, lowest mean of a later epoch)
    assert check(0.9, (1.0, 0.991))
    assert check(0.9, (1.0, 1.5))  # rose
    assert check(0.9, (1.0, math.nan))  # a non-finite mean counts as not falling
    assert not check(0.9, (1.0, 0.989))
    assert not check(0.9, None)  # nothing trained in the loop (GDumb trains in after_task)
    assert not check(0.9, (None, 0.5))  # resumed from a checkpoint that predates the check


def test_the_message_names_the_task_the_findings_the_causes_and_the_override():
    (message,) = check(0.5, (0.7, 0.8), lr=5)
    assert message.startswith("task 2 (classes c2, c3) may have learned nothing: ")
    assert (
        "test accuracy among its own classes is 0.500, no more than 5 points above chance (0.500" in message
    )
    assert "training loss did not fall (mean 0.7 in the first epoch, 0.8 at best in a later one)" in message
    assert "a learning rate too high for this model (try optimizer.lr=0.5)" in message
    assert "dataset.normalize=true" in message and "too few epochs (try epochs=20)" in message
    (message,) = check(0.9, (0.7, 0.8), epochs=1, lr=0, online=True)
    assert "over the first tenth of its batches" in message
    assert "a learning rate of 0 (set a positive optimizer.lr)" in message and "train.online=true" in message


# ------------------------------------------------------------------ whole runs on digits
def test_a_run_with_a_learning_rate_far_too_high_finishes_and_names_every_failed_task(tmp_path, capsys):
    run_dir = tmp_path / "run"
    metrics = run_experiment(run_dir, ["optimizer.lr=5", "epochs=3"])
    assert metrics["run"]["status"] == "finished"
    out = capsys.readouterr().out
    warned = [k for k, found in enumerate(warnings_of(metrics)) if found]
    assert warned, "lr=5 trains every task to chance"
    logged = logged_warnings(run_dir)
    for k in warned:
        (message,) = metrics["per_task"][k]["warnings"]
        assert message.startswith(f"task {k + 1} (classes ") and "optimizer.lr=0.5" in message
        assert any(line.endswith(message) for line in logged)
        assert f"warning: {message}" in out.replace(
            "\n", ""
        )  # the end-of-run recap, wrapped by the terminal width


def test_a_learning_rate_of_zero_is_reported_as_a_loss_that_did_not_fall(tmp_path):
    run_dir = tmp_path / "run"
    metrics = run_experiment(run_dir, ["strategy=finetune", "optimizer.lr=0", "epochs=2"])
    for k, found in enumerate(warnings_of(metrics)):
        (message,) = found
        assert f"task {k + 1} " in message and "training loss did not fall" in message
    assert len(logged_warnings(run_dir)) == len(metrics["per_task"])


@pytest.mark.parametrize("overrides", [[], ["strategy=finetune"]], ids=["default", "finetune"])
def test_a_healthy_digits_run_reports_nothing(tmp_path, capsys, overrides):
    run_dir = tmp_path / "run"
    metrics = run_experiment(run_dir, overrides)
    assert warnings_of(metrics) == [[]] * 5
    assert not logged_warnings(run_dir)
    assert "warning" not in capsys.readouterr().out


def test_the_warnings_survive_an_interruption_mid_task(tmp_path):
    # one task of 45 batches, one epoch: its loss over its first tenth (4 batches) is kept in the checkpoint
    # written at step 10, for the comparison with its last tenth at the end of the task
    overrides = [
        "strategy=finetune",
        "dataset.n_tasks=1",
        "optimizer.lr=5",
        "epochs=1",
        "train.on_nonfinite=skip_batch",
    ]
    resumed = assert_resumes_exactly(tmp_path, overrides, "step:10:SIGTERM")
    expected = json.loads((tmp_path / "uninterrupted" / "metrics.json").read_text())
    assert warnings_of(resumed) == warnings_of(expected)
    assert "over the first tenth of its batches" in expected["per_task"][0]["warnings"][0]
