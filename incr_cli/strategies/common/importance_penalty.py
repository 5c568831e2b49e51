"""A quadratic pull towards earlier parameters, weighted by a per-parameter importance (EWC's Fisher, SI's
path integral, MAS's sensitivity, RWalk's sum of both), and the cap that keeps it within what SGD can follow."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from incr_cli.data.batches import Batch
from incr_cli.strategies.base import Strategy

CURVATURE_LIMITS = ("sgd", "none")

log = logging.getLogger("incr")


def trainable_parameters(model: nn.Module) -> dict[str, Tensor]:
    """The parameters that train, by name: looked up each time, as growing the head replaces its Parameter
    objects."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


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
        return trainable_parameters(self.model)

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
