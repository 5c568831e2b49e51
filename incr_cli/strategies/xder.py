"""eXtended-DER (X-DER): DER++ whose memory is filled at task end and whose stored logits are rewritten as
later tasks teach the network about classes those samples never saw."""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from incr_cli.data.batches import Batch
from incr_cli.data.stream import Task
from incr_cli.memory import Memory
from incr_cli.strategies.base import Context
from incr_cli.strategies.der import DarkExperienceReplay

if TYPE_CHECKING:
    from incr_cli.step import StepRunner


def implant_logits(stored: Tensor, fresh: Tensor, labels: Tensor, columns: slice, gamma: float) -> Tensor:
    """`stored` with its `columns` replaced by those of `fresh`, scaled down where needed so that their
    largest value is at most gamma times the sample's stored true-class logit (X-DER's logit update).

    Row i gets fresh[i, columns] * c_i with c_i = gamma * stored[i, y_i] / max(fresh[i, columns]) when that
    maximum exceeds stored[i, y_i], else c_i = 1. The true class thus stays on top of what is implanted.
    Trap: a scale cannot bring values under a true-class logit that is 0 or negative (Mammoth's rule would
    flip signs there); such rows keep their stored values unchanged."""
    new = fresh[:, columns]
    if new.shape[1] == 0:
        return stored.clone()
    target = stored.gather(1, labels[:, None])
    top = new.max(1, keepdim=True).values
    too_high = top > target
    scale = torch.where(too_high, gamma * target / top, torch.ones_like(top))
    implanted = torch.where(too_high & (target <= 0), stored[:, columns], new * scale)
    updated = stored.clone()
    updated[:, columns] = implanted
    return updated


def past_margin_violation(logits: Tensor, first: int, margin: float) -> Tensor:
    """Mean over the samples that violate it of max_P p + margin - max_C p, where p is the softmax over the
    classes seen so far, C the classes from `first` on (the current task) and P those before; the past term
    carries no gradient (X-DER's past-logit constraint: a current sample must score its own task higher)."""
    p = logits.float().softmax(1)
    gap = p[:, :first].max(1).values.detach() + margin - p[:, first:].max(1).values
    # the mean over violating samples, without a host sync on whether there are any
    return gap.clamp(min=0).sum() / (gap > 0).sum().clamp(min=1)


def future_margin_violation(logits: Tensor, own: Tensor, future: int, margin: float) -> Tensor:
    """Mean over the samples that violate it of max_F z + margin - max_own z, on raw logits z: F are the
    classes from `future` on (tasks not yet trained), own the boolean [N, classes] mask of each sample's own
    task head (X-DER's future-logit constraint, gradient through both terms). 0 when no sample violates it."""
    z = logits.float()
    good = z.masked_fill(~own, float("-inf")).max(1).values
    gap = z[:, future:].max(1).values + margin - good
    return gap.clamp(min=0).sum() / (gap > 0).sum().clamp(min=1)


