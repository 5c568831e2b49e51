"""Elastic Weight Consolidation (EWC) and its online variant: a quadratic pull towards earlier solutions,
weighted by the diagonal Fisher information."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call, grad, vmap

from incr_cli.data.batches import Batch
from incr_cli.data.stream import Task
from incr_cli.strategies.base import Strategy
from incr_cli.strategies.common.importance_penalty import (
    check_curvature_limit,
    importance_limit,
    pad_rows,
    quadratic_penalty,
    report_stiffness,
    trainable_parameters,
)

MODES = ("separate", "online")
FISHERS = ("per_sample", "batch")
FISHER_LABELS = ("empirical", "expected", "empirical_weighted")
# Per-sample gradients held at once, in floats (256 MiB): bounds the vmap chunk for large models.
PER_SAMPLE_FLOATS = 2**26


class EWC(Strategy):
    """EWC (Kirkpatrick et al. 2017, "Overcoming catastrophic forgetting in neural networks", PNAS) and
    online EWC (Schwarz et al. 2018, "Progress & Compress: A scalable framework for continual learning",
    ICML 2018).

    Training on task t minimises

        L(theta) = CE(f(x), y) + (lambda / 2) * sum_k sum_i F_{k,i} (theta_i - theta*_{k,i})^2

    - mode `separate` (Kirkpatrick et al., eq. 3 extended to many tasks as in their paper): one pair
      (F_k, theta*_k) per finished task k, all kept;
    - mode `online` (Schwarz et al., section 3): a single running Fisher F <- gamma * F + F_k and a single
      anchor theta* = the parameters at the end of the last task, so memory does not grow with the tasks.

    The diagonal Fisher F_k is estimated at the end of task k from that task's training data (evaluation
    transform, eval mode, stream order: no randomness used, no weight changed), over the log-likelihood the
    run trains (task-IL: the sample's own task's classes; otherwise the classes seen so far):

    - `fisher: per_sample` (the paper's estimator, and van de Ven et al.'s and Mammoth's): the mean over the
      task's N samples of each sample's squared gradient, F_i = 1/N sum_n sum_c w_nc (d log p(c | x_n) /
      d theta_i)^2, with the weights w from `fisher_labels`:
      `empirical` w = 1 at the true label (van de Ven's `fisher_labels='true'`),
      `expected` w = p(c | x_n) over every class (the true Fisher; van de Ven's default `'all'`),
      `empirical_weighted` w = p(y_n | x_n) at the true label (Mammoth's `ewc_on.py`).
      Per-sample gradients come from torch.func (vmap of grad), in chunks.
    - `fisher: batch` (Avalanche's `EWCPlugin`): the mean over mini-batches of the run's batch size of the
      squared gradient of the batch's mean log-likelihood at the true labels. The mean gradient of a
      batch is smaller than its samples' gradients, so this F is about batch-size times smaller and its
      lambda correspondingly larger; kept for comparisons with Avalanche.

    lambda is a weight on a per-sample mean, so it means the same at any batch size. The penalty's
    curvature is lambda * sum_k F_k; `curvature_limit: sgd` (default) caps it, per parameter, at
    (1 + momentum) / lr when the optimizer is SGD, half of heavy-ball SGD's stability bound, by scaling that
    parameter's F_k down alike (see `ImportancePenalty`); `none` keeps the penalty as written (warns at a
    task's end when SGD would diverge). Avalanche and Mammoth add `lambda * sum F (theta - theta*)^2`
    without the paper's 1/2: their lambda is half of incr's; van de Ven's code keeps the 1/2.

    Defaults (ewc.yaml, online_ewc.yaml): `fisher: per_sample`, `fisher_labels: expected`, lambda 1e5, gamma 1: the paper
    gives no value for split digits; these are van de Ven et al.'s for task-IL Split MNIST (their
    params/param_values.py and default `--fisher-labels all`, `--gamma 1`; 1e9 for class-IL). gamma < 1
    forgets old tasks' importance gradually (Schwarz et al.); 1 is a plain running sum, as Mammoth and van
    de Ven use."""

    supports_distributed = True  # its state comes from whole tasks, never from one rank's slice

    def __init__(
        self,
        ewc_lambda: float,
        mode: str = "separate",
        gamma: float = 1.0,
        fisher: str = "per_sample",
        fisher_labels: str = "empirical",
        curvature_limit: str = "sgd",
    ):
        self.curvature_limit = check_curvature_limit(curvature_limit)
        if mode not in MODES:
            raise ValueError(f"EWC mode must be one of {', '.join(MODES)}, got {mode!r}")
        if ewc_lambda < 0:
            raise ValueError(f"EWC lambda must be 0 or more, got {ewc_lambda}")
        if not 0 <= gamma <= 1:
            raise ValueError(f"online EWC gamma must be in [0, 1], got {gamma}")
        if fisher not in FISHERS:
            raise ValueError(f"EWC fisher must be one of {', '.join(FISHERS)}, got {fisher!r}")
        if fisher_labels not in FISHER_LABELS:
            raise ValueError(
                f"EWC fisher_labels must be one of {', '.join(FISHER_LABELS)}, got {fisher_labels!r}"
            )
        if fisher == "batch" and fisher_labels != "empirical":
            raise ValueError(
                f"EWC fisher=batch uses the true labels only, got fisher_labels={fisher_labels!r}"
            )
        self.ewc_lambda, self.mode, self.gamma = float(ewc_lambda), mode, float(gamma)
        self.estimator, self.fisher_labels = fisher, fisher_labels
        # separate: one {"fisher": {name: F}, "anchor": {name: theta*}} per finished task; online: at most one
        self.penalties: list[dict[str, dict[str, Tensor]]] = []

    def parameters(self) -> dict[str, Tensor]:
        return trainable_parameters(self.model)

    def penalty(self) -> Tensor:
        """sum_k sum_i F_{k,i} (theta_i - theta*_{k,i})^2, without lambda / 2, sum_k F_{k,i} capped by
        `curvature_limit` (each task's F_{k,i} scaled by the same factor)."""
        if not self.penalties:
            return torch.zeros((), device=self.context.device)
        entries = [(entry["fisher"], entry["anchor"]) for entry in self.penalties]
        limit = importance_limit(self, self.ewc_lambda / 2)
        return quadratic_penalty(self.parameters(), entries, limit).to(self.context.device)

    def loss(self, batch: Batch) -> Tensor:
        loss = F.cross_entropy(self.logits(batch), batch.y)
        if self.penalties and self.ewc_lambda:
            loss = loss + self.ewc_lambda / 2 * self.penalty()
        return loss

    def scores(self, outputs: Tensor, y: Tensor) -> Tensor:
        """The outputs the training loss sees: task-IL masks every class outside the sample's task."""
        return self.own_task_scores(outputs, y) if self.context.scenario == "task_il" else outputs

    def fisher(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """Diagonal Fisher over raw uint8 inputs `x` with labels `y`, by the estimator chosen."""
        was_training = self.model.training
        self.model.eval()
        try:
            if self.estimator == "batch":
                return self.batch_fisher(x, y)
            return self.per_sample_fisher(x, y)
        finally:
            self.model.train(was_training)

    def batch_fisher(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """Avalanche's: the mean over mini-batches of the batch-mean log-likelihood's squared gradient."""
        params = self.parameters()
        names, tensors = list(params), list(params.values())
        fisher = [torch.zeros_like(t, dtype=torch.float32) for t in tensors]
        size = self.context.batch_size
        n_batches = 0
        for start in range(0, len(x), size):
            labels = y[start : start + size]
            outputs = self.model(self.context.preprocess(x[start : start + size])).float()
            loss = F.cross_entropy(self.scores(outputs, labels), labels)
            for total, gradient in zip(fisher, torch.autograd.grad(loss, tensors), strict=True):
                total += gradient.float().pow(2)
            n_batches += 1
        return {name: total / max(n_batches, 1) for name, total in zip(names, fisher, strict=True)}

    def per_sample_fisher(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """1/N sum_n sum_c w_nc (d log p(c | x_n) / d theta)^2, per-sample gradients by vmap(grad)."""
        params = {name: p.detach() for name, p in self.parameters().items()}
        every_class = self.fisher_labels == "expected"

        def log_likelihood(weights: dict[str, Tensor], inputs: Tensor, mask: Tensor, label: Tensor) -> Tensor:
            outputs = functional_call(self.model, weights, (inputs[None],))[0].float()
            # log p(label | x) over the unmasked classes, without indexing by a batched label
            log_p = outputs - torch.logsumexp(outputs.masked_fill(~mask, float("-inf")), 0)
            return torch.where(class_ids == label, log_p, 0.0).sum()

        class_ids = torch.arange(self.model.head.n_classes, device=self.context.device)
        per_sample = vmap(grad(log_likelihood), in_dims=(None, 0, 0, 0))
        n_values = sum(p.numel() for p in params.values())
        chunk = max(1, min(self.context.batch_size * 8, PER_SAMPLE_FLOATS // max(n_values, 1)))
        fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
        for start in range(0, len(x), chunk):
            inputs = self.context.preprocess(x[start : start + chunk]).float()
            labels = y[start : start + chunk]
            with torch.no_grad():
                outputs = self.model(inputs).float()
                mask = torch.isfinite(self.scores(outputs, labels))
                p = torch.softmax(outputs.masked_fill(~mask, float("-inf")), 1)
            if every_class:  # each sample once per class, weighted by the model's p(c | x)
                pairs = mask.nonzero()
                rows, classes, weight = pairs[:, 0], pairs[:, 1], p[mask]
            else:
                rows = torch.arange(len(labels), device=labels.device)
                classes = labels
                weight = (
                    p[rows, labels]
                    if self.fisher_labels == "empirical_weighted"
                    else torch.ones_like(p[:, 0])
                )
            for first in range(0, len(rows), chunk):
                part = slice(first, first + chunk)
                grads = per_sample(params, inputs[rows[part]], mask[rows[part]], classes[part])
                w = weight[part]
                for name, g in grads.items():
                    fisher[name] += torch.einsum("n,n...->...", w, g.float().pow(2))
        return {name: total / max(len(x), 1) for name, total in fisher.items()}

    def check_stiffness(self) -> None:
        """Log how many parameters `curvature_limit` caps, or warn when, uncapped, SGD diverges along one."""
        report_stiffness(
            self, "strategy.ewc_lambda", self.ewc_lambda / 2, [e["fisher"] for e in self.penalties]
        )

    def after_task(self, task: Task) -> None:
        x, y = self.training_samples(task.train_index)
        fisher = self.fisher(x, y.to(self.context.device))
        anchor = {name: p.detach().float().clone() for name, p in self.parameters().items()}
        if self.mode == "online" and self.penalties:
            old = self.penalties[0]["fisher"]
            fisher = {
                name: f + self.gamma * pad_rows(old[name], f.shape) if name in old else f
                for name, f in fisher.items()
            }
            self.penalties = []
        self.penalties.append({"fisher": fisher, "anchor": anchor})
        self.check_stiffness()

    def state_dict(self) -> dict:
        return {**super().state_dict(), "penalties": self.penalties}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        device = self.context.device
        self.penalties = [
            {kind: {name: t.to(device) for name, t in tensors.items()} for kind, tensors in entry.items()}
            for entry in state["penalties"]
        ]
