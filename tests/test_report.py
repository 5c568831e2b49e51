"""`incr report`: a real sweep's table against its runs' own metrics.json, unfinished runs kept apart, the
figures as valid PNG and SVG files, and bad input as one line with exit status 2."""

from __future__ import annotations

import csv
import json
import os
import statistics
import struct
import xml.etree.ElementTree as ElementTree

import pytest

from incr_cli import faults
from incr_cli.cli import main

SEEDS = (0, 1, 2)
METHODS = ("finetune", "replay")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """2 methods x 3 seeds on digits as one Hydra multirun, plus one run stopped by SIGTERM in task 2."""
    root = tmp_path_factory.mktemp("sweep")
    settings = ["epochs=2", "hardware=cpu", "hardware.num_threads=1", "progress=false"]
    status = main(
        [
            "train",
            "-m",
            f"strategy={','.join(METHODS)}",
            f"seed={','.join(map(str, SEEDS))}",
            *settings,
            f"hydra.sweep.dir={root / 'multirun'}",
        ]
    )
    assert status == 0
    # the same strategy on a domain-IL stream of the same data set: a table of its own
    domain = [
        "strategy=replay",
        "dataset.scenario=domain_il",
        "dataset.domains=permuted",
        "dataset.n_tasks=2",
    ]
    assert main(["train", *domain, *settings, f"hydra.run.dir={root / 'domain'}"]) == 0
    faults._counts.clear()
    os.environ["INCR_FAULT"] = "step:30:SIGTERM"  # 18 steps per task: stops in task 2
    try:
        with pytest.raises(SystemExit):
            main(["train", "strategy=replay", "seed=7", *settings, f"hydra.run.dir={root / 'stopped'}"])
    finally:
        del os.environ["INCR_FAULT"]
        faults._counts.clear()
    return root


def own_metrics(root, method: str) -> list[dict]:
    runs = sorted((root / "multirun").glob(f"*_{method}_seed*/metrics.json"))
    assert len(runs) == len(SEEDS)
    return [json.loads(path.read_text()) for path in runs]


def test_report_matches_the_runs_own_metrics(sweep, tmp_path):
    out = tmp_path / "report"
    assert main(["report", str(sweep), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    groups = {g["method"]: g for g in report["groups"] if g["dataset"] == "digits"}
    assert set(groups) == set(METHODS)
    domain = [g for g in report["groups"] if g["dataset"] != "digits"]
    assert [(g["dataset"], g["method"], g["seeds"]) for g in domain] == [("digits, domain-il", "replay", [0])]
    for method in METHODS:
        runs = own_metrics(sweep, method)
        group = groups[method]
        assert group["dataset"] == "digits" and group["seeds"] == list(SEEDS)
        for key in ("final_average_accuracy", "average_incremental_accuracy", "average_forgetting", "bwt"):
            values = [run["class_il"][key] for run in runs]
            assert group["figures"][key]["mean"] == pytest.approx(sum(values) / 3, abs=1e-12)
            # sample standard deviation, n - 1 in the denominator
            mean = sum(values) / 3
            sample_std = (sum((v - mean) ** 2 for v in values) / 2) ** 0.5
            assert group["figures"][key]["std"] == pytest.approx(sample_std, abs=1e-12)
        f1 = [run["final"]["f1"] for run in runs]
        assert group["figures"]["f1"]["mean"] == pytest.approx(statistics.fmean(f1), abs=1e-12)
        memory = [run["per_task"][-1]["memory_bytes"] for run in runs]
        assert group["figures"]["memory_bytes"]["mean"] == pytest.approx(statistics.fmean(memory))
    assert (
        groups["replay"]["figures"]["memory_bytes"]["mean"]
        > 0
        == groups["finetune"]["figures"]["memory_bytes"]["mean"]
    )

    # Sorted best first by final average accuracy; the CSV carries the same numbers.
    digits = [g for g in report["groups"] if g["dataset"] == "digits"]
    order = [g["method"] for g in digits]
    means = [g["figures"]["final_average_accuracy"]["mean"] for g in digits]
    assert means == sorted(means, reverse=True) and len(order) == 2
    with (out / "report.csv").open() as handle:
        rows = {row["method"]: row for row in csv.DictReader(handle) if row["dataset"] == "digits"}
    for method in METHODS:
        expected = groups[method]["figures"]["final_average_accuracy"]["mean"]
        assert float(rows[method]["final_average_accuracy_mean"]) == pytest.approx(expected)
        assert rows[method]["seeds"] == "3"


def test_an_unfinished_run_is_listed_apart_and_not_averaged(sweep, tmp_path):
    out = tmp_path / "report"
    assert main(["report", str(sweep), "--out", str(out), "--no-figures"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [u["status"] for u in report["unfinished"]] == ["interrupted"]
    assert (
        report["unfinished"][0]["run"].endswith("stopped") and report["unfinished"][0]["tasks_done"] == "1/5"
    )
    assert all(7 not in g["seeds"] for g in report["groups"])
    text = (out / "report.md").read_text()
    assert "Not finished" in text and "stopped" in text


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_figures_are_valid_png_and_svg(sweep, tmp_path):
    out = tmp_path / "report"
    assert main(["report", str(sweep / "multirun"), "--out", str(out)]) == 0
    for name in ("average_accuracy", "forgetting"):
        width, height = png_size(out / f"report_digits_class_il_{name}.png")
        assert 600 < width < 1000 and 300 < height <= 400  # 6 x 4 inches and the legend right of the axes
    matrices_width, _ = png_size(out / "report_digits_class_il_accuracy_matrices.png")
    assert matrices_width > 2 * 300  # two matrices side by side
    for svg in out.glob("*.svg"):
        root = ElementTree.parse(svg).getroot()
        assert root.tag.endswith("svg") and float(root.get("width").removesuffix("pt")) > 100
    assert len(list(out.glob("*.svg"))) == 3


def test_task_il_and_column_choice(sweep, tmp_path):
    out = tmp_path / "report"
    args = [
        "report",
        str(sweep / "multirun"),
        "--out",
        str(out),
        "--scenario",
        "task_il",
        "--no-figures",
        "--columns",
        "final_average_accuracy,wall_seconds",
        "--sort",
        "wall_seconds",
    ]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    for group in report["groups"]:
        runs = own_metrics(sweep, group["method"])
        values = [run["task_il"]["final_average_accuracy"] for run in runs]
        assert group["figures"]["final_average_accuracy"]["mean"] == pytest.approx(statistics.fmean(values))
    walls = [g["figures"]["wall_seconds"]["mean"] for g in report["groups"]]
    assert walls == sorted(walls)  # lower is better for time
    header = (out / "report.md").read_text().splitlines()
    assert "| method | seeds | final avg acc | wall s |" in header


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--columns", "accuracy"], "unknown column 'accuracy'; valid: final_average_accuracy"),
        (["--sort", "speed"], "unknown column 'speed'"),
    ],
)
def test_bad_report_options_are_one_line_errors(sweep, capsys, args, message):
    assert main(["report", str(sweep), *args]) == 2
    assert message in capsys.readouterr().err


def test_a_folder_without_runs_is_an_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no incr run directory" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err
