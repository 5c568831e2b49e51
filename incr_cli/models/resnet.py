"""Residual networks (He et al. 2016): ResNet-18 with the CIFAR stem (3x3, no max-pool) or the ImageNet stem
(7x7 stride 2 and a max-pool), and the CIFAR ResNet-32."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a shortcut. `zero_pad_shortcut` is He et al.'s option A (identity with
    subsampling and zero channels, no parameters), used by the CIFAR ResNet-32 of iCaRL and PyCIL;
    otherwise a 1x1 conv-BN projection (option B), as in the ResNet-18 of GEM and DER."""

    def __init__(self, in_planes: int, planes: int, stride: int, zero_pad_shortcut: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride, self.extra_channels = stride, planes - in_planes
        self.zero_pad_shortcut = zero_pad_shortcut
        self.activate = True  # False: the block returns its residual sum without the ReLU
        self.projection = None
        if not zero_pad_shortcut and (stride != 1 or in_planes != planes):
            self.projection = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def shortcut(self, x: Tensor) -> Tensor:
        if self.projection is not None:
            return self.projection(x)
        if self.zero_pad_shortcut and (self.stride != 1 or self.extra_channels):
            x = x[:, :, :: self.stride, :: self.stride]
            return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))
        return x

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out)) + self.shortcut(x)
        return F.relu(out) if self.activate else out


STEMS = ("cifar", "imagenet")


def stem(kind: str, in_channels: int, width: int) -> nn.Sequential:
    """cifar: 3x3 stride-1 conv-BN-ReLU, for 32x32 inputs; imagenet: 7x7 stride-2 conv-BN-ReLU and a 3x3
    stride-2 max-pool (He et al. 2016, table 1; torchvision's resnet18), for 224x224 inputs."""
    if kind not in STEMS:
        raise ValueError(f"stem must be one of {', '.join(STEMS)}, got {kind!r}")
    if kind == "cifar":
        return nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 7, 2, 3, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, 1),
    )


class _ResNet(nn.Module):
    """A stem, stages of basic blocks, global average pooling. A `Backbone`: each stage ends at its last
    block."""

    def __init__(
        self,
        in_channels: int,
        widths: list[int],
        blocks: list[int],
        zero_pad_shortcut: bool,
        stem_kind: str = "cifar",
    ):
        super().__init__()
        self.stem = stem(stem_kind, in_channels, widths[0])
        stages, in_planes = [], widths[0]
        for i, (planes, n_blocks) in enumerate(zip(widths, blocks, strict=True)):
            for j in range(n_blocks):
                stride = 2 if i > 0 and j == 0 else 1
                stages.append(BasicBlock(in_planes, planes, stride, zero_pad_shortcut))
                in_planes = planes
        self.stages = nn.Sequential(*stages)
        self.feature_dim = in_planes
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(self.stages(self.stem(x)), 1), 1)

    def embedding_before_activation(self, x: Tensor) -> Tensor:
        """The embedding as a cosine classifier takes it (LUCIR's and PODNet's code drop the network's last
        ReLU): the average-pooled residual sum of the last block, before its ReLU. One forward pass with
        that ReLU left out, so forward hooks fire as in `forward` (the last block's output is the sum)."""
        last = self.stages[-1]
        last.activate = False
        try:
            return self(x)
        finally:
            last.activate = True

    def stage_modules(self) -> list[nn.Module]:
        blocks = list(self.stages)  # a stage ends where the next block halves the resolution, or at the end
        return [b for i, b in enumerate(blocks) if i + 1 == len(blocks) or blocks[i + 1].stride == 2]


class ResNet18(_ResNet):
    """ResNet-18: four stages of two basic blocks with widths w, 2w, 4w, 8w and 1x1 projection shortcuts.
    stem "cifar" (default): for 32x32 inputs as in GEM and DER (Buzzega et al. 2020), 3x3 stride-1 stem and no
    max-pool (w=64; GEM's reduced variant uses w=20). stem "imagenet": He et al.'s 7x7 stride-2 stem and
    max-pool, the network LUCIR, PODNet and PyCIL train on ImageNet (torchvision's resnet18 without its
    classifier)."""

    def __init__(self, input_shape, width: int = 64, stem: str = "cifar"):
        widths = [width, 2 * width, 4 * width, 8 * width]
        super().__init__(input_shape[0], widths, [2, 2, 2, 2], False, stem)


class ResNet32(_ResNet):
    """ResNet-32 for CIFAR (He et al. 2016, section 4.2; iCaRL, PyCIL): three stages of five basic blocks
    with widths 16, 32, 64 and parameter-free (option A) shortcuts; 64 features."""

    def __init__(self, input_shape, width: int = 16):
        super().__init__(input_shape[0], [width, 2 * width, 4 * width], [5, 5, 5], True)
