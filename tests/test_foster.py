"""FOSTER: the class-balanced weights, the logit-adjusted cross-entropy and the (balanced) distillation by hand,
what it achieves on digits at the cost of one extractor, mixed precision, and exact resume mid-boosting."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_resumes_exactly, run_experiment

from incr_cli.strategies.foster import class_balanced_weights, distillation, logit_adjusted_cross_entropy


# ----------------------------------------------------------------------------------------- the maths, by hand
def test_class_balanced_weights_by_hand():
    # counts (1, 3), beta 1/2: (1 - beta) / (1 - beta^n) = (1/2) / (1/2) = 1 and (1/2) / (7/8) = 4/7;
    # their sum 11/7 scaled to the number of classes, 2: (14/11, 8/11). The rarer class weighs more.
    weights = class_balanced_weights(torch.tensor([1, 3]), beta=0.5)
    assert weights.tolist() == pytest.approx([14 / 11, 8 / 11], rel=1e-6)
    # a class without samples counts as one sample instead of dividing by zero
    assert class_balanced_weights(torch.tensor([0, 3]), beta=0.5).tolist() == pytest.approx([14 / 11, 8 / 11])


def test_logit_adjusted_cross_entropy_by_hand():
    # logits (2, 1), label 0, weights (2, 1/2): the logits divided by the weights are (1, 2), so
    # CE = -log(e^1 / (e^1 + e^2)) = log(1 + e) = 1.313262, against log(1 + e^-1) = 0.313262 unadjusted:
    # the under-represented class 0 (the larger weight) must reach a larger raw logit to be as confident.
    logits, y = torch.tensor([[2.0, 1.0]]), torch.tensor([0])
    loss = logit_adjusted_cross_entropy(logits, y, torch.tensor([2.0, 0.5]))
    assert math.log(1 + math.e) == pytest.approx(1.313262, abs=1e-6)
    assert loss.item() == pytest.approx(math.log(1 + math.e), rel=1e-6)
    assert logit_adjusted_cross_entropy(logits, y, torch.ones(2)).item() == pytest.approx(
        math.log(1 + math.exp(-1))
    )


def test_distillation_and_balanced_distillation_by_hand():
    # T = 2. Sample 1: teacher logits (0, 0) -> q = (1/2, 1/2); student (2 ln 3, 0) -> softmax((ln 3, 0)) = (3/4, 1/4).
    #   KL(q || p) = 1/2 ln((1/2) / (3/4)) + 1/2 ln((1/2) / (1/4)) = 1/2 ln(4/3) = 0.143841.
    #   Balanced with weights (3, 1): q_w = (3/2, 1/2) / 2 = (3/4, 1/4) = p, so KL = 0.
    # Sample 2: teacher and student both (1, 3): KL = 0 either way. Batch mean: 0.143841 / 2 = 0.071921.
    student = torch.tensor([[2 * math.log(3), 0.0], [1.0, 3.0]])
    teacher = torch.tensor([[0.0, 0.0], [1.0, 3.0]])
    expected = 0.5 * math.log(4 / 3) / 2
    assert expected == pytest.approx(0.071921, abs=1e-6)
    assert distillation(student, teacher, temperature=2.0).item() == pytest.approx(expected, rel=1e-6)
    balanced = distillation(student, teacher, temperature=2.0, class_weights=torch.tensor([3.0, 1.0]))
    # sample 2 under weights (3, 1): q = softmax((1/2, 3/2)) re-weighted is no longer p, so compute it:
    # q = (1, e) / (1 + e) -> (3, e) / (3 + e); p = (1, e) / (1 + e).
    e = math.e
    q, p = (3 / (3 + e), e / (3 + e)), (1 / (1 + e), e / (1 + e))
    second = sum(qi * math.log(qi / pi) for qi, pi in zip(q, p, strict=True))
    assert balanced.item() == pytest.approx((0.0 + second) / 2, rel=1e-5)


# ----------------------------------------------------------------------------------------- digits
def test_foster_beats_finetune_in_class_il_on_digits_with_one_extractor(tmp_path):
    # Digits, 5 tasks, 3 epochs of boosting and 3 of compression, memory 200 (herding). Class-IL final average
    # accuracy: seed 0: FOSTER 0.816, finetune 0.101; seed 1: FOSTER 0.826, finetune 0.099.
    # (10 epochs, seed 0: FOSTER 0.947.)
    settings = ["hardware=cpu", "hardware.num_threads=1", "seed=0", "epochs=3"]
    finetune = run_experiment(tmp_path / "finetune", ["strategy=finetune", *settings])
    foster = run_experiment(tmp_path / "foster", ["strategy=foster", *settings])
    assert foster["class_il"]["final_average_accuracy"] > finetune["class_il"]["final_average_accuracy"] + 0.5
    # compressed back to one extractor after every task: the same network as finetune's, task by task
    for key in ("parameters", "model_bytes"):
        assert [row[key] for row in foster["per_task"]] == [row[key] for row in finetune["per_task"]]


def test_foster_trains_under_mixed_precision(tmp_path):
    metrics = run_experiment(
        tmp_path / "run", ["strategy=foster", "hardware=amp", "epochs=2", "dataset.n_tasks=2"]
    )
    assert metrics["run"]["status"] == "finished"
    assert metrics["class_il"]["final_average_accuracy"] > 0.7  # measured 0.872 (bf16 autocast on CPU)


def test_foster_resumes_exactly_after_sigterm_while_boosting_task_2(tmp_path):
    # 9 steps per epoch in task 1, 16 in task 2 (288 samples + 200 in memory): step 30 is in task 2's
    # boosting. The second extractor, widened head, new extractor's classifier, the old head and the class
    # weights must come back, and the compression that follows must then match the uninterrupted run.
    assert_resumes_exactly(tmp_path, ["strategy=foster", "epochs=2"], fault="step:30:SIGTERM")
