"""Synaptic Intelligence (SI): importance of each parameter from its contribution to the loss's decrease
along the training trajectory."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from incr_cli.data.batches import Batch
from incr_cli.data.stream import Task
from incr_cli.strategies.common.importance_penalty import ImportancePenalty, pad_rows, report_stiffness

if TYPE_CHECKING:
    from incr_cli.step import StepRunner


class SynapticIntelligence(ImportancePenalty):
    """SI (Zenke, Poole and Ganguli 2017, "Continual Learning Through Synaptic Intelligence", ICML 2017).

    While task mu trains, every optimizer step adds to each parameter's path integral

        omega_i += -g_i * (theta_i(after step) - theta_i(before step))

    with g the gradient the step used (of the whole training loss, penalty included, as in Mammoth's and
    Avalanche's implementations; unscaled when a float16 loss scaler is on). At the task's end

        Omega_i <- max(0, Omega_i + omega_i / (Delta_i^2 + xi)),   Delta_i = theta_i(end) - theta_i(start)

    (eq. 5; the clamp at 0 is the authors' code, ganguli-lab/pathint protocols.py: a negative Omega would
    make the penalty concave) and the anchor becomes theta(end of task). Training then minimises (eq. 4)

        L = CE(f(x), y) + c * sum_i Omega_i (theta_i - anchor_i)^2.

    The head grows between tasks: its new rows have no importance yet (zero-padded Omega, not penalised).

    xi bounds Omega_i by omega_i / xi for a parameter that walked far but ended near its start; such an
    Omega can make the penalty's curvature 2 c Omega_i pass what SGD follows, 2 (1 + momentum) / lr:
    `curvature_limit: sgd` (default) caps it at half that (see `ImportancePenalty`), `none` keeps the
    paper's penalty.

    Defaults: xi = 1e-3, the paper's split-MNIST damping (section 5.1), and c = 0.1, its permuted-MNIST
    strength: its split-MNIST c = 1 went with Adam at lr 1e-3, whose steps (and so the path integrals) are
    not those of SGD at lr 0.05 with momentum, and under that SGD holds the old tasks so firmly that a
    later task is not learnt."""

    def __init__(self, c: float = 0.1, xi: float = 1e-3, curvature_limit: str = "sgd"):
        if c < 0 or xi <= 0:
            raise ValueError(f"SI needs c >= 0 and xi > 0, got c={c}, xi={xi}")
        self.c, self.xi = float(c), float(xi)
        super().__init__(
            curvature_limit
        )  # importance: Omega summed over finished tasks; anchor: theta at the last task's end
        self.start: dict[str, Tensor] = {}  # theta at the start of the current task
        self.omega: dict[str, Tensor] = {}  # the current task's path integral

    @property
    def strength(self) -> float:
        return self.c

    def before_task(self, task: Task) -> None:
        params = self.parameters()
        self.start = {name: p.detach().float().clone() for name, p in params.items()}
        self.omega = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}

    def training_step(self, batch: Batch, runner: StepRunner) -> Tensor:
        with runner.autocast():
            loss = self.loss(batch)
        if runner.backward(loss):
            params = self.parameters()
            scaler = runner.scaler
            scale = scaler.get_scale() if scaler.is_enabled() else 1.0
            grads = {n: p.grad.detach().float() / scale for n, p in params.items() if p.grad is not None}
            before = {n: params[n].detach().float().clone() for n in grads}
            runner.step()
            # A float16 scaler skips a step whose gradients overflowed: nothing moved, and inf * 0 is NaN.
            if not scaler.is_enabled() or all(torch.isfinite(g).all() for g in grads.values()):
                self.accumulate(grads, before)
        return loss.detach()

    @torch.no_grad()
    def accumulate(self, grads: dict[str, Tensor], before: dict[str, Tensor]) -> None:
        """omega += -g * (theta now - theta before the step). A step the scaler skipped moves nothing."""
        params = self.parameters()
        for name, grad in grads.items():
            self.omega[name] -= grad * (params[name].detach().float() - before[name])

    @torch.no_grad()
    def after_task(self, task: Task) -> None:
        for name, p in self.parameters().items():
            end = p.detach().float()
            new = self.omega[name] / ((end - self.start[name]).pow(2) + self.xi)
            old = self.importance.get(name)
            total = new if old is None else pad_rows(old, new.shape) + new
            self.importance[name] = total.clamp_min(0)
            self.anchor[name] = end.clone()
        report_stiffness(self, "strategy.c", self.c, [self.importance])

    def state_dict(self) -> dict:
        names = ("importance", "anchor", "start", "omega")
        return {**super().state_dict(), **{key: getattr(self, key) for key in names}}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        device = self.context.device
        for key in ("importance", "anchor", "start", "omega"):
            setattr(self, key, {name: t.to(device) for name, t in state[key].items()})
