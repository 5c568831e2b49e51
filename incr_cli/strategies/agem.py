"""Averaged GEM: one constraint, the gradient on a random sample of the whole episodic memory."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from incr_cli.data.batches import Batch
from incr_cli.data.stream import Task
from incr_cli.memory import EpisodicMemory
from incr_cli.strategies.common.projected_gradients import ProjectedGradients

if TYPE_CHECKING:
    from incr_cli.step import StepRunner


def agem_projection(gradient: Tensor, reference: Tensor) -> Tensor:
    """A-GEM's update (Chaudhry et al. 2019, eq. 11): g itself when <g, g_ref> >= 0, otherwise
    g - (<g, g_ref> / <g_ref, g_ref>) g_ref, the closest vector to g with <g~, g_ref> >= 0 (it lies on the
    hyperplane <g~, g_ref> = 0)."""
    dot = gradient @ reference
    if dot >= 0:
        return gradient
    return gradient - (dot / (reference @ reference)) * reference


class AGEM(ProjectedGradients):
    """Averaged Gradient Episodic Memory (Chaudhry, Ranzato, Rohrbach and Elhoseiny 2019, "Efficient
    Lifelong Learning with A-GEM", Sec. 4).

    GEM asks that the loss of every past task k, measured on its memory, does not increase. A-GEM asks only
    that the average memory loss does not: at every step it draws a random sample of `sample_size` samples
    from the whole episodic memory (all past tasks together), takes the gradient g_ref of their loss
    (class-IL: cross-entropy over all the classes seen so far) and the gradient g of the current batch's
    loss, and solves  min_g~ 1/2 ||g - g~||^2  subject to  <g~, g_ref> >= 0  (eq. 10), whose solution in
    closed form (eq. 11) is g~ = g - (<g, g_ref> / <g_ref, g_ref>) g_ref when <g, g_ref> < 0 and g
    otherwise. One extra forward and backward pass per step, whatever the number of tasks; no QP.

    Memory: `patterns_per_task` samples of each finished task, drawn uniformly at random from its training set
    (as Avalanche's A-GEM, the Split Fashion-MNIST reference, does). The sample is drawn without replacement,
    or is the whole memory while that holds fewer than `sample_size` samples.

    The head grows at each task, so g_ref is recomputed from the memory at every step. Under float16 loss
    scaling g and g_ref carry the same scale s, and scaling both by s scales the update by s: the scaled
    update is the scaled projection, with no unscaling.

    Defaults: patterns_per_task 100 and sample_size 256, the Split Fashion-MNIST benchmark's settings
    (Avalanche's A-GEM with patterns_per_exp=100, sample_size=256)."""

    def __init__(self, patterns_per_task: int = 100, sample_size: int = 256):
        if sample_size < 1:
            raise ValueError(f"sample_size must be at least 1, got {sample_size}")
        super().__init__(patterns_per_task)
        self.sample_size = sample_size

    def training_step(self, batch: Batch, runner: StepRunner) -> Tensor:
        if not len(self.memory):
            return super().training_step(batch, runner)

        def memory_sample() -> list[Batch]:
            # the whole memory while it holds fewer than sample_size samples (Memory.draw would repeat some)
            order = torch.randperm(len(self.memory), generator=self.rng, device=self.rng.device)
            return [self.memory.batch(order[: self.sample_size].to(self.memory.y.device))]

        def project(gradient: Tensor, reference: Tensor) -> Tensor:
            return agem_projection(gradient, reference[0])

        return self.projected_step(batch, runner, memory_sample, project)

    @property
    def memory_x(self) -> Tensor | None:
        """The raw samples of every finished task."""
        return self.memory.x

    @property
    def memory_y(self) -> Tensor | None:
        return self.memory.y

    def after_task(self, task: Task) -> None:
        chosen = torch.randperm(len(task.train_index), generator=self.rng, device=self.rng.device)
        index = task.train_index[chosen[: self.patterns_per_task].to(task.train_index.device)]
        self.memory.add(*self.training_samples(index), self.rng)

    def load_state_dict(self, state: dict) -> None:
        if "memory_x" in state:  # a checkpoint of the tensors that the memory replaced
            self.memory = EpisodicMemory(self.memory.size)
            if state["memory_y"] is not None:
                self.memory.add(state["memory_x"], state["memory_y"], self.rng)
            return
        super().load_state_dict(state)
