"""Small convolutional backbones for 28x28 (MNIST family) and 32x32 (CIFAR) images."""

from __future__ import annotations

from torch import Tensor, nn


def _conv_stack(in_channels: int, channels: list[int], convs_per_pool: int) -> tuple[nn.Sequential, int]:
    layers, n_pools = [], 0
    for i, out_channels in enumerate(channels):
        layers += [nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.ReLU(inplace=True)]
        in_channels = out_channels
        if (i + 1) % convs_per_pool == 0:
            layers.append(nn.MaxPool2d(2))
            n_pools += 1
    return nn.Sequential(*layers), n_pools


class _ConvFC(nn.Module):
    """Conv layers with max-pooling, then a hidden fully connected ReLU layer. A `Backbone`: its stages end
    at every pooling."""

    def __init__(
        self, input_shape, input_size: int, channels: list[int], hidden_size: int, convs_per_pool: int
    ):
        super().__init__()
        self.convs, n_pools = _conv_stack(input_shape[0], list(channels), convs_per_pool)
        side = input_size // 2**n_pools
        self.fc = nn.Sequential(
            nn.Flatten(), nn.Linear(channels[-1] * side * side, hidden_size), nn.ReLU(inplace=True)
        )
        self.feature_dim = hidden_size

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.convs(x))

    def embedding_before_activation(self, x: Tensor) -> Tensor:
        return self.fc[:-1](self.convs(x))  # fc ends with its ReLU

    def stage_modules(self) -> list[nn.Module]:
        return [layer for layer in self.convs if isinstance(layer, nn.MaxPool2d)]


class ConvNet(_ConvFC):
    """Two 3x3 conv layers, each followed by 2x2 max-pooling, then a hidden fully connected layer; the
    classifier head is the second fully connected layer. Made for 28x28 inputs."""

    def __init__(
        self, input_shape, input_size: int = 28, channels: list[int] = (32, 64), hidden_size: int = 256
    ):
        super().__init__(input_shape, input_size, channels, hidden_size, convs_per_pool=1)


class CifarCNN(_ConvFC):
    """Four 3x3 conv layers in two pairs, each pair followed by 2x2 max-pooling, then a hidden fully
    connected layer and the classifier head: the CIFAR network of Zenke et al. 2017 (SI). Made for 32x32."""

    def __init__(
        self,
        input_shape,
        input_size: int = 32,
        channels: list[int] = (32, 32, 64, 64),
        hidden_size: int = 512,
    ):
        super().__init__(input_shape, input_size, channels, hidden_size, convs_per_pool=2)
