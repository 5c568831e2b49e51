"""Sweeps beyond one process: Hydra's joblib launcher runs jobs side by side, the SLURM launcher config
composes without a cluster, a job requeued by SLURM continues its run, and an Optuna search optimises the
validation accuracy."""

from __future__ import annotations

import datetime
import json
import os

import pytest
import yaml
from conftest import incr, run_experiment

from incr_cli import faults
from incr_cli.cli import main

TINY = ["dataset.n_tasks=2", "epochs=2", "hardware=cpu", "hardware.num_threads=1", "progress=false"]


def log_interval(run_dir) -> tuple[datetime.datetime, datetime.datetime]:
    """First and last timestamp of a run's train.log ("[2026-11-22 20:43:23,537][incr][INFO] - ...")."""
    stamps = [line[1:24] for line in (run_dir / "train.log").read_text().splitlines() if line.startswith("[")]
    parse = [datetime.datetime.strptime(s, "%Y-%m-%d %H:%M:%S,%f") for s in stamps]
    return parse[0], parse[-1]


@pytest.mark.slow
def test_joblib_runs_a_four_job_sweep_in_parallel_and_resumes_it(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    sweep = [
        "train",
        "-m",
        "strategy=finetune,replay",
        "seed=0,1",
        *TINY,
        "epochs=6",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        f"hydra.sweep.dir={tmp_path}",
    ]
    result = incr(*sweep)
    assert result.returncode == 0, result.stderr[-2000:]
    runs = sorted(p for p in tmp_path.iterdir() if (p / "metrics.json").is_file())
    assert len(runs) == 4
    intervals = [log_interval(run) for run in runs]
    overlapping = [
        (a, b)
        for a in range(4)
        for b in range(a + 1, 4)
        if intervals[a][0] < intervals[b][1] and intervals[b][0] < intervals[a][1]
    ]
    assert overlapping, f"no two jobs ran at the same time: {intervals}"
    finished = {run.name: json.loads((run / "metrics.json").read_text()) for run in runs}
    assert all(m["run"]["status"] == "finished" for m in finished.values())

    again = incr(*sweep, "resume=true")  # each job finds its finished run and leaves it as it is
    assert again.returncode == 0, again.stderr[-2000:]
    for run in runs:
        assert "this run already finished" in (run / "train.log").read_text()
        assert json.loads((run / "metrics.json").read_text()) == finished[run.name]


def test_the_slurm_launcher_config_composes_without_a_cluster():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    result = incr(
        "train",
        "hydra/launcher=slurm",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.timeout_min=600",
        "hydra.launcher.gpus_per_node=2",
        "--cfg",
        "hydra",
    )
    assert result.returncode == 0, result.stderr
    launcher = yaml.safe_load(result.stdout)["hydra"]["launcher"]
    assert launcher["_target_"].endswith("submitit_launcher.SlurmLauncher")
    assert (launcher["partition"], launcher["timeout_min"], launcher["gpus_per_node"]) == ("gpu", 600, 2)
    assert launcher["max_num_timeout"] == 3  # requeues after preemption or timeout


def test_a_job_requeued_by_slurm_continues_its_run(tmp_path, monkeypatch):
    settings = ["strategy=replay", *TINY, "hardware.deterministic=true"]
    expected = run_experiment(tmp_path / "uninterrupted", settings)
    run_dir = tmp_path / "preempted"
    command = ["train", f"hydra.run.dir={run_dir}", *settings]
    faults._counts.clear()
    monkeypatch.setenv("INCR_FAULT", "step:30:SIGTERM")  # SLURM's preemption signal, inside task 2
    with pytest.raises(SystemExit):
        main(command)
    monkeypatch.delenv("INCR_FAULT")
    faults._counts.clear()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # the same command, rerun by SLURM after the requeue
    assert main(command) == 0
    log = (run_dir / "train.log").read_text()
    assert "requeued by SLURM" in log and "resumed from" in log
    resumed = json.loads((run_dir / "metrics.json").read_text())
    assert resumed["class_il"]["accuracy_matrix"] == expected["class_il"]["accuracy_matrix"]


@pytest.mark.slow  # an Optuna search of several runs
def test_optuna_search_maximises_the_validation_accuracy(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    status = main(
        ["train", "-m", "search=derpp", "hydra.sweeper.n_trials=3", *TINY, f"hydra.sweep.dir={tmp_path}"]
    )
    assert status == 0
    trials = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*/metrics.json"))]
    assert len(trials) == 3
    assert all(t["run"]["evaluated_on"] == "val" for t in trials)
    # the held-out part: 10% of each task's training images, not the test set
    assert all(t["tasks"][0]["val_samples"] > 0 for t in trials)
    best = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(max(t["class_il"]["final_average_accuracy"] for t in trials))
    assert set(best["best_params"]) == {"strategy.alpha", "strategy.beta", "optimizer.lr"}


def test_evaluate_on_val_needs_a_held_out_part(tmp_path):
    result = incr("train", "evaluate_on=val", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert "evaluate_on=val needs a held-out part: set dataset.val_fraction" in result.stderr
    assert os.listdir(tmp_path) == []
