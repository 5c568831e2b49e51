"""Figures of one run, written as PNG next to its metrics: the accuracy matrix and the average accuracy."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402


def plot_accuracy_matrix(matrix: list[list[float]], path: Path, title: str) -> None:
    n_rows, n_tasks = len(matrix), len(matrix[0])
    figure, axes = plt.subplots(figsize=(1.2 + 0.7 * n_tasks, 1.0 + 0.6 * n_rows))
    image = axes.imshow(matrix, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            axes.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8,
                      color="black" if value > 0.6 else "white")  # fmt: skip
    axes.set_xticks(range(n_tasks), [f"T{j + 1}" for j in range(n_tasks)])
    axes.set_yticks(range(n_rows), [str(i + 1) for i in range(n_rows)])
    axes.set_xlabel("evaluated on task")
    axes.set_ylabel("after training task")
    axes.set_title(title, fontsize=10)
    figure.colorbar(image, ax=axes, label="accuracy")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_average_accuracy(curves: dict[str, list[float]], path: Path, title: str) -> None:
    figure, axes = plt.subplots(figsize=(5, 3.5))
    for label, values in curves.items():
        axes.plot(range(1, len(values) + 1), values, marker="o", label=label)
    axes.set_xlabel("tasks learned")
    axes.set_ylabel("average accuracy on tasks seen")
    axes.set_ylim(0, 1.02)
    axes.set_xticks(range(1, max(len(v) for v in curves.values()) + 1))
    axes.grid(alpha=0.3)
    axes.legend()
    axes.set_title(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
