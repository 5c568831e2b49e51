"""The accuracy matrix -> the figures papers report, checked against small matrices worked out by hand."""

from __future__ import annotations

import pytest
import torch

from incr_cli import metrics

# R[i][j]: accuracy on task j after training tasks 0..i. Built so that every formula has a trap:
# task 0 improves after task 1 (its best is not the diagonal), task 1 recovers in the last row (negative
# forgetting, so the max must leave out the last row), and the upper triangle (the untrained future tasks)
# is non-zero, with R[j-1][j] the only entries FWT may read.
R = [
    [0.5, 0.3, 0.6, 0.6],
    [0.7, 0.8, 0.4, 0.6],
    [0.4, 0.6, 0.9, 0.2],
    [0.3, 0.9, 0.5, 1.0],
]
B = [0.1, 0.2, 0.3, 0.25]  # the untrained model's accuracy on each task


def test_average_accuracy_after_each_task_averages_the_tasks_seen():
    # A_0 = 0.5
    # A_1 = (0.7 + 0.8) / 2 = 0.75
    # A_2 = (0.4 + 0.6 + 0.9) / 3 = 1.9 / 3
    # A_3 = (0.3 + 0.9 + 0.5 + 1.0) / 4 = 2.7 / 4 = 0.675
    assert metrics.average_accuracy(R) == pytest.approx([0.5, 0.75, 1.9 / 3, 0.675])


def test_average_incremental_accuracy_is_the_mean_of_the_average_accuracies():
    # (0.5 + 0.75 + 1.9/3 + 0.675) / 4 = (1.925 + 0.633333) / 4 = 2.558333 / 4
    assert metrics.average_incremental_accuracy(R) == pytest.approx((1.925 + 1.9 / 3) / 4)


def test_forgetting_is_the_drop_from_the_best_earlier_accuracy():
    # Last row i = 3; f_j = max_{l in j..2} R[l][j] - R[3][j]
    # f_0 = max(0.5, 0.7, 0.4) - 0.3 = 0.4    (the diagonal 0.5 would give 0.2)
    # f_1 = max(0.8, 0.6) - 0.9 = -0.1        (including the last row 0.9 would give 0.0)
    # f_2 = max(0.9) - 0.5 = 0.4
    assert metrics.forgetting_per_task(R) == pytest.approx([0.4, -0.1, 0.4])
    # F = (0.4 - 0.1 + 0.4) / 3 = 0.7 / 3
    assert metrics.average_forgetting(R) == pytest.approx(0.7 / 3)


def test_forgetting_of_a_run_in_progress_uses_its_last_row():
    # Two rows: f_0 = max(R[0][0]) - R[1][0] = 0.5 - 0.7 = -0.2 (task 0 got better)
    assert metrics.forgetting_per_task(R[:2]) == pytest.approx([-0.2])
    assert metrics.average_forgetting(R[:2]) == pytest.approx(-0.2)
    # Three rows: f_0 = max(0.5, 0.7) - 0.4 = 0.3, f_1 = 0.8 - 0.6 = 0.2; F = 0.25
    assert metrics.forgetting_per_task(R[:3]) == pytest.approx([0.3, 0.2])
    assert metrics.average_forgetting(R[:3]) == pytest.approx(0.25)


def test_backward_transfer_compares_the_last_row_with_the_diagonal():
    # BWT = ((0.3 - 0.5) + (0.9 - 0.8) + (0.5 - 0.9)) / 3 = (-0.2 + 0.1 - 0.4) / 3 = -0.5 / 3
    assert metrics.backward_transfer(R) == pytest.approx(-0.5 / 3)


def test_forward_transfer_compares_each_task_before_training_with_the_untrained_model():
    # FWT = ((R[0][1] - b_1) + (R[1][2] - b_2) + (R[2][3] - b_3)) / 3
    #     = ((0.3 - 0.2) + (0.4 - 0.3) + (0.2 - 0.25)) / 3 = (0.1 + 0.1 - 0.05) / 3 = 0.05
    assert metrics.forward_transfer(R, B) == pytest.approx(0.05)


