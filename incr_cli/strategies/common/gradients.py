"""A model's gradient as one flat vector: read it after a backward pass, write a changed one back (GEM, A-GEM)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from incr_cli.step import StepRunner


def trainable(model: nn.Module) -> list[nn.Parameter]:
    """The parameters a gradient vector covers, in a fixed order. Read it at every step: the head grows."""
    return [p for p in model.parameters() if p.requires_grad]


def flatten(parameters: Sequence[nn.Parameter]) -> Tensor:
    """The parameters' .grad as one vector; zeros where the loss did not reach a parameter."""
    return torch.cat(
        [
            torch.zeros(p.numel(), device=p.device) if p.grad is None else p.grad.reshape(-1)
            for p in parameters
        ]
    )


def write(parameters: Sequence[nn.Parameter], vector: Tensor) -> None:
    """Set every parameter's .grad to its slice of `vector` (the inverse of `flatten`)."""
    offset = 0
    for p in parameters:
        p.grad = vector[offset : offset + p.numel()].view_as(p).to(p.dtype).clone()
        offset += p.numel()
    if offset != len(vector):
        raise ValueError(f"a gradient vector of {len(vector)} values for {offset} parameters")


def gradient_of(loss: Tensor, parameters: Sequence[nn.Parameter], runner: StepRunner) -> Tensor | None:
    """The flat gradient of `loss` alone, through the engine's scaled backward and its non-finite guard;
    None when the guard skips the batch. Under a GradScaler every vector comes out multiplied by the same
    scale, so comparisons and projections between them need no unscaling."""
    runner.zero_grad()
    if not runner.backward(loss):
        return None
    return flatten(parameters)


def loss_scale(runner: StepRunner) -> float:
    """The factor the engine's GradScaler multiplies gradients by (1 without float16 loss scaling)."""
    scaler = runner.scaler
    return float(scaler.get_scale()) if scaler.is_enabled() else 1.0
