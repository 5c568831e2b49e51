"""Whether a task just trained learned anything: its training loss, summed on the device as it trains, and its
accuracy against chance, turned into one message that names the likely causes."""

from __future__ import annotations

import math

import torch
from omegaconf import DictConfig
from torch import Tensor

from incr_cli.data.stream import Task

# A trained task is reported when its accuracy is at most this far above chance (see `learned_nothing`) ...
CHANCE_MARGIN = 0.05
# ... or when its mean training loss fell by less than this fraction of its first value.
LOSS_DROP = 0.01

TaskLoss = tuple[
    float | None, float
]  # (first epoch's mean, lowest later one) or (first tenth's, last tenth's)


class EpochLoss:
    """One epoch's training loss, summed on the device and read once at the epoch's end (and at checkpoints):
    no per-batch synchronisation. A one-epoch first task (`tenths`) also keeps copies of the running sum after
    its first tenth of batches and at the start of its last tenth, the figures its loss check compares. A
    resumed epoch starts from the sums its checkpoint kept in the run's position."""

    def __init__(self, position, device: torch.device, n_batches: int, tenths: bool):
        self.n_batches, self.tenths = n_batches, tenths
        self.window = max(1, n_batches // 10)
        self.sum = torch.tensor(position.epoch_loss, device=device)
        self.head, self.tail_start = (
            None if value is None else torch.tensor(value, device=device)
            for value in (position.head_loss, position.tail_start_loss)
        )

    def add(self, loss: Tensor, batches_done: int) -> None:
        self.sum += loss.float()
        if self.tenths:
            if batches_done == self.window:
                self.head = self.sum.clone()
            if batches_done == self.n_batches - self.window:
                self.tail_start = self.sum.clone()

    def keep_in(self, position) -> None:
        """The sums so far into the run's position, for a checkpoint written mid-epoch."""
        position.epoch_loss = self.sum.item()
        if self.head is not None:
            position.head_loss = self.head.item()
        if self.tail_start is not None:
            position.tail_start_loss = self.tail_start.item()

    def end(self, position, epochs: int) -> tuple[float, TaskLoss | None]:
        """The epoch's mean loss, and the task's loss figures so far for `learned_nothing` (None: none yet).
        The first epoch's mean and the lowest later mean are kept in the position, across a resume."""
        sums = [self.sum]
        if self.head is not None and self.tail_start is not None:
            sums += [self.head, self.tail_start]
        sums = torch.stack(sums).tolist()  # the epoch's one read of the device
        epoch_mean = sums[0] / max(self.n_batches, 1)
        lowest = position.lowest_epoch_loss
        if position.epoch == 0:
            position.first_epoch_loss = epoch_mean
        elif lowest is None or not math.isfinite(lowest) or epoch_mean < lowest:
            position.lowest_epoch_loss = epoch_mean
        if epochs > 1:
            return epoch_mean, (position.first_epoch_loss, position.lowest_epoch_loss)
        if len(sums) == 3 and self.tenths:
            return epoch_mean, (sums[1] / self.window, (sums[0] - sums[2]) / self.window)
        return epoch_mean, None


def learned_nothing(
    task: Task,
    accuracy: float,
    task_loss: TaskLoss | None,
    cfg: DictConfig,
    epochs: int,
    class_names: list[str],
) -> list[str]:
    """What says that the task just trained learned nothing, as one message naming the likely causes.

    - accuracy: the fraction of the task's own evaluation samples predicted correctly among the task's own
      classes (the task-IL figure; in domain-IL every class) is at most CHANCE_MARGIN above chance, 1 / the
      task's classes (a task of one class is not checked). In class-IL the argmax over every class seen is
      not used: a method's bias towards old classes lowers it on a task that was learned;
    - loss: the mean training loss did not fall by LOSS_DROP of its first value: no epoch after the first
      has a mean that much below the first epoch's. The loss the engine sees is the method's whole
      objective, and distillation or penalty terms grow as the model leaves the previous one: over a
      short epoch they can outweigh the new task's falling loss. So a one-epoch task is checked only when
      it is the first one (no earlier model to hold on to): its last tenth of batches against its first
      tenth (a task of one batch is not checked). A non-finite mean counts as not falling."""
    findings = []
    n_classes = len(task.classes)
    chance = 1 / n_classes
    if n_classes > 1 and accuracy <= chance + CHANCE_MARGIN:
        findings.append(
            f"its {cfg.evaluate_on} accuracy among its own classes is {accuracy:.3f}, no more than "
            f"{CHANCE_MARGIN * 100:.0f} points above chance ({chance:.3f} with {n_classes} classes)"
        )
    if task_loss is not None and None not in task_loss:
        first, later = task_loss
        if not later < first - LOSS_DROP * abs(first):
            findings.append(
                f"its training loss did not fall (mean {first:.4g} in the first epoch, {later:.4g} at best "
                "in a later one)"
                if epochs > 1
                else f"its training loss did not fall (mean {first:.4g} over the first tenth of its batches, "
                f"{later:.4g} over the last)"
            )
    if not findings:
        return []
    names = ", ".join(class_names[c] for c in task.classes)
    return [
        f"task {task.id + 1} (classes {names}) may have learned nothing: {'; '.join(findings)}. "
        f"Likely causes: {', '.join(likely_causes(cfg, epochs))}"
    ]


def likely_causes(cfg: DictConfig, epochs: int) -> list[str]:
    """The settings that most often keep a task from learning, each with the override to try."""
    causes = []
    lr = cfg.optimizer.get("lr") if cfg.optimizer is not None else None
    if isinstance(lr, (int, float)) and lr > 0:
        causes.append(f"a learning rate too high for this model (try optimizer.lr={lr / 10:g})")
    elif lr is not None:
        causes.append(f"a learning rate of {lr} (set a positive optimizer.lr)")
    if not cfg.dataset.normalize:
        causes.append(
            "unnormalised inputs (try dataset.normalize=true, with dataset.mean and dataset.std of the data)"
        )
    if cfg.train.online:
        causes.append("a single pass over the data (train.online=true)")
    else:
        causes.append(f"too few epochs (try epochs={epochs * 2})")
    return causes
