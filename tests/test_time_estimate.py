"""A long run on the CPU says so at its start: real steps of its model, timed on a copy, times the steps it
will make; the measurement leaves the run's results exactly as they would be without it."""

from __future__ import annotations

import pytest
import torch
from conftest import run_experiment

from incr_cli import estimate

QUICK = ["dataset=digits", "debug=quick", "hardware=cpu", "hardware.num_threads=1", "seed=0"]


def test_the_steps_a_run_makes_and_the_time_they_take():
    # three epochs of two tasks: 100 samples in 4 batches of 32, 65 samples in 3
    assert estimate.planned_steps([100, 65], batch_size=32, epochs=3) == 21
    message = estimate.long_run_warning(step_seconds=0.25, steps=12_000, epochs=10)  # 3000 s
    assert message.startswith("training on the CPU will take at least 50 minutes: 12000 steps at 250 ms each")
    assert "epochs=1 or debug=quick (about 5 minutes)" in message and "come on top" in message
    assert "at least 4.2 hours" in estimate.long_run_warning(0.5, 30_000, 10)
    assert "at least 3.5 days" in estimate.long_run_warning(3.0, 100_800, 50)
    one_epoch = estimate.long_run_warning(1.0, 2_000, epochs=1)
    assert "epochs=1" not in one_epoch and "a GPU (hardware=gpu), a smaller model or fewer tasks" in one_epoch
    # 30 minutes or less is said nowhere
    assert estimate.long_run_warning(0.1, 18_000, 10) is None
    assert estimate.long_run_warning(0.09, 18_000, 10) is None


def log_lines(run_dir) -> list[str]:
    return [line for line in (run_dir / "train.log").read_text().splitlines() if line.startswith("[")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """The same short CPU run twice: as it is (under MIN_STEPS: not measured), and with its steps measured and
    the estimate logged. Batch norm (running statistics), random crops (the run's generator) and SGD with
    momentum (optimizer state) would all differ if the measured steps touched the run's own objects."""
    root = tmp_path_factory.mktemp("estimate")
    settings = [
        *QUICK,
        "model=resnet32",
        "model.width=2",
        "dataset.n_tasks=1",
        "batch_size=64",
        "dataset.augment.crop_padding=1",
    ]
    with pytest.MonkeyPatch.context() as patch:

        def fail(*args, **kwargs):
            raise AssertionError(f"a run under MIN_STEPS={estimate.MIN_STEPS} steps is not measured")

        patch.setattr(estimate, "step_seconds", fail)
        plain = run_experiment(root / "plain", settings)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(estimate, "MIN_STEPS", 0)
        patch.setattr(estimate, "WARN_SECONDS", 0)
        measured = run_experiment(root / "measured", settings)
    return {"plain": plain, "measured": measured, "root": root}


def test_a_long_cpu_run_says_so_before_its_first_task(runs):
    steps = sum(t["steps"] for t in runs["measured"]["per_task"])
    lines = log_lines(runs["root"] / "measured")
    assert "run directory" in lines[0]
    assert "[WARNING]" in lines[1] and "training on the CPU will take at least" in lines[1]
    assert f": {steps} steps at " in lines[1] and "epochs=1" not in lines[1]  # debug=quick: one epoch already
    assert "task 1/1" in lines[2]
    assert not any("training on the CPU" in line for line in log_lines(runs["root"] / "plain"))


def test_the_measurement_leaves_the_run_bit_identical(runs):
    for scenario in ("class_il", "task_il"):
        assert runs["measured"][scenario]["accuracy_matrix"] == runs["plain"][scenario]["accuracy_matrix"]
    weights = [
        torch.load(runs["root"] / run / "checkpoints" / "last.pt", weights_only=True)["model"]
        for run in ("plain", "measured")
    ]
    for key, value in weights[0].items():
        assert torch.equal(weights[1][key], value), key
