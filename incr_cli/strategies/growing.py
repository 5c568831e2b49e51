"""The growing network that DER and FOSTER share: one more feature extractor per task next to the frozen old
ones, an auxiliary classifier while a task trains, and second training stages on the engine's step runner."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from incr_cli.data.batches import Batch
from incr_cli.data.stream import Task
from incr_cli.memory import Memory
from incr_cli.models.expandable import ExpandableBackbone
from incr_cli.strategies.base import Context, Strategy

if TYPE_CHECKING:
    from incr_cli.step import StepRunner


class _PlainSteps:
    """Full-precision steps for a second stage that found no engine step runner to copy (a run resumed just
    after its task's last step): backward and step, as the engine's runner does without mixed precision."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    def autocast(self):
        return nullcontext()

    def backward(self, loss: Tensor) -> bool:
        loss.backward()
        return True

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)


class GrowingNetwork(Strategy):
    """What DER and FOSTER share: an `ExpandableBackbone` that gains one extractor per task (the head gains
    the matching input columns), an auxiliary classifier on the newest extractor's features while a task
    trains, and an exemplar memory that joins the task's training set (PyCIL's `appendent` data) rather
    than each batch. The memory keeps, with each sample, its row in the stream's training tensors, so the
    engine's batches cut from task data and memory alike; its size and bytes are reported as any memory's."""

    scenarios = ("class_il", "task_il")  # old classes are "the head minus this task's": none in domain-IL

    def __init__(self, memory: Memory):
        self.memory = memory
        self._step_runner: StepRunner | None = None

    def setup(self, context: Context) -> None:
        super().setup(context)
        if not isinstance(self.model.backbone, ExpandableBackbone):
            self.model.backbone = ExpandableBackbone([self.model.backbone])

    @property
    def backbone(self) -> ExpandableBackbone:
        return self.model.backbone

    def expand(self) -> nn.Module:
        """A new trainable extractor (a copy of the newest one), all others frozen; the head widens to match."""
        extractor = self.backbone.expand()
        self.model.head.widen(extractor.feature_dim)
        return extractor

    def add_auxiliary_head(self, n_outputs: int) -> None:
        """A linear classifier on the newest extractor's features, trained with the model this task only."""
        head = nn.Linear(self.backbone.extractors[-1].feature_dim, n_outputs)  # drawn on the CPU: any device
        self.model.auxiliary_head = head.to(self.context.device)

    def remove_auxiliary_head(self) -> None:
        if hasattr(self.model, "auxiliary_head"):
            del self.model.auxiliary_head

    @property
    def auxiliary_outputs(self) -> int:
        head = getattr(self.model, "auxiliary_head", None)
        return 0 if head is None else head.out_features

    def training_step(self, batch: Batch, runner: StepRunner) -> Tensor:
        self._step_runner = runner  # its precision and non-finite policy also run the second stage
        return super().training_step(batch, runner)

    def stage_steps(self, optimizer: torch.optim.Optimizer, where: Callable[[], str]):
        """A step runner for a training stage of the method's own (FOSTER's compression, DER's classifier
        re-learning) on its own optimizer: the engine's runner of this task's steps, rebuilt around that
        optimizer with a fresh loss scaler, so that mixed precision and the non-finite guard hold there too."""
        runner = self._step_runner
        if runner is None:
            return _PlainSteps(optimizer)
        hardware = runner.hardware
        return type(runner)(optimizer, hardware.grad_scaler(), hardware, runner.on_nonfinite, where)

    def run_stage(
        self,
        rows: Tensor,
        epochs: int,
        steps: StepRunner | _PlainSteps,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        stage_loss: Callable[[Tensor, Tensor], Tensor],
    ) -> None:
        """A second training stage: `epochs` shuffled passes over the stream's training `rows` in batches of
        the run's size, each batch's `stage_loss(x, y)` (x with the training transform) stepped by `steps`
        (from `stage_steps`), `scheduler` stepped once per epoch."""
        batch_size = self.context.batch_size
        for _ in range(epochs):
            order = torch.randperm(len(rows), generator=self.rng, device=self.rng.device).to(rows.device)
            for first in range(0, len(order), batch_size):
                batch_rows = rows[order[first : first + batch_size]]
                x = self.context.preprocess(self.stream.train_x[batch_rows], self.rng)
                with steps.autocast():
                    loss = stage_loss(x, self.stream.train_y[batch_rows])
                if steps.backward(loss):
                    steps.step()
            scheduler.step()
        steps.zero_grad()

    def training_indices(self, task: Task) -> Tensor:
        return self.rows_with_memory(task.train_index, row_extra="row")

    def remember(self, task: Task) -> None:
        """Offer the task's training samples to the memory (herding on the features of the model as it
        ends the task, PyCIL's `build_rehearsal_memory`), each with its row in the stream."""
        self.remember_rows(task.train_index, row_extra="row")

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["extractors"] = len(self.backbone)
        state["auxiliary_outputs"] = self.auxiliary_outputs
        return state

    def restore_structure(self, state: dict) -> None:
        for _ in range(int(state["extractors"]) - len(self.backbone)):
            self.expand()
        if state["auxiliary_outputs"]:
            self.add_auxiliary_head(int(state["auxiliary_outputs"]))
