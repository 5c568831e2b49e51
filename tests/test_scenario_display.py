"""Each scenario shows its own figure: a task-IL run's per-task tables, summary, CSV, plots and `incr report`
show its task-IL accuracy, a domain-IL run's its domain-IL accuracy; metrics.json keeps both matrices."""

from __future__ import annotations

import contextlib
import csv
import io
import json
from xml.etree import ElementTree

import pytest
from rich.console import Console

from incr_cli import metrics, run_figures
from incr_cli.cli import main
from incr_cli.console import summary_table

SVG = "{http://www.w3.org/2000/svg}"


@pytest.fixture(scope="module")
def task_il_run(tmp_path_factory):
    """ewc on digits in task-IL, one epoch: the run directory, its metrics.json and what it printed."""
    run_dir = tmp_path_factory.mktemp("task_il") / "run"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = main(
            [
                "train",
                "strategy=ewc",
                "dataset.scenario=task_il",
                "epochs=1",
                "hardware=cpu",
                "hardware.num_threads=1",
                "progress=false",
                f"hydra.run.dir={run_dir}",
            ]
        )
    assert status == 0
    run_metrics = json.loads((run_dir / "metrics.json").read_text())
    # the point of the test: the two scenarios' figures differ, so showing the wrong one fails
    task_il, class_il = run_metrics["task_il"], run_metrics["class_il"]
    assert abs(task_il["final_average_accuracy"] - class_il["final_average_accuracy"]) > 0.1
    return run_dir, run_metrics, printed.getvalue()


def summary_row(text: str, title: str = "task-IL accuracy") -> list[str]:
    """The figures of a printed summary table: the first row of cells after its title."""
    lines = text.splitlines()
    start = max(i for i, line in enumerate(lines) if title in line and " on " in line)
    body = next(line for line in lines[start:] if line.startswith("│"))
    return [cell.strip() for cell in body.strip("│").split("│")]


def test_the_printed_summary_and_task_tables_show_task_il(task_il_run):
    _, run_metrics, printed = task_il_run
    task_il, class_il = run_metrics["task_il"], run_metrics["class_il"]
    assert "ewc on digits: task-IL accuracy" in printed
    final, incremental, *_ = summary_row(printed)
    assert final == f"{task_il['final_average_accuracy']:.4f}" != f"{class_il['final_average_accuracy']:.4f}"
    assert incremental == f"{task_il['average_incremental_accuracy']:.4f}"
    # one table per task, titled with what it shows; its last "avg" cell is the task-IL average accuracy
    for k in range(1, 6):
        assert f"task-IL accuracy after task {k}" in printed
    assert "class-IL accuracy after task" not in printed
    last_table = printed[printed.index("task-IL accuracy after task 5") :]
    last_row = next(line for line in last_table.splitlines() if line.startswith("│          5 │"))
    assert last_row.strip("│").split("│")[-1].strip() == f"{task_il['average_accuracy'][-1]:.3f}"


def test_csv_and_plots_hold_the_task_il_matrix(task_il_run):
    run_dir, run_metrics, _ = task_il_run
    with open(run_dir / "accuracy_matrix.csv", newline="") as handle:
        rows = list(csv.reader(handle))[1:]
    values = [[float(v) for v in row[1:]] for row in rows]
    expected = run_metrics["task_il"]["accuracy_matrix"]
    assert values == [pytest.approx(row, abs=5e-7) for row in expected]
    assert values != [pytest.approx(row, abs=5e-7) for row in run_metrics["class_il"]["accuracy_matrix"]]
    # the matrix figure: its title, and the task-IL values written in its cells, row by row
    texts = [t.text for t in ElementTree.parse(run_dir / "accuracy_matrix.svg").iter(f"{SVG}text")]
    assert texts[0].startswith("task-IL accuracy: ewc on digits")
    cells = [t for t in texts if len(t) == 4 and t[1] == "."]
    assert cells == [f"{v:.2f}" for row in expected for v in row]
    # the average-accuracy figure: the task-IL curve only, named
    assert run_figures.run_curves(run_metrics) == {
        "task-IL accuracy": run_metrics["task_il"]["average_accuracy"]
    }
    legend = [t.text for t in ElementTree.parse(run_dir / "average_accuracy.svg").iter(f"{SVG}text")]
    assert "task-IL accuracy" in legend and "class-IL accuracy" not in legend
    # metrics.json keeps both matrices
    assert len(run_metrics["class_il"]["accuracy_matrix"]) == len(expected) == 5


