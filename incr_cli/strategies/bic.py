"""Bias Correction (BiC): exemplars and distillation, then a two-parameter linear correction of the newest
classes' logits, fitted on a held-out part of the memory."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from incr_cli.data.stream import Task
from incr_cli.memory import Memory
from incr_cli.strategies.base import Context
from incr_cli.strategies.common.exemplar_distillation import ExemplarDistillation


def fit_bias_correction(
    logits: Tensor, labels: Tensor, first_new: int, epochs: int, lr: float, beta_l2: float = 0.0
) -> tuple[float, float]:
    """(alpha, beta) that minimise the mean cross-entropy of q = [o_1..o_n, alpha * o_n+1.. + beta] on
    (`logits`, `labels`), the columns from `first_new` on being the new classes', plus beta_l2 * beta^2 / 2:
    Adam from (1, 0), one full-batch step per epoch. The loss is convex in (alpha, beta) (cross-entropy of logits affine in
    them), but its minimum lies at infinity when the new classes' logits separate the samples perfectly;
    a fixed number of steps, as the paper's fixed number of epochs, keeps the fit finite."""
    logits, labels = logits.detach().float(), labels.detach()
    old, new = logits[:, :first_new], logits[:, first_new:]
    correction = torch.tensor([1.0, 0.0], device=logits.device, requires_grad=True)
    optimizer = torch.optim.Adam([correction], lr=lr)
    with torch.enable_grad():
        for _ in range(epochs):
            corrected = torch.cat([old, correction[0] * new + correction[1]], dim=1)
            loss = F.cross_entropy(corrected, labels) + beta_l2 * correction[1] ** 2 / 2
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    alpha, beta = correction.detach().tolist()
    return alpha, beta


