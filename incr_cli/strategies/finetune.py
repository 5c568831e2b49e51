"""Fine-tuning: the lower bound every continual-learning method must beat."""

from incr_cli.strategies.base import Strategy


class Finetune(Strategy):
    """Trains on each task in turn with plain cross-entropy and nothing against forgetting.

    The naive baseline of every continual-learning paper (Avalanche's `Naive`, Mammoth's `sgd`)."""

    supports_online = True  # keeps nothing beyond the current batch

    supports_distributed = True  # its state comes from whole tasks, never from one rank's slice
