"""Gradient Episodic Memory: each update is projected so that no past task's memory loss goes up."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import quadprog
import torch
from torch import Tensor

from incr_cli.data.batches import Batch
from incr_cli.data.stream import Task
from incr_cli.memory import EpisodicMemory, RingBuffer
from incr_cli.strategies.common import gradients
from incr_cli.strategies.common.projected_gradients import ProjectedGradients

if TYPE_CHECKING:
    from incr_cli.step import StepRunner

# Added to the diagonal of G G^T: the dual is then strictly convex, as quadprog needs, even when two memory
# gradients are parallel or one is zero. Avalanche's GEM (the Split Fashion-MNIST reference) uses the same
# value.
RIDGE = 1e-3


def gem_projection(
    gradient: Tensor, memory_gradients: Tensor, margin: float, ridge: float = RIDGE, loss_scale: float = 1.0
) -> Tensor:
    """GEM's update for the proposed `gradient` g (p values) and the past tasks' `memory_gradients` G (one
    row g_k per task): g itself when <g, g_k> >= 0 for every k, otherwise g~ = G^T v* + g with v* the
    solution of the dual QP  min_v 1/2 v^T (G G^T + ridge I) v + g^T G^T v  subject to v >= margin.

    With margin 0 and no ridge this is the Euclidean projection of g onto the cone {z : G z >= 0}; the
    KKT conditions give G g~ = lambda >= 0, so no past loss increases to first order. A margin gamma > 0
    keeps every v_k >= gamma, pushing g~ further towards every g_k; the ridge shifts G g~ by -ridge v.

    `loss_scale` is the factor s that g and G already carry (a GradScaler's): the QP's matrices scale by
    s^2, so dividing them by s^2 gives the unscaled v* (the ridge is the one term that is not scale-free),
    and g~ = G^T v* + g comes out carrying s like its inputs. Only the t x t and t-sized products are
    formed in float64; the p-sized vectors keep their dtype."""
    dots = memory_gradients @ gradient
    if bool((dots >= 0).all()):
        return gradient
    tasks = len(memory_gradients)
    unscale = 1.0 / (float(loss_scale) ** 2)
    gram = (memory_gradients @ memory_gradients.T).double().cpu().numpy() * unscale
    gram = 0.5 * (gram + gram.T) + ridge * np.eye(tasks)
    linear = dots.double().cpu().numpy() * unscale
    # quadprog minimises 1/2 v^T P v - a^T v subject to C^T v >= b: here a = -G g, C = I, b = margin.
    v = quadprog.solve_qp(gram, -linear, np.eye(tasks), np.full(tasks, float(margin)))[0]
    weights = torch.from_numpy(v).to(device=memory_gradients.device, dtype=memory_gradients.dtype)
    return gradient + weights @ memory_gradients


class GEM(ProjectedGradients):
    """Gradient Episodic Memory (Lopez-Paz and Ranzato 2017, "Gradient Episodic Memory for Continual
    Learning", Sec. 3).

    Each past task k keeps an episodic memory M_k of `patterns_per_task` samples. At every step the method
    computes the gradient g of the current batch's loss and, for every past task, the gradient g_k of the
    loss on M_k (class-IL: cross-entropy over all the classes seen so far). If some <g, g_k> < 0 (the
    update would increase that task's memory loss to first order), g is replaced by the closest vector g~
    (in squared Euclidean norm) with <g~, g_k> >= 0 for every k, found through the QP's dual (eq. 11-13):
    v* = argmin_{v >= 0} 1/2 v^T G G^T v + g^T G^T v, then g~ = G^T v* + g. The `memory_strength` gamma is
    the paper's small constant that biases the projection towards backward transfer; as in the authors'
    code it enters as a lower bound on the dual variables, v >= gamma instead of v >= 0.

    Memory: the paper keeps "a subset of the observed examples" of each task; the authors' code writes a
    task's incoming samples into a ring buffer, which ends holding (about) the last m samples it saw. Here
    M_k is exactly the last m training samples task k's batches showed, which are m random samples of its
    training set (the last epoch visits it in a random order); Avalanche (the Split Fashion-MNIST reference)
    keeps m random samples too. The memory holds the images as stored, and a run that augments its data
    augments them anew at every use, as Mammoth's GEM does (its buffer keeps unaugmented images; the
    authors' benchmarks do not augment). Avalanche 0.6's GEM instead keeps the one augmented view of each
    sample that its loader gave at the task's end (docs/benchmarks.md measures the difference).

    The head grows at each task, so the past gradients are recomputed at every step (as the authors do)
    rather than stored. Under float16 loss scaling every gradient carries the same scale s: P and q of the
    dual scale by s^2, so v* and the margin are unchanged; only the ridge is not scale-free, so the QP's
    t x t matrices are unscaled, and g~ keeps the scale for the GradScaler to unscale and check.

    Defaults: memory_strength 0.5 (the authors' run_experiments.sh on all three benchmarks, and Split
    Fashion-MNIST); patterns_per_task 100 (Split Fashion-MNIST; the authors used 256)."""

    def __init__(self, patterns_per_task: int = 100, memory_strength: float = 0.5):
        if memory_strength < 0:
            raise ValueError(f"memory_strength must be 0 or more, got {memory_strength}")
        super().__init__(patterns_per_task)
        self.memory_strength = memory_strength
        self.recent = RingBuffer(patterns_per_task)  # the current task's last samples seen, its memory-to-be
        self.task_sizes: list[int] = []  # samples of each finished task in the memory, in task order

    @property
    def memory_x(self) -> list[Tensor]:
        """Each finished task's memory: its raw samples."""
        return list(self.memory.x.split(self.task_sizes)) if self.task_sizes else []

    @property
    def memory_y(self) -> list[Tensor]:
        """Each finished task's memory: its labels."""
        return list(self.memory.y.split(self.task_sizes)) if self.task_sizes else []

    def before_task(self, task: Task) -> None:
        self.recent.clear()

    def training_step(self, batch: Batch, runner: StepRunner) -> Tensor:
        self.recent.add(batch.x, batch.y, self.rng)
        if not self.task_sizes:
            return super().training_step(batch, runner)

        def past_tasks() -> list[Batch]:
            return [Batch(x, y) for x, y in zip(self.memory_x, self.memory_y, strict=True)]

        def project(gradient: Tensor, memory_gradients: Tensor) -> Tensor:
            scale = gradients.loss_scale(runner)
            return gem_projection(gradient, memory_gradients, self.memory_strength, loss_scale=scale)

        return self.projected_step(batch, runner, past_tasks, project)

    def after_task(self, task: Task) -> None:
        if not len(self.recent):
            return
        # A task smaller than the memory shows some samples again in its later epochs: keep each once.
        keep = min(len(self.recent), len(task.train_index))
        self.memory.add(self.recent.x[-keep:], self.recent.y[-keep:], self.rng)
        self.task_sizes.append(keep)
        self.recent.clear()

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["recent"], state["task_sizes"] = self.recent.state_dict(), list(self.task_sizes)
        return state

    def load_state_dict(self, state: dict) -> None:
        self.recent.clear()
        if "memory_x" in state:  # a checkpoint of the per-task tensors that the memories replaced
            self.memory = EpisodicMemory(self.memory.size)
            for x, y in zip(state["memory_x"], state["memory_y"], strict=True):
                self.memory.add(x, y, self.rng)
            self.task_sizes = [len(y) for y in state["memory_y"]]
            if state["recent_y"] is not None:
                self.recent.add(state["recent_x"], state["recent_y"], self.rng)
            return
        super().load_state_dict(state)
        self.recent.load_state_dict(state["recent"])
        self.task_sizes = [int(n) for n in state["task_sizes"]]
