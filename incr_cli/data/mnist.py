"""MNIST (LeCun et al. 1998) and Fashion-MNIST (Xiao et al. 2017): four IDX files each, plain or gzipped, read
from data.root (flat, or in torchvision's layout) or, for Fashion-MNIST, from Debian's package folder."""

from __future__ import annotations

import gzip
import hashlib
from functools import partial
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from incr_cli.data.source import Source
from incr_cli.errors import ConfigError

# Debian's dataset-fashion-mnist installs the four original .gz files here (recompressed, so torchvision's
# checksums do not match them and its download=True would go to the network instead).
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


def _check(name: str, dataset: DictConfig, data: DictConfig) -> None:
    """Fails with a message that says how to get the files (data.download=true fetches them when loading)."""
    root = Path(data.root).expanduser()
    if not data.download and _idx_folder(name, root) is None:
        extra = " or `apt-get install dataset-fashion-mnist`" if name == "fashion_mnist" else ""
        raise ConfigError(
            f"{name} files not found under data.root={root}; add data.download=true, "
            f"point data.root=... at a folder that has them{extra}"
        )


def _load(name: str, dataset: DictConfig, data: DictConfig) -> Source:
    _check(name, dataset, data)
    return _mnist_family(name, Path(data.root).expanduser(), data.download)


# What configs/dataset/{mnist,fashion_mnist}.yaml name: loader._target_ and loader.check, (dataset, data).
load_mnist, check_mnist = partial(_load, "mnist"), partial(_check, "mnist")
load_fashion_mnist, check_fashion_mnist = partial(_load, "fashion_mnist"), partial(_check, "fashion_mnist")


def _idx_folder(name: str, root: Path) -> Path | None:
    """The folder holding the four IDX files (plain or .gz): flat in root, torchvision's layout, or Debian's."""
    torchvision_folder = "FashionMNIST" if name == "fashion_mnist" else "MNIST"
    candidates = [root, root / torchvision_folder / "raw"]
    if name == "fashion_mnist":
        candidates.append(DEBIAN_FASHION_MNIST)
    for folder in candidates:
        if all(_find_idx(folder, f) is not None for pair in IDX_FILES.values() for f in pair):
            return folder
    return None


def _find_idx(folder: Path, stem: str) -> Path | None:
    for path in (folder / stem, folder / f"{stem}.gz"):
        if path.is_file():
            return path
    return None


def _mnist_family(name: str, root: Path, download: bool) -> Source:
    folder = _idx_folder(name, root)
    if folder is None and download:
        from torchvision.datasets import MNIST, FashionMNIST

        dataset_class = FashionMNIST if name == "fashion_mnist" else MNIST
        for train in (True, False):
            dataset_class(str(root), train=train, download=True)
        folder = _idx_folder(name, root)
    files = [_find_idx(folder, f) for pair in IDX_FILES.values() for f in pair]
    names = FASHION_CLASSES if name == "fashion_mnist" else [str(c) for c in range(10)]
    cache = _cache_path(root, name, files)
    if cache is not None and cache.is_file():
        try:
            tensors = torch.load(cache, weights_only=True)
            return Source(*(tensors[k] for k in ("train_x", "train_y", "test_x", "test_y")), names)
        except Exception:  # a damaged cache is rebuilt from the files
            pass
    train_x, train_y, test_x, test_y = (torch.from_numpy(read_idx(path)) for path in files)
    source = Source(train_x[:, None], train_y.long(), test_x[:, None], test_y.long(), names)
    if cache is not None:
        _write_cache(cache, source)
    return source


def _cache_path(root: Path, name: str, files: list[Path]) -> Path | None:
    """Decoded tensors are cached next to the data, keyed by the source files' paths, sizes and times,
    so the gzip decoding (a second for Fashion-MNIST) happens once."""
    key = hashlib.sha256(
        "|".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files).encode()
    ).hexdigest()[:16]
    return root / ".incr-cache" / f"{name}-{key}.pt"


def _write_cache(path: Path, source: Source) -> None:
    from incr_cli.files import atomic_write

    tensors = {
        "train_x": source.train_x,
        "train_y": source.train_y,
        "test_x": source.test_x,
        "test_y": source.test_y,
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda handle: torch.save(tensors, handle))
    except OSError:  # a read-only data folder only costs the decoding next time
        pass


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (LeCun's MNIST format), plain or gzipped: big-endian header, then uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (EOFError, OSError) as error:  # a download cut short, or not gzip at all
        raise ConfigError(f"{path} cannot be read ({error}); delete it and fetch it again") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ConfigError(f"{path} is not a uint8 IDX file")
    n_dims = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(n_dims))
    offset = 4 + 4 * n_dims
    data = np.frombuffer(raw, dtype=np.uint8, offset=offset)
    if data.size != int(np.prod(shape)):
        raise ConfigError(f"{path} is truncated: expected {int(np.prod(shape))} values, found {data.size}")
    return data.reshape(shape).copy()
