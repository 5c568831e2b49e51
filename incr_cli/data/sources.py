"""Files on disk -> uint8 image tensors [N, C, H, W] and int64 labels, one train and one test split."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from incr_cli.errors import ConfigError

# Debian's dataset-fashion-mnist installs the four original .gz files here (recompressed, so torchvision's
# checksums do not match them and its download=True would go to the network instead).
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


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


def load_source(name: str, data: DictConfig, dataset: DictConfig | None = None) -> Source:
    if name == "image_folder":  # the user's own folder: its settings are in the dataset config
        if dataset is None:
            raise ConfigError(
                "dataset=image_folder needs the dataset config: load_source(name, data, dataset)"
            )
        from incr_cli.data.image_folder import load_folder_domains, load_image_folder

        if dataset.get("domains") == "folders":
            return load_folder_domains(dataset, data)
        return load_image_folder(dataset, data)
    if name == "synthetic":
        return synthetic(dataset)
    check_available(name, data)
    root = Path(data.root).expanduser()
    if name == "digits":
        return _digits()
    if name in ("mnist", "fashion_mnist"):
        return _mnist_family(name, root, data.download)
    if name in CIFAR_FOLDERS:
        return _cifar(name, root)
    raise ConfigError(
        f"dataset {name!r} has no loader; valid: digits, mnist, fashion_mnist, cifar10, cifar100, image_folder, "
        "synthetic"
    )


def check_available(name: str, data: DictConfig, dataset: DictConfig | None = None) -> None:
    """Fails with a message that says how to get the files, before anything is trained."""
    if name == "image_folder":  # listed (decoding nothing) and checked against the dataset config
        if dataset is not None:
            from incr_cli.data.image_folder import check_folder_domains, check_image_folder

            check_folder_domains(dataset) if dataset.get("domains") == "folders" else check_image_folder(
                dataset
            )
        return
    root = Path(data.root).expanduser()
    if name in ("digits", "synthetic") or data.download:
        return
    if name in ("mnist", "fashion_mnist"):
        if _idx_folder(name, root) is None:
            extra = " or `apt-get install dataset-fashion-mnist`" if name == "fashion_mnist" else ""
            raise ConfigError(
                f"{name} files not found under data.root={root}; add data.download=true, "
                f"point data.root=... at a folder that has them{extra}"
            )
    elif name in CIFAR_FOLDERS:
        if not (root / CIFAR_FOLDERS[name]).is_dir():
            raise ConfigError(
                f"{name} not found: {root / CIFAR_FOLDERS[name]} is missing; add data.download=true "
                "or point data.root=... at the folder that holds it"
            )


def _digits() -> Source:
    # Read scikit-learn's bundled file directly: importing sklearn itself would cost a second of start-up.
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        raise ConfigError("the digits data set ships with scikit-learn: pip install scikit-learn")
    table = np.loadtxt(Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz", delimiter=",")
    images = torch.from_numpy(table[:, :-1].astype(np.uint8)).reshape(-1, 1, 8, 8)  # values 0..16
    labels = torch.from_numpy(table[:, -1].astype(np.int64))
    # 80/20 split, stratified by class, fixed seed.
    generator = torch.Generator().manual_seed(0)
    test = torch.zeros(len(labels), dtype=torch.bool)
    for label in range(10):
        members = torch.nonzero(labels == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        test[members[: round(0.2 * len(members))]] = True
    return Source(
        images[~test], labels[~test], images[test], labels[test], [str(c) for c in range(10)], max_value=16
    )


def synthetic(dataset: DictConfig) -> Source:
    """Generated images of dataset.input_shape: each class a fixed random template, each image half its
    class's template and half uniform noise. For throughput benchmarks (GPU throughput, ResNet-18 on
    CIFAR-shaped data: docs/benchmarks.md) and tests; nothing is read from disk. Seeded by
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


def _cifar(name: str, root: Path) -> Source:
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
