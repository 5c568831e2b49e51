"""The classifier head that grows as classes arrive, and the backbone + head network."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class IncrementalClassifier(nn.Module):
    """A linear head with one row per class seen so far; `grow` appends rows and keeps the trained ones.

    The rows of classes still to come are drawn once, at construction, with PyTorch's default Linear
    initialisation and kept as a buffer: growing activates them, and `forward_all` can score future classes
    (task-IL accuracy of unseen tasks, needed for FWT) without changing what training sees."""

    def __init__(self, in_features: int, total_classes: int):
        super().__init__()
        template = nn.Linear(in_features, total_classes)
        self.register_buffer("future_weight", template.weight.detach().clone())
        self.register_buffer("future_bias", template.bias.detach().clone())
        self.weight = nn.Parameter(template.weight.detach()[:0].clone())
        self.bias = nn.Parameter(template.bias.detach()[:0].clone())

    @property
    def n_classes(self) -> int:
        return len(self.bias)

    def grow(self, n_classes: int) -> None:
        if n_classes <= self.n_classes:
            return
        new = slice(self.n_classes, n_classes)
        self.weight = nn.Parameter(torch.cat([self.weight.detach(), self.future_weight[new]]))
        self.bias = nn.Parameter(torch.cat([self.bias.detach(), self.future_bias[new]]))

    @property
    def in_features(self) -> int:
        return self.future_weight.shape[1]

    def widen(self, extra_features: int) -> None:
        """Append `extra_features` input columns (features of a new extractor, DER and FOSTER) to every row,
        active and future: the trained columns keep their weights, the new ones are drawn uniformly in
        +-1/sqrt(in_features) (nn.Linear's bound at the new width) from torch's global generator."""
        in_features = self.in_features + extra_features
        bound = 1 / in_features**0.5
        columns = torch.rand(len(self.future_bias), extra_features) * (2 * bound) - bound
        columns = columns.to(self.future_weight)
        self.future_weight = torch.cat([self.future_weight, columns], dim=1)
        active = torch.cat([self.weight.detach(), columns[: self.n_classes]], dim=1)
        self.weight = nn.Parameter(active, requires_grad=self.weight.requires_grad)

    def forward(self, features: Tensor) -> Tensor:
        return features @ self.weight.t() + self.bias

    def forward_all(self, features: Tensor) -> Tensor:
        weight = torch.cat([self.weight, self.future_weight[self.n_classes :]])
        bias = torch.cat([self.bias, self.future_bias[self.n_classes :]])
        return features @ weight.t() + bias

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint may hold more (or fewer) active classes than this fresh head: match its size first.
        saved = state_dict.get(prefix + "bias")
        if saved is not None and len(saved) != self.n_classes:
            self.weight = nn.Parameter(self.future_weight[: len(saved)].clone())
            self.bias = nn.Parameter(self.future_bias[: len(saved)].clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class IncrementalNet(nn.Module):
    """Backbone features -> growing linear head. `forward` scores the classes seen so far."""

    def __init__(self, backbone: nn.Module, total_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = IncrementalClassifier(backbone.feature_dim, total_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))

    def forward_all(self, x: Tensor) -> Tensor:
        """Scores of every class of the stream, those not yet seen included."""
        return self.head.forward_all(self.backbone(x))
