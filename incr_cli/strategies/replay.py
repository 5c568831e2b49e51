"""Experience replay from a fixed-size memory."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from incr_cli.data.batches import Batch
from incr_cli.data.stream import Task
from incr_cli.memory import Memory
from incr_cli.strategies.base import Strategy


class Replay(Strategy):
    """Experience replay (Chaudhry et al. 2019, "On Tiny Episodic Memories in Continual Learning").

    Every training batch B is joined by a batch M drawn from the memory, and the loss is the cross-entropy
    over the joined batch: L = CE(f(B u M), y). After each task, the task's training samples are offered
    to the memory (reservoir or class-balanced selection). Defaults: memory 200 (digits stream) / 500 (Split
    Fashion-MNIST), replay batch equal to the training batch (Avalanche's `batch_size_mem`, Mammoth's
    `minibatch_size`)."""

    supports_distributed = True  # its state comes from whole tasks, never from one rank's slice

    def __init__(self, memory: Memory, replay_batch_size: int | None = None):
        self.memory = memory
        self.replay_batch_size = replay_batch_size

    def loss(self, batch: Batch) -> Tensor:
        batch = self.with_replay(batch)
        return F.cross_entropy(self.logits(batch), batch.y)

    def after_task(self, task: Task) -> None:
        self.remember_rows(task.train_index)
