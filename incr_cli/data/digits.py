"""scikit-learn's bundled 8x8 digits (1,797 images, pixel values 0..16): runs offline, nothing to download."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from incr_cli.data.source import Source
from incr_cli.errors import ConfigError


def load_digits(dataset: DictConfig, data: DictConfig) -> Source:
    """Split 80/20, stratified by class, with a fixed seed (never the run's)."""
    # Read scikit-learn's bundled file directly: importing sklearn itself would cost a second of start-up.
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        raise ConfigError("the digits data set ships with scikit-learn: pip install scikit-learn")
    table = np.loadtxt(Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz", delimiter=",")
    images = torch.from_numpy(table[:, :-1].astype(np.uint8)).reshape(-1, 1, 8, 8)  # values 0..16
    labels = torch.from_numpy(table[:, -1].astype(np.int64))
    generator = torch.Generator().manual_seed(0)
    test = torch.zeros(len(labels), dtype=torch.bool)
    for label in range(10):
        members = torch.nonzero(labels == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        test[members[: round(0.2 * len(members))]] = True
    return Source(
        images[~test], labels[~test], images[test], labels[test], [str(c) for c in range(10)], max_value=16
    )
