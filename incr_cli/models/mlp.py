"""Multi-layer perceptron backbone on flattened pixels."""

from __future__ import annotations

import math

from torch import Tensor, nn


class MLP(nn.Module):
    """Fully connected ReLU layers; the classifier head is added by `IncrementalNet`. A `Backbone`: its stages
    are the hidden layers but the last, whose output is the embedding."""

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

    def embedding_before_activation(self, x: Tensor) -> Tensor:
        # the last layer is the final ReLU, unless there is no hidden layer
        last = len(self.layers) - 1 if isinstance(self.layers[-1], nn.ReLU) else len(self.layers)
        return self.layers[:last](x)

    def stage_modules(self) -> list[nn.Module]:
        return [layer for layer in self.layers if isinstance(layer, nn.ReLU)][:-1]