def test_report_heads_a_task_il_table_with_task_il_figures(task_il_run, tmp_path, capsys):
    run_dir, run_metrics, _ = task_il_run
    out = tmp_path / "report"
    assert main(["report", str(run_dir), "--out", str(out), "--no-figures"]) == 0
    printed = capsys.readouterr().out
    assert "digits, task-il: task-IL accuracy" in printed and "class-il" not in printed
    report = json.loads((out / "report.json").read_text())
    (group,) = report["groups"]
    assert (group["matrix"], group["accuracy"]) == ("task_il", "task-IL accuracy")
    for key in ("final_average_accuracy", "average_incremental_accuracy", "bwt"):
        assert group["figures"][key]["mean"] == pytest.approx(run_metrics["task_il"][key], abs=1e-12)
    assert "## digits, task-il: task-IL accuracy" in (out / "report.md").read_text()
    with (out / "report.csv").open() as handle:
        (row,) = csv.DictReader(handle)
    assert row["accuracy"] == "task-IL accuracy"
    assert float(row["final_average_accuracy_mean"]) == pytest.approx(
        run_metrics["task_il"]["final_average_accuracy"]
    )
    # --scenario still chooses the other matrix, and the header says so
    assert main(["report", str(run_dir), "--out", str(out), "--no-figures", "--scenario", "class_il"]) == 0
    assert "digits, task-il: class-IL accuracy" in capsys.readouterr().out
    (group,) = json.loads((out / "report.json").read_text())["groups"]
    expected = run_metrics["class_il"]["final_average_accuracy"]
    assert group["figures"]["final_average_accuracy"]["mean"] == pytest.approx(expected, abs=1e-12)


def fake_metrics(scenario: str) -> dict:
    class_il = [[0.9, 0.0], [0.4, 0.8]]
    task_il = [[0.95, 0.5], [0.9, 0.9]]
    return {
        "run": {"strategy": "replay", "dataset": "digits", "scenario": scenario},
        "class_il": metrics.summarize(class_il, [0.0, 0.0]) | {"accuracy_matrix": class_il},
        "task_il": metrics.summarize(task_il, [0.5, 0.5]) | {"accuracy_matrix": task_il},
        "final": {"f1": 0.6},
        "wall_seconds": 1.0,
    }


def rendered(table) -> str:
    screen = Console(file=io.StringIO(), width=200)
    screen.print(table)
    return screen.file.getvalue()


@pytest.mark.parametrize(
    ("scenario", "label", "final", "curves"),
    [
        ("class_il", "class-IL accuracy", "0.6000", ["class-IL accuracy", "task-IL accuracy"]),
        ("task_il", "task-IL accuracy", "0.9000", ["task-IL accuracy"]),
        ("domain_il", "domain-IL accuracy", "0.6000", ["domain-IL accuracy"]),
    ],
)
def test_each_scenario_names_and_shows_its_own_matrix(scenario, label, final, curves):
    run = fake_metrics(scenario)
    # final average accuracy by hand: class-IL (0.4 + 0.8) / 2 = 0.6, task-IL (0.9 + 0.9) / 2 = 0.9;
    # domain-IL's own figure is its class-IL matrix
    text = rendered(summary_table(run))
    assert f"replay on digits: {label}" in text
    assert summary_row(text, label)[0] == final
    assert list(run_figures.run_curves(run)) == curves
    assert run_figures.run_curves(run)[label] == run[metrics.scenario_matrix(scenario)]["average_accuracy"]
    assert metrics.shown_accuracy(run) == (metrics.scenario_matrix(scenario), label)
