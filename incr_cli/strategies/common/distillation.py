"""Knowledge distillation from the previous task's network: the KL divergence between softened outputs that
LwF, BiC and WA train with."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def distillation_loss(
    logits: Tensor, old_logits: Tensor, temperature: float, temperature_scaling: bool = False
) -> Tensor:
    """KL(softmax(old / T) || softmax(new / T)), averaged over the batch, in float32; times T^2 when
    `temperature_scaling`. `logits` and `old_logits` hold the same (old) classes, one row per sample."""
    log_p = F.log_softmax(logits.float() / temperature, dim=1)
    q = F.softmax(old_logits.float() / temperature, dim=1)
    kl = F.kl_div(log_p, q, reduction="batchmean")
    return temperature**2 * kl if temperature_scaling else kl
