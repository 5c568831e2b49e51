"""Figures of one run (PNG next to its metrics: the accuracy matrix and the average accuracy) and of a report
over many (`incr report`: curves with a band of one standard deviation, matrices side by side, forgetting).
The format follows the path's suffix (png or svg)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402


def draw_matrix(axes, matrix: list[list[float]], title: str):
    n_rows, n_tasks = len(matrix), len(matrix[0])
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
    return image


def plot_accuracy_matrix(matrix: list[list[float]], path: Path, title: str) -> None:
    n_rows, n_tasks = len(matrix), len(matrix[0])
    figure, axes = plt.subplots(figsize=(1.2 + 0.7 * n_tasks, 1.0 + 0.6 * n_rows))
    image = draw_matrix(axes, matrix, title)
    figure.colorbar(image, ax=axes, label="accuracy")
    _save(figure, path)


def plot_accuracy_matrices(matrices: dict[str, list[list[float]]], path: Path, title: str) -> None:
    """Each method's final accuracy matrix (mean over seeds), side by side on one colour scale."""
    n_tasks = len(next(iter(matrices.values()))[0])
    width = 1.0 + 0.7 * n_tasks
    figure, axes = plt.subplots(1, len(matrices), figsize=(0.8 + width * len(matrices), 1.6 + 0.6 * n_tasks),
                                squeeze=False)  # fmt: skip
    for ax, (label, matrix) in zip(axes[0], matrices.items(), strict=True):
        image = draw_matrix(ax, matrix, label)
    figure.colorbar(image, ax=list(axes[0]), label="accuracy (mean over seeds)")
    figure.suptitle(f"accuracy matrices: {title}", fontsize=11)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_average_accuracy_bands(
    curves: dict[str, tuple[list[float], list[float]]], path: Path, title: str
) -> None:
    """Average accuracy after each task per method: the mean over seeds with a band of +-1 sample std."""
    figure, axes = plt.subplots(figsize=(6, 4))
    for label, (means, stds) in curves.items():
        steps = range(1, len(means) + 1)
        line = axes.plot(steps, means, marker="o", label=label)[0]
        low = [m - s for m, s in zip(means, stds, strict=True)]
        high = [m + s for m, s in zip(means, stds, strict=True)]
        axes.fill_between(steps, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    axes.set_xlabel("tasks learned")
    axes.set_ylabel("average accuracy on tasks seen")
    axes.set_ylim(0, 1.02)
    axes.set_xticks(range(1, max(len(m) for m, _ in curves.values()) + 1))
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    axes.set_title(f"average accuracy (mean ± std over seeds): {title}", fontsize=10)
    _save(figure, path)


def plot_forgetting_bars(
    forgetting: dict[str, tuple[list[float], list[float]]], path: Path, title: str
) -> None:
    """Final forgetting of each earlier task per method, mean over seeds with std error bars."""
    figure, axes = plt.subplots(figsize=(6, 4))
    width = 0.8 / max(len(forgetting), 1)
    for k, (label, (means, stds)) in enumerate(forgetting.items()):
        positions = [j + 1 + (k - (len(forgetting) - 1) / 2) * width for j in range(len(means))]
        axes.bar(positions, means, width, yerr=stds, capsize=2, label=label)
    n_tasks = max((len(m) for m, _ in forgetting.values()), default=0)
    axes.set_xticks(range(1, n_tasks + 1), [f"T{j + 1}" for j in range(n_tasks)])
    axes.set_xlabel("task (all but the last)")
    axes.set_ylabel("forgetting: best accuracy − final accuracy")
    axes.axhline(0, color="black", linewidth=0.8)
    axes.grid(alpha=0.3, axis="y")
    axes.legend(fontsize=8)
    axes.set_title(f"forgetting per task (mean ± std over seeds): {title}", fontsize=10)
    _save(figure, path)


def _save(figure, path: Path) -> None:
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
    _save(figure, path)
