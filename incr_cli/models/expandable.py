"""A backbone that grows by feature extractors side by side, for growing-network methods (DER, FOSTER)."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


class ExpandableBackbone(nn.Module):
    """Feature extractors side by side: the features are their outputs concatenated, in order.

    `expand` appends a copy of the last extractor (the initialisation PyCIL's DER and FOSTER use) and
    freezes every earlier one: its parameters stop taking gradients and it stays in eval mode, so its
    batch-norm statistics no longer move. Any backbone with a `feature_dim` can be an extractor.

    A copy of a `compile`d extractor is not compiled (deep copies drop torch's compiled call), so only the
    first extractor of a run with `hardware.compile=true` runs compiled; the copies run eagerly."""

    def __init__(self, extractors: list[nn.Module]):
        super().__init__()
        self.extractors = nn.ModuleList(extractors)
        self.frozen = 0  # the first `frozen` extractors no longer learn
        self.freeze(len(extractors) - 1)

    @property
    def feature_dim(self) -> int:
        return sum(extractor.feature_dim for extractor in self.extractors)

    def __len__(self) -> int:
        return len(self.extractors)

    def expand(self) -> nn.Module:
        """Append a trainable copy of the last extractor and freeze all the others; returns the copy."""
        extractor = copy.deepcopy(self.extractors[-1])
        for parameter in extractor.parameters():
            parameter.requires_grad_(True)
        extractor.train(self.training)
        self.extractors.append(extractor)
        self.freeze(len(self.extractors) - 1)
        return extractor

    def freeze(self, n: int) -> None:
        """Freeze the first `n` extractors (parameters without gradients, eval mode)."""
        self.frozen = n
        for extractor in self.extractors[:n]:
            for parameter in extractor.parameters():
                parameter.requires_grad_(False)
            extractor.eval()

    def train(self, mode: bool = True) -> ExpandableBackbone:
        super().train(mode)
        for extractor in self.extractors[: self.frozen]:
            extractor.eval()
        return self

    def forward(self, x: Tensor) -> Tensor:
        if len(self.extractors) == 1:
            return self.extractors[0](x)
        return torch.cat([extractor(x) for extractor in self.extractors], dim=1)
