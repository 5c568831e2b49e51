"""What every loader returns: a data set as stored, uint8 images [N, C, H, W] and int64 labels, one train and
one test split."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class Source:
    """A data set as it is stored: uint8 pixels with `max_value` as full intensity."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    class_names: list[str]
    max_value: int = 255
    # dataset.domains=folders: the domain (sub-folder) of each sample, which becomes its task
    train_domain: torch.Tensor | None = None
    test_domain: torch.Tensor | None = None
    # "train_x" / "test_x" -> the .npy file that tensor maps, for a memory-mapped cache (read by streamed.py)
    files: dict[str, Path] = field(default_factory=dict)