class BiasCorrection(ExemplarDistillation):
    """BiC (Wu, Chen, Wang, Ye, Liu, Guo and Fu 2019, "Large Scale Incremental Learning", CVPR 2019).

    Stage 1 (the task's epochs): `ExemplarDistillation`, L = lambda * L_KD + (1 - lambda) * CE with
    lambda = n / (n + m) (the paper's Eq. 3), T = 2, on the task's data and the exemplars, less the validation
    samples. Stage 2 (`after_task`, every task but the first): with the network frozen, a bias correction
    layer rescales the logits of the task's m new classes,

        q_k = o_k (k <= n),    q_k = alpha * o_k + beta (n < k <= n + m)    (the paper's Eq. 4),

    (alpha, beta) minimising the cross-entropy of softmax(q) on the validation samples (Eq. 5) plus
    `beta_l2` * beta^2 / 2, the authors' L2 on the additive term (0.1 in their code and in Avalanche's).

    The validation samples: k = max(1, floor(val_fraction * memory.size / n)) of each seen class, the
    paper's 9:1 train:validation split of the exemplar budget, balanced between old and new classes.
    `validation` says where they come from:
    - "held_out" (default; the authors' code and Avalanche's): when a class arrives, k of its training
      samples (k as for the next task's stage 2, the largest it will need) are set aside at random for good;
      they are never trained on nor kept as exemplars, and each stage 2 uses the first k of every seen
      class's. The memory keeps `memory.size` training exemplars besides them (as Avalanche; the authors
      take the validation samples out of the same budget);
    - "exemplars" (PyCIL's): at the start of each task, k exemplars of each old class and k training samples
      of each new class are drawn at random and left out of that task's stage 1 only, so old classes are
      validated on samples the network was trained on in earlier tasks, whose logits are more confident than
      on unseen data; the correction then favours the old classes more.
    `bias_layers` says which fitted layers act:
    - "latest" (default; the authors' code and Avalanche's): only the last fitted (alpha, beta), on the
      classes of the task it was fitted for: in evaluation and `predict`, and on the frozen copy's logits
      that stage 1 distils from; the network in training and stage 2's old classes see raw logits;
    - "all" (PyCIL's): every task keeps its (alpha, beta) and the network's logits pass through all of them
      from then on, in stage-1 training (of the network and of the frozen copy), stage 2 and `predict`.

    Stage 2 runs on the logits of the un-augmented validation samples (evaluation transform, eval mode),
    computed once since nothing before the correction changes; `fit_bias_correction` then takes
    `bias_epochs` full-batch Adam steps of rate `bias_lr` (250 steps at 0.01 move alpha and beta by at
    most 2.5). The references use SGD on mini-batches: the authors with momentum and a step schedule for 2
    epochs of their ImageNet validation data, Avalanche at 0.1 with momentum 0.9 for 200 epochs (milestones
    50, 100, 150), PyCIL at 0.1 for as many epochs as stage 1 (170 on CIFAR-100). Defaults: T = 2 (the
    paper's), val_fraction 0.1 (9:1), memory 2,000 exemplars on CIFAR-100 in the paper (200 here, as on the
    digits stream), herding selection (iCaRL's). The validation rows and every task's (alpha, beta) are
    checkpointed."""

    def __init__(
        self,
        memory: Memory,
        temperature: float = 2.0,
        val_fraction: float = 0.1,
        bias_epochs: int = 250,
        bias_lr: float = 0.01,
        beta_l2: float = 0.1,
        validation: str = "held_out",
        bias_layers: str = "latest",
    ):
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction={val_fraction} must be in (0, 1)")
        if bias_epochs < 0:
            raise ValueError(f"bias_epochs={bias_epochs} must be 0 or more")
        if bias_lr <= 0:
            raise ValueError(f"bias_lr={bias_lr} must be > 0")
        if beta_l2 < 0:
            raise ValueError(f"beta_l2={beta_l2} must be 0 or more")
        if validation not in ("held_out", "exemplars"):
            raise ValueError(f"validation={validation!r} must be held_out or exemplars")
        if bias_layers not in ("latest", "all"):
            raise ValueError(f"bias_layers={bias_layers!r} must be latest or all")
        super().__init__(memory, temperature)
        self.val_fraction = float(val_fraction)
        self.bias_epochs, self.bias_lr, self.beta_l2 = int(bias_epochs), float(bias_lr), float(beta_l2)
        self.validation, self.layers_used = validation, bias_layers

    def setup(self, context: Context) -> None:
        super().setup(context)
        tasks = self.stream.tasks
        # one (alpha, beta) per task, (1, 0) until fitted; the first task's stays (1, 0)
        self.bias_layers = torch.tensor([[1.0, 0.0]] * len(tasks), device=context.device)
        self.latest = -1  # the task whose layer was fitted last (-1: none yet)
        task_of_class = torch.empty(self.stream.n_classes, dtype=torch.long)
        for task in tasks:
            task_of_class[task.classes] = task.id
        self.task_of_class = task_of_class.to(context.device)
        empty = torch.zeros(0, dtype=torch.long, device=context.device)
        self.val_rows, self.val_index = empty, empty  # memory rows, stream rows of this task's validation
        self.held_out = empty  # "held_out": stream rows set aside for good, in the order drawn

    def active_layers(self) -> Tensor:
        """The (alpha, beta) of each task that scores act with: all of them, or the latest fitted only."""
        if self.layers_used == "all" or self.latest < 0:
            return self.bias_layers
        layers = torch.zeros_like(self.bias_layers)
        layers[:, 0] = 1.0
        layers[self.latest] = self.bias_layers[self.latest]
        return layers

    def _apply(self, logits: Tensor, layers: Tensor) -> Tensor:
        layer = layers[self.task_of_class[: logits.shape[1]]]
        return logits * layer[:, 0] + layer[:, 1]

    def calibrated(self, logits: Tensor) -> Tensor:
        return self._apply(logits, self.active_layers())

    def trained(self, logits: Tensor) -> Tensor:
        return self.calibrated(logits) if self.layers_used == "all" else logits

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        return self.calibrated(self.model.forward_all(x))

    # ------------------------------------------------------------------ the validation samples
    def per_class(self, n_old: int, budget: int) -> int:
        """Validation samples per class for a stage 2 with `n_old` old classes and `budget` exemplars."""
        return max(1, int(self.val_fraction * budget / n_old))

    def _draw_per_class(self, labels: Tensor, k: int) -> Tensor:
        """Positions in `labels` of k samples drawn at random from each class (all of a smaller class)."""
        chosen = [labels.new_zeros(0)]
        for label in torch.unique(labels).tolist():
            members = torch.nonzero(labels == label).flatten()
            order = torch.randperm(len(members), generator=self.rng, device=self.rng.device)
            chosen.append(members[order[:k].to(members.device)])
        return torch.cat(chosen)

    def _first_per_class(self, rows: Tensor, k: int) -> Tensor:
        """The first k of `rows` (stream rows) of each class, in their order."""
        labels = self.stream.train_y[rows.to(self.stream.train_y.device)].to(rows.device)
        chosen = [rows[labels == label][:k] for label in torch.unique(labels).tolist()]
        return torch.cat([rows.new_zeros(0), *chosen])

    def before_task(self, task: Task) -> None:
        super().before_task(task)
        empty = torch.zeros(0, dtype=torch.long, device=self.context.device)
        self.val_rows, self.val_index = empty, empty
        labels = self.stream.train_y[task.train_index]
        if self.validation == "held_out":
            # enough for this task's stage 2 (the first task: for the second's, whose old classes are these)
            k = self.per_class(max(self.old_classes, len(task.classes)), self.memory.size)
            drawn = task.train_index[self._draw_per_class(labels, k)].to(self.held_out.device)
            self.held_out = torch.cat([self.held_out, drawn])
            if self.old_classes:
                k = self.per_class(self.old_classes, self.memory.size)
                self.val_index = self._first_per_class(self.held_out, k)
            return
        if self.old_classes == 0 or not len(self.memory):
            return
        k = self.per_class(self.old_classes, len(self.memory))
        self.val_rows = self._draw_per_class(self.memory.y, k)
        self.val_index = task.train_index[self._draw_per_class(labels, k)]

    def _new_rows(self, task: Task) -> Tensor:
        """The task's training rows less those set aside for validation."""
        aside = self.held_out if self.validation == "held_out" else self.val_index
        return task.train_index[~torch.isin(task.train_index, aside.to(task.train_index.device))]

    def training_indices(self, task: Task) -> Tensor:
        new = self._new_rows(task)
        keep = torch.ones(len(self.memory), dtype=torch.bool, device=self.context.device)
        keep[self.val_rows] = False
        return torch.cat([new, self.memory_rows()[keep].to(new.device)])

    # ------------------------------------------------------------------ stage 2
    def after_task(self, task: Task) -> None:
        if self.old_classes and len(self.val_index):
            self.correct_bias(task)
        self.remember_rows(
            self._new_rows(task) if self.validation == "held_out" else task.train_index, row_extra="index"
        )

    @torch.no_grad()
    def correct_bias(self, task: Task) -> None:
        index = self.val_index.to(self.stream.train_y.device)
        x = torch.cat([self.memory.x[self.val_rows], self.stream.train_x[index].to(self.memory.x.device)])
        y = torch.cat([self.memory.y[self.val_rows], self.stream.train_y[index].to(self.memory.y.device)])
        was_training = self.model.training
        self.model.eval()
        # this task's layer is still (1, 0): the new classes' logits come out raw; earlier tasks' classes
        # are corrected ("all") or raw ("latest": this layer replaces the last one)
        logits = self.trained(self.model(self.context.preprocess(x.to(self.context.device))))
        self.model.train(was_training)
        alpha, beta = fit_bias_correction(
            logits, y.to(logits.device), task.classes[0], self.bias_epochs, self.bias_lr, self.beta_l2
        )
        self.bias_layers[task.id] = torch.tensor([alpha, beta], device=self.bias_layers.device)
        self.latest = task.id

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        state = super().state_dict()
        state["bias_layers"] = self.bias_layers.clone()
        state["latest"] = self.latest
        state["val_rows"], state["val_index"] = self.val_rows.clone(), self.val_index.clone()
        state["held_out"] = self.held_out.clone()
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.bias_layers = state["bias_layers"].to(self.context.device)
        self.latest = int(state["latest"])
        self.val_rows = state["val_rows"].to(self.context.device)
        self.val_index = state["val_index"].to(self.context.device)
        self.held_out = state["held_out"].to(self.context.device)
