"""Joint training on everything seen so far: the upper bound."""

import torch
from torch import Tensor

from incr_cli.data.stream import Task
from incr_cli.strategies.base import Strategy


class Joint(Strategy):
    """At task k, trains on the training data of tasks 1..k together (cumulative joint training).

    Not a continual method: it stores all data. Its final accuracy bounds what a method could reach with the
    same model and budget; the last task's row equals training once on the whole data set, continued."""

    supports_distributed = True  # its state comes from whole tasks, never from one rank's slice

    def training_indices(self, task: Task) -> Tensor:
        return torch.cat([t.train_index for t in self.stream.tasks[: task.id + 1]])
