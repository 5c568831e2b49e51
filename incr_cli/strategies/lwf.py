"""Learning without Forgetting (LwF): distil the previous model's outputs on the old classes."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from incr_cli.data.batches import Batch
from incr_cli.data.stream import Task
from incr_cli.strategies.common.distillation import distillation_loss
from incr_cli.strategies.common.teacher import PreviousTaskTeacher


class LearningWithoutForgetting(PreviousTaskTeacher):
    """LwF (Li and Hoiem 2016, "Learning without Forgetting", ECCV 2016; TPAMI 2018).

    At the start of every task after the first, a frozen copy of the network as it ended the previous task
    (deep copy, eval mode) gives the responses y_o to the new task's inputs. Each step minimises

        L = CE(f(x)[:, :seen], y) + alpha * KL(softmax(y_o / T) || softmax(f(x)[:, :old] / T))

    with `seen` the classes seen so far, `old` those of the previous tasks, both models fed the same
    (augmented) input. The paper's old-task term is the cross-entropy -sum_i y'_o,i log y'_i with
    y' = softmax(y / T); the KL is that cross-entropy minus the old model's (constant) entropy: the same
    gradients, and 0 when the outputs agree. alpha is the paper's lambda_o.

    `temperature_scaling: false` (default) is the paper's loss and Avalanche 0.6's LwF (alpha times the
    batch-mean KL over the old classes) and Mammoth's lwf (alpha times the cross-entropy of the softened
    outputs: the same gradients). `true` multiplies the term by T^2 (Hinton et al. 2015), which keeps its
    gradient's scale independent of T; alpha then weighs T^2 times more.

    `alpha` may be a list with one weight per task, as Avalanche's: the task's own entry applies (the first
    task's is unused: nothing to distil). Defaults: T = 2 ("we set T = 2", Sec. 3), alpha = 1 (lambda_o = 1).
    One head grows with the classes; the paper's warm-up (training the new head alone first) is left out, as
    in Avalanche's LwF (Mammoth's does it). The frozen copy's weights go through `state_dict`: exact resume."""

    supports_distributed = True  # its state comes from whole tasks, never from one rank's slice

    def __init__(
        self,
        alpha: float | Sequence[float] = 1.0,
        temperature: float = 2.0,
        temperature_scaling: bool = False,
    ):
        alphas = [float(alpha)] if isinstance(alpha, (int, float)) else [float(a) for a in alpha]
        if not alphas or min(alphas) < 0 or temperature <= 0:
            raise ValueError(f"LwF needs alpha >= 0 and temperature > 0, got {alpha=}, {temperature=}")
        self.alphas, self.per_task = alphas, not isinstance(alpha, (int, float))
        self.temperature, self.temperature_scaling = float(temperature), bool(temperature_scaling)
        self.alpha = alphas[0]

    def before_task(self, task: Task) -> None:
        super().before_task(task)
        self.alpha = self.task_alpha(task.id)

    def task_alpha(self, task_id: int) -> float:
        if not self.per_task:
            return self.alphas[0]
        if task_id >= len(self.alphas):
            raise ValueError(f"LwF's alpha list has {len(self.alphas)} entries: none for task {task_id + 1}")
        return self.alphas[task_id]

    def loss(self, batch: Batch) -> Tensor:
        x = self.context.preprocess(batch.x, self.rng)
        logits = self.model(x)
        loss = F.cross_entropy(logits, batch.y)
        if self.old_model is not None and self.alpha:
            with torch.no_grad():
                old_logits = self.old_model(x)[:, : self.old_classes]
            loss = loss + self.alpha * distillation_loss(
                logits[:, : self.old_classes], old_logits, self.temperature, self.temperature_scaling
            )
        return loss

    def state_dict(self) -> dict:
        return {**super().state_dict(), "alpha": self.alpha}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.alpha = float(state.get("alpha", self.alphas[0]))
