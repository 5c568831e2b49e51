"""The growing network that DER and FOSTER share: one more feature extractor per task next to the frozen old
ones, and an auxiliary classifier while a task trains."""

from __future__ import annotations

from torch import Tensor, nn

from incr_cli.data.stream import Task
from incr_cli.memory import Memory
from incr_cli.models.expandable import ExpandableBackbone
from incr_cli.strategies.base import Context, Strategy


class GrowingNetwork(Strategy):
    """What DER and FOSTER share: an `ExpandableBackbone` that gains one extractor per task (the head gains
    the matching input columns), an auxiliary classifier on the newest extractor's features while a task
    trains, and an exemplar memory that joins the task's training set (PyCIL's `appendent` data) rather
    than each batch. The memory keeps, with each sample, its row in the stream's training tensors, so the
    engine's batches cut from task data and memory alike; its size and bytes are reported as any memory's."""

    scenarios = ("class_il", "task_il")  # old classes are "the head minus this task's": none in domain-IL

    def __init__(self, memory: Memory):
        self.memory = memory

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
