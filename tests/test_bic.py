"""Bias Correction: the correction layer and its fit against values computed by hand, what the correction does to
the bias towards new classes on digits, mixed precision, and exact resume."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_resumes_exactly, final_accuracy, old_class_bias, run_experiment

from incr_cli.memory import Memory
from incr_cli.strategies.bic import BiasCorrection, fit_bias_correction


def test_bias_correction_fit_by_hand():
    # One old class (logit fixed at 0) and one new class with logit o; corrected: q = (0, alpha * o + beta),
    # so P(new) = sigmoid(alpha * o + beta): logistic regression on o with slope alpha and intercept beta.
    # Two samples with o = 0, one of each class: the best sigmoid(beta) is 1/2, beta = 0.
    # Four samples with o = 1, three new and one old: the best sigmoid(alpha + beta) is 3/4, alpha = ln 3.
    # (Both groups can be fitted exactly, so this is the minimum of the cross-entropy.)
    logits = torch.tensor([[0.0, 0.0]] * 2 + [[0.0, 1.0]] * 4)
    labels = torch.tensor([0, 1, 1, 1, 1, 0])
    alpha, beta = fit_bias_correction(logits, labels, first_new=1, epochs=3000, lr=0.01)
    assert alpha == pytest.approx(math.log(3), abs=1e-3)
    assert beta == pytest.approx(0.0, abs=1e-3)
    # no steps: the layer stays the identity
    assert fit_bias_correction(logits, labels, first_new=1, epochs=0, lr=0.01) == (1.0, 0.0)


def test_bias_correction_layers_apply_per_task_by_hand():
    # Classes 0, 1 (task 1, no correction), 2, 3 (task 2: alpha 0.5, beta -1), 4 (task 3: alpha 2, beta 1).
    strategy = BiasCorrection(Memory(size=10))
    strategy.bias_layers = torch.tensor([[1.0, 0.0], [0.5, -1.0], [2.0, 1.0]])
    strategy.task_of_class = torch.tensor([0, 0, 1, 1, 2])
    logits = torch.tensor([[2.0, 4.0, 6.0, 8.0, 3.0]])
    # (2, 4) unchanged; 0.5 * (6, 8) - 1 = (2, 3); 2 * 3 + 1 = 7
    assert torch.equal(strategy.calibrated(logits), torch.tensor([[2.0, 4.0, 2.0, 3.0, 7.0]]))
    # a head that has not grown to all classes yet is corrected over its own columns
    assert torch.equal(strategy.calibrated(logits[:, :3]), torch.tensor([[2.0, 4.0, 2.0]]))


def test_bias_correction_makes_the_head_less_biased_towards_new_classes_on_digits(tmp_path, monkeypatch):
    # The same network measured just before and just after stage 2 at the end of the last task (digits,
    # 5 tasks, 10 epochs, memory 50 so that the old classes are few in the training set; the held-out part
    # is then 1 exemplar per old class and 1 sample per new class). Old-class test samples predicted as a
    # new class, and old-class accuracy, before -> after:
    # seed 0: 0.497 -> 0.062, 0.500 -> 0.899 (alpha 0.61, beta -0.72);
    # seed 1: 0.535 -> 0.083, 0.458 -> 0.889 (alpha 0.74, beta -0.98).
    # Final class-IL: BiC 0.863 (seed 0), 0.886 (seed 1); finetune 0.200.
    measured = []
    after_task = BiasCorrection.after_task

    def measuring_after_task(self, task):
        before = old_class_bias(self) if self.old_classes else None
        after_task(self, task)
        if before is not None:
            measured.append((before, old_class_bias(self), self.bias_layers[task.id].tolist()))

    monkeypatch.setattr(BiasCorrection, "after_task", measuring_after_task)
    settings = ["hardware=cpu", "hardware.num_threads=1", "seed=0"]
    bic = run_experiment(tmp_path / "bic", ["strategy=bic", "strategy.memory.size=50", *settings])
    (as_new_before, accuracy_before), (as_new_after, accuracy_after), (alpha, beta) = measured[-1]
    assert alpha < 1 and beta < 0  # the new classes' logits were too large
    assert as_new_after < as_new_before - 0.2
    assert accuracy_after > accuracy_before + 0.2
    finetune = run_experiment(tmp_path / "finetune", ["strategy=finetune", *settings])
    assert final_accuracy(bic) > final_accuracy(finetune) + 0.4


def test_bic_trains_under_mixed_precision(tmp_path):
    metrics = run_experiment(
        tmp_path / "run", ["strategy=bic", "hardware=amp", "epochs=1", "dataset.n_tasks=2"]
    )
    assert metrics["run"]["status"] == "finished"
    assert final_accuracy(metrics) > 0.5
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["strategy"]
    assert state["bias_layers"][1].tolist() != [1.0, 0.0]  # stage 2 ran after task 2


def test_bic_resumes_exactly_after_sigterm(tmp_path):
    # steps per task with 2 epochs: 18, 28, 30, 30, 30; step 60 is in task 3: task 2's (alpha, beta), task 3's
    # held-out split, the frozen copy of the task-2 network and the memory must come back from the checkpoint
    assert_resumes_exactly(tmp_path, ["strategy=bic", "epochs=2"], fault="step:60:SIGTERM")