def supervised_contrastive(features: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, SupCon "L_out") of `features` [N, V, D] (V views per
    sample, L2-normalised), averaged over the N * V anchors: each anchor's mean log-probability of its
    positives (every other view of a sample with its label) under the softmax of its similarities / T to all
    other views. X-DER sets the base temperature equal to T, so no extra factor."""
    n, v, _ = features.shape
    z = features.transpose(0, 1).reshape(n * v, -1)  # view-major rows: anchor i is sample i % n
    same = labels.repeat(v)
    self_pair = torch.eye(n * v, dtype=torch.bool, device=z.device)
    similarity = (z @ z.t() / temperature).masked_fill(self_pair, float("-inf"))
    log_prob = similarity - similarity.logsumexp(1, keepdim=True)
    positive = (same[:, None] == same[None, :]) & ~self_pair
    mean_positive = log_prob.masked_fill(~positive, 0).sum(1) / positive.sum(1).clamp(min=1)
    return -mean_positive.mean()


def strong_augmentation(x: Tensor, generator: torch.Generator) -> Tensor:
    """SimCLR-style views of images in [0, 1] [N, C, H, W], batched on their device (X-DER's views for its
    contrastive term): random resized crop (area 0.2-1, aspect 3/4-4/3, bilinear), colour jitter with
    probability 0.8 (brightness, contrast, saturation 0.4, hue 0.1; hue as a rotation of the YIQ chroma plane),
    horizontal flip with probability 0.5, grayscale with probability 0.2. Differences from torchvision: jitter
    in a fixed order, hue approximated in YIQ, a crop that does not fit is clipped rather than redrawn."""
    n, c, h, w = x.shape
    dev = x.device

    def uniform(low: float, high: float) -> Tensor:
        return torch.rand(n, generator=generator, device=dev) * (high - low) + low

    area, log_ratio = uniform(0.2, 1.0), uniform(math.log(3 / 4), math.log(4 / 3))
    width = (area * log_ratio.exp()).sqrt().clamp(max=1)
    height = (area / log_ratio.exp()).sqrt().clamp(max=1)
    cx, cy = uniform(-1, 1) * (1 - width), uniform(-1, 1) * (1 - height)
    zero = torch.zeros_like(width)
    theta = torch.stack([torch.stack([width, zero, cx], 1), torch.stack([zero, height, cy], 1)], 1)
    grid = F.affine_grid(theta, [n, c, h, w], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    jitter = (torch.rand(n, generator=generator, device=dev) < 0.8)[:, None, None, None]
    out = x * uniform(0.6, 1.4)[:, None, None, None]
    out = out.clamp(0, 1)
    mean = out.mean((1, 2, 3), keepdim=True)
    out = ((out - mean) * uniform(0.6, 1.4)[:, None, None, None] + mean).clamp(0, 1)
    if c == 3:
        gray = (out * GRAY.to(out)).sum(1, keepdim=True)
        out = ((out - gray) * uniform(0.6, 1.4)[:, None, None, None] + gray).clamp(0, 1)
        angle = uniform(-0.1, 0.1) * 2 * math.pi
        yiq = torch.einsum("ij,njhw->nihw", RGB_TO_YIQ.to(out), out)
        cos, sin = angle.cos()[:, None, None], angle.sin()[:, None, None]
        i, q = yiq[:, 1] * cos - yiq[:, 2] * sin, yiq[:, 1] * sin + yiq[:, 2] * cos
        yiq = torch.stack([yiq[:, 0], i, q], 1)
        out = torch.einsum("ij,njhw->nihw", torch.linalg.inv(RGB_TO_YIQ).to(out), yiq).clamp(0, 1)
    x = torch.where(jitter, out, x)

    flip = (torch.rand(n, generator=generator, device=dev) < 0.5)[:, None, None, None]
    x = torch.where(flip, x.flip(3), x)
    if c == 3:
        gray = (torch.rand(n, generator=generator, device=dev) < 0.2)[:, None, None, None]
        x = torch.where(gray, (x * GRAY.to(x)).sum(1, keepdim=True).expand_as(x), x)
    return x


GRAY = torch.tensor([0.299, 0.587, 0.114]).reshape(1, 3, 1, 1)
RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


@contextmanager
def batch_statistics_untracked(model: nn.Module):
    """Train-mode forward passes that leave batch-norm running statistics alone (Mammoth's
    `bn_track_stats(model, False)`): with tracking off, batch norm normalises with the batch's own statistics
    and updates nothing."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    tracked = [m.track_running_stats for m in norms]
    was_training = model.training
    model.train()
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m, flag in zip(norms, tracked, strict=True):
            m.track_running_stats = flag
        model.train(was_training)


