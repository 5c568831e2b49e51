"""Memory Aware Synapses (MAS): importance from the sensitivity of the network's output, no labels needed."""

from __future__ import annotations

import torch
from torch import Tensor

from incr_cli.data.batches import eval_batches
from incr_cli.data.stream import Task
from incr_cli.strategies.common.importance_penalty import ImportancePenalty, pad_rows, report_stiffness


class MemoryAwareSynapses(ImportancePenalty):
    """MAS (Aljundi, Babiloni, Elhoseiny, Rohrbach and Tuytelaars 2018, "Memory Aware Synapses: Learning what
    (not) to forget", ECCV 2018).

    At the end of each task, the importance of parameter i is (eq. 2 and 3 with the squared l2 norm of the
    output, the paper's global version)

        Omega_i = mean_k | d ||f(x_k)||_2^2 / d theta_i |

    over the task's training inputs, f the logits of the classes seen so far; importances are summed over
    tasks (section 4.2: accumulated), and training minimises (eq. 4)

        L = CE(f(x), y) + lambda * sum_i Omega_i (theta_i - theta*_i)^2

    with theta* the parameters at the end of the last task. The head's rows of later classes have no
    importance (zero-padded, not penalised).

    Estimate: batched, the mean over mini-batches of |gradient of the batch's mean ||f(x)||^2| (as
    Avalanche's `MASPlugin`, which uses the unsquared norm): the absolute value is taken per batch, not per
    sample, so it is a lower bound of the per-sample mean; summed over a batch and divided by the number
    of samples, as the authors' code (MAS_utils) does. Run's batch size, stream order, evaluation
    transform, eval mode.

    The penalty's curvature is 2 lambda Omega_i, and Omega grows with the logits' scale and with every
    task (it is a sum): `curvature_limit: sgd` (default) caps it at half of what SGD follows, (1 + momentum)
    / lr (see `ImportancePenalty`); `none` keeps the paper's penalty. Default lambda = 1, the paper's."""

    def __init__(self, mas_lambda: float = 1.0, curvature_limit: str = "sgd"):
        if mas_lambda < 0:
            raise ValueError(f"MAS lambda must be 0 or more, got {mas_lambda}")
        self.mas_lambda = float(mas_lambda)
        super().__init__(curvature_limit)

    @property
    def strength(self) -> float:
        return self.mas_lambda

    def sensitivity(self, x: Tensor, rows: Tensor | None = None) -> dict[str, Tensor]:
        """mean over mini-batches of |d mean_k ||f(x_k)||^2 / d theta| for raw uint8 inputs `x` (or its `rows`,
        read a batch at a time: the task's images need not fit on the device at once)."""
        if rows is None:
            rows = torch.arange(len(x), device=self.context.device)
        params = self.parameters()
        names, tensors = list(params), list(params.values())
        totals = [torch.zeros_like(t, dtype=torch.float32) for t in tensors]
        was_training = self.model.training
        self.model.eval()
        size, n_batches = self.context.batch_size, 0
        for batch in eval_batches(x, rows, size):
            out = self.model(self.context.preprocess(batch)).float()
            for total, grad in zip(
                totals, torch.autograd.grad(out.pow(2).sum(1).mean(), tensors), strict=True
            ):
                total += grad.float().abs()
            n_batches += 1
        self.model.train(was_training)
        return {name: total / max(n_batches, 1) for name, total in zip(names, totals, strict=True)}

    def after_task(self, task: Task) -> None:
        new = self.sensitivity(self.stream.train_x, task.train_index)
        for name, value in new.items():
            old = self.importance.get(name)
            self.importance[name] = value if old is None else pad_rows(old, value.shape) + value
        self.anchor = {name: p.detach().float().clone() for name, p in self.parameters().items()}
        report_stiffness(self, "strategy.mas_lambda", self.mas_lambda, [self.importance])

    def state_dict(self) -> dict:
        return {**super().state_dict(), "importance": self.importance, "anchor": self.anchor}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        device = self.context.device
        self.importance = {name: t.to(device) for name, t in state["importance"].items()}
        self.anchor = {name: t.to(device) for name, t in state["anchor"].items()}