def test_a_single_task_has_no_forgetting_and_no_transfer():
    row = [[0.8, 0.1, 0.0, 0.0]]
    assert metrics.average_accuracy(row) == pytest.approx([0.8])
    assert metrics.average_incremental_accuracy(row) == pytest.approx(0.8)
    assert metrics.forgetting_per_task(row) == []
    assert metrics.average_forgetting(row) is None
    assert metrics.backward_transfer(row) is None
    assert metrics.forward_transfer(row, B) is None


def test_summarize_collects_every_figure_of_one_matrix():
    summary = metrics.summarize(R, B)
    assert summary["average_accuracy"] == pytest.approx([0.5, 0.75, 1.9 / 3, 0.675])
    assert summary["final_average_accuracy"] == pytest.approx(0.675)
    assert summary["average_incremental_accuracy"] == pytest.approx((1.925 + 1.9 / 3) / 4)
    assert summary["forgetting"] == pytest.approx([0.4, -0.1, 0.4])
    assert summary["average_forgetting"] == pytest.approx(0.7 / 3)
    assert summary["bwt"] == pytest.approx(-0.5 / 3)
    assert summary["fwt"] == pytest.approx(0.05)


def test_confusion_matrix_counts_true_class_by_predicted_class():
    targets = torch.tensor([0, 0, 1, 2, 2, 2])
    predictions = torch.tensor([0, 1, 1, 2, 0, 2])
    # true 0: predicted 0 once, 1 once; true 1: predicted 1; true 2: predicted 2 twice, 0 once
    expected = torch.tensor([[1, 1, 0], [0, 1, 0], [1, 0, 2]])
    assert torch.equal(metrics.confusion_matrix(targets, predictions, 3), expected)


def test_confusion_matrix_keeps_classes_absent_from_both_sides():
    confusion = metrics.confusion_matrix(torch.tensor([0, 0]), torch.tensor([0, 0]), 4)
    assert confusion.shape == (4, 4)
    assert confusion[0, 0] == 2 and confusion.sum() == 2


def test_precision_recall_f1_are_macro_averages_over_classes():
    confusion = torch.tensor([[1, 1, 0], [0, 1, 0], [1, 0, 2]])
    # TP = (1, 1, 2); predicted (column sums) = (2, 2, 2); actual (row sums) = (2, 1, 3)
    # P = (1/2, 1/2, 2/2) -> mean 2/3
    # R = (1/2, 1/1, 2/3) -> mean (0.5 + 1 + 2/3) / 3 = 13/18
    # F1 = (2*.5*.5/1, 2*.5*1/1.5, 2*1*(2/3)/(5/3)) = (0.5, 2/3, 0.8) -> mean (0.5 + 2/3 + 0.8) / 3
    scores = metrics.precision_recall_f1(confusion)
    assert scores["precision"] == pytest.approx(2 / 3)
    assert scores["recall"] == pytest.approx(13 / 18)
    assert scores["f1"] == pytest.approx((0.5 + 2 / 3 + 0.8) / 3)


def test_a_class_never_predicted_has_precision_zero():
    targets = torch.tensor([0, 0, 1, 1, 2])
    predictions = torch.tensor([0, 0, 0, 1, 0])  # class 2 is never predicted
    confusion = metrics.confusion_matrix(targets, predictions, 3)
    assert confusion.tolist() == [[2, 0, 0], [1, 1, 0], [1, 0, 0]]
    # TP = (2, 1, 0); predicted = (4, 1, 0); actual = (2, 2, 1)
    # P = (2/4, 1/1, 0 [no predictions]) -> mean 0.5 (0.75 if class 2 were left out)
    # R = (2/2, 1/2, 0/1) -> mean 0.5
    # F1 = (2*.5*1/1.5, 2*1*.5/1.5, 0) = (2/3, 2/3, 0) -> mean 4/9
    scores = metrics.precision_recall_f1(confusion)
    assert scores["precision"] == pytest.approx(0.5)
    assert scores["recall"] == pytest.approx(0.5)
    assert scores["f1"] == pytest.approx(4 / 9)


def test_perfect_predictions_score_one():
    confusion = metrics.confusion_matrix(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 2, 2]), 3)
    assert metrics.precision_recall_f1(confusion) == pytest.approx(
        {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    )
