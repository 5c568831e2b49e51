"""Shared test helpers: run `incr` in-process and read what a run wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
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


class RawPixels(torch.nn.Module):
    """A backbone whose features are the raw pixels of a tiny image: with it, a head's logits are computable
    by hand (w . x + b)."""

    def __init__(self, n_pixels: int):
        super().__init__()
        self.feature_dim = n_pixels

    def forward(self, x):
        return x.flatten(1)


def tiny_context(model, pixels: list, labels: list[int], tasks: list[list[int]], batch_size: int, flip=False):
    """A Context around `model` whose stream holds one 1 x W uint8 image per sample (`pixels`: a number or a
    tuple of W numbers each, full intensity 1), three classes split into `tasks`, no test set, plain SGD."""
    from omegaconf import OmegaConf

    from incr_cli.data.stream import Stream, Task

    train_x = torch.tensor(pixels, dtype=torch.uint8).reshape(len(labels), 1, 1, -1)
    dataset = OmegaConf.create(
        {
            "input_shape": list(train_x.shape[1:]),
            "normalize": False,
            "mean": [0.0],
            "std": [1.0],
            "augment": {"crop_padding": 0, "horizontal_flip": flip, "rotation_degrees": 0.0},
        }
    )
    train_y = torch.tensor(labels)
    empty = torch.zeros(0, dtype=torch.long)
    stream_tasks = [
        Task(i, classes, torch.nonzero(torch.isin(train_y, torch.tensor(classes))).flatten(), empty, empty)
        for i, classes in enumerate(tasks)
    ]
    stream = Stream(
        train_x, train_y, train_x[:0], empty, stream_tasks, [0, 1, 2], ["0", "1", "2"], max_value=1
    )
    return cpu_context(model, stream, dataset, batch_size=batch_size)


def cpu_context(model, stream, dataset, max_value: int = 1, batch_size: int = 1, optimizer=None, rng=None):
    """A Context for one epoch on the CPU (seed 0) around `model` and `stream`: `dataset`'s preprocessing of
    pixels whose full intensity is `max_value`; SGD lr 0.1 unless `optimizer` (a function of the parameters);
    a generator seeded 0 unless `rng`."""
    from incr_cli.data.batches import Preprocess
    from incr_cli.strategies.base import Context

    return Context(
        model,
        stream,
        Preprocess(dataset, max_value, torch.device("cpu")),
        torch.Generator().manual_seed(0) if rng is None else rng,
        torch.device("cpu"),
        optimizer or (lambda p: torch.optim.SGD(p, lr=0.1)),
        batch_size=batch_size,
        epochs=1,
        seed=0,
    )


def old_class_bias(strategy) -> tuple[float, float]:
    """On the test samples of the classes seen before the current task: the fraction predicted as one of the
    current task's classes, and the accuracy (argmax over the classes seen so far)."""
    n_old, seen = strategy.old_classes, strategy.model.head.n_classes
    strategy.model.eval()
    scores = strategy.predict(strategy.context.preprocess(strategy.stream.test_x))[:, :seen]
    strategy.model.train()
    y = strategy.stream.test_y
    prediction = scores[y < n_old].argmax(1)
    return (prediction >= n_old).float().mean().item(), (prediction == y[y < n_old]).float().mean().item()
