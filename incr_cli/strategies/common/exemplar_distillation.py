"""The exemplar distillation stage that BiC and WA share: the task's data and the exemplars form one training
set, and each step weighs the cross-entropy against the distillation from the previous task's network."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from incr_cli.data.batches import Batch
from incr_cli.data.stream import Task
from incr_cli.memory import Memory
from incr_cli.strategies.common.distillation import distillation_loss
from incr_cli.strategies.common.teacher import PreviousTaskTeacher


class ExemplarDistillation(PreviousTaskTeacher):
    """The first stage that BiC (Wu et al. 2019) and WA (Zhao et al. 2020) share: the task's data and the
    exemplar memory form one training set (each sample once per epoch, as the papers concatenate them, so
    the old classes stay as under-represented as they are), and each step minimises

        L = lambda * L_KD + (1 - lambda) * CE(f(x), y),    lambda = n / (n + m),

    with n old and m new classes, CE over the n + m classes seen so far and L_KD the distillation over the
    old classes at temperature T against the frozen network of the end of the previous task (`PreviousTaskTeacher`'s
    frozen copy, checkpointed): -sum_k softmax(o_old / T)_k log softmax(f(x)_old / T)_k. `distillation_loss` (no T^2
    factor) is the KL divergence: this cross-entropy minus the soft targets' entropy, a constant, so the
    gradients are the papers'. The memory keeps each exemplar's row in the stream's training
    tensors (an `index` extra) so that the engine's batches can draw exemplars and new samples together;
    after each task the task's training data are offered to the memory (herding, as iCaRL's, by default)."""

    supports_distributed = True  # its state comes from whole tasks, never from one rank's slice

    def __init__(self, memory: Memory, temperature: float = 2.0):
        if temperature <= 0:
            raise ValueError(f"temperature={temperature} must be > 0")
        self.memory = memory
        self.temperature = float(temperature)

    def training_indices(self, task: Task) -> Tensor:
        return self.rows_with_memory(task.train_index)

    def calibrated(self, logits: Tensor) -> Tensor:
        """Logits as the method scores them (BiC corrects those of earlier tasks' classes)."""
        return logits

    def trained(self, logits: Tensor) -> Tensor:
        """Logits of the network being trained as its stage-1 loss sees them (BiC: corrected or raw)."""
        return self.calibrated(logits)

    def loss(self, batch: Batch) -> Tensor:
        x = self.context.preprocess(batch.x, self.rng)
        logits = self.trained(self.model(x))
        loss = F.cross_entropy(logits, batch.y)
        if self.old_model is None:
            return loss
        with torch.no_grad():
            old_logits = self.calibrated(self.old_model(x))[:, : self.old_classes]
        distillation = distillation_loss(logits[:, : self.old_classes], old_logits, self.temperature)
        weight = self.old_classes / logits.shape[1]  # lambda = n / (n + m)
        return weight * distillation + (1 - weight) * loss

    def after_task(self, task: Task) -> None:
        self.remember_rows(task.train_index, row_extra="index")
