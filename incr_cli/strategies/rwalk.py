"""Riemannian Walk (RWalk): EWC++'s running Fisher plus a KL-based path-integral score, one quadratic pull."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from incr_cli.data.batches import Batch
from incr_cli.data.stream import Task
from incr_cli.strategies.common.importance_penalty import ImportancePenalty, pad_rows, report_stiffness

if TYPE_CHECKING:
    from incr_cli.step import StepRunner

# Tensors kept per parameter between steps (and tasks), all checkpointed.
PER_PARAMETER = (
    "importance",
    "anchor",
    "fisher",
    "score",
    "task_score",
    "interval_loss",
    "interval_fisher",
    "interval_start",
)


def normalised(values: dict[str, Tensor]) -> dict[str, Tensor]:
    """`values` (all >= 0) divided by their largest entry over every parameter, so that they lie in [0, 1]."""
    largest = max((float(v.max()) for v in values.values() if v.numel()), default=0.0)
    if largest <= 0:
        return {name: torch.zeros_like(v) for name, v in values.items()}
    return {name: v / largest for name, v in values.items()}


class RiemannianWalk(ImportancePenalty):
    """RWalk (Chaudhry, Dokania, Ajanthan and Torr 2018, "Riemannian Walk for Incremental Learning:
    Understanding Forgetting and Intransigence", ECCV 2018).

    Two importances, both from the gradient g of the training batch's cross-entropy (the penalty left out,
    as in the authors' code), gathered while the task trains:

    - EWC++ (eq. 6): every `update_every` steps, the empirical Fisher of those steps, F_new = mean of g^2,
      enters a moving average F <- alpha * F_new + (1 - alpha) * F that runs over the whole stream;
    - the KL-based path integral (eq. 7): over each interval [t, t + n] of `update_every` steps,

          s_i += max(0, sum_steps -g_i * (theta_i(after) - theta_i(before))
                         / (1/2 * F_i * (theta_i(t + n) - theta_i(t))^2 + epsilon))

      the loss decrease due to parameter i over the KL distance it walked, with F the running Fisher
      before this interval's update (on the stream's first interval, the interval's own Fisher). Negative
      interval scores are clamped per interval, as in the authors' code. A task's last, partial interval is
      counted too.

    At the end of task k the score is averaged with the earlier tasks' one, s <- (s_old + s_new) / 2 (the
    first task's score is taken as is), F and s are each divided by their largest entry over all
    parameters so that both lie in [0, 1] (the paper normalises them to the same range), and training
    minimises (eq. 8)

        L = CE(f(x), y) + lambda * sum_i (F_i + s_i) (theta_i - theta*_i)^2,

    theta* the parameters at the end of the last task. The head's rows of classes added later have no
    importance (zero-padded, not penalised). RWalk as published also replays a few stored samples in the
    class-incremental setting; this class is the regulariser alone (combine it with a memory elsewhere).

    Defaults: alpha = 0.9 (the paper's EWC++ decay), Fisher and score updated every 10 steps (the authors'
    MNIST setting; 50 for CIFAR-100), epsilon = 1e-3 (the authors' damping), lambda = 1: the
    cross-validated value for RWalk with normalised importances in the authors' follow-up, A-GEM (Chaudhry
    et al. 2019, ICLR), on permuted MNIST and split CIFAR. Avalanche's `RWalkPlugin` defaults to lambda 0.1
    and updates the Fisher every step."""

    def __init__(
        self,
        rwalk_lambda: float = 1.0,
        alpha: float = 0.9,
        update_every: int = 10,
        epsilon: float = 1e-3,
        curvature_limit: str = "sgd",
    ):
        if rwalk_lambda < 0:
            raise ValueError(f"RWalk lambda must be 0 or more, got {rwalk_lambda}")
        if not 0 <= alpha <= 1:
            raise ValueError(f"RWalk alpha (EWC++ moving-average weight) must be in [0, 1], got {alpha}")
        if update_every < 1:
            raise ValueError(f"RWalk update_every must be a positive number of steps, got {update_every}")
        if epsilon <= 0:
            raise ValueError(f"RWalk epsilon must be positive, got {epsilon}")
        self.rwalk_lambda, self.alpha = float(rwalk_lambda), float(alpha)
        self.update_every, self.epsilon = int(update_every), float(epsilon)
        super().__init__(
            curvature_limit
        )  # importance: normalised F + s at the last task's end; anchor: theta there
        self.fisher: dict[str, Tensor] = {}  # EWC++ running Fisher, over the whole stream
        self.score: dict[str, Tensor] = {}  # the current task's path-integral score
        self.task_score: dict[str, Tensor] = {}  # averaged over finished tasks
        self.interval_loss: dict[str, Tensor] = {}  # sum of -g * delta theta over the open interval
        self.interval_fisher: dict[str, Tensor] = {}  # sum of g^2 over the open interval
        self.interval_start: dict[str, Tensor] = {}  # theta when the open interval began
        self.interval_steps = 0

    @property
    def strength(self) -> float:
        return self.rwalk_lambda

    def before_task(self, task: Task) -> None:
        params = self.parameters()  # the head has grown: new rows start with no Fisher
        self.fisher = {name: pad_rows(f, params[name].shape) for name, f in self.fisher.items()}
        self.score = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
        self._open_interval()

    def _open_interval(self) -> None:
        params = self.parameters()
        self.interval_start = {name: p.detach().float().clone() for name, p in params.items()}
        self.interval_loss = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
        self.interval_fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
        self.interval_steps = 0

    def training_step(self, batch: Batch, runner: StepRunner) -> Tensor:
        with runner.autocast():
            cross_entropy = F.cross_entropy(self.logits(batch), batch.y)
            pull = self.strength * self.penalty() if self.importance and self.strength else None
        loss = cross_entropy.detach() if pull is None else (cross_entropy + pull).detach()
        # Two backward passes into the same .grad: the first leaves the cross-entropy's gradient alone, which
        # the Fisher and the score need; the second adds the penalty's, so the step is that of the sum.
        if not runner.backward(cross_entropy):
            return loss
        params = self.parameters()
        scaler = runner.scaler
        scale = scaler.get_scale() if scaler.is_enabled() else 1.0
        grads = {n: p.grad.detach().float() / scale for n, p in params.items() if p.grad is not None}
        if pull is not None and not runner.backward(pull):
            return loss
        before = {n: params[n].detach().float().clone() for n in grads}
        runner.step()
        # A float16 scaler skips a step whose gradients overflowed: nothing moved, and inf * 0 is NaN.
        if not scaler.is_enabled() or all(torch.isfinite(g).all() for g in grads.values()):
            self.accumulate(grads, before)
        return loss

    @torch.no_grad()
    def accumulate(self, grads: dict[str, Tensor], before: dict[str, Tensor]) -> None:
        """One step's -g * delta theta and g^2; closes the interval every `update_every` steps."""
        params = self.parameters()
        for name, grad in grads.items():
            self.interval_loss[name] -= grad * (params[name].detach().float() - before[name])
            self.interval_fisher[name] += grad.pow(2)
        self.interval_steps += 1
        if self.interval_steps == self.update_every:
            self.close_interval()

    @torch.no_grad()
    def close_interval(self) -> None:
        """Add the interval's score with the running Fisher, then move the Fisher (EWC++), then reopen."""
        if self.interval_steps == 0:
            return
        params = self.parameters()
        new_fisher = {name: total / self.interval_steps for name, total in self.interval_fisher.items()}
        if not self.fisher:  # the stream's first interval: no running Fisher yet
            self.fisher = {name: f.clone() for name, f in new_fisher.items()}
        for name, p in params.items():
            walked = (p.detach().float() - self.interval_start[name]).pow(2)
            distance = 0.5 * self.fisher[name] * walked + self.epsilon
            self.score[name] += (self.interval_loss[name] / distance).clamp_min(0)
            self.fisher[name] = self.alpha * new_fisher[name] + (1 - self.alpha) * self.fisher[name]
        self._open_interval()

    @torch.no_grad()
    def after_task(self, task: Task) -> None:
        self.close_interval()
        if self.task_score:
            self.task_score = {
                name: 0.5 * (pad_rows(self.task_score[name], s.shape) + s) for name, s in self.score.items()
            }
        else:
            self.task_score = {name: s.clone() for name, s in self.score.items()}
        fisher, score = normalised(self.fisher), normalised(self.task_score)
        self.importance = {name: fisher[name] + score[name] for name in fisher}
        self.anchor = {name: p.detach().float().clone() for name, p in self.parameters().items()}
        report_stiffness(self, "strategy.rwalk_lambda", self.rwalk_lambda, [self.importance])

    def state_dict(self) -> dict:
        state = {key: getattr(self, key) for key in PER_PARAMETER}
        return {**super().state_dict(), **state, "interval_steps": self.interval_steps}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        device = self.context.device
        for key in PER_PARAMETER:
            setattr(self, key, {name: t.to(device) for name, t in state[key].items()})
        self.interval_steps = int(state["interval_steps"])
