"""Elastic Weight Consolidation (EWC) and its online variant: a quadratic pull towards earlier solutions,
weighted by the diagonal Fisher information."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from incr_cli.data.batches import Batch
from incr_cli.data.stream import Task
from incr_cli.strategies.base import Strategy

MODES = ("separate", "online")


def quadratic_penalty(
    params: dict[str, Tensor], importance: dict[str, Tensor], anchor: dict[str, Tensor]
) -> Tensor:
    """sum_i importance_i * (theta_i - anchor_i)^2 over the parameters named in `importance`.

    The classifier head grows after the importance was computed: its rows of classes that did not exist
    then have no importance and no anchor, so only the leading rows it was computed on are penalised (the
    same as zero-padding the importance)."""
    total = None
    for name, weight in importance.items():
        param = params[name]
        if param.shape != weight.shape:
            param = param[: weight.shape[0]]
        term = (weight * (param.float() - anchor[name]).pow(2)).sum()
        total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return total


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
    fill `importance` (Omega) and `anchor` (theta*) and say which of their knobs is `strength`."""

    def __init__(self) -> None:
        self.importance: dict[str, Tensor] = {}
        self.anchor: dict[str, Tensor] = {}

    @property
    def strength(self) -> float:
        raise NotImplementedError

    def parameters(self) -> dict[str, Tensor]:
        # By name, looked up each time: growing the head replaces its Parameter objects.
        return {name: p for name, p in self.model.named_parameters() if p.requires_grad}

    def penalty(self) -> Tensor:
        """sum_i Omega_i (theta_i - theta*_i)^2, without the strength."""
        if not self.importance:
            return torch.zeros((), device=self.context.device)
        return quadratic_penalty(self.parameters(), self.importance, self.anchor)

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

    Fisher estimate: the diagonal *empirical* Fisher computed at the end of each task from that task's
    training data with the true labels (not labels sampled from the model), as the mean over mini-batches
    of the squared gradient of the mini-batch's mean log-likelihood: F_i = mean_b (d log p(y_b | x_b) /
    d theta_i)^2. This is Avalanche's estimator (`EWCPlugin.compute_importances`), which the P2 reference
    uses; per-batch gradients make it smaller than the per-sample Fisher by about the batch size, which is
    why lambda is large. Batches are the run's batch size, in the stream's order, evaluation transform,
    eval mode: the estimate consumes no randomness and changes no weights.

    Defaults: lambda 1000 (protocol P2). Note that Avalanche adds `lambda * sum F (theta - theta*)^2`
    without the paper's 1/2, so at equal lambda its penalty is twice this one. gamma for online EWC: the
    paper treats it as a hyper-parameter (gamma < 1 forgets old tasks' importance gradually, gamma = 1 is a
    plain running sum); the YAML's 0.9 is a choice, not a value from the paper. lambda 1000 goes with P2's
    learning rate 0.01: the penalty's curvature is lambda * F, and with P1's 0.05 and momentum 0.9 it can
    make SGD diverge (a non-finite loss) late in the stream."""

    supports_distributed = True  # its state comes from whole tasks, never from one rank's slice

    def __init__(self, ewc_lambda: float, mode: str = "separate", gamma: float = 1.0):
        if mode not in MODES:
            raise ValueError(f"EWC mode must be one of {', '.join(MODES)}, got {mode!r}")
        if ewc_lambda < 0:
            raise ValueError(f"EWC lambda must be 0 or more, got {ewc_lambda}")
        if not 0 <= gamma <= 1:
            raise ValueError(f"online EWC gamma must be in [0, 1], got {gamma}")
        self.ewc_lambda, self.mode, self.gamma = float(ewc_lambda), mode, float(gamma)
        # separate: one {"fisher": {name: F}, "anchor": {name: theta*}} per finished task; online: at most one
        self.penalties: list[dict[str, dict[str, Tensor]]] = []

    def parameters(self) -> dict[str, Tensor]:
        # By name, looked up each time: growing the head replaces its Parameter objects.
        return {name: p for name, p in self.model.named_parameters() if p.requires_grad}

    def penalty(self) -> Tensor:
        """sum_k sum_i F_{k,i} (theta_i - theta*_{k,i})^2, without lambda / 2."""
        params = self.parameters()
        total = torch.zeros((), device=self.context.device)
        for entry in self.penalties:
            total = total + quadratic_penalty(params, entry["fisher"], entry["anchor"])
        return total

    def loss(self, batch: Batch) -> Tensor:
        loss = F.cross_entropy(self.logits(batch), batch.y)
        if self.penalties and self.ewc_lambda:
            loss = loss + self.ewc_lambda / 2 * self.penalty()
        return loss

    def fisher(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """Diagonal empirical Fisher over raw uint8 inputs `x` with labels `y`: the mean over mini-batches of
        the batch-mean log-likelihood's squared gradient."""
        params = self.parameters()
        names, tensors = list(params), list(params.values())
        fisher = [torch.zeros_like(t, dtype=torch.float32) for t in tensors]
        was_training = self.model.training
        self.model.eval()
        size = self.context.batch_size
        n_batches = 0
        for start in range(0, len(x), size):
            inputs = self.context.preprocess(x[start : start + size])
            loss = F.cross_entropy(self.model(inputs).float(), y[start : start + size])
            for total, grad in zip(fisher, torch.autograd.grad(loss, tensors), strict=True):
                total += grad.float().pow(2)
            n_batches += 1
        self.model.train(was_training)
        return {name: total / max(n_batches, 1) for name, total in zip(names, fisher, strict=True)}

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

    def state_dict(self) -> dict:
        return {**super().state_dict(), "penalties": self.penalties}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        device = self.context.device
        self.penalties = [
            {kind: {name: t.to(device) for name, t in tensors.items()} for kind, tensors in entry.items()}
            for entry in state["penalties"]
        ]
