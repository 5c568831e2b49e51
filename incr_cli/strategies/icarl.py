"""iCaRL: herding exemplars, sigmoid distillation of the previous network, nearest-mean-of-exemplars prediction."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from incr_cli.data.batches import Batch
from incr_cli.data.stream import Task
from incr_cli.memory import Memory
from incr_cli.strategies.teacher import PreviousTaskTeacher

CLASSIFIERS = ("nme", "linear")


def icarl_loss(logits: Tensor, labels: Tensor, old_logits: Tensor | None = None) -> Tensor:
    """Binary cross-entropy of sigmoid(`logits`) against one-hot `labels`, except that the first
    old_logits.shape[1] (old) classes take the previous network's sigmoid outputs as targets; the mean over
    samples and classes, in float32."""
    targets = F.one_hot(labels, logits.shape[1]).float()
    if old_logits is not None:
        targets[:, : old_logits.shape[1]] = torch.sigmoid(old_logits.float())
    return F.binary_cross_entropy_with_logits(logits.float(), targets)


def nearest_mean_scores(features: Tensor, class_means: Tensor) -> Tensor:
    """-|| phi(x) - mu_y || for every sample and class, phi the L2-normalised `features`: the largest score
    is the nearest class mean."""
    return -torch.cdist(F.normalize(features.float(), dim=1), class_means.float())


class ICaRL(PreviousTaskTeacher):
    """iCaRL (Rebuffi, Kolesnikov, Sperl and Lampert 2017, "iCaRL: Incremental Classifier and
    Representation Learning", CVPR 2017).

    Training (Alg. 3, UpdateRepresentation): each task trains on its own data together with the exemplars
    of the earlier classes (the memory's samples are rows of the stream's training set, so the epochs
    shuffle the union, as the paper's D = new data u exemplars). With s the classes seen before this task,
    q_y(x) the sigmoid outputs of the network as it ended the previous task (a frozen copy), and g_y(x) the
    current network's sigmoid outputs over the classes seen so far, every sample x with label y_x costs

        - sum_{y >= s} [ d(y = y_x) log g_y(x) + d(y != y_x) log(1 - g_y(x)) ]    (classification)
        - sum_{y < s}  [ q_y(x) log g_y(x) + (1 - q_y(x)) log(1 - g_y(x)) ]       (distillation)

    averaged over the batch and the classes (the paper sums; the mean is the authors' code's and
    Avalanche's normalisation). Old classes' targets are the old network's outputs for every sample,
    exemplars included, not their labels.

    Exemplars (Alg. 4 and 5): after training, a fixed total of `memory.size` samples, split equally over
    the classes seen (the memory's quotas), chosen by herding on the L2-normalised features of the trained
    network; earlier classes shrink by keeping a prefix of their herding order.

    Classification (Alg. 1): class prototypes mu_y = the mean of the L2-normalised features phi of class
    y's exemplars, renormalised to unit length (as in the authors' code), computed once the exemplars are
    chosen; a test sample goes to argmin_y || phi(x) - mu_y ||. When the data set trains with horizontal
    flips, each exemplar's features are averaged with its mirror image's (the authors' code's trick);
    otherwise (digits, MNIST, Fashion-MNIST) plain features. `classifier: linear` keeps the same training
    and evaluates with the trained linear head instead, to compare the two. A seen class without exemplars
    (memory smaller than the number of classes) cannot be predicted by the nearest-mean rule; classes not
    yet seen keep the linear head's scores (task-IL accuracy of future tasks).

    Defaults: memory 2000 exemplars in the paper (CIFAR-100, ImageNet) and PyCIL; 200 on P1, 500 on P2
    (Avalanche's reference: herding, memory 500). The paper's weight decay and learning-rate schedule are
    the optimizer's and scheduler's config groups."""

    def __init__(self, memory: Memory, classifier: str = "nme"):
        if classifier not in CLASSIFIERS:
            raise ValueError(f"iCaRL classifier must be one of {', '.join(CLASSIFIERS)}, got {classifier!r}")
        if classifier == "nme" and memory.size == 0:
            raise ValueError("iCaRL's nearest-mean classifier needs exemplars: memory.size must be 1 or more")
        self.memory, self.classifier = memory, classifier
        self.class_means: Tensor | None = (
            None  # (classes seen, feature dim), unit rows; zero rows: no exemplar
        )
        self.has_exemplars: Tensor | None = None  # (classes seen,) bool

    def training_indices(self, task: Task) -> Tensor:
        if not len(self.memory):
            return task.train_index
        return torch.cat([task.train_index, self.memory.extras["index"].to(task.train_index.device)])

    def loss(self, batch: Batch) -> Tensor:
        x = self.context.preprocess(batch.x, self.rng)
        logits = self.model(x)
        old_logits = None
        if self.old_model is not None:
            with torch.no_grad():
                old_logits = self.old_model(x)[:, : self.old_classes]
        return icarl_loss(logits, batch.y, old_logits)

    def after_task(self, task: Task) -> None:
        index = task.train_index
        x, y = self.stream.train_x[index], self.stream.train_y[index]
        features = self.features(x) if self.memory.needs_features else None
        # the stream row of each exemplar travels with it, so that later tasks can train on it
        self.memory.add(x, y, self.rng, features=features, index=index)
        self.update_class_means()

    @torch.no_grad()
    def update_class_means(self) -> None:
        """mu_y = the renormalised mean of the exemplars' L2-normalised features, with the current network."""
        seen = self.model.head.n_classes
        phi = F.normalize(self.features(self.memory.x), dim=1)
        if self.context.preprocess.flip:
            phi = (phi + F.normalize(self.features(self.memory.x.flip(3)), dim=1)) / 2
        sums = phi.new_zeros(seen, phi.shape[1]).index_add_(0, self.memory.y, phi)
        counts = torch.bincount(self.memory.y, minlength=seen)
        self.class_means = F.normalize(sums, dim=1)  # the mean's direction: the count does not matter
        self.has_exemplars = counts > 0

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        features = self.model.backbone(x)
        scores = self.model.head.forward_all(features).float()
        if self.classifier == "linear" or self.class_means is None:
            return scores
        known = len(self.class_means)
        nearest = nearest_mean_scores(features, self.class_means)
        scores[:, :known] = nearest.masked_fill(~self.has_exemplars, float("-inf"))
        return scores

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.class_means is not None:
            state["class_means"], state["has_exemplars"] = self.class_means, self.has_exemplars
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        device = self.context.device
        if "class_means" in state:
            self.class_means = state["class_means"].to(device)
            self.has_exemplars = state["has_exemplars"].to(device)
