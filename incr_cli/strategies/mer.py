"""Meta-experience replay: experience replay inside a Reptile meta-update, so that updates align gradients."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from incr_cli.data.batches import Batch
from incr_cli.data.stream import Task
from incr_cli.memory import Memory
from incr_cli.strategies.base import Strategy

if TYPE_CHECKING:
    from incr_cli.step import StepRunner


class MER(Strategy):
    """Meta-Experience Replay (Riemer et al. 2019, "Learning to Learn without Forgetting by Maximizing
    Transfer and Minimizing Interference", ICLR; Algorithm 1).

    For each incoming example (x_t, y_t), with parameters theta and a reservoir memory M:

        theta_0 <- theta
        for i = 1..s:                                   s = batches_per_example
            B_i <- [(x_t, y_t), k - 1 samples drawn from M]
            theta_A <- theta
            for each element (x, y) of B_i, in order:   k plain SGD steps, learning rate alpha
                theta <- theta - alpha * grad L(x, y; theta)
            theta <- theta_A + beta * (theta - theta_A)  within-batch Reptile step
        theta <- theta_0 + gamma * (theta - theta_0)    across-batch Reptile step
        offer (x_t, y_t) to M (reservoir sampling)

    To first order the two Reptile steps follow the average gradient of the batch's elements plus a term
    that raises the dot products between those gradients (the paper's regularised objective): updates that
    help the current example without interfering with the remembered ones.

    Mini-batches. The paper feeds one example at a time (batch size 1); the engine hands a mini-batch of b
    examples. Here the incoming mini-batch takes the place of the single example and every element of B_i
    is a mini-batch: B_i is the incoming batch first, then k - 1 mini-batches of `replay_batch_size`
    samples (default b) drawn from the memory, and each element is one inner SGD step on its mean
    cross-entropy. The rest is Algorithm 1 as written: s, k, alpha, beta, gamma, the order of the steps,
    a reservoir memory updated online. Each example still gets s * k sample gradients, as in the paper,
    in b times fewer sequential steps than splitting the batch into single examples would take (sequential
    steps cannot be batched); the price is s * k times fine-tuning's compute. A task's examples are offered
    to the memory once, as they arrive in its first epoch (the paper's single pass); later epochs only
    replay. While the memory is empty, B_i is the incoming batch alone.

    The inner steps are MER's own plain SGD (no momentum, no weight decay): the run's optimizer and
    scheduler are not used. Each inner loss goes through the engine's guarded, scaled backward, so a
    non-finite loss stops the run or skips the step (train.on_nonfinite), and under float16 AMP the
    gradients are unscaled before the step and the loss scale is updated after it.

    Defaults (configs/strategy/mer.yaml): alpha = 0.03, beta = 0.03, gamma = 1.0, k - 1 = 10 and s = 10,
    memory 200: the paper's MER (Algorithm 1) setting for MNIST Permutations with 200 memories (the
    values of the authors' released run script, github.com/mattriemer/MER, mer_examples.sh), the budget
    closest to incr's default memory of 200 on the digits stream."""

    supports_online = True  # learns and fills its memory batch by batch

    def __init__(
        self,
        memory: Memory,
        lr: float = 0.03,
        beta: float = 0.03,
        gamma: float = 1.0,
        batches_per_example: int = 10,
        replay_batches: int = 10,
        replay_batch_size: int | None = None,
    ):
        if memory.selection != "reservoir":
            raise ValueError(
                f"MER keeps a reservoir memory (Algorithm 1); got selection={memory.selection!r}"
            )
        for name, value in (("lr", lr), ("beta", beta), ("gamma", gamma)):
            if not value > 0:
                raise ValueError(f"MER's {name} must be positive, got {value}")
        if batches_per_example < 1 or replay_batches < 0:
            raise ValueError(
                f"MER needs batches_per_example >= 1 and replay_batches >= 0, got {batches_per_example}"
                f" and {replay_batches}"
            )
        self.memory = memory
        self.lr, self.beta, self.gamma = lr, beta, gamma
        self.batches_per_example, self.replay_batches = batches_per_example, replay_batches
        self.replay_batch_size = replay_batch_size
        self.offered = 0  # samples of the current task offered to the memory so far
        self.task_size = 0

    def before_task(self, task: Task) -> None:
        self.offered, self.task_size = 0, len(task.train_index)

    def training_step(self, batch: Batch, runner: StepRunner) -> Tensor:
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        theta_0 = [p.detach().clone() for p in parameters]
        first_loss = None
        for i in range(self.batches_per_example):
            theta_a = [p.detach().clone() for p in parameters]
            for j, element in enumerate(self._meta_batch(batch)):
                loss = self._sgd_step(element, parameters, runner)
                if i == j == 0:
                    if loss is None:  # on_nonfinite=skip_batch: the batch is skipped, nothing has moved yet
                        return torch.tensor(float("nan"))
                    first_loss = loss
            reptile(parameters, theta_a, self.beta)
        reptile(parameters, theta_0, self.gamma)
        if self.offered < self.task_size:  # the first epoch: each example offered once, as it arrives
            self.remember_samples(batch.x, batch.y)
            self.offered += len(batch)
        return first_loss

    def _meta_batch(self, batch: Batch) -> list[Batch]:
        """B_i: the incoming batch first, then k - 1 mini-batches from the memory (none while it is empty)."""
        if not len(self.memory):
            return [batch]
        size = self.replay_size(batch)
        return [batch] + [self.memory.sample(size, self.rng) for _ in range(self.replay_batches)]

    def _sgd_step(self, batch: Batch, parameters: list[torch.nn.Parameter], runner) -> Tensor | None:
        """theta <- theta - alpha * grad L(batch); None when the engine skips a non-finite loss."""
        with runner.autocast():
            loss = F.cross_entropy(self.logits(batch), batch.y)
        if not runner.backward(loss):
            return None
        scaler = runner.scaler
        scaler.unscale_(runner.optimizer)  # float16 AMP: true-scale gradients; otherwise a no-op
        gradients = [p.grad for p in parameters]
        finite = not scaler.is_enabled() or all(bool(g.isfinite().all()) for g in gradients if g is not None)
        if finite:
            with torch.no_grad():
                for p, g in zip(parameters, gradients, strict=True):
                    if g is not None:
                        p.add_(g, alpha=-self.lr)
        scaler.update()  # float16: shrinks the loss scale after an overflow, grows it after clean steps
        runner.zero_grad()
        return loss.detach()

    def state_dict(self) -> dict:
        return {**super().state_dict(), "offered": self.offered, "task_size": self.task_size}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.offered, self.task_size = int(state["offered"]), int(state["task_size"])


@torch.no_grad()
def reptile(parameters: list[torch.nn.Parameter], start: list[Tensor], rate: float) -> None:
    """The Reptile interpolation theta <- start + rate * (theta - start), in place."""
    for p, p0 in zip(parameters, start, strict=True):
        p.lerp_(p0, 1.0 - rate)
