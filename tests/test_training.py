"""Training on the default digits stream (scikit-learn's 8x8 digits, 5 tasks of 2 classes, MLP 64-256-256):
what the strategies achieve, what a run directory holds, and one pinned exact-value regression."""

from __future__ import annotations

import csv
from pathlib import Path
from xml.etree import ElementTree

import pytest
import torch
import yaml
from conftest import assert_resumes_exactly, final_accuracy, run_experiment

from incr_cli import checkpoint


@pytest.fixture(scope="module")
def p1_runs(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """`incr train strategy=S` with every other setting at its default, for the three strategies."""
    runs = {}
    for strategy in ("finetune", "replay", "joint"):
        run_dir = tmp_path_factory.mktemp("p1") / strategy
        runs[strategy] = run_dir, run_experiment(run_dir, [f"strategy={strategy}"])
    return runs


# ----------------------------------------------------------------------------------------- what methods achieve
def test_replay_remembers_what_finetune_forgets_on_digits(p1_runs):
    finetune, replay = p1_runs["finetune"][1], p1_runs["replay"][1]
    assert final_accuracy(replay) >= final_accuracy(finetune) + 0.30


def test_joint_training_beats_finetune_on_digits(p1_runs):
    finetune, joint = p1_runs["finetune"][1], p1_runs["joint"][1]
    assert final_accuracy(joint) >= final_accuracy(finetune) + 0.30


def test_finetune_forgets_and_replay_forgets_less(p1_runs):
    finetune, replay = p1_runs["finetune"][1]["class_il"], p1_runs["replay"][1]["class_il"]
    assert finetune["average_forgetting"] > replay["average_forgetting"]
    assert finetune["bwt"] < replay["bwt"]


@pytest.mark.parametrize("strategy", ["finetune", "replay", "joint"])
def test_task_il_accuracy_is_at_least_class_il_accuracy_on_every_seen_task(p1_runs, strategy):
    metrics = p1_runs[strategy][1]
    class_il, task_il = metrics["class_il"]["accuracy_matrix"], metrics["task_il"]["accuracy_matrix"]
    # the task-IL argmax runs over a subset of the classes (the true class's task), so it is right whenever
    # the class-IL argmax over all seen classes is right
    for i in range(5):
        for j in range(i + 1):
            assert task_il[i][j] >= class_il[i][j], (i, j)


# ----------------------------------------------------------------------------------------- the run directory
def test_metrics_json_holds_the_accuracy_matrices_and_every_figure(p1_runs):
    _, metrics = p1_runs["replay"]
    assert metrics["run"]["status"] == "finished"
    assert (metrics["run"]["strategy"], metrics["run"]["dataset"], metrics["run"]["model"]) == (
        "replay",
        "digits",
        "mlp",
    )
    for scenario in ("class_il", "task_il"):
        m = metrics[scenario]
        assert len(m["accuracy_matrix"]) == 5 and all(len(row) == 5 for row in m["accuracy_matrix"])
        assert len(m["initial_accuracy"]) == 5
        assert len(m["average_accuracy"]) == 5 and len(m["forgetting"]) == 4
        for key in ("average_incremental_accuracy", "average_forgetting", "bwt", "fwt"):
            assert isinstance(m[key], float), (scenario, key)
        # A_4 is the mean of the last row's five tasks
        assert m["final_average_accuracy"] == pytest.approx(sum(m["accuracy_matrix"][-1]) / 5)
    # nothing is learned before the first task: class-IL cannot predict any class
    assert metrics["class_il"]["initial_accuracy"] == [0.0] * 5


def test_final_precision_recall_f1_and_confusion_matrix_describe_the_last_model(p1_runs):
    _, metrics = p1_runs["replay"]
    final, tasks = metrics["final"], metrics["tasks"]
    confusion = torch.tensor(final["confusion_matrix"])
    assert confusion.shape == (10, 10)
    # every test sample once: 72 + 72 + 72 + 72 + 71 = 359
    assert confusion.sum() == sum(t["test_samples"] for t in tasks) == 359
    # the diagonal holds the class-IL hits of the last row: sum_j R[4][j] * n_j
    hits = sum(
        r * t["test_samples"] for r, t in zip(metrics["class_il"]["accuracy_matrix"][-1], tasks, strict=True)
    )
    assert confusion.trace() == round(hits)
    for key in ("precision", "recall", "f1"):
        assert 0.5 < final[key] <= 1.0
    assert metrics["per_task"][-1]["f1"] == final["f1"]


def test_metrics_json_records_timings_size_and_memory(p1_runs):
    _, metrics = p1_runs["replay"]
    assert [t["task"] for t in metrics["per_task"]] == [0, 1, 2, 3, 4]
    for timing, task in zip(metrics["per_task"], metrics["tasks"], strict=True):
        assert timing["train_seconds"] > 0 and timing["eval_seconds"] > 0
        # 10 epochs over the task's training samples (the replayed samples come on top)
        assert timing["samples"] == 10 * task["train_samples"]
        assert timing["samples_per_second"] == pytest.approx(timing["samples"] / timing["train_seconds"])
        # a full memory: 200 images of 1x8x8 uint8 (64 bytes) and 200 int64 labels = 12,800 + 1,600 bytes
        assert timing["memory_samples"] == 200 and timing["memory_bytes"] == 14_400
    # MLP 64-256-256 plus the 10-class head: (64*256 + 256) + (256*256 + 256) + (256*10 + 10) = 85,002
    assert metrics["parameters"] == 85_002
    assert metrics["peak_memory_bytes"] > 0 and metrics["wall_seconds"] > 0


def test_accuracy_matrix_csv_matches_metrics_json(p1_runs):
    run_dir, metrics = p1_runs["replay"]
    with open(run_dir / "accuracy_matrix.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["after_task", "task_1", "task_2", "task_3", "task_4", "task_5"]
    assert [row[0] for row in rows[1:]] == ["1", "2", "3", "4", "5"]
    for row, expected in zip(rows[1:], metrics["class_il"]["accuracy_matrix"], strict=True):
        assert [float(v) for v in row[1:]] == pytest.approx(expected, abs=5e-7)  # written with 6 decimals


def test_a_run_directory_holds_plots_checkpoints_config_and_log(p1_runs):
    run_dir, metrics = p1_runs["replay"]
    for figure in ("accuracy_matrix.svg", "average_accuracy.svg"):
        assert ElementTree.parse(run_dir / figure).getroot().tag == "{http://www.w3.org/2000/svg}svg", figure
    for name in [f"task_{k}.pt" for k in range(1, 6)] + ["last.pt"]:
        assert (run_dir / "checkpoints" / name).is_file(), name
    last = checkpoint.load(run_dir / "checkpoints" / "last.pt")
    assert last["metrics"]["class_il"]["accuracy_matrix"] == metrics["class_il"]["accuracy_matrix"]
    config = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    assert config["strategy"]["_target_"] == "incr_cli.strategies.replay.Replay"
    assert config["strategy"]["memory"]["size"] == 200
    assert config["dataset"]["name"] == "digits" and config["seed"] == 0 and config["epochs"] == 10
    assert "strategy=replay" in yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
    log = (run_dir / "train.log").read_text()
    assert "task 5/5" in log and "finished" in log


def test_replay_with_a_memory_larger_than_one_task_trains_on_digits(tmp_path):
    metrics = run_experiment(tmp_path / "run", ["strategy.memory.size=500", "epochs=1"])
    # the memory keeps everything until it is full: 288 + 288 samples of the first two tasks > 500
    assert [t["memory_samples"] for t in metrics["per_task"]][:2] == [288, 500]


# ----------------------------------------------------------------------------------------- pinned regression
def test_two_task_finetune_on_digits_reproduces_its_pinned_accuracy_matrix(tmp_path):
    """Exact values, as torchtune pins its losses. A change of these numbers must be explained in the commit
    that makes it (new initialisation, batch order, loss, data split...); never update them silently.
    Pinned on the CPU (hardware=cpu, so a machine with a GPU runs the same kernels); one thread or two give the
    same numbers."""
    metrics = run_experiment(
        tmp_path / "run",
        [
            "dataset.n_tasks=2",
            "epochs=2",
            "strategy=finetune",
            "hardware=cpu",
            "hardware.deterministic=true",
            "seed=0",
        ],
    )
    assert [t["test_samples"] for t in metrics["tasks"]] == [180, 179]

    def rounded(matrix):
        return [[round(v, 6) for v in row] for row in matrix]

    # class-IL: 173/180 after task 1; task 1 entirely forgotten after task 2, which scores 171/179
    assert rounded(metrics["class_il"]["accuracy_matrix"]) == [[0.961111, 0.0], [0.0, 0.955307]]
    # task-IL: 173/180, 12/179 (untrained task 2); 68/180, 171/179
    assert rounded(metrics["task_il"]["accuracy_matrix"]) == [[0.961111, 0.067039], [0.377778, 0.955307]]
    # the untrained model within each task's classes: 42/180 and 16/179
    assert [round(v, 6) for v in metrics["task_il"]["initial_accuracy"]] == [0.233333, 0.089385]
    assert round(metrics["final"]["f1"], 6) == 0.344016


def test_a_learning_rate_schedule_runs_per_task_and_resumes_with_its_state(tmp_path):
    # cosine over each task's epochs; step 30 is in the 2nd epoch of task 1 (23 batches an epoch), after a
    # scheduler step: a resume that lost the scheduler's state would train with another learning rate
    resumed = assert_resumes_exactly(
        tmp_path, ["scheduler=cosine", "epochs=3", "dataset.n_tasks=2"], fault="step:30:SIGTERM"
    )
    assert resumed["run"]["status"] == "finished"
