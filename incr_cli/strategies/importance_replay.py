"""Importance-weighted replay: incr's own method. Replay whose loss and memory favour the samples that matter."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from incr_cli.data.batches import Batch
from incr_cli.data.stream import Task
from incr_cli.memory import Memory
from incr_cli.strategies.base import Strategy

SCORINGS = ("loss", "grad_norm")
ADMISSIONS = ("random", "importance")


class ImportanceReplay(Strategy):
    """Importance-weighted replay (incr's method; docs/methods.md has the equations with their reasons).

    As in experience replay, every training batch is joined by a batch drawn uniformly from the memory. Each
    sample i of the joined batch of n gets an importance score s_i, computed from the same forward pass:

        scoring=loss:       s_i = CE(z_i, y_i)                  (its cross-entropy)
        scoring=grad_norm:  s_i = || softmax(z_i) - onehot(y_i) ||_2
                                                                (the norm of d CE / d z_i, in closed form)

    and the loss weights each sample by its score relative to the batch, at temperature T, with a floor:

        w_i = max( floor, n * s_i^(1/T) / sum_j s_j^(1/T) ),      L = (1/n) sum_i w_i * CE(z_i, y_i)

    The weights are constants (no gradient flows through them). Without the floor they average 1, so the
    step size stays the plain replay's; the floor keeps every sample, however well learned, in the loss
    (the mean weight stays in [1, 1 + floor]). T -> infinity gives w_i = 1: plain replay.

    The memory is class-balanced (size // classes seen slots per class, the remainder to the lowest labels)
    and keeps each class's most important samples. The score is stored with each sample (the memory extra
    `score`) and refreshed whenever the sample is replayed; at the end of a task the new samples are scored
    with the trained model (evaluation transform). A class that shrinks drops its least important samples,
    the ones the model has learned best, and keeps those it is forgetting or finds hard. How a new class
    enters is `admission`: `random` (default) admits a uniform random subset of its samples; `importance`
    admits its highest-scoring ones. Measured on Split Fashion-MNIST (docs/methods.md), admitting by
    importance fills a class with its atypical samples and collapses (0.39 against replay's 0.80), while
    random admission with importance-based eviction stays near replay (0.78).

    Defaults (configs/strategy/importance_replay.yaml): scoring=loss, T=4, floor=0.1, memory 200 (digits
    stream; 500 on Split Fashion-MNIST), replay batch equal to the training batch (as incr's replay).
    docs/methods.md gives the reasons and the measurements behind them, including where keeping the most
    important samples hurts."""

    def __init__(
        self,
        memory: Memory,
        scoring: str = "loss",
        temperature: float = 4.0,
        floor: float = 0.1,
        replay_batch_size: int | None = None,
        admission: str = "random",
    ):
        if memory.selection != "class_balanced":
            raise ValueError(
                "importance replay keeps a class-balanced memory with its own eviction (the least important "
                f"sample of a class goes first); set memory.selection=class_balanced, got {memory.selection!r}"
            )
        if scoring not in SCORINGS:
            raise ValueError(f"importance replay scoring {scoring!r} is not one of {', '.join(SCORINGS)}")
        if admission not in ADMISSIONS:
            raise ValueError(
                f"importance replay admission {admission!r} is not one of {', '.join(ADMISSIONS)}"
            )
        if not temperature > 0:
            raise ValueError(f"importance replay temperature must be positive, got {temperature}")
        if not 0 < floor <= 1:
            raise ValueError(f"importance replay floor must be in (0, 1], got {floor}")
        self.memory = memory
        self.scoring, self.temperature, self.floor = scoring, temperature, floor
        self.replay_batch_size = replay_batch_size
        self.admission = admission

    def loss(self, batch: Batch) -> Tensor:
        rows = None
        if len(self.memory):
            rows = self.memory.draw(self.replay_size(batch), self.rng)
            incoming, batch = len(batch), batch.join(self.memory.batch(rows))
        logits = self.logits(batch)
        losses = F.cross_entropy(logits, batch.y, reduction="none")
        scores = importance(logits.detach(), batch.y, self.scoring, losses.detach())
        if rows is not None:
            self._refresh(rows, scores[incoming:])
        return (importance_weights(scores, self.temperature, self.floor) * losses).mean()

    def _refresh(self, rows: Tensor, scores: Tensor) -> None:
        """Replayed samples get the score they have now (a row drawn twice: the mean of its two scores)."""
        stored = self.memory.extras["score"]
        fresh = stored.clone().scatter_reduce_(0, rows, scores.to(stored.dtype), "mean", include_self=False)
        self.memory.extras["score"] = torch.where(
            fresh.isfinite(), fresh, stored
        )  # a NaN batch changes nothing

    def after_task(self, task: Task) -> None:
        x, y = self.training_samples(task.train_index)
        self._keep_most_important(x, y, self.score(x, y))

    @torch.no_grad()
    def score(self, x: Tensor, y: Tensor, batch_size: int = 1000) -> Tensor:
        """Importance scores of raw uint8 images under the current model (evaluation transform, eval mode)."""
        was_training = self.model.training
        self.model.eval()
        scores = []
        for i in range(0, len(y), batch_size):
            logits = self.model(self.context.preprocess(x[i : i + batch_size])).float()
            scores.append(importance(logits, y[i : i + batch_size], self.scoring))
        self.model.train(was_training)
        return torch.cat(scores)

    def _keep_most_important(self, x: Tensor, y: Tensor, scores: Tensor) -> None:
        memory = self.memory
        if memory.size == 0 or len(y) == 0:
            return
        offered = len(y)
        priority = scores
        if self.admission == "random":
            # New samples rank above every stored one, in random order: a class enters as a uniform subset,
            # and only a shrinking class's eviction goes by importance.
            top = torch.cat([scores, memory.extras["score"]]).max() if len(memory) else scores.max()
            uniform = torch.rand(len(y), generator=self.rng, device=self.rng.device).to(scores.device)
            priority = top + 1 + uniform
        if len(memory):
            x, y = torch.cat([memory.x, x]), torch.cat([memory.y, y])
            priority = torch.cat([memory.extras["score"], priority])
            scores = torch.cat([memory.extras["score"], scores])
        keep = most_important_per_class(y, priority, memory.size)
        memory.x, memory.y, memory.extras = x[keep], y[keep], {"score": scores[keep]}
        memory.n_seen += offered


def gradient_norm(logits: Tensor, y: Tensor) -> Tensor:
    """|| d CE(z, y) / d z ||_2 per sample, in closed form: || softmax(z) - onehot(y) ||_2."""
    probabilities = logits.float().softmax(dim=1)
    return (probabilities - F.one_hot(y, logits.shape[1]).to(probabilities.dtype)).norm(dim=1)


def importance(logits: Tensor, y: Tensor, scoring: str, losses: Tensor | None = None) -> Tensor:
    """Per-sample importance scores s_i (float32): the cross-entropy, or the norm of its logit gradient."""
    if scoring == "grad_norm":
        return gradient_norm(logits, y)
    if losses is None:
        losses = F.cross_entropy(logits.float(), y, reduction="none")
    return losses.float()


def importance_weights(scores: Tensor, temperature: float, floor: float) -> Tensor:
    """w_i = max(floor, n * s_i^(1/T) / sum_j s_j^(1/T)); scores of 0 count as a tiny positive number, so a
    batch of all-zero scores gets uniform weights."""
    tempered = scores.float().clamp_min(torch.finfo(torch.float32).tiny).pow(1.0 / temperature)
    return (len(scores) * tempered / tempered.sum()).clamp_min(floor)


def most_important_per_class(y: Tensor, scores: Tensor, size: int) -> Tensor:
    """Rows to keep, in their original order: each class's highest-scoring rows up to its quota of
    size // classes (the remainder to the lowest labels). Ties keep the earlier row."""
    classes = torch.unique(y)
    quota = torch.full((len(classes),), size // len(classes), device=y.device)
    quota[: size % len(classes)] += 1
    by_score = torch.sort(scores, descending=True, stable=True).indices
    by_class = by_score[torch.sort(y[by_score], stable=True).indices]  # by class, then score, high first
    class_index = torch.searchsorted(classes, y[by_class])
    first_of_class = torch.searchsorted(y[by_class], classes)
    rank = torch.arange(len(y), device=y.device) - first_of_class[class_index]
    return by_class[rank < quota[class_index]].sort().values
