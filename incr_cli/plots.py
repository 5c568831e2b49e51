"""Figures of a report over many runs (`incr report`: curves with a band of one standard deviation, matrices in a
grid, forgetting), and the matrix image the TensorBoard and W&B loggers send. The format follows the path's
suffix (png or svg). A run's own two figures are run_figures.py's."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402

MATRIX_COLUMNS = 5  # a report's matrices wrap into rows of this many
LEGEND_ROWS = 25  # methods per legend column


def method_colours(n: int) -> list[tuple[float, float, float, float]]:
    """n distinct colours: tab10 up to 10 methods, tab20 up to 20, tab20 + tab20b + tab20c up to 60, then
    evenly spaced hues (two methods never share a colour, as matplotlib's 10-colour cycle makes them do)."""
    if n <= 10:
        return [plt.get_cmap("tab10")(k) for k in range(n)]
    if n <= 20:
        return [plt.get_cmap("tab20")(k) for k in range(n)]
    if n <= 60:
        return [plt.get_cmap(name)(k) for name in ("tab20", "tab20b", "tab20c") for k in range(20)][:n]
    return [plt.get_cmap("hsv")(k / n) for k in range(n)]


def draw_matrix(axes, matrix: list[list[float]], title: str, cell_inches: float = 0.6, outer=(True, True)):
    """One heatmap with its values written in the cells when they fit; `outer` says whether this panel is
    the lowest of its column and whether it is in the left column: only those carry the axis labels."""
    n_rows, n_tasks = len(matrix), len(matrix[0])
    image = axes.imshow(matrix, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    if cell_inches >= 0.35:  # smaller cells cannot hold "0.00" legibly
        size = min(8.0, cell_inches * 16)
        for i, row in enumerate(matrix):
            for j, value in enumerate(row):
                axes.text(
                    j,
                    i,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    fontsize=size,
                    color="black" if value > 0.6 else "white",
                )
    every = max(1, math.ceil(0.25 / cell_inches))  # tick labels at least a quarter inch apart
    axes.set_xticks(range(0, n_tasks, every), [f"T{j + 1}" for j in range(0, n_tasks, every)], fontsize=8)
    axes.set_yticks(range(0, n_rows, every), [str(i + 1) for i in range(0, n_rows, every)], fontsize=8)
    if outer[0]:
        axes.set_xlabel("evaluated on task")
    if outer[1]:
        axes.set_ylabel("after training task")
    axes.set_title(title, fontsize=9)
    return image


def plot_accuracy_matrices(matrices: dict[str, list[list[float]]], path: Path, title: str) -> None:
    """Each method's final accuracy matrix (mean over seeds) on one colour scale, in a grid of at most
    MATRIX_COLUMNS columns whose cells shrink as tasks grow, so the figure stays readable and bounded from one
    method to dozens. The layout is fixed in inches (titles wrapped to their panel's width, room for tick
    labels between panels): a layout engine would measure every text of every panel again, seconds per file."""
    n_tasks = len(next(iter(matrices.values()))[0])
    n_rows = max(len(m) for m in matrices.values())
    columns = min(len(matrices), MATRIX_COLUMNS)
    rows = math.ceil(len(matrices) / columns)
    # a panel is at most 5 inches across in a row of up to 3, at most 3 inches in wider rows
    cell = min(0.5, (5.0 if columns <= 3 else 3.0) / max(n_tasks, n_rows))
    panel_width, panel_height = cell * n_tasks, cell * n_rows
    left, gap_x, right = 0.75, 0.45, 1.1  # inches: y label; y tick labels; colour bar and its label
    gap_y, bottom = 0.55, 0.55  # x tick labels and x label; x label
    # 9-point text is about 13 characters an inch; a title may reach half-way into the gaps beside it
    titles = [textwrap.fill(label, max(10, int((panel_width + gap_x / 2) * 13))) for label in matrices]
    title_height = 0.08 + 0.16 * max(t.count("\n") + 1 for t in titles)
    width = left + columns * panel_width + (columns - 1) * gap_x + right
    heading = textwrap.fill(f"accuracy matrices: {title}", max(30, int(width * 11)))
    top = 0.2 + 0.2 * (heading.count("\n") + 1)  # 11-point lines
    height = top + rows * (title_height + panel_height) + (rows - 1) * gap_y + bottom
    figure = plt.figure(figsize=(width, height))

    def box(x: float, y: float, w: float, h: float) -> list[float]:  # inches from the top left -> fractions
        return [x / width, 1 - (y + h) / height, w / width, h / height]

    for k, (label, matrix) in enumerate(zip(titles, matrices.values(), strict=True)):
        row, column = divmod(k, columns)
        x = left + column * (panel_width + gap_x)
        y = top + title_height + row * (title_height + panel_height + gap_y)
        last_in_column = k + columns >= len(matrices)
        image = draw_matrix(
            figure.add_axes(box(x, y, panel_width, panel_height)),
            matrix,
            label,
            cell,
            outer=(last_in_column, column == 0),
        )
    bar_height = min(3.0, height - top - title_height - bottom)
    figure.colorbar(
        image,
        cax=figure.add_axes(box(width - right + 0.2, top + title_height, 0.15, bar_height)),
        label="accuracy (mean over seeds)",
    )
    figure.suptitle(heading, fontsize=11, y=1 - 0.1 / height, va="top")
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_average_accuracy_bands(
    curves: dict[str, tuple[list[float], list[float]]], path: Path, title: str
) -> None:
    """Average accuracy after each task per method: the mean over seeds with a band of +-1 sample std."""
    figure, axes = plt.subplots(figsize=(6, 4))
    for colour, (label, (means, stds)) in zip(method_colours(len(curves)), curves.items(), strict=True):
        steps = range(1, len(means) + 1)
        axes.plot(steps, means, marker="o", markersize=3, color=colour, label=label)
        low = [m - s for m, s in zip(means, stds, strict=True)]
        high = [m + s for m, s in zip(means, stds, strict=True)]
        axes.fill_between(steps, low, high, color=colour, alpha=0.15, linewidth=0)
    axes.set_xlabel("tasks learned")
    axes.set_ylabel("average accuracy on tasks seen")
    axes.set_ylim(0, 1.02)
    axes.set_xticks(range(1, max(len(m) for m, _ in curves.values()) + 1))
    axes.grid(alpha=0.3)
    axes.set_title(_wrapped(f"average accuracy (mean ± std over seeds): {title}"), fontsize=10)
    _save(figure, path, legend_entries=len(curves))


def plot_forgetting_bars(
    forgetting: dict[str, tuple[list[float], list[float]]], path: Path, title: str
) -> None:
    """Final forgetting of each earlier task per method, mean over seeds with std error bars."""
    n_tasks = max((len(m) for m, _ in forgetting.values()), default=0)
    # about a tenth of an inch per bar, between 6 and 16 inches
    figure, axes = plt.subplots(figsize=(min(16.0, max(6.0, 1.5 + 0.1 * len(forgetting) * n_tasks)), 4))
    width = 0.8 / max(len(forgetting), 1)
    entries = zip(method_colours(len(forgetting)), forgetting.items(), strict=True)
    for k, (colour, (label, (means, stds))) in enumerate(entries):
        positions = [j + 1 + (k - (len(forgetting) - 1) / 2) * width for j in range(len(means))]
        axes.bar(
            positions,
            means,
            width,
            yerr=stds,
            capsize=2 if len(forgetting) <= 10 else 0,
            color=colour,
            error_kw={"linewidth": 0.8},
            label=label,
        )
    axes.set_xticks(range(1, n_tasks + 1), [f"T{j + 1}" for j in range(n_tasks)])
    axes.set_xlabel("task (all but the last)")
    axes.set_ylabel("forgetting: best accuracy − final accuracy")
    axes.axhline(0, color="black", linewidth=0.8)
    axes.grid(alpha=0.3, axis="y")
    axes.set_title(_wrapped(f"forgetting per task (mean ± std over seeds): {title}"), fontsize=10)
    _save(figure, path, legend_entries=len(forgetting))


def _wrapped(title: str) -> str:
    return textwrap.fill(title, 70)


def _save(figure, path: Path, legend_entries: int = 0) -> None:
    """With `legend_entries`, the legend goes right of the axes, never over the data. It is added after
    tight_layout, which would otherwise shrink the axes to make room for it, and the image's tight bounding
    box then grows to hold it: no legend is clipped, whatever the number of methods."""
    figure.tight_layout()
    if legend_entries:
        figure.axes[0].legend(
            loc="upper left",
            bbox_to_anchor=(1.02, 1.0),
            borderaxespad=0.0,
            fontsize=8,
            ncol=math.ceil(legend_entries / LEGEND_ROWS),
        )
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)
