"""LUCIR: a cosine-normalised classifier with a less-forget constraint on the embedding and a margin ranking
loss that separates old classes from the new ones."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from incr_cli.data.batches import Batch
from incr_cli.data.stream import Task
from incr_cli.memory import Memory
from incr_cli.strategies.cosine import (
    EmbeddingDistillation,
    cosine_similarity,
    embed,
    embedding_distillation,
)


def imprinted_weights(features: Tensor, labels: Tensor, classes: list[int]) -> Tensor:
    """One row per class of `classes`: the normalised mean of its samples' normalised features (weight
    imprinting, Qi et al. 2018, "Low-Shot Learning with Imprinted Weights"), as LUCIR's code starts new
    classes."""
    phi = F.normalize(features.float(), dim=1)
    means = torch.stack([phi[labels == c].mean(0) for c in classes])
    return F.normalize(means, dim=1)


def margin_ranking_loss(
    cosines: Tensor, labels: Tensor, old_classes: int, hard_negatives: int, margin: float
) -> Tensor:
    """LUCIR's margin ranking loss: the mean over the old-class samples (anchors) and their K highest-scoring
    new classes of max(0, m - cos_y + cos_k), on the unscaled cosines; 0 without an anchor."""
    anchors = (labels < old_classes).float()
    k = min(hard_negatives, cosines.shape[1] - old_classes)
    positive = cosines.gather(1, labels[:, None])
    hardest = cosines[:, old_classes:].topk(k, dim=1).values
    # A masked mean rather than indexing by the anchors: no host synchronisation on a GPU.
    per_pair = F.relu(margin - positive + hardest) * anchors[:, None]
    return per_pair.sum() / (anchors.sum() * k).clamp(min=1)


class LUCIR(EmbeddingDistillation):
    """LUCIR (Hou, Pan, Loy, Wang and Lin 2019, "Learning a Unified Classifier Incrementally via
    Rebalancing", CVPR 2019).

    Cosine normalisation: p(c | x) = softmax_c(sigma * <w_c / |w_c|, f(x) / |f(x)|>), with w_c the rows of
    the model's growing head (its bias is unused), f(x) the backbone's embedding taken before its final
    ReLU (as in the authors' code) and sigma a learned scale (the paper's eta) registered on the head.
    From the second task on, each step minimises, over a batch of the task's data and exemplars,

        L = CE(sigma * cos, y)
            + lambda * (1 - <f*(x) / |f*(x)|, f(x) / |f(x)|>)                       (less-forget constraint)
            + sum_{k=1..K} max(0, m - <w_y, f(x)> + <w_k, f(x)>)   (x of an old class; inter-class separation)

    with f* the frozen network of the previous task, the w_k the K new classes that score highest on x (the
    ranking uses the cosines, before sigma), and the adaptive weight lambda = lambda_base *
    sqrt(|C_old| / |C_new|): stronger as old classes outnumber the new ones, as the authors' code computes
    it. The first task trains the cross-entropy alone. As in the authors' code, the less-forget term is
    averaged over the batch, the ranking term over the (anchor, hard negative) pairs, and a new class's row
    starts as the normalised mean of its training samples' normalised embeddings (weight imprinting),
    scaled to the old rows' mean norm.

    Training follows `EmbeddingDistillation`: the exemplars join the task's training set, the old classes'
    rows stay frozen from the second task on (the authors' code trains them at learning rate 0 while the
    less-forget term is on), and an optional class-balanced finetuning on the memory ends each task but the
    first. That finetuning is off by default, as in the authors' code (its `cb_finetune` flag; PyCIL's
    port has none); turned on, its defaults are the authors': 20 epochs at learning rate 0.01, divided by
    10 after epoch 10, the classifier rows alone (old and new; sigma and the backbone fixed, BatchNorm in
    eval mode: their `ft_flag` 2), the full loss (Mammoth's LUCIR runs the same stage after every task).

    Defaults, the paper's for CIFAR-100: lambda_base 5 (10 on ImageNet), K = 2, m = 0.5, ranking weight 1,
    sigma starting at 1 (the authors' code); exemplars chosen by herding."""

    finetune_freezes_batchnorm = True  # the authors' fix_bn in their class-balanced finetuning

    def __init__(
        self,
        memory: Memory,
        lambda_base: float = 5.0,
        hard_negatives: int = 2,
        margin: float = 0.5,
        ranking_weight: float = 1.0,
        sigma: float = 1.0,
        imprint: bool = True,
        exemplars: str = "training_set",
        replay_batch_size: int | None = None,
        freeze_old: bool = True,
        finetune_epochs: int = 0,
        finetune_lr: float = 0.01,
        finetune_params: str = "classifier",
        finetune_schedule: str = "step",
        finetune_milestones: Sequence[int] = (10,),
    ):
        if lambda_base < 0 or ranking_weight < 0 or margin < 0:
            raise ValueError(
                f"LUCIR needs lambda_base, ranking_weight and margin >= 0, got {lambda_base=}, "
                f"{ranking_weight=}, {margin=}"
            )
        if hard_negatives < 1 or sigma <= 0:
            raise ValueError(
                f"LUCIR needs hard_negatives >= 1 and sigma > 0, got {hard_negatives=}, {sigma=}"
            )
        super().__init__(
            memory,
            exemplars,
            replay_batch_size,
            freeze_old,
            finetune_epochs,
            finetune_lr,
            finetune_params,
            finetune_schedule,
            finetune_milestones,
        )
        self.lambda_base, self.ranking_weight = float(lambda_base), float(ranking_weight)
        self.hard_negatives, self.margin = int(hard_negatives), float(margin)
        self.initial_sigma, self.imprint = float(sigma), bool(imprint)

    def setup(self, context) -> None:
        super().setup(context)
        self.register("sigma", torch.tensor(self.initial_sigma))

    @property
    def less_forget_weight(self) -> float:
        new_classes = self.model.head.n_classes - self.old_classes
        return self.lambda_base * math.sqrt(self.old_classes / new_classes)

    def before_task(self, task: Task) -> None:
        super().before_task(task)
        if self.imprint and self.old_classes:
            x, y = self.training_samples(task.train_index)
            weight = self.model.head.weight
            with torch.no_grad():
                norm = weight[: self.old_classes].norm(dim=1).mean()
                rows = imprinted_weights(self.features(x), y, task.classes) * norm
                weight[task.classes[0] : task.classes[-1] + 1] = rows.to(weight.dtype)

    def classifier_rows(self, model: nn.Module) -> tuple[nn.Parameter, int]:
        return model.head.weight, 1

    def loss(self, batch: Batch) -> Tensor:
        x = self.context.preprocess(batch.x, self.rng)
        features = embed(self.model.backbone, x)[1]
        cosines = cosine_similarity(features, self.model.head.weight)
        loss = F.cross_entropy(self.model.head.sigma * cosines, batch.y)
        if self.old_model is None:
            return loss
        if self.lambda_base:
            with torch.no_grad():
                old_features = embed(self.old_model.backbone, x)[1]
            loss = loss + self.less_forget_weight * embedding_distillation(features, old_features)
        if self.ranking_weight:
            ranking = margin_ranking_loss(
                cosines, batch.y, self.old_classes, self.hard_negatives, self.margin
            )
            loss = loss + self.ranking_weight * ranking
        return loss

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        head = self.model.head
        weight = torch.cat([head.weight, head.future_weight[head.n_classes :]])
        return head.sigma * cosine_similarity(embed(self.model.backbone, x)[1], weight)
