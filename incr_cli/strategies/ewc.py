"""Elastic Weight Consolidation (EWC) and its online variant: a quadratic pull towards earlier solutions,
weighted by the diagonal Fisher information."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call, grad, vmap

from incr_cli.data.batches import Batch
from incr_cli.data.stream import Task
from incr_cli.strategies.base import Strategy

MODES = ("separate", "online")
FISHERS = ("per_sample", "batch")
FISHER_LABELS = ("empirical", "expected", "empirical_weighted")
CURVATURE_LIMITS = ("sgd", "none")
# Per-sample gradients held at once, in floats (256 MiB): bounds the vmap chunk for large models.
PER_SAMPLE_FLOATS = 2**26

log = logging.getLogger("incr")


def quadratic_penalty(
    params: dict[str, Tensor],
    entries: list[tuple[dict[str, Tensor], dict[str, Tensor]]],
    limit: float | None = None,
) -> Tensor:
    """sum_k sum_i Omega_k,i (theta_i - anchor_k,i)^2 over the (importance, anchor) pairs `entries`.

    `limit` caps each parameter's summed importance sum_k Omega_k,i: where it is larger, every term of that
    parameter is scaled down by the same factor so the sum equals the limit (see `importance_limit`).

    The classifier head grows after an importance was computed: its rows of classes that did not exist
    then have no importance and no anchor, so only the leading rows it was computed on are penalised (the
    same as zero-padding the importance)."""
    total = None
    for name, param in params.items():
        terms = [(importance[name], anchor[name]) for importance, anchor in entries if name in importance]
        if not terms:
            continue
        scale = None
        if limit is not None:
            shape = max((w.shape for w, _ in terms), key=lambda s: s[0] if len(s) else 0)
            summed = terms[0][0] if len(terms) == 1 else sum(pad_rows(w, shape) for w, _ in terms)
            scale = (limit / summed).clamp(max=1.0)  # 1 where summed is 0 (limit / 0 = inf)
        for weight, anchor in terms:
            value = param if param.shape == weight.shape else param[: weight.shape[0]]
            if scale is not None:
                weight = weight * (scale if scale.shape == weight.shape else scale[: weight.shape[0]])
            term = (weight * (value.float() - anchor).pow(2)).sum()
            total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return total


def sgd_stability_bound(strategy: Strategy) -> float | None:
    """The largest curvature h at which SGD with the run's lr and momentum m still converges on a quadratic,
    2 (1 + m) / lr (heavy ball); None for other optimizers, whose steps are not lr * gradient."""
    optimizer = strategy.context.make_optimizer([torch.nn.Parameter(torch.zeros(1))])
    if type(optimizer) is not torch.optim.SGD:
        return None
    group = optimizer.param_groups[0]
    return 2 * (1 + float(group.get("momentum", 0.0))) / float(group["lr"])


def run_sgd_bound(strategy: Strategy) -> float | None:
    """`sgd_stability_bound`, computed once: the optimizer's settings are fixed for the run."""
    if not hasattr(strategy, "_sgd_bound"):
        strategy._sgd_bound = sgd_stability_bound(strategy)
    return strategy._sgd_bound


def importance_limit(strategy: Strategy, strength: float) -> float | None:
    """The largest summed importance Omega_i that `curvature_limit: sgd` lets a penalty
    strength * sum_i Omega_i (theta_i - theta*_i)^2 keep: its curvature 2 * strength * Omega_i at most
    (1 + m) / lr, half of SGD's stability bound (a margin for the loss's own curvature). None (no cap) for
    `curvature_limit: none`, a zero strength, or an optimizer other than SGD."""
    if strategy.curvature_limit == "none" or not strength:
        return None
    bound = run_sgd_bound(strategy)
    return None if bound is None else bound / 2 / (2 * strength)


def check_curvature_limit(curvature_limit: str) -> str:
    if curvature_limit not in CURVATURE_LIMITS:
        raise ValueError(
            f"curvature_limit must be one of {', '.join(CURVATURE_LIMITS)}, got {curvature_limit!r}"
        )
    return curvature_limit


