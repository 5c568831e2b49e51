"""FOSTER: boost the network with a second feature extractor for each task, then compress it back into one."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor

from incr_cli.data.batches import Batch
from incr_cli.data.stream import Task
from incr_cli.memory import Memory
from incr_cli.models.expandable import ExpandableBackbone
from incr_cli.models.head import IncrementalClassifier
from incr_cli.strategies.common.growing import GrowingNetwork
from incr_cli.strategies.wa import align_weights


def class_balanced_weights(counts: Tensor, beta: float) -> Tensor:
    """Per-class weights from the effective number of samples (Cui et al. 2019, "Class-Balanced Loss Based on
    Effective Number of Samples"): w_c = (1 - beta) / (1 - beta^n_c), scaled so that they sum to the number
    of classes. Rare classes (the old ones, seen through the memory) get the larger weights."""
    counts = counts.double().clamp(min=1)
    weights = (1 - beta) / (1 - beta**counts)
    return (weights * len(weights) / weights.sum()).float()


def logit_adjusted_cross_entropy(logits: Tensor, y: Tensor, class_weights: Tensor) -> Tensor:
    """FOSTER's logits alignment: CE(logits / w, y), each class's logit divided by its weight, so that the
    network learns larger logits for the classes that the training set under-represents."""
    return F.cross_entropy(logits.float() / class_weights, y)


def distillation(
    student: Tensor, teacher: Tensor, temperature: float, class_weights: Tensor | None = None
) -> Tensor:
    """KL(q || softmax(student / T)), averaged over the batch, in float32, with q = softmax(teacher / T); with
    `class_weights`, q is FOSTER's balanced target: q_c w_c / sum_k q_k w_k. No T^2 factor (as PyCIL)."""
    log_p = F.log_softmax(student.float() / temperature, dim=1)
    q = F.softmax(teacher.float() / temperature, dim=1)
    if class_weights is not None:
        q = q * class_weights
        q = q / q.sum(dim=1, keepdim=True)
    return F.kl_div(log_p, q, reduction="batchmean")


def foster_weight_align(weight: Tensor, n_old: int, value: float) -> None:
    """PyCIL's FOSTERNet.weight_align: WA's gamma (`align_weights`) times value^(n_old / n_new) on the new rows."""
    align_weights(weight, n_old)
    if value != 1.0:
        with torch.no_grad():
            weight[n_old:] *= value ** (n_old / (len(weight) - n_old))


class FeatureBoostingAndCompression(GrowingNetwork):
    """FOSTER (Wang, Zhou, Ye and Zhan 2022, "FOSTER: Feature Boosting and Compression for Class-Incremental
    Learning", ECCV 2022), as PyCIL and the authors' code implement it (`oofc: ft`).

    The first task trains one extractor F_old with CE. At every later task:

    1. Boosting (the task's epochs). A new extractor F_new, a copy of F_old, joins the frozen F_old (batch
       norm in eval mode); the head W scores every seen class from [F_old(x), F_new(x)] (old rows keep their
       weights on F_old's features). With S = W [F_old(x), F_new(x)], S_old the previous model's logits
       (its head on F_old(x)), and W_new a classifier on F_new(x) alone over every seen class, each step on
       the task's data joined with the memory minimises

           L = CE(S / w1, y) + CE(W_new F_new(x), y) + lambda_kd * KL(softmax(S_old / T) || softmax(S[:, old] / T))

       the logits alignment, the feature enhancement and the old model's distillation terms; w1 are the
       per-class weights (1 - beta1) / (1 - beta1^n_c) over the training counts n_c, scaled to sum to the
       number of classes (`class_balanced_weights`).
    2. Compression (`compression_epochs`, in `after_task`). A student of one extractor, initialised from
       F_old and the previous head (the new classes' rows fresh), learns from the boosted model (eval mode)
       on the same data by balanced distillation, KL(q_w2 || softmax(student / T)) with q the teacher's
       softmax(S / T) re-weighted by the beta2 weights and renormalised. As PyCIL, its own optimizer: SGD,
       lr `compression_lr`, momentum 0.9, no weight decay, cosine decay to 0 over the compression epochs.
       Its steps run through the engine's step runner (mixed precision, non-finite guard).

    `evaluated_model`: which model the task ends with. `teacher` (default; PyCIL and the authors' code):
    the boosted two-extractor model is evaluated and chooses the exemplars (herding on its features); the
    student replaces it when the next task begins, so the old model of the next boosting is the student.
    `student` (the compressed single-extractor model, which the paper's method yields and whose accuracy
    its authors name the single-backbone result): the student replaces the model at once, is evaluated
    and chooses the exemplars. Either way each task trains from the student.

    Defaults (PyCIL's `exps/foster.json`): beta1 = 0.96, beta2 = 0.97, T = 2, lambda_kd (`lambda_okd`) = 1,
    compression lr 0.1 (PyCIL's `lr`), no weight aligning of teacher or student (`is_teacher_wa`,
    `is_student_wa`: false; with them, the new rows scaled by PyCIL's gamma * wa_value^(n_old / n_new)).
    PyCIL boosts for 170 and compresses for 130 epochs; `compression_epochs` null runs the run's `epochs`.
    `beta1` may be a list, one value per task after the first (the authors' CIFAR-100 B0 configs). Memory
    200 by herding (PyCIL: 2,000 on CIFAR-100). Left out: the `oofc: az` variant."""

    def __init__(
        self,
        memory: Memory,
        beta1: float | list[float] = 0.96,
        beta2: float = 0.97,
        temperature: float = 2.0,
        kd_weight: float = 1.0,
        compression_epochs: int | None = None,
        compression_lr: float = 0.1,
        evaluated_model: str = "teacher",
        teacher_weight_align: bool = False,
        student_weight_align: bool = False,
        wa_value: float = 1.0,
    ):
        betas1 = [float(b) for b in beta1] if hasattr(beta1, "__len__") else [float(beta1)]
        if not betas1:
            raise ValueError("strategy.beta1 must be a number or a non-empty list")
        for name, beta in [*(("beta1", b) for b in betas1), ("beta2", beta2)]:
            if not 0 < beta < 1:
                raise ValueError(f"strategy.{name}={beta} must be in (0, 1)")
        if temperature <= 0:
            raise ValueError(f"strategy.temperature={temperature} must be positive")
        if kd_weight < 0:
            raise ValueError(f"strategy.kd_weight={kd_weight} must be 0 or more")
        if compression_epochs is not None and compression_epochs < 1:
            raise ValueError(
                f"strategy.compression_epochs={compression_epochs} must be a positive integer or null"
            )
        if compression_lr <= 0:
            raise ValueError(f"strategy.compression_lr={compression_lr} must be positive")
        if evaluated_model not in ("teacher", "student"):
            raise ValueError(f"strategy.evaluated_model={evaluated_model!r} must be teacher or student")
        if wa_value <= 0:
            raise ValueError(f"strategy.wa_value={wa_value} must be positive")
        super().__init__(memory)
        self.betas1, self.beta2 = betas1, float(beta2)
        self.temperature, self.kd_weight = float(temperature), float(kd_weight)
        self.compression_epochs = compression_epochs
        self.compression_lr = float(compression_lr)
        self.evaluated_model = evaluated_model
        self.teacher_weight_align, self.student_weight_align = (
            bool(teacher_weight_align),
            bool(student_weight_align),
        )
        self.wa_value = float(wa_value)
        self.old_head: IncrementalClassifier | None = None
        self.boosting_weights: Tensor | None = None
        self.compression_weights: Tensor | None = None
        self.student: torch.nn.ModuleDict | None = None  # evaluated_model=teacher: the next task's model

    @property
    def old_classes(self) -> int:
        return 0 if self.old_head is None else self.old_head.n_classes

    def beta1(self, task: Task) -> float:
        """beta1 of task `task` (0-based id > 0): one value, or the task's entry of a list (the last repeats)."""
        return self.betas1[min(task.id - 1, len(self.betas1) - 1)]

    def before_task(self, task: Task) -> None:
        if self.student is not None:  # the previous task's student takes over from its teacher
            seen = self.model.head.n_classes
            self.model.backbone, self.model.head = self.student["backbone"], self.student["head"]
            self.model.head.grow(seen)
            self.student = None
        n_old = self.model.head.n_classes - len(task.classes)
        if n_old == 0:
            return
        counts = torch.bincount(
            self.stream.train_y[self.training_indices(task)], minlength=self.model.head.n_classes
        )
        self.boosting_weights = class_balanced_weights(counts, self.beta1(task)).to(self.context.device)
        self.compression_weights = class_balanced_weights(counts, self.beta2).to(self.context.device)
        self.old_head = self._old_head(self.model.head, n_old)
        self.expand()
        self.add_auxiliary_head(self.model.head.n_classes)

    @staticmethod
    def _old_head(head: IncrementalClassifier, n_old: int) -> IncrementalClassifier:
        """A frozen copy of the head's first `n_old` rows: the previous model's classifier."""
        old = copy.deepcopy(head)
        old.weight = torch.nn.Parameter(head.weight.detach()[:n_old].clone(), requires_grad=False)
        old.bias = torch.nn.Parameter(head.bias.detach()[:n_old].clone(), requires_grad=False)
        return old.eval()

    def loss(self, batch: Batch) -> Tensor:
        x = self.context.preprocess(batch.x, self.rng)
        if self.old_head is None:
            return F.cross_entropy(self.model(x), batch.y)
        features = self.model.backbone(x)
        logits = self.model.head(features)
        old_dim = self.old_head.in_features
        with torch.no_grad():
            old_logits = self.old_head(features[:, :old_dim])
        enhancement = F.cross_entropy(self.model.auxiliary_head(features[:, old_dim:]), batch.y)
        loss = logit_adjusted_cross_entropy(logits, batch.y, self.boosting_weights) + enhancement
        if self.kd_weight:
            kd = distillation(logits[:, : self.old_classes], old_logits, self.temperature)
            loss = loss + self.kd_weight * kd
        return loss

    def after_task(self, task: Task) -> None:
        if self.old_head is not None:
            if self.teacher_weight_align:
                foster_weight_align(self.model.head.weight, self.old_classes, self.wa_value)
            student = self.compress(task)
            if self.student_weight_align:
                foster_weight_align(student["head"].weight, self.old_classes, self.wa_value)
            self.remove_auxiliary_head()
            self.old_head = None
            if self.evaluated_model == "student":
                self.model.backbone, self.model.head = student["backbone"], student["head"]
            else:
                self.student = student
        self.remember(task)

    def compress(self, task: Task) -> torch.nn.ModuleDict:
        """Distil the boosted two-extractor model into a student of one extractor, which is returned."""
        teacher = self.model
        student_backbone = ExpandableBackbone([copy.deepcopy(self.backbone.extractors[0])])
        student_head = copy.deepcopy(self.old_head)
        student_head.grow(teacher.head.n_classes)
        student = torch.nn.ModuleDict({"backbone": student_backbone, "head": student_head})
        for parameter in student.parameters():
            parameter.requires_grad_(True)
        epochs = self.compression_epochs or self.context.epochs
        optimizer = torch.optim.SGD(
            student.parameters(), lr=self.compression_lr, momentum=0.9, weight_decay=0.0
        )
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
        was_training = teacher.training
        teacher.eval()
        student.train()

        def compression_loss(batch: Batch) -> Tensor:
            x = self.context.preprocess(batch.x, self.rng)
            with torch.no_grad():
                teacher_logits = teacher(x)
            student_logits = student_head(student_backbone(x))
            return distillation(student_logits, teacher_logits, self.temperature, self.compression_weights)

        rows, stage = self.training_indices(task), f"task {task.id + 1}, compression"
        self.run_stage(rows, compression_loss, optimizer, epochs, scheduler=scheduler, name=stage)
        teacher.train(was_training)
        student.train(was_training)
        return student

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.old_head is not None:
            state["old_head"] = {k: v.detach().clone() for k, v in self.old_head.state_dict().items()}
            state["boosting_weights"] = self.boosting_weights
            state["compression_weights"] = self.compression_weights
        if self.student is not None:
            state["student"] = {k: v.detach().clone() for k, v in self.student.state_dict().items()}
        return state

    @staticmethod
    def _head_from_state(saved: dict, prefix: str = "") -> IncrementalClassifier:
        future = saved[prefix + "future_weight"]
        head = IncrementalClassifier(future.shape[1], len(saved[prefix + "future_bias"]))
        head.load_state_dict({k[len(prefix) :]: v for k, v in saved.items() if k.startswith(prefix)})
        return head

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        device = self.context.device
        self.old_head = None
        if "old_head" in state:
            saved = state["old_head"]
            self.old_head = self._old_head(self._head_from_state(saved).to(device), len(saved["bias"]))
            self.boosting_weights = state["boosting_weights"]
            self.compression_weights = state["compression_weights"]
        self.student = None
        if "student" in state:
            saved = state["student"]
            backbone = ExpandableBackbone([copy.deepcopy(self.backbone.extractors[0])])
            for parameter in backbone.parameters():
                parameter.requires_grad_(True)
            backbone.load_state_dict(
                {k[len("backbone.") :]: v for k, v in saved.items() if k.startswith("backbone.")}
            )
            head = self._head_from_state(saved, "head.")
            self.student = torch.nn.ModuleDict({"backbone": backbone, "head": head}).to(device)
            self.student.train(self.model.training)
