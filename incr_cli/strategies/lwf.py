"""Learning without Forgetting (LwF): distil the previous model's outputs on the old classes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from incr_cli.data.batches import Batch
from incr_cli.strategies.teacher import PreviousTaskTeacher


def distillation_loss(logits: Tensor, old_logits: Tensor, temperature: float) -> Tensor:
    """T^2 * KL(softmax(old / T) || softmax(new / T)), averaged over the batch, in float32.

    `logits` and `old_logits` hold the same (old) classes, one row per sample."""
    log_p = F.log_softmax(logits.float() / temperature, dim=1)
    q = F.softmax(old_logits.float() / temperature, dim=1)
    return temperature**2 * F.kl_div(log_p, q, reduction="batchmean")


class LearningWithoutForgetting(PreviousTaskTeacher):
    """LwF (Li and Hoiem 2016, "Learning without Forgetting", ECCV 2016; TPAMI 2018).

    At the start of every task after the first, a frozen copy of the network as it ended the previous task
    (deep copy, eval mode) records its responses y_o to the new task's inputs. Each step minimises

        L = CE(f(x)[:, :seen], y) + alpha * T^2 * KL(softmax(y_o / T) || softmax(f(x)[:, :old] / T))

    with `seen` the classes seen so far, `old` those of the previous tasks, both models fed the same
    (augmented) input. The paper's old-task term is a modified cross-entropy, -sum_i y'_o,i log y'_i with
    y' = softmax(y / T); this KL is that cross-entropy minus the entropy of the old model's soft targets, a
    constant, so the gradients are the same and the reported loss is 0 when the outputs agree. The T^2 factor
    (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network") keeps the term's gradient scale
    independent of T; the paper has no such factor, so its lambda_o = 1 corresponds to alpha = 1 / T^2 here.

    Defaults: T = 2, the paper's ("we set T = 2", Sec. 3); alpha = 1, the paper's lambda_o = 1 and protocol
    P2's setting (alpha 1, temperature 2). One head grows with the classes, as in this project; the paper's
    warm-up step (training only the new head first) is left out, as in Avalanche's and Mammoth's LwF.

    The frozen copy's weights go through `state_dict`, so resume is exact."""

    supports_distributed = True  # its state comes from whole tasks, never from one rank's slice

    def __init__(self, alpha: float = 1.0, temperature: float = 2.0):
        if alpha < 0 or temperature <= 0:
            raise ValueError(f"LwF needs alpha >= 0 and temperature > 0, got {alpha=}, {temperature=}")
        self.alpha, self.temperature = float(alpha), float(temperature)

    def loss(self, batch: Batch) -> Tensor:
        x = self.context.preprocess(batch.x, self.rng)
        logits = self.model(x)
        loss = F.cross_entropy(logits, batch.y)
        if self.old_model is not None and self.alpha:
            with torch.no_grad():
                old_logits = self.old_model(x)[:, : self.old_classes]
            loss = loss + self.alpha * distillation_loss(
                logits[:, : self.old_classes], old_logits, self.temperature
            )
        return loss
