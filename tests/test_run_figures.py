"""A run's two SVG figures: valid SVG, each cell coloured as matplotlib's viridis colours its value, the
curves' points where their values put them."""

from __future__ import annotations

import re
from xml.etree import ElementTree

import matplotlib
import pytest

from incr_cli import run_figures

SVG = "{http://www.w3.org/2000/svg}"
MATRIX = [[0.98, 0.0, 0.1], [0.5, 0.91, 0.0], [0.25, 0.375, 1.0]]


def rgb(colour: str) -> tuple[int, ...]:
    return tuple(int(colour[k : k + 2], 16) for k in (1, 3, 5))


@pytest.mark.parametrize("value", [0.0, 0.1, 0.25, 0.333, 0.5, 0.61, 0.8, 0.95, 1.0, 1.3, -0.2])
def test_cell_colours_follow_matplotlibs_viridis(value):
    expected = matplotlib.colormaps["viridis"](min(max(value, 0.0), 1.0))[:3]
    got = rgb(run_figures.viridis(value))
    # 17 anchors, linearly interpolated: within 6 of 255 of the 256-entry table in each channel
    assert all(abs(g - 255 * e) <= 6 for g, e in zip(got, expected, strict=True)), (got, expected)


def test_matrix_figure_has_one_cell_per_value_with_its_colour_and_text():
    root = ElementTree.fromstring(
        run_figures.accuracy_matrix_svg(MATRIX, "class-IL accuracy: replay on digits")
    )
    cells = [r for r in root.iter(f"{SVG}rect") if r.get("fill", "").startswith("#")]
    assert [c.get("fill") for c in cells] == [run_figures.viridis(v) for row in MATRIX for v in row]
    # row i of the matrix is row i of the grid: y grows with the row, x with the task
    xs = sorted({float(c.get("x")) for c in cells})
    ys = sorted({float(c.get("y")) for c in cells})
    assert len(xs) == len(ys) == 3
    assert (float(cells[5].get("x")), float(cells[5].get("y"))) == (xs[2], ys[1])
    texts = [t.text for t in root.iter(f"{SVG}text")]
    assert texts[0] == "class-IL accuracy: replay on digits"
    assert [t for t in texts if re.fullmatch(r"\d\.\d\d", t)] == [f"{v:.2f}" for row in MATRIX for v in row]
    assert {"T1", "T2", "T3", "evaluated on task", "after training task", "accuracy"} <= set(texts)


def test_large_matrices_drop_the_cell_texts_and_stay_bounded():
    matrix = [[0.5] * 60 for _ in range(60)]
    root = ElementTree.fromstring(run_figures.accuracy_matrix_svg(matrix, "t"))
    assert not [t for t in root.iter(f"{SVG}text") if t.text == "0.50"]
    assert float(root.get("width")) < 1000


def test_titles_are_escaped():
    text = run_figures.accuracy_matrix_svg(MATRIX, "a <b> & c")
    assert ElementTree.fromstring(text).find(f"{SVG}text").text == "a <b> & c"


def test_curve_points_sit_at_their_values():
    curves = {"class-IL accuracy": [1.0, 0.5, 0.25], "task-IL accuracy": [1.0, 0.75, 0.0]}
    root = ElementTree.fromstring(run_figures.average_accuracy_svg(curves, "replay on digits, seed 0"))
    frame = next(r for r in root.iter(f"{SVG}rect") if r.get("fill") == "none")
    top, height = float(frame.get("y")), float(frame.get("height"))
    left, width = float(frame.get("x")), float(frame.get("width"))
    lines = list(root.iter(f"{SVG}polyline"))
    assert len(lines) == 2
    for line, values in zip(lines, curves.values(), strict=True):
        points = [tuple(map(float, p.split(","))) for p in line.get("points").split()]
        xs = [x for x, _ in points]  # equally spaced, inside the frame
        assert left < xs[0] < xs[1] < xs[2] < left + width and xs[1] - xs[0] == pytest.approx(xs[2] - xs[1])
        assert [y for _, y in points] == pytest.approx([top + height * (1 - v) for v in values], abs=0.06)
    assert {"class-IL accuracy", "task-IL accuracy", "tasks learned"} <= {
        t.text for t in root.iter(f"{SVG}text")
    }
