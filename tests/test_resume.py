"""Runs that never lose work: killed, interrupted or corrupted runs resume to exactly the same numbers."""

from __future__ import annotations

import errno
import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_experiment

from incr_cli import checkpoint
from incr_cli.cli import main

# Small but real: digits, 5 tasks, 2 epochs of 9 batches each (90 steps), a step checkpoint every 5 steps.
SETTINGS = [
    "epochs=2",
    "hardware=cpu",
    "hardware.num_threads=1",
    "hardware.deterministic=true",
    "checkpoint.every_steps=5",
    "progress=false",
]


def incr(*args: str, fault: str | None = None) -> subprocess.CompletedProcess:
    """The real `incr` command in a child process; `fault` kills it at a chosen point (incr_cli/faults.py)."""
    env = {k: v for k, v in os.environ.items() if k != "INCR_FAULT"}
    if fault:
        env["INCR_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "incr_cli", *args], capture_output=True, text=True, env=env)


def results(run_dir: Path) -> tuple[dict, dict]:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    model = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
    return metrics, model


def assert_same_run(resumed: Path, reference: Path) -> None:
    (metrics, model), (expected, expected_model) = results(resumed), results(reference)
    assert metrics["run"]["status"] == "finished"
    for scenario in ("class_il", "task_il"):
        assert metrics[scenario]["accuracy_matrix"] == expected[scenario]["accuracy_matrix"]
        assert metrics[scenario]["initial_accuracy"] == expected[scenario]["initial_accuracy"]
    assert len(metrics["per_task"]) == len(expected["per_task"])  # nothing recorded twice
    assert model.keys() == expected_model.keys()
    for key in model:
        assert torch.equal(model[key], expected_model[key]), key


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, Path]:
    """The reference runs, never killed (in this process: the kills below need child processes)."""
    runs = {}
    for strategy in ("replay", "finetune"):
        runs[strategy] = tmp_path_factory.mktemp(f"uninterrupted_{strategy}")
        run_experiment(runs[strategy], [f"strategy={strategy}", *SETTINGS])
    return runs


