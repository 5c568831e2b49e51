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


def test_bias_correction_fit_with_the_authors_l2_on_beta_by_hand():
    # Both logits 0 for every sample, 3 of 4 samples new: the fit sets sigmoid(beta) against the penalty
    # l2 * beta^2 / 2, whose minimum solves sigmoid(beta) - 3/4 + l2 * beta = 0 (alpha has no effect at o = 0).
    logits = torch.zeros(4, 2)
    labels = torch.tensor([1, 1, 1, 0])
    low, high = 0.0, 2.0  # the root, by bisection
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if 1 / (1 + math.exp(-middle)) - 0.75 + 0.5 * middle < 0 else (low, middle)
    _, beta = fit_bias_correction(logits, labels, first_new=1, epochs=4000, lr=0.01, beta_l2=0.5)
    assert beta == pytest.approx(low, abs=1e-3)
    assert low < math.log(3) - 0.3  # the penalty matters here (unpenalised: ln 3)


def layered_bic(bias_layers: str) -> BiasCorrection:
    # Classes 0, 1 (task 1, no correction), 2, 3 (task 2: alpha 0.5, beta -1), 4 (task 3: alpha 2, beta 1,
    # fitted last).
    strategy = BiasCorrection(Memory(size=10), bias_layers=bias_layers)
    strategy.bias_layers = torch.tensor([[1.0, 0.0], [0.5, -1.0], [2.0, 1.0]])
    strategy.task_of_class = torch.tensor([0, 0, 1, 1, 2])
    strategy.latest = 2
    return strategy


def test_bias_correction_layers_apply_per_task_by_hand():
    logits = torch.tensor([[2.0, 4.0, 6.0, 8.0, 3.0]])
    every = layered_bic("all")  # PyCIL: every task's layer acts, in training too
    # (2, 4) unchanged; 0.5 * (6, 8) - 1 = (2, 3); 2 * 3 + 1 = 7
    assert torch.equal(every.calibrated(logits), torch.tensor([[2.0, 4.0, 2.0, 3.0, 7.0]]))
    assert torch.equal(every.trained(logits), every.calibrated(logits))
    # a head that has not grown to all classes yet is corrected over its own columns
    assert torch.equal(every.calibrated(logits[:, :3]), torch.tensor([[2.0, 4.0, 2.0]]))
    latest = layered_bic("latest")  # the authors: the last fitted layer only; the trained network raw
    assert torch.equal(latest.calibrated(logits), torch.tensor([[2.0, 4.0, 6.0, 8.0, 7.0]]))
    assert torch.equal(latest.trained(logits), logits)


def held_out_run(tmp_path, overrides):
    """A digits run of BiC recording, per task, the rows trained on, the validation rows and the memory."""
    seen = []
    training_indices, after_task = BiasCorrection.training_indices, BiasCorrection.after_task

    def recording_training_indices(self, task):
        rows = training_indices(self, task)
        seen.append(
            {
                "trained": set(rows.tolist()),
                "val": self.val_index.tolist(),
                "val_rows": self.val_rows.tolist(),
            }
        )
        return rows

    def recording_after_task(self, task):
        after_task(self, task)
        seen[-1]["memory"] = set(self.memory.extras["index"].tolist())
        seen[-1]["held_out"] = self.held_out.tolist()
        seen[-1]["labels"] = self.stream.train_y

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(BiasCorrection, "training_indices", recording_training_indices)
        patch.setattr(BiasCorrection, "after_task", recording_after_task)
        run_experiment(tmp_path, ["strategy=bic", "epochs=1", "strategy.memory.size=100", *overrides])
    return seen


def test_held_out_validation_is_never_trained_on_nor_kept(tmp_path):
    # memory 100, val_fraction 0.1: 5 per class held out for tasks 1-2 (0.1 * 100 / 2), 2 for task 3's
    # classes (0.1 * 100 / 4), 1 after; each stage 2 validates on the first k of every seen class's
    seen = held_out_run(tmp_path, [])
    held_out = set(seen[-1]["held_out"])
    labels = seen[-1]["labels"]
    counts = torch.bincount(labels[torch.tensor(sorted(held_out))], minlength=10).tolist()
    assert counts == [5, 5, 5, 5, 2, 2, 1, 1, 1, 1]
    for task in seen:
        assert not task["trained"] & held_out
        assert not task["memory"] & held_out
        assert task["val_rows"] == []  # nothing of the memory is validation
    # task 2: 2 old classes, k = 5 of each of 4 classes; task 5: 8 old, k = 1 of each of 10
    assert sorted(torch.bincount(labels[torch.tensor(seen[1]["val"])]).tolist()) == [5, 5, 5, 5]
    assert torch.bincount(labels[torch.tensor(seen[4]["val"])], minlength=10).tolist() == [1] * 10


def test_exemplar_validation_draws_from_the_memory_each_task(tmp_path):
    # PyCIL's split: old classes validate on exemplars, left out of that task's stage 1 only
    seen = held_out_run(tmp_path, ["strategy.validation=exemplars", "strategy.bias_layers=all"])
    assert seen[-1]["held_out"] == []
    assert len(seen[1]["val_rows"]) == 2 * 5  # k = 0.1 * 100 exemplars / 2 old classes
    trained_later = set().union(*(task["trained"] for task in seen[2:]))
    assert set(seen[1]["val"]) & seen[1]["memory"]  # task 2's new validation samples may become exemplars
    assert trained_later & seen[1]["memory"]


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
