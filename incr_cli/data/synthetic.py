"""Generated images, nothing read from disk: for throughput benchmarks (GPU throughput, ResNet-18 on
CIFAR-shaped data: docs/benchmarks.md) and tests."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from incr_cli.data.source import Source


def load_synthetic(dataset: DictConfig, data: DictConfig | None = None) -> Source:
    """Images of dataset.input_shape: each class a fixed random template, each image half its class's template
    and half uniform noise; dataset.train_per_class and test_per_class images per class. Seeded by
    dataset.generator_seed alone."""
    generator = torch.Generator().manual_seed(int(dataset.generator_seed or 0))
    shape = tuple(dataset.input_shape)
    templates = torch.randint(0, 256, (dataset.num_classes, *shape), generator=generator, dtype=torch.uint8)

    def split(per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(dataset.num_classes).repeat_interleave(per_class)
        noise = torch.randint(0, 256, (len(labels), *shape), generator=generator, dtype=torch.uint8)
        images = ((templates[labels].to(torch.int16) + noise) // 2).to(torch.uint8)
        return images, labels

    train_x, train_y = split(int(dataset.train_per_class))
    test_x, test_y = split(int(dataset.test_per_class))
    return Source(train_x, train_y, test_x, test_y, [f"class {c}" for c in range(dataset.num_classes)])
