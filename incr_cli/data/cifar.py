"""CIFAR-10 and CIFAR-100 (Krizhevsky 2009): the python-pickle releases, read from data.root."""

from __future__ import annotations

import pickle
from functools import partial
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from incr_cli.data.source import Source
from incr_cli.errors import ConfigError

CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


def _check(name: str, dataset: DictConfig, data: DictConfig) -> None:
    """Fails with a message that says how to get the files (data.download=true fetches them when loading)."""
    folder = Path(data.root).expanduser() / CIFAR_FOLDERS[name]
    if not data.download and not folder.is_dir():
        raise ConfigError(
            f"{name} not found: {folder} is missing; add data.download=true "
            "or point data.root=... at the folder that holds it"
        )


def _load(name: str, dataset: DictConfig, data: DictConfig) -> Source:
    _check(name, dataset, data)
    return _read(name, Path(data.root).expanduser())


# What configs/dataset/{cifar10,cifar100}.yaml name: loader._target_ and loader.check, (dataset, data).
load_cifar10, check_cifar10 = partial(_load, "cifar10"), partial(_check, "cifar10")
load_cifar100, check_cifar100 = partial(_load, "cifar100"), partial(_check, "cifar100")


def _read(name: str, root: Path) -> Source:
    # Read the python-pickle release directly: torchvision's CIFAR classes also verify the official
    # checksums, which would refuse any other well-formed copy (and our small test files).
    folder = root / CIFAR_FOLDERS[name]
    if not folder.is_dir():
        from torchvision.datasets import CIFAR10, CIFAR100

        dataset_class = CIFAR10 if name == "cifar10" else CIFAR100
        for train in (True, False):
            dataset_class(str(root), train=train, download=True)
    if name == "cifar10":
        train_files = [f"data_batch_{i}" for i in range(1, 6)]
        test_files, meta_file, names_key, label_key = ["test_batch"], "batches.meta", "label_names", "labels"
    else:
        train_files, test_files, meta_file, names_key, label_key = (
            ["train"],
            ["test"],
            "meta",
            "fine_label_names",
            "fine_labels",
        )

    def read(files: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for file in files:
            with open(folder / file, "rb") as handle:
                batch = pickle.load(handle, encoding="latin1")
            xs.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(batch[label_key], dtype=np.int64))
        return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))

    with open(folder / meta_file, "rb") as handle:
        names = list(pickle.load(handle, encoding="latin1")[names_key])
    return Source(*read(train_files), *read(test_files), names)
