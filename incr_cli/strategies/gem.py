"""Gradient Episodic Memory: each update is projected so that no past task's memory loss goes up."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import quadprog
import torch
import torch.nn.functional as F
from torch import Tensor

from incr_cli.data.batches import Batch
from incr_cli.data.stream import Task
from incr_cli.strategies import gradients
from incr_cli.strategies.base import Strategy

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


class GEM(Strategy):
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
    keeps m random samples too.

    The head grows at each task, so the past gradients are recomputed at every step (as the authors do)
    rather than stored. Under float16 loss scaling every gradient carries the same scale s: P and q of the
    dual scale by s^2, so v* and the margin are unchanged; only the ridge is not scale-free, so the QP's
    t x t matrices are unscaled, and g~ keeps the scale for the GradScaler to unscale and check.

    Defaults: memory_strength 0.5 (the authors' run_experiments.sh on all three benchmarks, and Split
    Fashion-MNIST); patterns_per_task 100 (Split Fashion-MNIST; the authors used 256)."""

    def __init__(self, patterns_per_task: int = 100, memory_strength: float = 0.5):
        if patterns_per_task < 1:
            raise ValueError(f"patterns_per_task must be at least 1, got {patterns_per_task}")
        if memory_strength < 0:
            raise ValueError(f"memory_strength must be 0 or more, got {memory_strength}")
        self.patterns_per_task = patterns_per_task
        self.memory_strength = memory_strength
        self.memory_x: list[Tensor] = []  # one entry per finished task: raw uint8 samples
        self.memory_y: list[Tensor] = []
        self.recent_x: Tensor | None = None  # the current task's last samples seen, its memory-to-be
        self.recent_y: Tensor | None = None

    def before_task(self, task: Task) -> None:
        self.recent_x = self.recent_y = None

    def training_step(self, batch: Batch, runner: StepRunner) -> Tensor:
        self._remember(batch)
        if not self.memory_y:
            return super().training_step(batch, runner)
        parameters = gradients.trainable(self.model)
        with runner.autocast():
            loss = self.loss(batch)
        current = gradients.gradient_of(loss, parameters, runner)
        if current is None:
            return loss.detach()
        past = []
        for x, y in zip(self.memory_x, self.memory_y, strict=True):
            with runner.autocast():
                memory_loss = F.cross_entropy(self.logits(Batch(x, y)), y)
            past.append(gradients.gradient_of(memory_loss, parameters, runner))
            if past[-1] is None:
                return loss.detach()
        past = torch.stack(past)
        # One non-finite value in g or in a g_k makes a dot product non-finite: a t-sized check.
        if torch.isfinite(past @ current).all():
            scale = gradients.loss_scale(runner)
            update = gem_projection(current, past, self.memory_strength, loss_scale=scale)
        else:
            # A float16 overflow in one of the scaled backward passes: hand the GradScaler a non-finite
            # gradient, so that it skips this step and lowers the scale as for an overflow of the loss.
            update = current + past.sum(0)
        gradients.write(parameters, update)
        runner.step()
        return loss.detach()

    def _remember(self, batch: Batch) -> None:
        x, y = batch.x, batch.y
        if self.recent_y is not None:
            x, y = torch.cat([self.recent_x, x]), torch.cat([self.recent_y, y])
        # Copies, not views: a checkpoint would otherwise hold the whole concatenation.
        self.recent_x, self.recent_y = (
            x[-self.patterns_per_task :].clone(),
            y[-self.patterns_per_task :].clone(),
        )

    def after_task(self, task: Task) -> None:
        if self.recent_y is None:
            return
        # A task smaller than the memory shows some samples again in its later epochs: keep each once.
        keep = min(len(self.recent_y), len(task.train_index))
        self.memory_x.append(self.recent_x[-keep:].clone())
        self.memory_y.append(self.recent_y[-keep:].clone())
        self.recent_x = self.recent_y = None

    @property
    def memory_samples(self) -> int:
        return sum(len(y) for y in self.memory_y)

    @property
    def memory_bytes(self) -> int:
        return sum(x.nbytes + y.nbytes for x, y in zip(self.memory_x, self.memory_y, strict=True))

    def state_dict(self) -> dict:
        return {"memory_x": list(self.memory_x), "memory_y": list(self.memory_y),
                "recent_x": self.recent_x, "recent_y": self.recent_y}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.memory_x, self.memory_y = list(state["memory_x"]), list(state["memory_y"])
        self.recent_x, self.recent_y = state["recent_x"], state["recent_y"]
