"""How long a run will train on the CPU, said before it starts: a few real training steps of the run's own model
on a batch of its own data, timed on a copy, times the number of steps the run will make."""

from __future__ import annotations

import copy
import logging
import math
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from incr_cli import distributed

log = logging.getLogger("incr")

MIN_STEPS = 300  # a run of fewer optimizer steps is short on any CPU: nothing is measured
WARN_SECONDS = 30 * 60  # a longer estimate is said at the start of the log
TIMED_STEPS = 3  # after one untimed warm-up step (first-call allocations and kernel choices)
TIME_BUDGET = 1.0  # seconds: a slow model is timed over fewer steps


def planned_steps(task_sizes: list[int], batch_size: int, epochs: int) -> int:
    """Optimizer steps of the engine's loop: every task's training samples in batches, every epoch."""
    return epochs * sum(math.ceil(n / batch_size) for n in task_sizes)


def duration(seconds: float) -> str:
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} minutes"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} hours"
    return f"{seconds / 86400:.1f} days"


def long_run_warning(step_seconds: float, steps: int, epochs: int) -> str | None:
    """The log line for a run whose estimated training time is over WARN_SECONDS, or None."""
    seconds = step_seconds * steps
    if seconds <= WARN_SECONDS:
        return None
    shorter = (
        f"for a quick look try epochs=1 or debug=quick (about {duration(seconds / epochs)}); the full recipe "
        "is meant for a GPU (hardware=gpu)"
        if epochs > 1
        else "a GPU (hardware=gpu), a smaller model or fewer tasks would shorten it"
    )
    return (
        f"training on the CPU will take at least {duration(seconds)}: {steps} steps at {step_seconds * 1000:.0f} ms "
        "each, measured on this machine (a method's extra passes, such as replayed samples, distillation or a "
        f"second training stage, come on top); {shorter}"
    )


def step_seconds(
    model: torch.nn.Module,
    preprocess: Callable,
    x: torch.Tensor,
    y: torch.Tensor,
    make_optimizer: Callable,
    autocast: Callable = nullcontext,
) -> float:
    """Median seconds of a training step of `model` on the batch (x, y): preprocessing with augmentation,
    forward, cross-entropy, backward, optimizer step; after an untimed warm-up, up to TIMED_STEPS
    (at least one) within TIME_BUDGET. `model` is trained: pass a copy. The global random state
    is restored afterwards and augmentation draws from its own generator, so the run's streams are untouched."""
    optimizer = make_optimizer(model.parameters())
    generator = torch.Generator(device=x.device).manual_seed(0)
    model.train()
    times, spent = [], 0.0
    with torch.random.fork_rng(devices=[]):
        for step in range(1 + TIMED_STEPS):
            tick = time.perf_counter()
            with autocast():
                loss = F.cross_entropy(model(preprocess(x, generator)), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - tick
            spent += elapsed
            if step:
                times.append(elapsed)
                if spent > TIME_BUDGET:
                    break
    return statistics.median(times)


def warn_if_long_on_cpu(
    model,
    stream,
    preprocess,
    make_optimizer,
    *,
    batch_size: int,
    epochs: int,
    next_task: int,
    done_steps: int,
    autocast: Callable = nullcontext,
    compiled: bool = False,
) -> float | None:
    """At the start of a CPU run of at least MIN_STEPS steps still to make: time a few steps on a copy of the
    model with a batch of the next task's training images, and log a warning when the rest of the run would
    train for over WARN_SECONDS. Returns the estimated seconds (None when not measured). Nothing of the run
    changes: its model, optimizer and random streams are as without the measurement. A compiled model is not
    measured: its copy would compile again, and its first steps time the compiler."""
    device = next(model.parameters()).device
    if device.type != "cpu" or compiled or distributed.active() or next_task >= len(stream.tasks):
        return None
    steps = planned_steps([len(t.train_index) for t in stream.tasks], batch_size, epochs) - done_steps
    rows = stream.tasks[next_task].train_index[:batch_size]
    if steps < MIN_STEPS or not len(rows):
        return None
    trial = copy.deepcopy(model)
    trial.head.grow(stream.n_classes)
    seconds = step_seconds(
        trial, preprocess, stream.train_x[rows], stream.train_y[rows], make_optimizer, autocast
    )
    warning = long_run_warning(seconds, steps, epochs)
    if warning:
        log.warning(warning)
    return seconds * steps
