"""iCaRL: herding exemplars, sigmoid distillation of the previous network, nearest-mean-of-exemplars prediction."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from incr_cli.data.batches import Batch
from incr_cli.data.stream import Task
from incr_cli.memory import Memory
from incr_cli.strategies.common.teacher import PreviousTaskTeacher

CLASSIFIERS = ("nme", "linear")
LOSSES = ("bce", "ce_kd")
BCE_REDUCTIONS = ("mean_all", "mean_seen", "sum_seen")
FLIP_MEANS = ("auto", "always", "never")


def icarl_loss(
    logits: Tensor, labels: Tensor, old_logits: Tensor | None = None, reduction: str = "mean"
) -> Tensor:
    """Binary cross-entropy of sigmoid(`logits`) against one-hot `labels`, except that the first
    old_logits.shape[1] (old) classes take the previous network's sigmoid outputs as targets, in float32.
    `reduction`: "mean" over samples and the classes of `logits`, or "sum" over those classes and mean over
    the samples."""
    targets = F.one_hot(labels, logits.shape[1]).float()
    if old_logits is not None:
        targets[:, : old_logits.shape[1]] = torch.sigmoid(old_logits.float())
    terms = F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="none")
    return terms.mean() if reduction == "mean" else terms.sum(1).mean()


def ce_kd_loss(
    logits: Tensor, labels: Tensor, old_logits: Tensor | None = None, temperature: float = 2.0
) -> Tensor:
    """Cross-entropy over `logits` plus, with a previous network, the cross-entropy between its softened
    outputs softmax(old / T) and softmax(logits[:, :old] / T): summed over the old classes, averaged over the
    batch, weight 1, no T^2 (PyCIL models/icarl.py, _KD_loss); in float32."""
    loss = F.cross_entropy(logits.float(), labels)
    if old_logits is not None:
        log_p = F.log_softmax(logits[:, : old_logits.shape[1]].float() / temperature, dim=1)
        q = F.softmax(old_logits.float() / temperature, dim=1)
        loss = loss - (q * log_p).sum(1).mean()
    return loss


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
    q_y(x) the sigmoid outputs of the network as it ended the previous task (a frozen copy, eval mode), and
    g_y(x) the current network's sigmoid outputs, every sample x with label y_x costs (`loss: bce`)

        - sum_{y >= s} [ d(y = y_x) log g_y(x) + d(y != y_x) log(1 - g_y(x)) ]    (classification)
        - sum_{y < s}  [ q_y(x) log g_y(x) + (1 - q_y(x)) log(1 - g_y(x)) ]       (distillation)

    Old classes' targets are the old network's outputs for every sample, exemplars included, not their
    labels. `bce_reduction` says over which outputs and how:
    - `mean_all` (default): one output per class of the stream from the first task on, classes not seen
      yet with target 0, the mean over the batch and all outputs: the authors' code (Theano and TensorFlow,
      a fixed 100-output layer, `.mean()`), Mammoth's icarl and Avalanche's ICaRLLossPlugin (BCELoss over
      a fixed-size classifier). The head holds every class's row from the first task (trained, target 0).
    - `mean_seen`: the classes seen so far (the paper's growing output layer), mean over batch and classes.
    - `sum_seen`: the classes seen so far, summed per sample and averaged over the batch: the paper's
      per-sample loss, and van de Ven et al.'s code.
    `loss: ce_kd` is PyCIL's iCaRL instead: softmax cross-entropy over the classes seen so far plus the
    cross-entropy between softmax(old / T) and softmax(new / T) on the old classes (`temperature`, T = 2).

    Exemplars (Alg. 4 and 5): after training, a fixed total of `memory.size` samples, split equally over
    the classes seen (the memory's quotas), chosen by herding on the L2-normalised features of the trained
    network (eval transform, eval mode); earlier classes shrink by keeping a prefix of their herding order.

    Classification (Alg. 1): class prototypes mu_y = the mean of the L2-normalised features phi of class
    y's exemplars, renormalised to unit length (as in the authors' code), computed with the trained network
    once the exemplars are chosen; a test sample goes to argmin_y || phi(x) - mu_y ||. `flip_means`: each
    exemplar's features averaged with its mirror image's (the authors' code's test-time trick, for CIFAR
    trained with flips): `auto` (default) when the data set trains with horizontal flips, `always`
    (Mammoth; Avalanche for every image input), `never` (the paper's Alg. 2; PyCIL). `classifier: linear`
    evaluates with the trained head instead. A seen class without exemplars (memory smaller than the
    number of classes) cannot be predicted by the nearest-mean rule; classes not yet seen keep the linear
    head's scores (task-IL accuracy of future tasks).

    Defaults: memory 2000 exemplars in the paper (CIFAR-100, ImageNet) and PyCIL. The paper's weight decay
    and learning-rate schedule are the optimizer's and scheduler's config groups."""

    def __init__(
        self,
        memory: Memory,
        classifier: str = "nme",
        loss: str = "bce",
        bce_reduction: str = "mean_all",
        temperature: float = 2.0,
        flip_means: str = "auto",
    ):
        for name, value, choices in (
            ("classifier", classifier, CLASSIFIERS),
            ("loss", loss, LOSSES),
            ("bce_reduction", bce_reduction, BCE_REDUCTIONS),
            ("flip_means", flip_means, FLIP_MEANS),
        ):
            if value not in choices:
                raise ValueError(f"iCaRL {name} must be one of {', '.join(choices)}, got {value!r}")
        if temperature <= 0:
            raise ValueError(f"iCaRL temperature must be > 0, got {temperature}")
        if classifier == "nme" and memory.size == 0:
            raise ValueError("iCaRL's nearest-mean classifier needs exemplars: memory.size must be 1 or more")
        self.memory, self.classifier = memory, classifier
        self.loss_name, self.bce_reduction, self.temperature = loss, bce_reduction, float(temperature)
        self.flip_means = flip_means
        self.class_means: Tensor | None = (
            None  # (classes seen, feature dim), unit rows; zero rows: no exemplar
        )
        self.has_exemplars: Tensor | None = None  # (classes seen,) bool

    @property
    def all_outputs(self) -> bool:
        """The head scores every class of the stream from the first task on (bce, mean_all)."""
        return self.loss_name == "bce" and self.bce_reduction == "mean_all"

    def before_task(self, task: Task) -> None:
        super().before_task(task)
        # the classes before this task (the teacher counts "head minus this task", but a full head is larger)
        self.old_classes = task.classes[-1] + 1 - len(task.classes)
        if self.old_classes == 0:
            self.old_model = None
        if self.all_outputs:
            self.model.head.grow(self.stream.n_classes)

    def training_indices(self, task: Task) -> Tensor:
        return self.rows_with_memory(task.train_index)

    def loss(self, batch: Batch) -> Tensor:
        x = self.context.preprocess(batch.x, self.rng)
        logits = self.model(x)
        old_logits = None
        if self.old_model is not None:
            with torch.no_grad():
                old_logits = self.old_model(x)[:, : self.old_classes]
        if self.loss_name == "ce_kd":
            return ce_kd_loss(logits, batch.y, old_logits, self.temperature)
        return icarl_loss(logits, batch.y, old_logits, "sum" if self.bce_reduction == "sum_seen" else "mean")

    def after_task(self, task: Task) -> None:
        self.remember_rows(task.train_index, row_extra="index")
        self.update_class_means(seen=task.classes[-1] + 1)

    @torch.no_grad()
    def update_class_means(self, seen: int) -> None:
        """mu_y = the renormalised mean of the exemplars' L2-normalised features, with the current network,
        for the `seen` classes."""
        phi = F.normalize(self.features(self.memory.x), dim=1)
        flip = self.flip_means == "always" or (self.flip_means == "auto" and self.context.preprocess.flip)
        if flip:
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
