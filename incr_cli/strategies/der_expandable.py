"""DER, dynamically expandable representation: a new feature extractor per task next to the frozen old ones."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from incr_cli.data.batches import Batch
from incr_cli.data.stream import Task
from incr_cli.memory import Memory
from incr_cli.strategies.common.growing import GrowingNetwork
from incr_cli.strategies.wa import align_weights

BIAS_CORRECTIONS = ("weight_align", "classifier_relearn", "none")


def auxiliary_targets(y: Tensor, n_old: int) -> Tensor:
    """Labels of DER's auxiliary classifier: every old class is class 0, new class n_old + j is class 1 + j."""
    return torch.where(y >= n_old, y - n_old + 1, torch.zeros_like(y))


def balanced_subset(rows: Tensor, labels: Tensor, generator: torch.Generator) -> Tensor:
    """`rows` cut to the same number of samples per class, the smallest class's count, drawn at random
    (DER's class-balanced subset for classifier re-learning: the authors' `construct_balanced_subset`)."""
    classes = labels.unique()
    keep = min(int((labels == c).sum()) for c in classes)
    chosen = []
    for c in classes:
        members = rows[labels == c]
        order = torch.randperm(len(members), generator=generator, device=generator.device)
        chosen.append(members[order[:keep].to(members.device)])
    return torch.cat(chosen)


class DynamicallyExpandableRepresentation(GrowingNetwork):
    """DER (Yan, Xie and He 2021, "DER: Dynamically Expandable Representation for Class Incremental
    Learning", CVPR 2021), its representation-learning stage as PyCIL implements it, then a correction of
    the head's bias towards the new classes.

    At task t > 1 a new feature extractor F_t, initialised as a copy of F_{t-1} (PyCIL), joins the frozen
    F_1..F_{t-1} (no gradients, batch-norm in eval mode): the features are u = [F_1(x), ..., F_t(x)] and the
    head H_t scores every seen class from u; its rows keep their trained weights on the old features and
    get new columns for F_t's. An auxiliary classifier H_a on F_t(x) alone has |C_new| + 1 outputs, all
    old classes being one class (label 0, new class j -> 1 + j). Each step on a batch of the task's data
    joined with the exemplar memory minimises

        L = CE(H_t(u), y) + lambda_a * CE(H_a(F_t(x)), y_a)

    The first task trains one extractor with CE alone. After each later task, `bias_correction`:

    - `weight_align` (default; PyCIL's der.py): the new classes' rows of H_t scaled by
      gamma = mean ||W_old,i|| / mean ||W_new,j|| (WA's `align_weights`), each task's gamma in `gammas`;
    - `classifier_relearn` (the paper's classifier learning stage, as the authors' code runs it):
      H_t drawn afresh and trained alone, the extractors frozen in eval mode, on a class-balanced subset of
      the task's data and the memory (every class cut at random to the smallest class's count, i.e. the
      exemplars per old class), by CE(H_t(u) / T, y), SGD with momentum 0.9, the training augmentation;
      the authors' head has no bias, so the bias is zeroed and held there during this stage;
    - `none`: nothing corrects it.

    Then the memory takes the task's samples by herding on u (iCaRL), class-balanced. The auxiliary
    classifier is dropped at the task's end, so the model's size (reported per task in metrics.json) grows
    by exactly one extractor and the head's new columns per task.

    Defaults: lambda_a = 1 (the paper's equal weighting, as its official code and PyCIL add the two terms);
    re-learning as the authors' CIFAR-100 configs: 30 epochs, lr 0.1 divided by 10 at epoch 15, weight
    decay 5e-4, T = 5, the run's batch size (theirs 128). Memory 200 samples chosen by herding (the paper:
    2,000 on CIFAR-100, herding). Left out: the paper's channel-level masks and pruning (optional in the
    paper, "DER w/o P"; PyCIL leaves it out too)."""

    def __init__(
        self,
        memory: Memory,
        aux_weight: float = 1.0,
        bias_correction: str = "weight_align",
        relearn_epochs: int = 30,
        relearn_lr: float = 0.1,
        relearn_milestones: list[int] | tuple[int, ...] = (15,),
        relearn_gamma: float = 0.1,
        relearn_weight_decay: float = 5e-4,
        relearn_temperature: float = 5.0,
    ):
        if aux_weight < 0:
            raise ValueError(f"strategy.aux_weight={aux_weight} must be 0 or more")
        if bias_correction not in BIAS_CORRECTIONS:
            raise ValueError(
                f"strategy.bias_correction={bias_correction!r} must be one of {BIAS_CORRECTIONS}"
            )
        if relearn_epochs < 1 or relearn_lr <= 0 or relearn_temperature <= 0 or relearn_weight_decay < 0:
            raise ValueError(
                f"strategy.relearn_epochs={relearn_epochs} must be a positive integer, relearn_lr={relearn_lr} "
                f"and relearn_temperature={relearn_temperature} positive, "
                f"relearn_weight_decay={relearn_weight_decay} 0 or more"
            )
        super().__init__(memory)
        self.aux_weight = float(aux_weight)
        self.bias_correction = bias_correction
        self.relearn_epochs, self.relearn_lr = int(relearn_epochs), float(relearn_lr)
        self.relearn_milestones = [int(m) for m in relearn_milestones]
        self.relearn_gamma, self.relearn_weight_decay = float(relearn_gamma), float(relearn_weight_decay)
        self.relearn_temperature = float(relearn_temperature)
        self.old_classes = 0
        self.gammas: list[float] = []

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
        if self.old_classes and self.bias_correction == "weight_align":
            self.gammas.append(align_weights(self.model.head.weight, self.old_classes))
        elif self.old_classes and self.bias_correction == "classifier_relearn":
            self.relearn_classifier(task)
        self.remember(task)

    def relearn_classifier(self, task: Task) -> None:
        """The paper's classifier learning stage: a fresh head trained alone on a class-balanced subset."""
        rows = self.training_indices(task)
        rows = balanced_subset(rows, self.stream.train_y[rows], self.rng)
        head = self.model.head
        bound = head.in_features**-0.5  # nn.Linear's initialisation, drawn from the run's generator
        with torch.no_grad():
            fresh = torch.rand(head.weight.shape, generator=self.rng, device=self.rng.device)
            head.weight.copy_(fresh * (2 * bound) - bound)
            head.bias.zero_()
        optimizer = torch.optim.SGD(
            [head.weight], lr=self.relearn_lr, momentum=0.9, weight_decay=self.relearn_weight_decay
        )
        scheduler = torch.optim.lr_scheduler.MultiStepLR(
            optimizer, self.relearn_milestones, self.relearn_gamma
        )
        bias_grad = head.bias.requires_grad
        head.bias.requires_grad_(False)
        was_training = self.model.training
        self.model.eval()  # batch-norm statistics stay; the augmentation still applies (training transform)

        def relearn_loss(batch: Batch) -> Tensor:
            x = self.context.preprocess(batch.x, self.rng)
            with torch.no_grad():
                features = self.model.backbone(x)
            return F.cross_entropy(head(features).float() / self.relearn_temperature, batch.y)

        stage = f"task {task.id + 1}, classifier re-learning"
        self.run_stage(rows, relearn_loss, optimizer, self.relearn_epochs, scheduler=scheduler, name=stage)
        head.bias.requires_grad_(bias_grad)
        self.model.train(was_training)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "old_classes": self.old_classes, "gammas": list(self.gammas)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.old_classes = int(state["old_classes"])
        self.gammas = [float(g) for g in state.get("gammas", [])]