class ExtendedDarkExperienceReplay(DarkExperienceReplay):
    """X-DER (Boschini, Bonicelli, Buzzega, Porrello, Calderara 2022, "Class-Incremental Continual Learning
    into the eXtended DER-verse", IEEE TPAMI): DER++ on a class-balanced memory whose stored logits are
    rewritten with what later tasks teach, the cross-entropy split by task, future heads prepared by a
    contrastive loss, and margin constraints that keep the split from biasing predictions.

    With t the current task, P the classes of tasks before t, C those of task t and F those after it, the
    head has every class of the stream from the first task on (as Mammoth's), and each step minimises

        L = CE_C(f(x), y) + alpha * MSE(f(x'), z') + beta * CE_P(f(x''), y'')
            + lambd * L_SupCon + eta * (L_past + L_future)

    CE_C is the cross-entropy over the current task's classes only and CE_P over the past classes only (the
    memory holds only past tasks' samples while a task trains); MSE runs over every class; (x', z') and
    (x'', y'') are two independent draws from the memory.
    - L_SupCon ("future preparation"): while tasks remain, the first `simclr_batch_size` samples of the batch
      and as many drawn from the memory get `simclr_num_aug` strong views each (SimCLR-style,
      `strong_augmentation`); for each future task, the logits of its classes, L2-normalised, are the
      features of a supervised contrastive loss (temperature `simclr_temp`), averaged over future tasks and
      anchors. Batch-norm running statistics are left alone in that pass.
    - L_past: mean, over the batch samples that violate it, of max_P p + m - max_C p (p: softmax over the
      seen classes, the past term without gradient): a current sample scores its own task above old ones.
    - L_future: mean, over the violating samples of the batch and of the replayed ones (both draws, each
      slot once), of max_F z + m - max_own z on raw logits, own being the sample's own task's classes:
      the heads being prepared must not outscore the true task.

    The stored logits z change in two ways, both through implant_logits (gamma):
    - present: at the end of task t the memory takes its class-balanced share of the task's samples (the
      quotas of `Memory`'s class_balanced selection; older classes shrink to make room) with the logits the
      network gives them then; their past-class entries (P) are scaled below gamma times their true-class
      logit, so a stored response never ranks an old class above the true one.
    - future past: the entries C u F of a stored sample of an older task are replaced by the network's
      current responses, scaled below gamma times its stored true-class logit. This is done for the whole
      memory at the end of each task and, as Mammoth's implementation does, during training for replayed
      samples from the training forward pass: the k-th time a sample is replayed within a task it is
      rewritten with probability 1/k.
    Task-end logits are taken as in Mammoth: training transform, train mode, batch-norm running statistics
    left untouched. Deliberate difference: where the stored true-class logit is 0 or negative, no rescaling
    keeps the implant below it, and the stored values are kept (Mammoth's formula flips the implant's sign).

    Defaults: the paper's Seq-CIFAR-100, 500-sample values, as in Mammoth's best_args at the paper's release:
    alpha 0.3, beta 0.8, gamma 0.85, lambd 0.05, eta 0.001, m 0.7, simclr_temp 5, simclr_batch_size 64,
    simclr_num_aug 2, both constraints on. Current Mammoth's xder config differs (past constraint off,
    eta 0.1, m 0.3, 4 views, an extra distance-preserving loss not in the paper): `past_constraint: false`,
    eta, margin and simclr_num_aug select it, the distance-preserving loss is not implemented.
    Memory: class_balanced as in the paper."""

    scenarios = ("class_il", "task_il")  # old classes are "the head minus this task's": none in domain-IL
    supports_online = False  # its memory is filled at the end of each task

    def __init__(
        self,
        memory: Memory,
        alpha: float,
        beta: float,
        gamma: float = 0.85,
        lambd: float = 0.05,
        eta: float = 0.001,
        margin: float = 0.7,
        past_constraint: bool = True,
        future_constraint: bool = True,
        simclr_temp: float = 5.0,
        simclr_batch_size: int = 64,
        simclr_num_aug: int = 2,
        replay_batch_size: int | None = None,
    ):
        super().__init__(memory, alpha, beta, replay_batch_size, head="full")
        if not 0 < gamma <= 1:
            raise ValueError(f"X-DER's gamma must be in (0, 1], got {gamma}")
        if eta < 0 or lambd < 0:
            raise ValueError(f"X-DER's eta and lambd must be 0 or more, got eta={eta}, lambd={lambd}")
        if simclr_num_aug < 2 or simclr_batch_size < 1 or simclr_temp <= 0:
            raise ValueError(
                "X-DER's contrastive term needs simclr_num_aug >= 2, simclr_batch_size >= 1, "
                f"simclr_temp > 0; got {simclr_num_aug}, {simclr_batch_size}, {simclr_temp}"
            )
        self.gamma, self.lambd, self.eta, self.margin = float(gamma), float(lambd), float(eta), float(margin)
        self.past_constraint, self.future_constraint = bool(past_constraint), bool(future_constraint)
        self.simclr_temp, self.simclr_batch_size = float(simclr_temp), int(simclr_batch_size)
        self.simclr_num_aug = int(simclr_num_aug)
        self.task_id = 0
        # times each memory slot was replayed during the current task (for the 1/k online rewrite)
        self.replays = torch.zeros(memory.size, dtype=torch.long)

    def setup(self, context: Context) -> None:
        super().setup(context)
        self.task_of_class = torch.empty(self.stream.n_classes, dtype=torch.long)
        for task in self.stream.tasks:
            self.task_of_class[task.classes] = task.id
        self.task_of_class = self.task_of_class.to(context.device)
        self.replays = self.replays.to(context.device)

    def before_task(self, task: Task) -> None:
        super().before_task(task)
        self.task_id = task.id

    def _first_class(self) -> int:
        """First class of the task being trained."""
        return self.stream.tasks[self.task_id].classes[0]

    def _next_class(self) -> int:
        """First class after the task being trained (the stream's class count at the last task)."""
        return self.stream.tasks[self.task_id].classes[-1] + 1

    def objective(self, batch: Batch) -> tuple[Tensor, Tensor, list[Tensor]]:
        n, first, future = len(batch), self._first_class(), self._next_class()
        rows = self.draw(batch)
        x = self.context.preprocess(torch.cat([batch.x, *(self.memory.x[r] for r in rows)]), self.rng)
        logits = self.model.forward_all(x)
        loss = F.cross_entropy(logits[:n, first:future], batch.y - first)
        if first > 0 and self.eta and self.past_constraint:
            loss = loss + self.eta * past_margin_violation(logits[:n, :future], first, self.margin)
        if rows:
            k = len(rows[0])
            loss = loss + self.alpha * F.mse_loss(
                logits[n : n + k].float(), self.memory.extras["logits"][rows[0]]
            )
            if self.beta and first > 0:
                loss = loss + self.beta * F.cross_entropy(logits[n + k :, :first], self.memory.y[rows[1]])
        if future < self.stream.n_classes:
            if self.lambd:
                loss = loss + self.lambd * self.future_preparation(batch)
            if self.eta and self.future_constraint:
                # the batch, then each replayed slot once (its first draw), as in Mammoth
                keep = (
                    self._first_draws(torch.cat(rows)) + n if rows else torch.arange(0, device=batch.y.device)
                )
                picked = torch.cat([torch.arange(n, device=keep.device), keep])
                labels = torch.cat([batch.y, *(self.memory.y[r] for r in rows)])[picked]
                own = self.task_of_class[None, :] == self.task_of_class[labels][:, None]
                loss = loss + self.eta * future_margin_violation(logits[picked], own, future, self.margin)
        return loss, logits, rows

    def future_preparation(self, batch: Batch) -> Tensor:
        """X-DER's contrastive term on the future tasks' heads (`supervised_contrastive`, averaged over heads)."""
        x, y = batch.x[: self.simclr_batch_size], batch.y[: self.simclr_batch_size]
        if len(self.memory):
            drawn = self.memory.draw(min(self.simclr_batch_size, len(self.memory)), self.rng)
            x, y = torch.cat([self.memory.x[drawn], x]), torch.cat([self.memory.y[drawn], y])
        prep = self.context.preprocess
        views = strong_augmentation(
            x.repeat_interleave(self.simclr_num_aug, 0).float() * prep.scale, self.rng
        )
        views = (views - prep.mean) / prep.std
        if prep.channels_last:
            views = views.contiguous(memory_format=torch.channels_last)
        with batch_statistics_untracked(self.model):
            logits = self.model.forward_all(views).float()
        logits = logits.reshape(len(y), self.simclr_num_aug, -1)
        heads = self.stream.tasks[self.task_id + 1 :]
        losses = [
            supervised_contrastive(
                F.normalize(logits[:, :, t.classes[0] : t.classes[-1] + 1], dim=2), y, self.simclr_temp
            )
            for t in heads
        ]
        return torch.stack(losses).mean()

    @staticmethod
    def _first_draws(rows: Tensor) -> Tensor:
        """Positions in `rows` of each slot's first occurrence, in draw order."""
        ordered, order = rows.sort(stable=True)
        first_time = torch.ones_like(ordered, dtype=torch.bool)
        first_time[1:] = ordered[1:] != ordered[:-1]
        return order[first_time].sort().values

    def training_step(self, batch: Batch, runner: StepRunner) -> Tensor:
        with runner.autocast():
            loss, logits, rows = self.objective(batch)
        if runner.backward(loss):
            runner.step()
            if rows:
                self._rewrite_replayed(torch.cat(rows), logits[len(batch) :].detach().float())
        return loss.detach()

    @torch.no_grad()
    def _rewrite_replayed(self, rows: Tensor, logits: Tensor) -> None:
        """Future-past update of the replayed samples of older tasks, with probability 1/k on the k-th replay."""
        keep = self._first_draws(rows)  # a sample in both draws counts once, with its first draw's logits
        rows, logits = rows[keep], logits[keep]
        labels = self.memory.y[rows]
        first = self._first_class()
        older = self.task_of_class[labels] < self.task_of_class[first]
        self.replays[rows[older]] += 1
        draw = torch.rand(len(rows), generator=self.rng, device=self.rng.device).to(rows.device)
        chosen = older & (draw * self.replays[rows] < 1)
        stored, rows = self.memory.extras["logits"], rows[chosen]
        stored[rows] = implant_logits(
            stored[rows], logits[chosen], labels[chosen], slice(first, None), self.gamma
        )

    @torch.no_grad()
    def _task_end_logits(self, x: Tensor) -> Tensor:
        batch_size = self.context.batch_size
        with batch_statistics_untracked(self.model):
            chunks = [
                self.model.forward_all(self.context.preprocess(x[i : i + batch_size], self.rng)).float()
                for i in range(0, len(x), batch_size)
            ]
        return torch.cat(chunks) if chunks else torch.empty(0, self.stream.n_classes, device=x.device)

    def after_task(self, task: Task) -> None:
        first = task.classes[0]
        # future past: rewrite the current and future classes of every stored sample (all of older tasks)
        if len(self.memory):
            stored = self.memory.extras["logits"]
            fresh = self._task_end_logits(self.memory.x)
            self.memory.extras["logits"] = implant_logits(
                stored, fresh, self.memory.y, slice(first, None), self.gamma
            )
        # present: the task's samples, their past-class logits capped below their true-class logit
        x, y = self.training_samples(task.train_index)
        logits = self._task_end_logits(x)
        logits = implant_logits(logits, logits, y, slice(0, first), self.gamma)
        self.remember_samples(x, y, logits=logits)
        self.replays.zero_()

    def state_dict(self) -> dict:
        return {**super().state_dict(), "replays": self.replays, "task_id": self.task_id}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.replays = state["replays"].to(self.replays.device)
        self.task_id = int(state.get("task_id", 0))
