"""hardware=ddp on CPU: two gloo processes started by torchrun train the same model as one process with the
same global batch, rank 0 alone writes, and what ddp cannot run is refused before training."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from conftest import incr, run_experiment
from omegaconf import OmegaConf

from incr_cli import distributed
from incr_cli.cli import main
from incr_cli.run_checkpoints import Checkpointer, StopSignals, after_step

SETTINGS = ["strategy=finetune", "epochs=2", "progress=false"]


def torchrun(*args: str) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=2 -m incr_cli train ARGS`."""
    return torchrun_command("train", *args)


def torchrun_command(*args: str, fault: str | None = None) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=2 -m incr_cli ARGS`, with INCR_FAULT=`fault` in every rank."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("INCR_FAULT", None)
    if fault is not None:
        env["INCR_FAULT"] = fault
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "incr_cli",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    # digits, 5 tasks, batch 32: each rank trains on 16 rows of every global batch (the last batch of an
    # epoch is split 8 + 7 or so, weighted by size), and the averaged gradient is the global batch's.
    result = torchrun("hardware=ddp", "hardware.device=cpu", *SETTINGS, f"hydra.run.dir={tmp_path / 'ddp'}")
    assert result.returncode == 0, result.stderr[-3000:]
    single = run_experiment(tmp_path / "single", ["hardware=cpu", "hardware.num_threads=1", *SETTINGS])
    ddp = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert ddp["run"]["status"] == "finished"
    # Stated tolerance: float sums in another order; 1e-6 on the accuracies (1/144 is one test image).
    for scenario in ("class_il", "task_il"):
        for got, want in zip(
            ddp[scenario]["accuracy_matrix"], single[scenario]["accuracy_matrix"], strict=True
        ):
            assert got == pytest.approx(want, abs=1e-6)
    ddp_weights = torch.load(tmp_path / "ddp" / "checkpoints" / "last.pt", weights_only=True)["model"]
    single_weights = torch.load(tmp_path / "single" / "checkpoints" / "last.pt", weights_only=True)["model"]
    for name, value in single_weights.items():
        torch.testing.assert_close(ddp_weights[name], value, rtol=1e-4, atol=1e-5)
    # Rank 0 wrote the run directory; rank 1's Hydra files went to a scratch folder it removed.
    assert (tmp_path / "ddp" / ".hydra" / "config.yaml").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "single"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def two_nodes(*args: str) -> list[subprocess.CompletedProcess]:
    """`torchrun --nnodes=2` started twice on this machine, one process per "node", as a cluster's nodes each
    start it (node_rank 0 and 1, rendezvous at node 0's address), gloo."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("INCR_FAULT", None)
    port = free_port()
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                "--nproc_per_node=1",
                f"--node_rank={node}",
                "--master_addr=127.0.0.1",
                f"--master_port={port}",
                "-m",
                "incr_cli",
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for node in (0, 1)
    ]
    done = []
    for node in nodes:
        stdout, stderr = node.communicate(timeout=300)
        done.append(subprocess.CompletedProcess(node.args, node.returncode, stdout, stderr))
    return done


@pytest.mark.slow
def test_two_nodes_of_one_process_equal_one_process(tmp_path):
    # as the one-machine test above: every global batch split over the two ranks, gradients averaged
    nodes = two_nodes(
        "train", "hardware=ddp", "hardware.device=cpu", *SETTINGS, f"hydra.run.dir={tmp_path / 'ddp'}"
    )
    for node in nodes:
        assert node.returncode == 0, node.stderr[-3000:]
    single = run_experiment(tmp_path / "single", ["hardware=cpu", "hardware.num_threads=1", *SETTINGS])
    ddp = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert ddp["run"]["status"] == "finished"
    for scenario in ("class_il", "task_il"):  # float sums in another order: 1e-6 is far below one test image
        for got, want in zip(
            ddp[scenario]["accuracy_matrix"], single[scenario]["accuracy_matrix"], strict=True
        ):
            assert got == pytest.approx(want, abs=1e-6)


@pytest.mark.slow
def test_a_ddp_run_with_augmentation_resumes_bit_exactly(tmp_path):
    # Each rank augments its slice with its own generator; the checkpoint carries every rank's, so the run
    # stopped at step 40 and resumed (by both ranks, as torchrun restarts them) repeats the uninterrupted one.
    settings = [
        "hardware=ddp",
        "hardware.device=cpu",
        "hardware.deterministic=true",
        "strategy=replay",
        "epochs=1",
        "dataset.augment.horizontal_flip=true",
        "dataset.augment.crop_padding=1",
        "progress=false",
    ]
    whole = torchrun(*settings, f"hydra.run.dir={tmp_path / 'whole'}")
    assert whole.returncode == 0, whole.stderr[-3000:]
    stopped = torchrun_command(
        "train", *settings, f"hydra.run.dir={tmp_path / 'stopped'}", fault="step:40:SIGTERM"
    )
    assert stopped.returncode != 0
    saved = torch.load(tmp_path / "stopped" / "checkpoints" / "last.pt", weights_only=True)
    assert len(saved["augment_rng"]) == 2 and not torch.equal(*saved["augment_rng"])
    resumed = torchrun_command("resume", str(tmp_path / "stopped"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    got = json.loads((tmp_path / "stopped" / "metrics.json").read_text())
    for scenario in ("class_il", "task_il"):
        assert got[scenario]["accuracy_matrix"] == expected[scenario]["accuracy_matrix"]
    weights = torch.load(tmp_path / "stopped" / "checkpoints" / "last.pt", weights_only=True)["model"]
    for name, value in torch.load(tmp_path / "whole" / "checkpoints" / "last.pt", weights_only=True)[
        "model"
    ].items():
        assert torch.equal(weights[name], value), name


@pytest.mark.slow
def test_the_tasks_of_a_slurm_job_are_the_ranks_of_one_run(tmp_path):
    # Two processes with the variables SLURM and submitit give the tasks of one job (2 tasks on one node): incr
    # turns them into torchrun's (submitit's helper) and trains one run over both, as torchrun's would.
    port = free_port()
    slurm = {
        "SUBMITIT_EXECUTOR": "slurm",
        "SLURM_JOB_ID": "4242",
        "SLURM_NTASKS": "2",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_NODEID": "0",
        "SLURM_JOB_NODELIST": "localhost",
        "MASTER_PORT": str(port),
        "OMP_NUM_THREADS": "1",
    }
    env = {k: v for k, v in os.environ.items() if k not in ("INCR_FAULT", "RANK", "WORLD_SIZE")}
    tasks = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "incr_cli",
                "train",
                "hardware=ddp",
                "hardware.device=cpu",
                *SETTINGS,
                f"hydra.run.dir={tmp_path / 'ddp'}",
            ],
            env={**env, **slurm, "SLURM_PROCID": str(task), "SLURM_LOCALID": str(task)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for task in (0, 1)
    ]
    for task in tasks:
        _, stderr = task.communicate(timeout=300)
        assert task.returncode == 0, stderr[-3000:]
    single = run_experiment(tmp_path / "single", ["hardware=cpu", "hardware.num_threads=1", *SETTINGS])
    ddp = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    for scenario in ("class_il", "task_il"):
        for got, want in zip(
            ddp[scenario]["accuracy_matrix"], single[scenario]["accuracy_matrix"], strict=True
        ):
            assert got == pytest.approx(want, abs=1e-6)


def test_a_ddp_sweep_for_slurm_is_checked_without_torchrun():
    from incr_cli.errors import ConfigError
    from incr_cli.precheck import check_command

    # submitted: its ranks start as the SLURM tasks, so no torchrun is needed where the command runs
    check_command(["-m", "hydra/launcher=slurm", "hardware=ddp", "hardware.device=cpu", "seed=0,1"])
    with pytest.raises(ConfigError, match="or as the tasks of SLURM jobs"):
        check_command(["-m", "hardware=ddp", "hardware.device=cpu", "seed=0,1"])


def test_ddp_outside_torchrun_is_a_one_line_error(tmp_path):
    result = incr("train", "hardware=ddp", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert "hardware=ddp runs under torchrun: torchrun --nproc_per_node=N -m incr_cli train" in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_strategy_with_per_batch_state_is_refused_under_ddp(tmp_path, monkeypatch, capsys):
    # DER stores each batch's logits: a rank sees only its slice, so the memories would differ.
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert main(["train", "hardware=ddp", "strategy=der", f"hydra.run.dir={tmp_path}/r"]) == 2
    error = capsys.readouterr().err
    assert "DarkExperienceReplay does not run under hardware=ddp yet; strategies that do: " in error
    assert "finetune" in error and "replay" in error
    assert not (tmp_path / "r").exists()


def test_a_steps_checkpoint_and_stop_answers_are_agreed_in_one_collective(tmp_path, monkeypatch):
    # Under ddp a rank whose clock is not yet due, and which got no signal, still saves and stops with the
    # others: one all-reduce a step carries both flags.
    collectives = []

    def agree(*flags):
        collectives.append(flags)
        return [True] * len(flags)  # another rank's clock was due, and another rank got SIGTERM

    cfg = OmegaConf.create({"every_steps": None, "every_seconds": 3600, "keep_last": 2})
    checkpointer, signals = Checkpointer(tmp_path, cfg, writes=False), StopSignals()
    monkeypatch.setattr(distributed, "agree", agree)
    monkeypatch.setattr(distributed, "active", lambda: False)
    assert after_step(checkpointer, signals, 1) == (False, False) and not collectives
    monkeypatch.setattr(distributed, "active", lambda: True)
    assert after_step(checkpointer, signals, 2) == (True, True)
    assert collectives == [(False, False)]
    assert signals.name == "SIGTERM"
