"""Weight Aligning: the aligning factor against a value computed by hand, what aligning does to the bias towards
new classes on digits, mixed precision, and exact resume."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_resumes_exactly, final_accuracy, old_class_bias, run_experiment
from test_lwf import two_pixel_lwf

from incr_cli.data.batches import Batch
from incr_cli.memory import Memory
from incr_cli.strategies.wa import WeightAligning, align_weights


def test_weight_aligning_factor_by_hand():
    # Two old classes and two new ones.
    # Old rows (3, 4) and (0, 1): norms 5 and 1, mean 3. New rows (6, 8) and (0, 2): norms 10 and 2, mean 6.
    # gamma = 3 / 6 = 0.5; the new rows become (3, 4) and (0, 1), the old ones stay.
    weight = torch.tensor([[3.0, 4.0], [0.0, 1.0], [6.0, 8.0], [0.0, 2.0]])
    gamma = align_weights(weight, n_old=2)
    assert gamma == pytest.approx(0.5)
    assert torch.equal(weight, torch.tensor([[3.0, 4.0], [0.0, 1.0], [3.0, 4.0], [0.0, 1.0]]))
    # after aligning, both groups have the same mean norm: a second alignment changes nothing
    assert align_weights(weight, n_old=2) == pytest.approx(1.0)


def test_aligned_head_is_less_biased_towards_new_classes_on_digits(tmp_path, monkeypatch):
    # The same network measured just before and just after aligning, at the end of the last task (digits,
    # 5 tasks, 10 epochs, memory 50 so that the old classes are few in the training set). Old-class test
    # samples predicted as a new class, and old-class accuracy, before -> after:
    # seed 0: 0.483 -> 0.285, 0.503 -> 0.688 (gamma 0.88); seed 1: 0.406 -> 0.226, 0.569 -> 0.747 (0.90).
    # Final class-IL: WA 0.736 (seed 0), 0.786 (seed 1); finetune 0.200.
    measured = []
    after_task = WeightAligning.after_task

    def measuring_after_task(self, task):
        before = old_class_bias(self) if self.old_classes else None
        after_task(self, task)
        if before is not None:
            measured.append((before, old_class_bias(self), self.gammas[-1]))

    monkeypatch.setattr(WeightAligning, "after_task", measuring_after_task)
    settings = ["hardware=cpu", "hardware.num_threads=1", "seed=0"]
    wa = run_experiment(tmp_path / "wa", ["strategy=wa", "strategy.memory.size=50", *settings])
    (as_new_before, accuracy_before), (as_new_after, accuracy_after), gamma = measured[-1]
    assert gamma < 1  # the new classes' weights were the longer ones
    assert as_new_after < as_new_before - 0.1
    assert accuracy_after > accuracy_before + 0.1
    finetune = run_experiment(tmp_path / "finetune", ["strategy=finetune", *settings])
    assert final_accuracy(wa) > final_accuracy(finetune) + 0.3


def test_wa_trains_under_mixed_precision_with_a_clipped_bias_free_head(tmp_path):
    metrics = run_experiment(
        tmp_path / "run", ["strategy=wa", "hardware=amp", "epochs=3", "dataset.n_tasks=2"]
    )
    assert metrics["run"]["status"] == "finished"
    assert final_accuracy(metrics) > 0.5
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert (state["model"]["head.weight"] >= 0).all()
    assert (state["model"]["head.bias"] == 0).all()
    assert len(state["strategy"]["gammas"]) == 1


def test_wa_resumes_exactly_after_sigterm(tmp_path):
    # steps per task with 2 epochs: 18, 32, 32, 32, 32; step 60 is in task 3: the aligned weights, the frozen
    # copy of the task-2 network and the memory (with its stream rows) must come back from the checkpoint
    assert_resumes_exactly(tmp_path, ["strategy=wa", "epochs=2"], fault="step:60:SIGTERM")


def test_first_stage_loss_weighs_distillation_and_cross_entropy_by_the_class_shares():
    # BiC's and WA's first stage, L = lambda * KD + (1 - lambda) * CE, lambda = old / seen classes = 2 / 3, KD
    # the soft cross-entropy at T = 2 (the KL: the same gradients), no T^2. Same batch and networks as LwF's
    # hand test: CE ln 3 per sample, KL batch mean (3/4 ln(3/2) - 1/4 ln 2) / 2.
    kl = (0.75 * math.log(1.5) - 0.25 * math.log(2)) / 2
    batch = Batch(torch.tensor([[1, 0], [0, 1]], dtype=torch.uint8).reshape(2, 1, 1, 2), torch.tensor([2, 0]))
    wa = two_pixel_lwf(WeightAligning(Memory(10, "class_balanced")))
    assert wa.loss(batch).item() == pytest.approx(2 / 3 * kl + 1 / 3 * math.log(3), rel=1e-6)
