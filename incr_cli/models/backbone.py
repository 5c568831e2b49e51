"""What a backbone tells the strategies about itself, so that no strategy needs to know its class."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from torch import Tensor, nn

from incr_cli.errors import ConfigError


class Backbone(Protocol):
    """A feature extractor `x -> embedding (N, feature_dim)`, the classifier head left out.

    Every built-in backbone (MLP, ConvNet, CifarCNN, ResNet18, ResNet32) has these; a new one needs them only
    for the strategies that use them, which check at their setup, before any training:
    - `feature_dim`: the size of the embedding that `forward` returns, the head's width (every run needs it);
    - `embedding_before_activation(x)`: that embedding without the network's last activation, from the same
      layers in the same order. The cosine classifiers of LUCIR and PODNet take it, as their authors' code
      does: a ReLU output is non-negative, often sparse and sometimes all zero, where the cosine's gradient,
      which grows as 1 / |f|, is unstable. A network that ends without an activation returns its `forward`;
    - `stage_modules()`: the modules whose outputs are the network's intermediate representations, in
      order from the input, the embedding itself left out (PODNet distils them, POD-spatial). Their outputs
      are read with forward hooks, so each must run once per forward pass."""

    feature_dim: int

    def __call__(self, x: Tensor) -> Tensor: ...

    def embedding_before_activation(self, x: Tensor) -> Tensor: ...

    def stage_modules(self) -> list[nn.Module]: ...


def require(backbone: nn.Module, method: str, needs: Sequence[str]) -> None:
    """Raise a one-line ConfigError if `backbone` lacks any of the `Backbone` members that `method` needs."""
    lacking = [name for name in needs if not hasattr(backbone, name)]
    if lacking:
        raise ConfigError(
            f"the backbone {type(backbone).__name__} lacks {', '.join(lacking)}, which {method} needs "
            "(what a backbone offers the strategies: incr_cli.models.backbone.Backbone)"
        )
