"""The two figures of one run, as SVG text: its accuracy matrix as a heatmap and its average accuracy after each
task. Written directly, without matplotlib, whose import and layout would cost a short run more than its own
training; `incr report` draws its figures over many runs with matplotlib (plots.py)."""

from __future__ import annotations

from xml.sax.saxutils import escape

from incr_cli.metrics import matrix_label, shown_accuracy

# matplotlib's viridis at 0, 1/16, ..., 1 (the colour scale of the report's matrices), linearly interpolated
VIRIDIS = [
    (0.267, 0.005, 0.329),
    (0.282, 0.095, 0.417),
    (0.279, 0.175, 0.483),
    (0.259, 0.252, 0.525),
    (0.230, 0.322, 0.546),
    (0.199, 0.388, 0.555),
    (0.173, 0.449, 0.558),
    (0.149, 0.508, 0.557),
    (0.128, 0.567, 0.551),
    (0.121, 0.626, 0.533),
    (0.158, 0.684, 0.502),
    (0.246, 0.739, 0.452),
    (0.369, 0.789, 0.383),
    (0.516, 0.831, 0.294),
    (0.678, 0.864, 0.190),
    (0.846, 0.887, 0.100),
    (0.993, 0.906, 0.144),
]
# matplotlib's default colour cycle (tab10), for the curves
CURVE_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
FONT = 'font-family="DejaVu Sans, Arial, sans-serif"'


def run_curves(run_metrics: dict) -> dict[str, list[float]]:
    """The average-accuracy curves of one run's figure, its scenario's own first. A class-IL run also shows its
    task-IL curve (what knowing the task would give); a task-IL run shows only task-IL (its training masks the
    other tasks' classes, so its class-IL figure is not its result) and a domain-IL run only its own."""
    shown, label = shown_accuracy(run_metrics)
    curves = {label: run_metrics[shown]["average_accuracy"]}
    if run_metrics["run"].get("scenario", "class_il") == "class_il":
        curves[matrix_label("class_il", "task_il")] = run_metrics["task_il"]["average_accuracy"]
    return curves


def viridis(value: float) -> str:
    """The colour of an accuracy in [0, 1] (clipped), as #rrggbb."""
    position = min(max(value, 0.0), 1.0) * (len(VIRIDIS) - 1)
    low = min(int(position), len(VIRIDIS) - 2)
    share = position - low
    channels = (a + (b - a) * share for a, b in zip(VIRIDIS[low], VIRIDIS[low + 1], strict=True))
    return "#" + "".join(f"{round(255 * c):02x}" for c in channels)


def _text(x: float, y: float, text: str, size: int = 11, anchor: str = "middle", extra: str = "") -> str:
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" {FONT}{extra}>'
        f"{escape(text)}</text>"
    )


def _svg(width: float, height: float, body: list[str]) -> str:
    return "\n".join(
        [
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
            f'viewBox="0 0 {width:.0f} {height:.0f}">',
            f'<rect width="{width:.0f}" height="{height:.0f}" fill="white"/>',
            *body,
            "</svg>\n",
        ]
    )


def accuracy_matrix_svg(matrix: list[list[float]], title: str) -> str:
    """Row i: accuracy on each task after training task i + 1, one cell per value, its value written in it
    while cells are large enough; a colour bar from 0 to 1 on the right."""
    n_rows, n_tasks = len(matrix), len(matrix[0])
    cell = min(48.0, max(10.0, 480.0 / max(n_rows, n_tasks)))
    left, top = 64.0, 44.0
    grid_width, grid_height = cell * n_tasks, cell * n_rows
    width = max(left + grid_width + 90.0, 7.0 * len(title) + 20.0)
    height = top + grid_height + 52.0
    body = [_text(width / 2, 24, title, 13)]
    every = max(1, round(24 / cell))  # tick labels at least 24 pixels apart
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            x, y = left + j * cell, top + i * cell
            body.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{cell:.1f}" height="{cell:.1f}" fill="{viridis(value)}"/>'
            )
            if cell >= 28:
                colour = "black" if value > 0.6 else "white"
                body.append(
                    _text(x + cell / 2, y + cell / 2 + 4, f"{value:.2f}", 10, extra=f' fill="{colour}"')
                )
    for j in range(0, n_tasks, every):
        body.append(_text(left + (j + 0.5) * cell, top + grid_height + 16, f"T{j + 1}", 10))
    for i in range(0, n_rows, every):
        body.append(_text(left - 6, top + (i + 0.5) * cell + 4, str(i + 1), 10, "end"))
    body.append(_text(left + grid_width / 2, top + grid_height + 38, "evaluated on task"))
    middle = top + grid_height / 2
    body.append(_text(18, middle, "after training task", extra=f' transform="rotate(-90 18 {middle:.1f})"'))
    body.extend(_colour_bar(left + grid_width + 16, top, grid_height))
    return _svg(width, height, body)


