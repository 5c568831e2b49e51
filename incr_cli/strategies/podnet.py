"""PODNet: pooled-outputs distillation of intermediate feature maps and of the embedding, with a local
similarity classifier of several proxies per class trained by an NCA loss."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from incr_cli.data.batches import Batch
from incr_cli.data.stream import Task
from incr_cli.memory import Memory
from incr_cli.strategies.cosine import EmbeddingDistillation, cosine_similarity, embed, embedding_distillation


def pooled(h: Tensor) -> Tensor:
    """POD-spatial's view of a stage output: h^2 summed over the width and, apart, over the height, both
    flattened and concatenated, then L2-normalised. A vector (MLP layer) has no width or height: h^2."""
    h = h.float().pow(2)
    if h.dim() == 4:  # (N, C, H, W)
        h = torch.cat([h.sum(3).flatten(1), h.sum(2).flatten(1)], dim=1)
    return F.normalize(h.flatten(1), dim=1)


POD_DISTANCES = ("norm", "squared")


def pod_spatial(stages: list[Tensor], old_stages: list[Tensor], distance: str = "norm") -> Tensor:
    """(1 / L) sum_l of the batch mean of || pooled(h_l) - pooled(h*_l) || over the L stages (the authors' code
    and PyCIL); `distance="squared"`: of its square."""
    if distance not in POD_DISTANCES:
        raise ValueError(f"pod_distance must be one of {', '.join(POD_DISTANCES)}, got {distance!r}")
    distances = []
    for h, old in zip(stages, old_stages, strict=True):
        squared = (pooled(h) - pooled(old)).pow(2).sum(1)
        # the norm's gradient where the two agree exactly: 0 (the clamp), not 0 / 0
        per_sample = squared if distance == "squared" else squared.clamp(min=1e-24).sqrt()
        distances.append(per_sample.mean())
    return torch.stack(distances).mean()


def local_similarity(features: Tensor, proxies: Tensor, per_class: int) -> Tensor:
    """LSC: s_c = sum_k softmax_k(<theta_ck, h>) <theta_ck, h> over the K proxies of each class, with
    cosine similarities; `proxies` holds the K proxies of class c in rows c*K .. c*K + K - 1."""
    cosines = cosine_similarity(features, proxies).unflatten(1, (-1, per_class))
    return (F.softmax(cosines, dim=2) * cosines).sum(2)


def nca_loss(similarities: Tensor, labels: Tensor, scale: Tensor | float, margin: float) -> Tensor:
    """Batch mean of [-log(exp(eta (s_y - delta)) / sum_{c != y} exp(eta s_c))]_+: the true class
    leaves the denominator and must win by the margin delta."""
    if similarities.shape[1] < 2:  # nothing to tell apart
        return similarities.sum() * 0
    logits = scale * similarities.float()
    is_label = F.one_hot(labels, similarities.shape[1]).bool()
    negatives = torch.logsumexp(logits.masked_fill(is_label, float("-inf")), dim=1)
    positive = logits.gather(1, labels[:, None]).squeeze(1) - scale * margin
    return F.relu(negatives - positive).mean()


def kmeans(points: Tensor, k: int, generator: torch.Generator, iterations: int = 20) -> Tensor:
    """k centroids of `points` by Lloyd's algorithm from k distinct random points (fewer points than k: some
    repeat); an empty cluster keeps its centroid."""
    first = torch.randperm(len(points), generator=generator, device=generator.device).to(points.device)
    centroids = points[first.repeat(math.ceil(k / len(points)))[:k]].clone()
    for _ in range(iterations):
        nearest = torch.cdist(points, centroids).argmin(1)
        sums = torch.zeros_like(centroids).index_add_(0, nearest, points)
        counts = torch.bincount(nearest, minlength=k).unsqueeze(1)
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
    return centroids


class PODNet(EmbeddingDistillation):
    """PODNet (Douillard, Cord, Ollion, Robert and Valle 2020, "PODNet: Pooled Outputs Distillation for
    Small-Tasks Incremental Learning", ECCV 2020).

    Local similarity classifier (LSC): K proxies theta_ck per class, registered on the model's head (sized
    for every class of the stream, so that checkpoints keep one shape), score
    s_c(x) = sum_k softmax_k(<theta_ck, h>) <theta_ck, h> with cosine similarities, h the backbone's
    embedding taken before its final ReLU (as in the authors' code). It trains with the NCA loss

        L_LSC = [-log(exp(eta (s_y - delta)) / sum_{c != y} exp(eta s_c))]_+

    with eta a learned scale (registered on the head). From the second task on, over a batch of the task's
    data and exemplars, the loss adds

        sqrt(N / T) * (lambda_c * L_POD-spatial + lambda_f * L_POD-flat)

    with N the classes seen so far and T the task's new classes. L_POD-spatial = (1/L) sum_l of the batch mean
    of || P(h_l) - P(h*_l) || over the L stage outputs h_l of the current network and h*_l of the frozen
    previous one, P concatenating the width-pooled and the height-pooled maps (the paper's POD-width plus
    POD-height) of the squared activations, L2-normalised, as in the authors' code and PyCIL (which makes
    the term blind to the activations' scale). `pod_distance: squared` takes the squared distance instead,
    smooth where the two networks agree (the unsquared distance keeps a gradient of full size however small
    the difference). L_POD-flat = 1 - cos(h, h*), as the authors' code computes it. Stages: the backbone's
    `stage_modules()` (a ResNet's last stage is taken before its ReLU, as the embedding; a vector output, an
    MLP layer's, has nothing to pool: P(h) = h^2, normalised).

    New classes' proxies start as k-means centroids of the normalised embeddings of their training samples,
    scaled to the old proxies' mean norm (the authors' code's imprinting). One addition: eta never falls
    below its initial value (projected after each step). With the hinge, a two-class task's loss is
    eta * (s_neg - s_y + delta), smallest at eta <= 0 while the classes are not yet delta apart: left free,
    eta can turn negative and invert every score.

    Training follows `EmbeddingDistillation`: the exemplars join the task's training set, the old classes'
    proxies stay frozen from the second task on (the authors' `groupwise_factors: old_weights: 0`, PyCIL's
    learning rate 0), and a class-balanced finetuning ends each task but the first, with the defaults of the
    authors' CIFAR-100 options (`finetuning_config`): 20 epochs on the memory at a constant learning rate
    0.05, the proxies alone (old and new; eta and the backbone fixed, BatchNorm in training mode as there).
    PyCIL's port trains the network but the old proxies instead, at 0.005 annealed by a cosine
    (`finetune_params: network`, `finetune_lr: 0.005`, `finetune_schedule: cosine`).

    Defaults, the paper's for CIFAR-100: lambda_c = 3, lambda_f = 1, K = 10, delta = 0.6, eta starting at 1
    (the authors' code); herding exemplars. Left out: the authors' clamping of every gradient element to
    [-5, 5]."""

    backbone_needs = ("feature_dim", "embedding_before_activation", "stage_modules")

    def __init__(
        self,
        memory: Memory,
        lambda_spatial: float = 3.0,
        lambda_flat: float = 1.0,
        proxies_per_class: int = 10,
        margin: float = 0.6,
        scale: float = 1.0,
        imprint: bool = True,
        pod_distance: str = "norm",
        exemplars: str = "training_set",
        replay_batch_size: int | None = None,
        freeze_old: bool = True,
        finetune_epochs: int = 20,
        finetune_lr: float = 0.05,
        finetune_params: str = "classifier",
        finetune_schedule: str = "constant",
        finetune_milestones: Sequence[int] = (),
    ):
        if lambda_spatial < 0 or lambda_flat < 0 or margin < 0:
            raise ValueError(
                f"PODNet needs lambda_spatial, lambda_flat and margin >= 0, got {lambda_spatial=}, "
                f"{lambda_flat=}, {margin=}"
            )
        if proxies_per_class < 1 or scale <= 0:
            raise ValueError(
                f"PODNet needs proxies_per_class >= 1 and scale > 0, got {proxies_per_class=}, {scale=}"
            )
        if pod_distance not in POD_DISTANCES:
            raise ValueError(f"pod_distance must be one of {', '.join(POD_DISTANCES)}, got {pod_distance!r}")
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
        self.pod_distance = pod_distance
        self.lambda_spatial, self.lambda_flat = float(lambda_spatial), float(lambda_flat)
        self.per_class, self.margin = int(proxies_per_class), float(margin)
        self.initial_scale, self.imprint = float(scale), bool(imprint)

    def setup(self, context) -> None:
        super().setup(context)
        dim = self.model.backbone.feature_dim
        # nn.Linear's initialisation, from a generator of its own so that the run's other draws stay as they are
        generator = torch.Generator().manual_seed(context.seed)
        bound = 1 / math.sqrt(dim)
        proxies = (
            torch.rand(self.stream.n_classes * self.per_class, dim, generator=generator) * 2 - 1
        ) * bound
        self.register("proxies", proxies)
        self.register("scale", torch.tensor(self.initial_scale))

    def before_task(self, task: Task) -> None:
        super().before_task(task)
        if self.imprint and self.old_classes:
            x, y = self.training_samples(task.train_index)
            phi = F.normalize(self.features(x), dim=1)
            proxies, k = self.model.head.proxies, self.per_class
            with torch.no_grad():
                norm = proxies[: self.old_classes * k].norm(dim=1).mean()
                for c in task.classes:
                    centroids = F.normalize(kmeans(phi[y == c], k, self.rng), dim=1)
                    proxies[c * k : (c + 1) * k] = (centroids * norm).to(proxies.dtype)

    def scores(self, features: Tensor, n_classes: int) -> Tensor:
        return local_similarity(
            features, self.model.head.proxies[: n_classes * self.per_class], self.per_class
        )

    def classifier_rows(self, model: nn.Module) -> tuple[nn.Parameter, int]:
        return model.head.proxies, self.per_class

    def loss(self, batch: Batch) -> Tensor:
        x = self.context.preprocess(batch.x, self.rng)
        stages, features = embed(self.model.backbone, x, self.model.backbone.stage_modules())
        seen = self.model.head.n_classes
        loss = nca_loss(self.scores(features, seen), batch.y, self.model.head.scale, self.margin)
        if self.old_model is None or not (self.lambda_spatial or self.lambda_flat):
            return loss
        with torch.no_grad():
            old_stages, old_features = embed(
                self.old_model.backbone, x, self.old_model.backbone.stage_modules()
            )
        distillation = self.lambda_flat * embedding_distillation(features, old_features)
        if self.lambda_spatial and stages:
            distillation = distillation + self.lambda_spatial * pod_spatial(
                stages, old_stages, self.pod_distance
            )
        return loss + math.sqrt(seen / (seen - self.old_classes)) * distillation

    @torch.no_grad()
    def after_step(self, freeze_old: bool) -> None:
        super().after_step(freeze_old)
        self.model.head.scale.clamp_(min=self.initial_scale)

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        return self.model.head.scale * self.scores(embed(self.model.backbone, x)[1], self.stream.n_classes)
