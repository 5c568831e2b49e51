"""A sweep survives a failed job: the job is recorded as failed, the other jobs run, the sweep's last line
names the failed folders (exit status 1), and the sweep resumed in its folder reruns only what did not
finish; Ctrl-C in a sweep names the command that continues the whole sweep, and train.log keeps each message."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
import shutil
import signal

import pytest

from incr_cli import faults
from incr_cli.cli import main

# two tasks of five digits, one epoch: 23 steps of 32 samples per task, 46 per job
TINY = ["dataset.n_tasks=2", "epochs=1", "hardware=cpu", "hardware.num_threads=1", "progress=false"]
LEARNING_RATES = "optimizer.lr=0.05,1000000,0.01"  # the middle job diverges in its first task
JOBS = ("0_replay_seed0", "1_replay_seed0", "2_replay_seed0")


def incr_stderr(*args: str) -> tuple[int, str]:
    """`incr ARGS` in this process: (exit status, stderr); an exit through sys.exit counts as its code."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            status = main(list(args))
        except SystemExit as stop:
            status = stop.code
    return status, stderr.getvalue()


def metrics(job) -> dict:
    return json.loads((job / "metrics.json").read_text())


@pytest.fixture(scope="module")
def failed_sweep(tmp_path_factory):
    """The three-job sweep as it stands after its first command: (folder, exit status, stderr)."""
    folder = tmp_path_factory.mktemp("sweep")
    status, stderr = incr_stderr("train", "-m", LEARNING_RATES, *TINY, f"hydra.sweep.dir={folder}")
    return folder, status, stderr


def test_a_diverging_job_is_recorded_as_failed_and_the_sweep_runs_the_others(failed_sweep):
    folder, status, stderr = failed_sweep
    assert status == 1
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == list(JOBS)
    first, diverged, last = (folder / job for job in JOBS)
    assert metrics(first)["run"]["status"] == metrics(last)["run"]["status"] == "finished"
    run = metrics(diverged)["run"]
    assert run["status"] == "failed"
    assert run["error"].startswith("non-finite loss (nan) at task 1, epoch 1, step ")
    assert f"[incr][ERROR] - {run['error']}" in (diverged / "train.log").read_text()
    final = stderr.strip().splitlines()[-1]
    assert final.startswith(f"error: 1 of 3 jobs failed: {diverged} ")
    expected = ["incr", "train", "-m", LEARNING_RATES, *TINY, "resume=true", f"hydra.sweep.dir={folder}"]
    assert final.endswith(f"continue the sweep with: {shlex.join(expected)}")


def test_report_shows_the_finished_jobs_and_lists_the_failed_one_apart(failed_sweep, tmp_path):
    folder, _, _ = failed_sweep
    out = tmp_path / "report"
    assert main(["report", str(folder), "--out", str(out), "--no-figures"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [u["status"] for u in report["unfinished"]] == ["failed"]
    assert report["unfinished"][0]["run"].endswith(JOBS[1])
    # each learning rate is an experiment of its own: one row per finished job
    runs = sorted(run for group in report["groups"] for run in group["runs"])
    assert runs == [str(folder / JOBS[0]), str(folder / JOBS[2])]


def test_a_sweep_resumed_with_other_values_is_refused_before_anything_runs(failed_sweep):
    folder, _, _ = failed_sweep
    before = {job: (folder / job / ".hydra" / "config.yaml").read_text() for job in JOBS}
    status, stderr = incr_stderr(
        "train", "-m", "optimizer.lr=0.01,1000000,0.05", *TINY, "resume=true", f"hydra.sweep.dir={folder}"
    )
    assert status == 2
    assert stderr.startswith(f"error: {folder / JOBS[0]} was made with a different config (a sweep resumes")
    assert {job: (folder / job / ".hydra" / "config.yaml").read_text() for job in JOBS} == before


def test_the_sweep_resumed_with_skip_batch_reruns_only_the_failed_job(failed_sweep, tmp_path):
    folder = tmp_path / "sweep"
    shutil.copytree(failed_sweep[0], folder)
    first, diverged, last = (folder / job for job in JOBS)
    untouched = {job: (job / "metrics.json").read_text() for job in (first, last)}
    status, stderr = incr_stderr(
        "train",
        "-m",
        LEARNING_RATES,
        *TINY,
        "resume=true",
        "train.on_nonfinite=skip_batch",
        f"hydra.sweep.dir={folder}",
    )
    assert status == 0, stderr
    assert metrics(diverged)["run"]["status"] == "finished"
    assert "batch skipped" in (diverged / "train.log").read_text()
    for job, text in untouched.items():
        assert (job / "metrics.json").read_text() == text
        assert "this run already finished; nothing to do" in (job / "train.log").read_text()


@pytest.mark.slow  # a sweep stopped and continued, 17 s
def test_ctrl_c_in_a_sweep_names_the_command_that_continues_every_unfinished_job(tmp_path):
    folder = tmp_path / "sweep"
    sweep = ["train", "-m", "seed=0,1,2", *TINY, f"hydra.sweep.dir={folder}"]
    faults._counts.clear()
    os.environ["INCR_FAULT"] = "step:56:SIGINT"  # step 10 of the second job
    try:
        status, stderr = incr_stderr(*sweep)
    finally:
        del os.environ["INCR_FAULT"]
        faults._counts.clear()
    assert status == 128 + signal.SIGINT
    jobs = sorted(p for p in folder.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0_replay_seed0", "1_replay_seed1"]  # the third job never started
    message = stderr.strip().splitlines()[-1]
    command = shlex.join(
        ["incr", "train", "-m", "seed=0,1,2", *TINY, "resume=true", f"hydra.sweep.dir={folder}"]
    )
    assert (
        message
        == f"error: SIGINT received: checkpoint saved at task 1, epoch 1, batch 10; continue with: {command}"
    )
    assert f"[incr][ERROR] - {message.removeprefix('error: ')}" in (jobs[1] / "train.log").read_text()
    assert metrics(jobs[1])["run"]["status"] == "interrupted"

    status, stderr = incr_stderr(*shlex.split(command)[1:])
    assert status == 0, stderr
    jobs = sorted(p for p in folder.iterdir() if p.is_dir())
    assert [metrics(job)["run"]["status"] for job in jobs] == ["finished"] * 3
    assert "resumed from" in (jobs[1] / "train.log").read_text()
    assert "already finished" in (jobs[0] / "train.log").read_text()


def test_a_run_stopped_by_a_nonfinite_loss_resumes_with_skip_batch(tmp_path):
    run_dir = tmp_path / "run"
    status, stderr = incr_stderr("train", "optimizer.lr=1000000", *TINY, f"hydra.run.dir={run_dir}")
    assert status == 1
    message = stderr.strip().removeprefix("error: ")
    assert message == metrics(run_dir)["run"]["error"]
    assert f"[incr][ERROR] - {message}" in (run_dir / "train.log").read_text()
    assert incr_stderr("resume", str(run_dir), "train.on_nonfinite=skip_batch")[0] == 0
    assert metrics(run_dir)["run"]["status"] == "finished"
