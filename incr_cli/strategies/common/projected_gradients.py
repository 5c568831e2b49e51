"""What GEM and A-GEM share: an episodic memory of every finished task, and a step whose gradient is changed
so that it does not raise the loss on that memory (to first order)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from incr_cli.data.batches import Batch
from incr_cli.memory import EpisodicMemory
from incr_cli.step import StepRunner
from incr_cli.strategies.base import Context, Strategy
from incr_cli.strategies.common import gradients


class ProjectedGradients(Strategy):
    """A method that keeps `patterns_per_task` samples of each finished task in an `EpisodicMemory` and
    projects each step's gradient against the gradients of memory losses (`projected_step`)."""

    def __init__(self, patterns_per_task: int):
        if patterns_per_task < 1:
            raise ValueError(f"patterns_per_task must be at least 1, got {patterns_per_task}")
        self.patterns_per_task = patterns_per_task

    def setup(self, context: Context) -> None:
        super().setup(context)
        self.memory = EpisodicMemory(self.patterns_per_task * len(self.stream.tasks))

    def projected_step(
        self,
        batch: Batch,
        runner: StepRunner,
        memory_batches: Callable[[], list[Batch]],
        project: Callable[[Tensor, Tensor], Tensor],
    ) -> Tensor:
        """One update from `batch` whose gradient g is replaced by `project(g, G)`, G holding one row per
        batch of `memory_batches()` (called once g is known): the gradient of its cross-entropy over the
        classes seen so far. Every gradient goes through the runner's scaled backward and non-finite guard,
        so under float16 loss scaling they all carry the same scale; a non-finite value in any of them is
        handed on to the GradScaler, which then skips the step and lowers the scale as for the loss."""
        parameters = gradients.trainable(self.model)
        with runner.autocast():
            loss = self.loss(batch)
        current = gradients.gradient_of(loss, parameters, runner)
        if current is None:
            return loss.detach()
        references = []
        for memory_batch in memory_batches():
            with runner.autocast():
                memory_loss = F.cross_entropy(self.logits(memory_batch), memory_batch.y)
            references.append(gradients.gradient_of(memory_loss, parameters, runner))
            if references[-1] is None:
                return loss.detach()
        references = torch.stack(references)
        # One non-finite value in g or in a row of G makes a dot product non-finite: a t-sized check.
        if torch.isfinite(references @ current).all():
            update = project(current, references)
        else:
            update = current + references.sum(0)
        gradients.write(parameters, update)
        runner.step()
        return loss.detach()
