"""One optimizer step as every method takes it: the device and precision (`Hardware`), and `StepRunner`, which
runs a step's mixed precision, its scaled backward pass with the non-finite guard, and the optimizer step."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from incr_cli import distributed
from incr_cli.errors import ConfigError

log = logging.getLogger("incr")


class NonFiniteLoss(RuntimeError):
    """A NaN or infinite loss with train.on_nonfinite=stop."""


class StepRunner:
    """The engine's half of a training step, handed to `Strategy.training_step`: mixed precision, the
    scaled backward pass with the non-finite guard, and the optimizer step."""

    def __init__(self, optimizer, scaler, hardware: Hardware, on_nonfinite: str, where: Callable[[], str]):
        self.optimizer, self.scaler, self.hardware = optimizer, scaler, hardware
        self.on_nonfinite, self.where = on_nonfinite, where
        self.parameters = [p for group in optimizer.param_groups for p in group["params"]]
        self.weight = 1.0  # hardware=ddp: the current batch's share, set by the engine per batch

    def autocast(self):
        return self.hardware.autocast()

    def backward(self, loss: torch.Tensor) -> bool:
        """Backpropagate `loss`; False when the batch is to be skipped (non-finite, on_nonfinite=skip_batch)."""
        # One scalar read per step (a host sync on a GPU): the price of naming the exact step and of
        # skipping a batch before it touches the weights.
        nonfinite = not torch.isfinite(loss)
        if distributed.active():  # every rank skips or stops together
            (nonfinite,) = distributed.agree(nonfinite)
        if nonfinite:
            if self.on_nonfinite == "skip_batch":
                log.warning("non-finite loss (%s) at %s: batch skipped", loss.item(), self.where())
                self.optimizer.zero_grad(set_to_none=True)
                return False
            raise NonFiniteLoss(
                f"non-finite loss ({loss.item()}) at {self.where()}; the last good checkpoint is "
                "kept (train.on_nonfinite=skip_batch skips such batches instead)"
            )
        self.scaler.scale(loss).backward()
        if distributed.active():
            distributed.average_gradients(self.parameters, self.weight)
        return True

    def step(self) -> None:
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)


@dataclass
class Hardware:
    device: torch.device
    autocast_dtype: torch.dtype | None  # None: full precision

    def autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        # Loss scaling is only needed for float16's narrow exponent range (Micikevicius et al. 2018).
        return torch.amp.GradScaler(self.device.type, enabled=self.autocast_dtype == torch.float16)


def setup_hardware(cfg: DictConfig) -> Hardware:
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "hardware=gpu (hardware.device=cuda) but no CUDA GPU is visible; use hardware=cpu or auto"
        )
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True
    dtype = getattr(torch, cfg.amp_dtype) if cfg.amp else None
    if cfg.distributed:
        return Hardware(distributed.start("cuda" if cuda else "cpu"), dtype)
    return Hardware(torch.device("cuda" if cuda else "cpu"), dtype)
