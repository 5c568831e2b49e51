"""Accuracy matrix -> the figures continual-learning papers report.

Notation: R[i][j] is the test accuracy on task j after training on tasks 0..i (T tasks, rows may be fewer
while a run is in progress), b[j] the accuracy of the untrained model on task j. Averages over tasks are
task-weighted (each task counts once, whatever its number of test samples), as in the papers cited."""

from __future__ import annotations

from collections.abc import Sequence

import torch

Matrix = Sequence[Sequence[float]]


def _r(matrix: Matrix) -> torch.Tensor:
    return torch.as_tensor(matrix, dtype=torch.float64)


def average_accuracy(matrix: Matrix) -> list[float]:
    """A_i = 1/(i+1) * sum_{j<=i} R[i][j], after each task i (Chaudhry et al. 2018, "Riemannian Walk")."""
    r = _r(matrix)
    return [r[i, : i + 1].mean().item() for i in range(len(r))]


def average_incremental_accuracy(matrix: Matrix) -> float:
    """1/T * sum_i A_i: the mean of the average accuracies after each task (Rebuffi et al. 2017, iCaRL)."""
    accuracies = average_accuracy(matrix)
    return sum(accuracies) / len(accuracies)


def forgetting_per_task(matrix: Matrix) -> list[float]:
    """f_j = max_{l in j..i-1} R[l][j] - R[i][j] for each earlier task j < i, i the last row
    (Chaudhry et al. 2018, eq. 3): how far task j fell from its best accuracy."""
    r = _r(matrix)
    i = len(r) - 1
    return [(r[j:i, j].max() - r[i, j]).item() for j in range(i)]


def average_forgetting(matrix: Matrix) -> float | None:
    """F_i = 1/i * sum_{j<i} f_j (Chaudhry et al. 2018); undefined after the first task."""
    values = forgetting_per_task(matrix)
    return sum(values) / len(values) if values else None


def backward_transfer(matrix: Matrix) -> float | None:
    """BWT = 1/(T-1) * sum_{j<T-1} (R[T-1][j] - R[j][j]) (Lopez-Paz and Ranzato 2017, GEM, eq. 3).
    Negative values are forgetting."""
    r = _r(matrix)
    t = len(r)
    if t < 2:
        return None
    return sum((r[t - 1, j] - r[j, j]).item() for j in range(t - 1)) / (t - 1)


def forward_transfer(matrix: Matrix, initial: Sequence[float]) -> float | None:
    """FWT = 1/(T-1) * sum_{j=1}^{T-1} (R[j-1][j] - b[j]) (Lopez-Paz and Ranzato 2017, eq. 4): how much
    learning earlier tasks helps a task before it is trained on. Needs the untrained model's b."""
    r, b = _r(matrix), _r(initial)
    t = len(r)
    if t < 2:
        return None
    return sum((r[j - 1, j] - b[j]).item() for j in range(1, t)) / (t - 1)


def confusion_matrix(targets: torch.Tensor, predictions: torch.Tensor, n_classes: int) -> torch.Tensor:
    """C[a][p]: how many samples of true class a were predicted as p."""
    flat = targets.long().cpu() * n_classes + predictions.long().cpu()
    return torch.bincount(flat, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def precision_recall_f1(confusion: torch.Tensor) -> dict[str, float]:
    """Macro-averaged precision, recall and F1 over classes (Sokolova and Lapalme 2009): per class
    P = TP/(TP+FP), R = TP/(TP+FN), F1 = 2PR/(P+R), with 0 where a denominator is 0; then the mean."""
    c = confusion.to(torch.float64)
    tp = c.diagonal()
    predicted, actual = c.sum(0), c.sum(1)
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(actual > 0, tp / actual.clamp(min=1), torch.zeros_like(tp))
    denominator = precision + recall
    f1 = torch.where(
        denominator > 0, 2 * precision * recall / denominator.clamp(min=1e-12), torch.zeros_like(tp)
    )
    return {"precision": precision.mean().item(), "recall": recall.mean().item(), "f1": f1.mean().item()}


def summarize(matrix: Matrix, initial: Sequence[float]) -> dict[str, float | list[float] | None]:
    """All matrix-derived figures of one accuracy matrix (class-IL or task-IL)."""
    accuracies = average_accuracy(matrix)
    return {
        "average_accuracy": accuracies,
        "final_average_accuracy": accuracies[-1],
        "average_incremental_accuracy": average_incremental_accuracy(matrix),
        "forgetting": forgetting_per_task(matrix),
        "average_forgetting": average_forgetting(matrix),
        "bwt": backward_transfer(matrix),
        "fwt": forward_transfer(matrix, initial),
    }


def scenario_matrix(scenario: str) -> str:
    """The metrics.json matrix that is a scenario's own figure: `task_il` for task-IL; `class_il` for class-IL
    and for domain-IL, where every task holds every class, so the argmax over all of them is the domain-IL
    accuracy. Both matrices are always stored."""
    return "task_il" if scenario == "task_il" else "class_il"


def matrix_label(scenario: str, matrix: str) -> str:
    """What `matrix` ("class_il" or "task_il") measures in a run of `scenario`, as figures and tables name it."""
    if matrix == "class_il" and scenario == "domain_il":
        return "domain-IL accuracy"
    return "task-IL accuracy" if matrix == "task_il" else "class-IL accuracy"


def shown_accuracy(run_metrics: dict) -> tuple[str, str]:
    """The matrix key and label that a run's tables, plots, CSV and summary show: its scenario's own."""
    scenario = run_metrics["run"].get("scenario", "class_il")  # older metrics.json: class-IL only
    matrix = scenario_matrix(scenario)
    return matrix, matrix_label(scenario, matrix)