# SIGKILL mid-epoch (step 40 is in task 3), in evaluation, half-way through writing a checkpoint, between
# two tasks; each time `incr resume` continues from what survived. Finetune, whose only state is the model
# and optimizer, gets two of the kills.
KILLS = {
    "replay": ["step:40", "evaluate:2", "checkpoint_write:3", "task_end:1"],
    "finetune": ["checkpoint_write:4", "evaluate:3"],
}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["replay", "finetune"])
def test_run_killed_anywhere_resumes_to_identical_numbers(strategy, uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    first, *later = KILLS[strategy]
    killed = incr("train", f"strategy={strategy}", *SETTINGS, f"hydra.run.dir={run_dir}", fault=first)
    assert killed.returncode == -signal.SIGKILL
    for fault in later:
        killed = incr("resume", str(run_dir), fault=fault)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert main(["resume", str(run_dir)]) == 0
    assert_same_run(run_dir, uninterrupted[strategy])
    assert (run_dir / "train.log").read_text().count("resumed from") == len(KILLS[strategy])


@pytest.mark.slow
def test_sigterm_mid_task_checkpoints_and_resume_finishes_identically(uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    stopped = incr("train", "strategy=replay", *SETTINGS, f"hydra.run.dir={run_dir}", fault="step:50:SIGTERM")
    assert stopped.returncode == 128 + signal.SIGTERM
    assert "SIGTERM received: checkpoint saved at task 3" in stopped.stderr
    assert f"incr resume {run_dir}" in stopped.stderr
    saved = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["position"]
    assert saved["step"] == 50 and saved["started"]  # mid-task: step 50 is in task 3
    assert json.loads((run_dir / "metrics.json").read_text())["run"]["status"] == "interrupted"
    assert main(["resume", str(run_dir)]) == 0
    assert_same_run(run_dir, uninterrupted["replay"])


@pytest.mark.slow
def test_truncated_last_checkpoint_falls_back_to_an_earlier_one(uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    killed = incr("train", "strategy=replay", *SETTINGS, f"hydra.run.dir={run_dir}", fault="task_end:3")
    assert killed.returncode == -signal.SIGKILL
    last = run_dir / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])  # also truncates task_3.pt: last.pt is a hard link to it
    assert main(["resume", str(run_dir)]) == 0
    log = (run_dir / "train.log").read_text()
    assert f"{last} is not a usable incr checkpoint (unreadable or truncated); falling back" in log
    assert_same_run(run_dir, uninterrupted["replay"])


class Payload:
    """Unpickling this would run a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_with_pickled_code_is_refused_without_running_it(tmp_path):
    marker, path = tmp_path / "pwned", tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"format": checkpoint.FORMAT, "model": Payload(marker)}, handle, protocol=2)
    with pytest.raises(
        checkpoint.CheckpointError,
        match=r"evil\.pt is not a usable incr checkpoint \(unsafe content refused\)",
    ):
        checkpoint.load(path)
    assert not marker.exists()


def test_foreign_and_truncated_files_are_refused_with_their_name(tmp_path):
    foreign, truncated = tmp_path / "foreign.pt", tmp_path / "truncated.pt"
    torch.save({"weights": torch.ones(3)}, foreign)
    with pytest.raises(checkpoint.CheckpointError, match=r"foreign\.pt is not an incr checkpoint"):
        checkpoint.load(foreign)
    checkpoint.save(truncated, {"model": {"w": torch.ones(1000)}})
    truncated.write_bytes(truncated.read_bytes()[:-100])
    with pytest.raises(checkpoint.CheckpointError, match=r"truncated\.pt is not a usable incr checkpoint"):
        checkpoint.load(truncated)


def test_disk_full_while_saving_is_a_clear_error_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoint.save(path, {"model": {"w": torch.zeros(4)}})

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.os, "fsync", full_disk)
    with pytest.raises(
        checkpoint.CheckpointError, match="no space left on the device while writing .*last.pt"
    ):
        checkpoint.save(path, {"model": {"w": torch.ones(4)}})
    monkeypatch.undo()
    assert torch.equal(checkpoint.load(path)["model"]["w"], torch.zeros(4))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary left behind


def test_resume_refuses_an_override_that_changes_results(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_experiment(run_dir, ["epochs=1"])
    saved_overrides = (run_dir / ".hydra" / "overrides.yaml").read_text()
    capsys.readouterr()
    assert main(["resume", str(run_dir), "strategy.memory.size=10"]) == 2
    assert capsys.readouterr().err.startswith("error: strategy.memory.size would change the run's results")
    assert main(["train", "epochs=2", "resume=true", "progress=false", f"hydra.run.dir={run_dir}"]) == 2
    assert "was made with a different config" in capsys.readouterr().err
    assert (
        run_dir / ".hydra" / "overrides.yaml"
    ).read_text() == saved_overrides  # refused before Hydra wrote
    assert main(["resume", str(run_dir), "hardware.num_threads=1", "progress=false"]) == 0
    assert "already finished" in (run_dir / "train.log").read_text()


def test_nonfinite_loss_stops_with_task_epoch_and_step(tmp_path, capsys):
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as stopped:
        main(["train", "optimizer.lr=1e30", "progress=false", f"hydra.run.dir={run_dir}"])
    assert stopped.value.code == 1
    message = capsys.readouterr().err.strip()
    assert message.startswith("error: non-finite loss") and "at task 1, epoch 1, step" in message
    assert len(message.splitlines()) == 1
    assert json.loads((run_dir / "metrics.json").read_text())["run"]["status"] == "failed"


@pytest.mark.slow
def test_rerunning_a_killed_sweep_with_resume_finishes_it_and_skips_finished_jobs(tmp_path):
    sweep = [
        "train",
        "-m",
        "strategy=finetune,replay",
        "epochs=1",
        "hardware.num_threads=1",
        "hardware.deterministic=true",
        "progress=false",
        f"hydra.sweep.dir={tmp_path}",
    ]
    killed = incr(*sweep, fault="task_end:2")  # the first job dies after its second task
    assert killed.returncode == -signal.SIGKILL
    jobs = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert len(jobs) == 1
    assert main([*sweep, "resume=true"]) == 0
    jobs = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert len(jobs) == 2
    finished_at = [(j / "metrics.json").stat().st_mtime_ns for j in jobs]
    assert main([*sweep, "resume=true"]) == 0
    assert [(j / "metrics.json").stat().st_mtime_ns for j in jobs] == finished_at  # nothing retrained
    reference = tmp_path.parent / "reference"
    run_experiment(
        reference, ["strategy=finetune", "epochs=1", "hardware.num_threads=1", "hardware.deterministic=true"]
    )
    assert_same_run(jobs[0], reference)


def test_nonfinite_loss_with_skip_batch_skips_the_batch_and_finishes(tmp_path):
    run_dir = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "optimizer.lr=1e30",
                "train.on_nonfinite=skip_batch",
                "epochs=1",
                "progress=false",
                f"hydra.run.dir={run_dir}",
            ]
        )
        == 0
    )
    assert "batch skipped" in (run_dir / "train.log").read_text()
    assert json.loads((run_dir / "metrics.json").read_text())["run"]["status"] == "finished"
