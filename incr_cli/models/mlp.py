"""Multi-layer perceptron backbone on flattened pixels."""

from __future__ import annotations

import math

from torch import Tensor, nn


class MLP(nn.Module):
    """Fully connected ReLU layers; the classifier head is added by `IncrementalNet`."""

    def __init__(self, input_shape: tuple[int, int, int], hidden_sizes: list[int] = (256, 256)):
        super().__init__()
        layers, width = [nn.Flatten()], math.prod(input_shape)
        for size in hidden_sizes:
            layers += [nn.Linear(width, size), nn.ReLU(inplace=True)]
            width = size
        self.layers = nn.Sequential(*layers)
        self.feature_dim = width

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)
