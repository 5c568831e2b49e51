"""The `logger` group: scalars.csv against metrics.json, the same rows after a kill and resume as without,
TensorBoard's event files read back, and a missing package as a one-line error before training."""

from __future__ import annotations

import csv
import importlib.util

import pytest
from conftest import assert_resumes_exactly, incr, run_experiment

SETTINGS = ["dataset.n_tasks=2", "epochs=3", "hardware=cpu", "hardware.num_threads=1"]


def read_scalars(run_dir) -> list[dict]:
    with (run_dir / "scalars.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_csv_scalars_match_the_metrics(tmp_path):
    metrics = run_experiment(tmp_path / "run", SETTINGS)
    rows = read_scalars(tmp_path / "run")
    losses = [r for r in rows if r["name"] == "epoch/loss"]
    # digits, 2 tasks of 5 classes: 719 training images per task, batch 32 -> 23 steps per epoch
    assert [(int(r["task"]), int(r["epoch"]), int(r["step"])) for r in losses] == [
        (1, 1, 23),
        (1, 2, 46),
        (1, 3, 69),
        (2, 1, 92),
        (2, 2, 115),
        (2, 3, 138),
    ]
    first_task = [float(r["value"]) for r in losses[:3]]
    assert first_task[2] < first_task[0]  # training lowers the loss
    accuracy = [float(r["value"]) for r in rows if r["name"] == "task/class_il/average_accuracy"]
    assert accuracy == pytest.approx(metrics["class_il"]["average_accuracy"], abs=1e-12)
    bwt = [r for r in rows if r["name"] == "task/class_il/bwt"]
    assert len(bwt) == 1 and float(bwt[0]["value"]) == pytest.approx(metrics["class_il"]["bwt"])
    assert {float(r["value"]) for r in rows if r["name"] == "epoch/lr"} == {0.05}


def test_a_resumed_run_logs_the_same_rows(tmp_path):
    # task 1 is steps 1-69: step 80 is inside task 2, epoch 1, so the epoch loss so far must be checkpointed
    assert_resumes_exactly(tmp_path, [*SETTINGS[:2], "logger=csv"], fault="step:80:SIGTERM")
    expected, resumed = read_scalars(tmp_path / "uninterrupted"), read_scalars(tmp_path / "interrupted")
    drop_speed = [
        (r["step"], r["task"], r["epoch"], r["name"], r["value"])
        for r in expected
        if r["name"] != "epoch/samples_per_second"
    ]
    assert [
        (r["step"], r["task"], r["epoch"], r["name"], r["value"])
        for r in resumed
        if r["name"] != "epoch/samples_per_second"
    ] == drop_speed
    assert len(resumed) == len(expected)  # nothing logged twice


def test_tensorboard_events_hold_the_scalars_and_the_matrix(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    metrics = run_experiment(tmp_path / "run", [*SETTINGS, "logger=tensorboard"])
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"images": 0}).Reload()
    accuracy = [e.value for e in events.Scalars("task/class_il/average_accuracy")]
    assert accuracy == pytest.approx(metrics["class_il"]["average_accuracy"], abs=1e-6)
    assert [e.step for e in events.Scalars("epoch/loss")] == [23, 46, 69, 92, 115, 138]
    assert len(events.Images("task/accuracy_matrix")) == 2
    assert (tmp_path / "run" / "scalars.csv").is_file()  # csv stays on


@pytest.mark.parametrize("name", ["mlflow", "wandb"])
def test_a_logger_without_its_package_is_a_one_line_error(tmp_path, name):
    if importlib.util.find_spec(name) is not None:
        pytest.skip(f"{name} is installed here")
    result = incr("train", f"logger={name}", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert (
        f"logger={name} needs the {name} package, which is not installed: pip install {name}" in result.stderr
    )
    assert not (tmp_path / "run").exists()


def test_a_logger_is_any_class_its_yaml_names(tmp_path, monkeypatch):
    # A logger of the user's own, named by `_target_` and given the YAML's other keys: nothing in incr changes.
    (tmp_path / "my_logger.py").write_text(
        "import json\n"
        "class Recorder:\n"
        "    package = None\n"
        "    def __init__(self, run, file):\n"
        "        self.path = run.run_dir / file\n"
        "        self.rows = []\n"
        "    def scalars(self, values, step, task, epoch):\n"
        "        self.rows += [[step, name, value] for name, value in values.items()]\n"
        "    def matrix(self, matrix, step):\n"
        "        self.rows.append([step, 'matrix', matrix])\n"
        "    def close(self):\n"
        "        self.path.write_text(json.dumps(self.rows))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    metrics = run_experiment(
        tmp_path / "run",
        [*SETTINGS, "logger=csv", "logger._target_=my_logger.Recorder", "+logger.file=rows.json"],
    )
    import json

    rows = json.loads((tmp_path / "run" / "rows.json").read_text())
    accuracy = [value for _, name, value in rows if name == "task/class_il/average_accuracy"]
    assert accuracy == pytest.approx(metrics["class_il"]["average_accuracy"], abs=1e-12)
    assert [step for step, name, _ in rows if name == "matrix"] == [69, 138]
    assert (tmp_path / "run" / "scalars.csv").is_file()  # csv stays on


def test_a_logger_target_that_does_not_import_is_a_one_line_error(tmp_path):
    result = incr("train", "logger._target_=incr_cli.loggers.Nothing", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert "logger._target_='incr_cli.loggers.Nothing' is not an importable logger class" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_a_setting_the_logger_does_not_take_is_a_one_line_error(tmp_path):
    result = incr("train", "logger=tensorboard", "+logger.colour=red", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert "logger: incr_cli.loggers.TensorBoardScalars does not take these settings" in result.stderr
    assert "valid: log_dir" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