def report_stiffness(
    strategy: Strategy, key: str, strength: float, importances: list[dict[str, Tensor]]
) -> None:
    """At a task's end: with `curvature_limit: sgd`, log how many parameters the cap holds (their
    importance is larger than SGD can follow); with `none`, warn when some curvature passes SGD's
    stability bound 2 (1 + m) / lr, beyond which that parameter oscillates with growing amplitude until
    the loss is no longer finite."""
    if not strength or not importances:
        return
    bound = run_sgd_bound(strategy)
    if bound is None:
        return
    limit = importance_limit(strategy, strength)
    largest, clipped, count = 0.0, 0, 0
    for name in importances[-1]:
        tensors = [imp[name] for imp in importances if name in imp]
        shape = max((t.shape for t in tensors), key=lambda s: s[0] if len(s) else 0)
        total = sum(pad_rows(t, shape) for t in tensors)
        count += total.numel()
        largest = max(largest, float(total.max()) if total.numel() else 0.0)
        if limit is not None:
            clipped += int((total > limit).sum())
    if limit is not None:
        if clipped:
            log.info(
                "%s: %d of %d parameters have an importance beyond what SGD with this learning rate and "
                "momentum follows; their penalty is capped at curvature (1 + momentum) / lr (curvature_limit: sgd)",
                type(strategy).__name__,
                clipped,
                count,
            )
        return
    curvature = 2 * strength * largest
    if curvature > bound:
        log.warning(
            "%s: the penalty's largest curvature %.3g exceeds %.3g, the most SGD with this learning rate and "
            "momentum follows (2 (1 + momentum) / lr): expect a non-finite loss; lower %s or the learning "
            "rate, or set strategy.curvature_limit=sgd",
            type(strategy).__name__,
            curvature,
            bound,
            key,
        )


def pad_rows(tensor: Tensor, shape: torch.Size) -> Tensor:
    """`tensor` zero-padded along its first dimension to `shape` (a head that grew since)."""
    if tensor.shape == shape:
        return tensor
    padded = tensor.new_zeros(shape)
    padded[: tensor.shape[0]] = tensor
    return padded


class ImportancePenalty(Strategy):
    """A quadratic pull towards the parameters at the end of the last task, one importance per parameter:
    L = CE(f(x), y) + strength * sum_i Omega_i (theta_i - theta*_i)^2 (SI's c, MAS's lambda). Subclasses
    fill `importance` (Omega) and `anchor` (theta*) and say which of their knobs is `strength`.

    `curvature_limit: sgd` caps each Omega_i at (1 + m) / (2 lr strength) when the run's optimizer is SGD
    (lr, momentum m): the penalty's curvature 2 strength Omega_i then stays at half of heavy-ball SGD's
    stability bound 2 (1 + m) / lr, past which the parameter oscillates with growing amplitude and the loss
    turns non-finite. A capped parameter is held as firmly as SGD can hold it. `none`: no cap (the papers'
    penalty as written, stable with Adam, whose steps are bounded by its lr)."""

    def __init__(self, curvature_limit: str = "sgd") -> None:
        self.curvature_limit = check_curvature_limit(curvature_limit)
        self.importance: dict[str, Tensor] = {}
        self.anchor: dict[str, Tensor] = {}

    @property
    def strength(self) -> float:
        raise NotImplementedError

    def parameters(self) -> dict[str, Tensor]:
        # By name, looked up each time: growing the head replaces its Parameter objects.
        return {name: p for name, p in self.model.named_parameters() if p.requires_grad}

    def penalty(self) -> Tensor:
        """sum_i Omega_i (theta_i - theta*_i)^2, without the strength, Omega capped by `curvature_limit`."""
        if not self.importance:
            return torch.zeros((), device=self.context.device)
        limit = importance_limit(self, self.strength)
        return quadratic_penalty(self.parameters(), [(self.importance, self.anchor)], limit)

    def loss(self, batch: Batch) -> Tensor:
        loss = F.cross_entropy(self.logits(batch), batch.y)
        if self.importance and self.strength:
            loss = loss + self.strength * self.penalty()
        return loss


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
        # By name, looked up each time: growing the head replaces its Parameter objects.
        return {name: p for name, p in self.model.named_parameters() if p.requires_grad}

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
        index = task.train_index
        fisher = self.fisher(self.stream.train_x[index], self.stream.train_y[index].to(self.context.device))
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
