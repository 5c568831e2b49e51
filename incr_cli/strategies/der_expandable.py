"""DER, dynamically expandable representation: a new feature extractor per task next to the frozen old ones."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from incr_cli.data.batches import Batch
from incr_cli.data.stream import Task
from incr_cli.memory import Memory
from incr_cli.models.expandable import ExpandableBackbone
from incr_cli.strategies.base import Context, Strategy


def auxiliary_targets(y: Tensor, n_old: int) -> Tensor:
    """Labels of DER's auxiliary classifier: every old class is class 0, new class n_old + j is class 1 + j."""
    return torch.where(y >= n_old, y - n_old + 1, torch.zeros_like(y))


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
        if not len(self.memory):
            return task.train_index
        return torch.cat([task.train_index, self.memory.extras["row"].to(task.train_index.device)])

    def remember(self, task: Task) -> None:
        """Offer the task's training samples to the memory (herding on the features of the model as it
        ends the task, PyCIL's `build_rehearsal_memory`), each with its row in the stream."""
        rows = task.train_index
        if self.memory.size == 0 or len(rows) == 0:
            return
        x, y = self.stream.train_x[rows], self.stream.train_y[rows]
        features = self.features(x) if self.memory.needs_features else None
        self.memory.add(x, y, self.rng, features=features, row=rows)

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


class DynamicallyExpandableRepresentation(GrowingNetwork):
    """DER (Yan, Xie and He 2021, "DER: Dynamically Expandable Representation for Class Incremental
    Learning", CVPR 2021), its representation-learning stage as PyCIL implements it.

    At task t > 1 a new feature extractor F_t, initialised as a copy of F_{t-1} (PyCIL), joins the frozen
    F_1..F_{t-1} (no gradients, batch-norm in eval mode): the features are u = [F_1(x), ..., F_t(x)] and the
    head H_t scores every seen class from u; its rows keep their trained weights on the old features and
    get new columns for F_t's. An auxiliary classifier H_a on F_t(x) alone has |C_new| + 1 outputs, all
    old classes being one class (label 0, new class j -> 1 + j). Each step on a batch of the task's data
    joined with the exemplar memory minimises

        L = CE(H_t(u), y) + lambda_a * CE(H_a(F_t(x)), y_a)

    The first task trains one extractor with CE alone. After each task the memory takes the task's samples
    by herding on u (iCaRL), class-balanced. The auxiliary classifier is dropped at the task's end, so the
    model's size (reported per task in metrics.json) grows by exactly one extractor and the head's new
    columns per task.

    Defaults: lambda_a = 1 (the paper's equal weighting, as its official code and PyCIL add the two terms);
    memory 200 samples chosen by herding (the paper: 2,000 on CIFAR-100, 20 per class, herding).
    Left out: the paper's channel-level masks and pruning (optional in the paper, "DER w/o P"; PyCIL leaves
    it out too), and its classifier-learning stage (re-training the head on class-balanced data with a
    softmax temperature), for which PyCIL substitutes weight aligning; this class does neither."""

    def __init__(self, memory: Memory, aux_weight: float = 1.0):
        if aux_weight < 0:
            raise ValueError(f"strategy.aux_weight={aux_weight} must be 0 or more")
        super().__init__(memory)
        self.aux_weight = float(aux_weight)
        self.old_classes = 0

    def before_task(self, task: Task) -> None:
        self.old_classes = self.model.head.n_classes - len(task.classes)
        if self.old_classes:
            self.expand()
            self.add_auxiliary_head(len(task.classes) + 1)

    def loss(self, batch: Batch) -> Tensor:
        x = self.context.preprocess(batch.x, self.rng)
        features = self.model.backbone(x)
        loss = F.cross_entropy(self.model.head(features), batch.y)
        if self.auxiliary_outputs and self.aux_weight:
            new_features = features[:, -self.backbone.extractors[-1].feature_dim :]
            aux_logits = self.model.auxiliary_head(new_features)
            loss = loss + self.aux_weight * F.cross_entropy(
                aux_logits, auxiliary_targets(batch.y, self.old_classes)
            )
        return loss

    def after_task(self, task: Task) -> None:
        self.remove_auxiliary_head()
        self.remember(task)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "old_classes": self.old_classes}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.old_classes = int(state["old_classes"])
