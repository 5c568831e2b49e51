"""`incr report` on hand-made run directories: a run found twice counts once, method labels name each
override once, and the figures stay bounded and readable from 1 to 30 methods, one colour each."""

from __future__ import annotations

import itertools
import json
import struct

import pytest
import yaml

from incr_cli import metrics, plots
from incr_cli.cli import main

MATRIX = [[0.9, 0.1, 0.0], [0.5, 0.8, 0.1], [0.4, 0.6, 0.7]]


def fake_run(run_dir, strategy: str, seed: int, overrides: tuple[str, ...] = (), accuracy_shift: float = 0.0):
    """A finished run directory as `incr train` leaves it, for what `incr report` reads: the composed config
    and the command-line overrides under .hydra/, and metrics.json."""
    matrix = [[min(1.0, v + accuracy_shift) for v in row] for row in MATRIX]
    (run_dir / ".hydra").mkdir(parents=True)
    config = {
        "seed": seed,
        "strategy": {"name": strategy},
        "dataset": {"name": "digits"},
        "epochs": 1,
        "train": {"online": "train.online=true" in overrides},
    }
    (run_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (run_dir / ".hydra" / "overrides.yaml").write_text(
        yaml.safe_dump([f"strategy={strategy}", *overrides, f"seed={seed}"])
    )
    run = {
        "run": {
            "strategy": strategy,
            "dataset": "digits",
            "seed": seed,
            "status": "finished",
            "n_tasks": 3,
            "scenario": "class_il",
        },
        "class_il": metrics.summarize(matrix, [0.0] * 3) | {"accuracy_matrix": matrix},
        "task_il": metrics.summarize(matrix, [0.5] * 3) | {"accuracy_matrix": matrix},
        "final": {"f1": 0.5},
        "per_task": [{"train_seconds": 1.0, "memory_bytes": 0}],
        "wall_seconds": 2.0,
        "model_bytes": 10,
        "parameters": 3,
    }
    (run_dir / "metrics.json").write_text(json.dumps(run))


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def report(tmp_path, *dirs, figures=False) -> dict:
    out = tmp_path / "report"
    assert main(["report", *map(str, dirs), "--out", str(out), *([] if figures else ["--no-figures"])]) == 0
    return json.loads((out / "report.json").read_text())


def test_a_run_found_twice_counts_once_with_a_note(tmp_path, capsys):
    for sweep, seed in itertools.product(("a", "b"), range(3)):  # the same sweep in two folders
        fake_run(tmp_path / sweep / f"replay_seed{seed}", "replay", seed)
    result = report(tmp_path, tmp_path / "a", tmp_path / "b")
    (group,) = result["groups"]
    assert group["seeds"] == [0, 1, 2] and all("/a/" in run for run in group["runs"])
    assert {(d["run"].split("/")[-2], d["same_as"].split("/")[-2]) for d in result["duplicates"]} == {
        ("b", "a")
    }
    assert len(result["duplicates"]) == 3
    assert "has the same config and seed as" in capsys.readouterr().out
    text = (tmp_path / "report" / "report.md").read_text()
    assert "| replay | 3 |" in text and "## Counted once" in text
    # the same folder given twice, or a folder and one inside it
    for dirs in ((tmp_path / "a", tmp_path / "a"), (tmp_path / "a", tmp_path / "a" / "replay_seed0")):
        result = report(tmp_path, *dirs)
        assert result["groups"][0]["seeds"] == [0, 1, 2] and not result["duplicates"]
        assert len(result["notes"]) == 1 and "counted once" in result["notes"][0]


def test_other_seeds_in_another_folder_are_not_duplicates(tmp_path):
    for sweep, seed in (("a", 0), ("a", 1), ("b", 2), ("b", 3)):
        fake_run(tmp_path / sweep / f"replay_seed{seed}", "replay", seed)
    result = report(tmp_path, tmp_path / "a", tmp_path / "b")
    assert result["groups"][0]["seeds"] == [0, 1, 2, 3] and result["duplicates"] == []


@pytest.mark.parametrize("online_first", [True, False])
def test_labels_name_each_override_once(tmp_path, online_first):
    # directory names decide the order the runs are found in; the labels must not depend on it
    first, second = ("a", "b") if online_first else ("b", "a")
    for seed in range(2):
        fake_run(tmp_path / first / f"seed{seed}", "der", seed, ("epochs=1", "train.online=true"))
        fake_run(tmp_path / second / f"seed{seed}", "der", seed, ("epochs=1",), accuracy_shift=0.1)
    result = report(tmp_path, tmp_path)
    assert sorted(g["method"] for g in result["groups"]) == ["der", "der (train.online=true)"]


def test_a_report_of_seven_methods_lays_its_matrices_out_in_two_rows(tmp_path, kept_figures):
    for k in range(7):
        fake_run(tmp_path / "sweep" / f"m{k}", f"method_{k}", 0, accuracy_shift=k / 100)
    result = report(tmp_path, tmp_path / "sweep", figures=True)
    assert len(result["figures"]) == 6
    bands, matrices, _ = kept_figures[:3]  # png first: curves, matrices, forgetting
    assert bands.axes[0].get_title().endswith("digits, class-IL accuracy")
    assert matrices.get_suptitle() == "accuracy matrices: digits, class-IL accuracy"
    assert [axes.get_title() for axes in matrices.axes[:7]] == [f"method_{k} (n=1)" for k in range(6, -1, -1)]
    # 5 panels of 3 tasks (1.5 inches) a row, at 100 dpi: 0.75 + 5 * 1.5 + 4 * 0.45 + 1.1 inches wide;
    # two rows of panels, titles, tick labels: under 8 inches high
    width, height = png_size(tmp_path / "report" / "report_digits_class_il_accuracy_matrices.png")
    assert (width, height) == (1115, pytest.approx(height)) and 400 < height < 800


@pytest.fixture
def kept_figures(monkeypatch):
    """The figures the plot functions draw, kept open for inspection after they are saved."""
    kept = []
    monkeypatch.setattr(plots.plt, "close", kept.append)
    yield kept
    monkeypatch.undo()
    for figure in kept:
        plots.plt.close(figure)


@pytest.mark.parametrize("n_methods", [1, 30])
def test_curves_and_bars_have_one_colour_per_method_and_a_legend_in_the_image(
    tmp_path, kept_figures, n_methods
):
    curves = {
        f"method {k} (train.online=true)": ([0.5, 0.4 - k / 100], [0.0, 0.01]) for k in range(n_methods)
    }
    plots.plot_average_accuracy_bands(curves, tmp_path / "bands.png", "digits, class-IL accuracy")
    plots.plot_forgetting_bars({k: ([0.1], [0.0]) for k in curves}, tmp_path / "bars.png", "digits")
    bands, bars = kept_figures
    assert len({line.get_color() for line in bands.axes[0].get_lines()}) == n_methods
    assert len({bar.get_facecolor() for bar in bars.axes[0].patches}) == n_methods
    for figure, name in ((bands, "bands"), (bars, "bars")):
        axes = figure.axes[0]
        legend = axes.get_legend()
        assert len(legend.get_texts()) == n_methods
        renderer = figure.canvas.get_renderer()
        inches = figure.dpi_scale_trans.inverted()
        saved = figure.get_tightbbox(renderer)  # what bbox_inches="tight" keeps, in inches
        box = legend.get_window_extent(renderer).transformed(inches)
        assert saved.x0 <= box.x0 and box.x1 <= saved.x1 and saved.y0 <= box.y0 and box.y1 <= saved.y1
        # right of the axes: no curve or bar is hidden under it
        assert box.x0 >= axes.get_window_extent(renderer).transformed(inches).x1
        width, height = png_size(tmp_path / f"{name}.png")
        assert 600 < width < 1400 and 300 < height < 450, name  # 30 methods: a legend of two columns


@pytest.mark.parametrize("n", [1, 10, 11, 20, 30, 60, 90])
def test_method_colours_are_distinct(n):
    colours = plots.method_colours(n)
    assert len(colours) == n == len(set(colours))


@pytest.mark.parametrize("n_methods", [1, 30])
def test_matrices_stay_bounded_and_their_titles_apart(tmp_path, kept_figures, n_methods):
    label = "der (train.online=true buffer_size=500 alpha=0.3 beta=0.5) (n=3)"
    matrices = {f"{k} {label}": MATRIX for k in range(n_methods)}
    plots.plot_accuracy_matrices(matrices, tmp_path / "m.png", "image_folder, domain-il, domain-IL accuracy")
    width, height = png_size(tmp_path / "m.png")
    if n_methods == 1:
        assert width < 600 and height < 500
    else:  # 6 rows of 5 panels, not one row of 30 (which was 5,480 pixels wide)
        assert 1000 < width < 1200 and 1500 < height < 2000
    (figure,) = kept_figures
    renderer = figure.canvas.get_renderer()
    panels = [axes for axes in figure.axes if axes.get_title()]
    assert len(panels) == n_methods
    boxes = [axes.title.get_window_extent(renderer) for axes in panels]
    heading = figure.get_suptitle()
    assert heading.replace("\n", " ") == "accuracy matrices: image_folder, domain-il, domain-IL accuracy"
    assert ("\n" in heading) == (n_methods == 1)  # wrapped to the width of one panel
    for a, b in itertools.combinations(
        [next(t for t in figure.texts if t.get_text() == heading).get_window_extent(renderer), *boxes], 2
    ):
        assert not a.overlaps(b)
    frame = figure.bbox
    for axes, box in zip(panels, boxes, strict=True):  # over its own panel, inside the image
        panel = axes.get_window_extent(renderer)
        assert panel.x0 - 25 <= box.x0 and box.x1 <= panel.x1 + 25 and box.y0 >= panel.y1
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and box.y1 <= frame.y1