def _colour_bar(x: float, top: float, height: float) -> list[str]:
    stops = "".join(
        f'<stop offset="{k / (len(VIRIDIS) - 1):.3f}" stop-color="{viridis(1 - k / (len(VIRIDIS) - 1))}"/>'
        for k in range(len(VIRIDIS))
    )
    parts = [
        f'<defs><linearGradient id="scale" x1="0" y1="0" x2="0" y2="1">{stops}</linearGradient></defs>',
        f'<rect x="{x:.1f}" y="{top:.1f}" width="14" height="{height:.1f}" fill="url(#scale)"/>',
    ]
    for value in (0.0, 0.5, 1.0):
        parts.append(_text(x + 18, top + (1 - value) * height + 4, f"{value:.1f}", 10, "start"))
    middle = top + height / 2
    parts.append(
        _text(x + 56, middle, "accuracy", extra=f' transform="rotate(-90 {x + 56:.1f} {middle:.1f})"')
    )
    return parts


def average_accuracy_svg(curves: dict[str, list[float]], title: str) -> str:
    """Each curve's average accuracy on the tasks seen (y, 0 to 1) after each task learned (x), with its
    legend below the axes."""
    n_tasks = max(len(values) for values in curves.values())
    left, top, plot_width, plot_height = 60.0, 40.0, 400.0, 240.0
    width = max(left + plot_width + 30.0, 7.0 * len(title) + 20.0)
    height = top + plot_height + 60.0 + 18.0 * len(curves)

    def point(step: int, value: float) -> tuple[float, float]:
        inner = plot_width - 2 * 16  # the first and last points 16 pixels inside the frame
        x = left + 16 + (inner / 2 if n_tasks == 1 else inner * step / (n_tasks - 1))
        return x, top + plot_height * (1 - min(max(value, 0.0), 1.0))

    body = [_text(width / 2, 22, title, 13)]
    for k in range(6):  # gridlines at 0, 0.2, ..., 1
        y = top + plot_height * (1 - k / 5)
        body.append(
            f'<line x1="{left:.1f}" y1="{y:.1f}" x2="{left + plot_width:.1f}" y2="{y:.1f}" stroke="#dddddd"/>'
        )
        body.append(_text(left - 6, y + 4, f"{k / 5:.1f}", 10, "end"))
    body.append(
        f'<rect x="{left:.1f}" y="{top:.1f}" width="{plot_width:.1f}" height="{plot_height:.1f}" '
        'fill="none" stroke="black"/>'
    )
    for step in range(n_tasks):
        body.append(_text(point(step, 0)[0], top + plot_height + 16, str(step + 1), 10))
    body.append(_text(left + plot_width / 2, top + plot_height + 36, "tasks learned"))
    middle = top + plot_height / 2
    body.append(
        _text(18, middle, "average accuracy on tasks seen", extra=f' transform="rotate(-90 18 {middle:.1f})"')
    )
    for k, (label, values) in enumerate(curves.items()):
        colour = CURVE_COLOURS[k % len(CURVE_COLOURS)]
        points = [point(step, value) for step, value in enumerate(values)]
        body.append(
            f'<polyline points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in points)}" fill="none" '
            f'stroke="{colour}" stroke-width="2"/>'
        )
        body.extend(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{colour}"/>' for x, y in points)
        legend_y = top + plot_height + 56 + 18 * k
        body.append(
            f'<line x1="{left:.1f}" y1="{legend_y - 4:.1f}" x2="{left + 24:.1f}" y2="{legend_y - 4:.1f}" '
            f'stroke="{colour}" stroke-width="2"/>'
        )
        body.append(_text(left + 30, legend_y, label, 11, "start"))
    return _svg(width, height, body)
