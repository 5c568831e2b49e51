"""Shared test helpers: run `incr` in-process and read what a run wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import DictConfig

from incr_cli.cli import main

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def run_experiment(run_dir: Path, overrides: list[str]) -> dict:
    """`incr train OVERRIDES hydra.run.dir=RUN_DIR`, in this process; returns the run's metrics.json."""
    status = main(["train", f"hydra.run.dir={run_dir}", "progress=false", *overrides])
    assert status == 0
    return json.loads((run_dir / "metrics.json").read_text())


def final_accuracy(metrics: dict) -> float:
    return metrics["class_il"]["final_average_accuracy"]


needs_fashion_mnist = pytest.mark.skipif(
    not FASHION_MNIST.is_dir(), reason="apt-get install dataset-fashion-mnist (.ci/run does)"
)


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tiny models on a 2-core CI machine: one intra-op thread is as fast as two and never oversubscribes
    the cores when something else runs beside the suite (spinning OpenMP threads made steps 100x slower).
    Session-scoped so that module-scoped fixtures that train also get it."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def keep_one_torch_thread(one_torch_thread):
    """A run with hardware.num_threads=N changes the thread count of the whole process: set it back."""
    import torch

    yield
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def restore_determinism():
    """A run with hardware.deterministic=true switches torch to deterministic kernels for the whole process;
    every test leaves the setting as it found it."""
    import torch

    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


def compose_config(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The config `incr train OVERRIDES` would run, composed through Hydra's compose API."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from incr_cli.config import config_dir, register_schema

    register_schema()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(config_dir()), version_base="1.3"):
            return compose("train", overrides=list(overrides))
    finally:
        GlobalHydra.instance().clear()


def incr(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The real `incr` command in a child process (`python -m incr_cli` is the same entry point)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("INCR_FAULT", None)
    return subprocess.run(
        [sys.executable, "-m", "incr_cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
    )


def assert_resumes_exactly(tmp_path: Path, overrides: list[str], fault: str = "step:30:SIGTERM") -> dict:
    """Run once uninterrupted, and once stopped by the fault (incr_cli/faults.py; SIGTERM makes the engine
    write a checkpoint and exit) then resumed with `incr resume`, all in this process; both must end with
    the same accuracy matrices and model weights, bit for bit. Returns the resumed run's metrics."""
    import torch

    from incr_cli import faults

    settings = [*overrides, "hardware=cpu", "hardware.num_threads=1", "hardware.deterministic=true"]
    expected = run_experiment(tmp_path / "uninterrupted", settings)
    run_dir = tmp_path / "interrupted"
    faults._counts.clear()
    os.environ["INCR_FAULT"] = fault
    try:
        with pytest.raises(SystemExit) as stopped:
            main(["train", f"hydra.run.dir={run_dir}", "progress=false", *settings])
        assert stopped.value.code == 143
    finally:
        del os.environ["INCR_FAULT"]
        faults._counts.clear()
    assert main(["resume", str(run_dir)]) == 0
    resumed = json.loads((run_dir / "metrics.json").read_text())
    for scenario in ("class_il", "task_il"):
        assert resumed[scenario]["accuracy_matrix"] == expected[scenario]["accuracy_matrix"]
    weights = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
    expected_weights = torch.load(tmp_path / "uninterrupted" / "checkpoints" / "last.pt", weights_only=True)[
        "model"
    ]
    for key, value in expected_weights.items():
        assert torch.equal(weights[key], value), key
    return resumed
