"""A folder of the user's own images, one sub-folder per class -> the same uint8 Source as the built-in data
sets: resized and converted once, then cached on disk so that the next run starts without decoding."""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, ListConfig

from incr_cli.data.source import Source
from incr_cli.errors import ConfigError

log = logging.getLogger("incr")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
BAD_FILE_ACTIONS = ("skip", "stop")
FITS = ("stretch", "center_crop")  # dataset.fit: aspect ratio given up, or kept with the centre cut out
CHANNEL_MODES = {1: "L", 3: "RGB"}
SPLIT_SEED = 0  # the test_fraction hold-out never depends on the run's seed (as the digits split)
RESAMPLING = (
    "bilinear"  # Pillow's, which widens its filter when shrinking (antialiased, like torchvision's Resize)
)
CACHE_VERSION = 2  # bump when decoding changes, so that older caches are not reused

decoded_files = 0  # image files this process has decoded; a load served from the cache adds none


@dataclass
class Listing:
    """What the folder holds, found without decoding anything."""

    root: Path
    layout: str  # "train/test": the folder's own split; "one tree": test_fraction of each class is held out
    classes: list[str]  # class folders with images, sorted: label i is classes[i]
    files: dict[str, list[list[Path]]]  # "train" and "test" (or "all") -> per label, its image files, sorted
    left_out: list[str]  # one line per class folder without usable images, saying why
    ignored: list[Path]  # files that are not images by their suffix

    @property
    def n_images(self) -> int:
        return sum(len(f) for per_class in self.files.values() for f in per_class)


Lister = Callable[[Path], Listing]  # a data set's layout under its folder -> what it holds


@dataclass
class FolderPlan:
    """The checked settings of `dataset=image_folder` and the folder's listing."""

    listing: Listing
    size: tuple[int, int]  # (height, width) of every decoded image
    resize: bool  # False: image_size=null, every file must already be `size`
    channels: int
    test_fraction: float
    on_bad_file: str
    fit: str = "stretch"  # stretch | center_crop: how a file of another aspect ratio becomes `size` (FITS)


def load_images(dataset: DictConfig, data: DictConfig) -> Source:
    """`dataset=image_folder`'s loader: one folder, or with dataset.domains=folders one folder per domain."""
    if dataset.get("domains") == "folders":
        return load_folder_domains(dataset, data)
    return load_image_folder(dataset, data)


def check_images(dataset: DictConfig, data: DictConfig) -> None:
    """`dataset=image_folder`'s check: the folder (or each domain folder) listed, decoding nothing; fills in
    dataset.num_classes and dataset.input_shape."""
    if dataset.get("domains") == "folders":
        check_folder_domains(dataset)
    else:
        check_image_folder(dataset)


def check_image_folder(dataset: DictConfig, lister: Lister | None = None) -> FolderPlan:
    """List the folder (decoding nothing) and fill dataset.num_classes and dataset.input_shape where they are
    null, or check them against the folder; raises ConfigError for a folder that cannot be trained on.
    `lister`: a data set's own layout (ImageNet's val/, Tiny-ImageNet's annotation file, CORe50's sessions)
    instead of image_folder's class folders."""
    root = _root(dataset.get("folder"))
    size = _image_size(dataset.get("image_size"))
    channels = dataset.get("channels")
    if channels not in CHANNEL_MODES:
        raise ConfigError(f"dataset.channels={channels} is not valid; choose 1 (grayscale) or 3 (RGB)")
    on_bad_file = dataset.get("on_bad_file")
    if on_bad_file not in BAD_FILE_ACTIONS:
        raise ConfigError(f"dataset.on_bad_file={on_bad_file} is not valid; choose one of: skip, stop")
    test_fraction = dataset.get("test_fraction")
    if test_fraction is None or not 0.0 <= test_fraction < 1.0:
        raise ConfigError(f"dataset.test_fraction={test_fraction} must be in [0, 1)")
    threshold = dataset.get("memory_map_gb")
    if threshold is not None and not threshold >= 0:
        raise ConfigError(
            f"dataset.memory_map_gb={threshold} must be 0 or more, or null to keep images in memory"
        )
    fit = dataset.get("fit", "stretch")
    if fit not in FITS:
        raise ConfigError(f"dataset.fit={fit} is not valid; choose one of: {', '.join(FITS)}")
    limit = dataset.get("max_decoded_gb")
    if limit is not None and not limit > 0:
        raise ConfigError(f"dataset.max_decoded_gb={limit} must be positive, or null for no limit")

    listing = lister(root) if lister is not None else list_folder(root, test_fraction)
    if listing.left_out and on_bad_file == "stop":
        raise ConfigError(
            f"class folder {listing.left_out[0]} (dataset.on_bad_file=stop); add images, remove "
            "the folder, or set dataset.on_bad_file=skip to leave the class out"
        )
    plan = FolderPlan(
        listing, size or _first_size(listing), size is not None, channels, test_fraction, on_bad_file, fit
    )

    shape = [channels, *plan.size]
    n_classes = len(listing.classes)
    if dataset.num_classes is None:
        dataset.num_classes = n_classes
    elif dataset.num_classes != n_classes:
        shown = ", ".join(listing.classes[:8]) + (", ..." if n_classes > 8 else "")
        raise ConfigError(
            f"dataset.num_classes={dataset.num_classes} but {root} has {n_classes} class folders "
            f"with images ({shown}); set dataset.num_classes={n_classes}, or null to count them"
        )
    if dataset.input_shape is None:
        dataset.input_shape = shape
    elif list(dataset.input_shape) != shape:
        raise ConfigError(
            f"dataset.input_shape={list(dataset.input_shape)} does not match dataset.channels="
            f"{channels} and images of {plan.size[0]}x{plan.size[1]}; set dataset.input_shape=null"
        )
    decoded = listing.n_images * math.prod(shape)
    if limit is not None and decoded > limit * 1e9:
        raise ConfigError(
            f"{root} decodes to {decoded / 1e9:.2f} GB ({listing.n_images} images of {'x'.join(map(str, shape))}), "
            f"over dataset.max_decoded_gb={limit}; lower dataset.image_size, or raise the limit if the disk is "
            "there (above dataset.memory_map_gb the decoded images stay on disk, memory-mapped)"
        )
    return plan


def domain_folders(dataset: DictConfig) -> list[Path]:
    """dataset.domains=folders: FOLDER/<domain>/ (each laid out as an image folder), in name order."""
    root = _root(dataset.get("folder"))
    domains = sorted(p for p in root.iterdir() if p.is_dir())
    if len(domains) != dataset.n_tasks:
        names = ", ".join(p.name for p in domains) or "none"
        raise ConfigError(
            f"dataset.domains=folders: {root} has {len(domains)} domain folders ({names}) for "
            f"dataset.n_tasks={dataset.n_tasks}; one folder per task"
        )
    return domains


def _domain(dataset: DictConfig, folder: Path) -> DictConfig:
    one = dataset.copy()
    one.folder = str(folder)
    return one


def check_folder_domains(dataset: DictConfig) -> None:
    """Each domain folder checked as an image folder; all must have the same classes. Fills
    dataset.num_classes and dataset.input_shape as check_image_folder does for one folder."""
    checked = []
    for folder in domain_folders(dataset):
        one = _domain(dataset, folder)
        classes = check_image_folder(one).listing.classes
        if checked and classes != checked[0][1]:
            raise ConfigError(
                f"domain folder {folder} has classes {', '.join(classes)}; every domain needs "
                f"those of {checked[0][0]}: {', '.join(checked[0][1])}"
            )
        checked.append((folder, classes))
    dataset.num_classes, dataset.input_shape = one.num_classes, one.input_shape


def load_folder_domains(dataset: DictConfig, data: DictConfig) -> Source:
    """Each domain folder loaded as an image folder (cached alike); the domain of a sample is its task. A null
    dataset.mean or std is computed over the training images of every domain together."""
    loaded = [_load(_domain(dataset, folder), data) for folder in domain_folders(dataset)]
    parts = [source for source, _ in loaded]
    fill_normalization(dataset, add_pixel_sums([sums for _, sums in loaded]))
    train_domain = torch.cat([torch.full((len(p.train_y),), k) for k, p in enumerate(parts)])
    test_domain = torch.cat([torch.full((len(p.test_y),), k) for k, p in enumerate(parts)])
    return Source(
        torch.cat([p.train_x for p in parts]),
        torch.cat([p.train_y for p in parts]),
        torch.cat([p.test_x for p in parts]),
        torch.cat([p.test_y for p in parts]),
        parts[0].class_names,
        train_domain=train_domain,
        test_domain=test_domain,
    )


def load_image_folder(dataset: DictConfig, data: DictConfig, lister: Lister | None = None) -> Source:
    """The folder's images as uint8 [N, C, H, W] and int64 labels, from the cache when the files are unchanged.
    A null dataset.mean or std is filled in with the training images' own (`fill_normalization`).

    Above dataset.memory_map_gb of decoded pixels, the images are decoded straight into .npy files beside the
    cache and memory-mapped: a batch, a memory update or an evaluation reads only its rows from disk, through
    the same index slices as the in-memory path, so a folder larger than the RAM trains on the CPU."""
    source, sums = _load(dataset, data, lister)
    fill_normalization(dataset, sums)
    return source


def _load(dataset: DictConfig, data: DictConfig, lister: Lister | None = None) -> tuple[Source, dict]:
    """The folder as a Source, and the per-channel pixel sums of its training images (cached with them)."""
    plan = check_image_folder(dataset, lister)
    listing = plan.listing
    cache = _cache_path(Path(str(data.root)).expanduser(), plan)
    threshold = dataset.get("memory_map_gb")
    decoded_bytes = listing.n_images * plan.channels * plan.size[0] * plan.size[1]
    mapped = threshold is not None and decoded_bytes > threshold * 1e9
    state = _read_cache(cache)
    if state is None:
        state = _decode(plan, cache if mapped else None)
        where = f"decoded; cached in {cache}"
    else:
        where = f"read from the cache {cache}"
    stored = state  # as the cache holds it: memory-mapped splits by their .npy file names
    files = {}
    if isinstance(state["train_x"], str):
        files = {k: cache.parent / state[k] for k in ("train_x", "test_x")}
        state = {**state, **{k: _mapped(path) for k, path in files.items()}}
        where += " (memory-mapped from disk)"
    if "pixel_sums" not in state:  # once per cache: after decoding, or added to a cache written without them
        state["pixel_sums"] = stored["pixel_sums"] = pixel_sums(state["train_x"])
        _write_cache(cache, stored)
    skipped = state["skipped"]
    if skipped and plan.on_bad_file == "stop":  # a cache written by an earlier run with on_bad_file=skip
        raise _unreadable(listing.root / skipped[0][0], skipped[0][1])
    _log_report(plan, state, where)
    source = Source(
        state["train_x"],
        state["train_y"],
        state["test_x"],
        state["test_y"],
        list(listing.classes),
        files=files,
    )
    return source, state["pixel_sums"]


# ------------------------------------------------------------------------------------------------ listing
def list_folder(root: Path, test_fraction: float) -> Listing:
    has_train, has_test = (root / "train").is_dir(), (root / "test").is_dir()
    if has_train != has_test:
        have, missing = ("train", "test") if has_train else ("test", "train")
        raise ConfigError(
            f"{root} has {have}/ but no {missing}/: give both train/<class>/ and test/<class>/, or put "
            f"the class folders directly in {root} and let dataset.test_fraction split them"
        )
    if has_train:
        return list_split_folders(root, "train", "test")
    if test_fraction == 0:
        raise ConfigError(
            f"{root} has no train/ and test/ folders and dataset.test_fraction=0 holds out no "
            "test images; set dataset.test_fraction (e.g. 0.2) or split the folder into train/ and test/"
        )
    ignored: list[Path] = []
    per_class = _class_files(root, ignored)
    classes, left_out = [], []
    for name in sorted(per_class):
        count = len(per_class[name])
        if count >= 2:
            classes.append(name)
        else:
            left_out.append(
                f"{root / name} has {'no images' if count == 0 else 'one image'} "
                "(a class needs two: one to train on, one to test)"
            )
    _require_classes(root, classes)
    return Listing(
        root, "one tree", classes, {"all": [per_class[name] for name in classes]}, left_out, ignored
    )


def list_split_folders(root: Path, train: str, test: str) -> Listing:
    """root/<train>/<class>/ and root/<test>/<class>/ (image_folder's train/ and test/, ImageNet's train/ and
    val/): a class needs images in both; the listing names the two splits train and test."""
    ignored: list[Path] = []
    splits = {split: _class_files(root / split, ignored) for split in (train, test)}
    ignored.extend(p for p in sorted(root.iterdir()) if p.name not in (train, test) and p.is_file())
    classes, left_out = [], []
    for name in sorted(set(splits[train]) | set(splits[test])):
        empty = [split for split in (train, test) if not splits[split].get(name)]
        if empty:
            left_out.append(
                f"{root / empty[0] / name} has no images (a class needs both {train} and {test} images)"
            )
        else:
            classes.append(name)
    _require_classes(root, classes)
    files = {
        "train": [splits[train][name] for name in classes],
        "test": [splits[test][name] for name in classes],
    }
    return Listing(root, "train/test", classes, files, left_out, ignored)


def _require_classes(root: Path, classes: list[str]) -> None:
    if not classes:
        raise ConfigError(
            f"found no class folder with images in {root}; expected {root}/<class>/*.png (or "
            f"{', '.join(IMAGE_SUFFIXES[1:])}), or {root}/train/<class>/ and {root}/test/<class>/"
        )


def _class_files(folder: Path, ignored: list[Path]) -> dict[str, list[Path]]:
    """Each sub-folder is a class; its image files are taken from any depth below it."""
    classes: dict[str, list[Path]] = {}
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):  # .DS_Store, .incr-cache, .git: never a class
            continue
        if not entry.is_dir():
            ignored.append(entry)
            continue
        images = classes.setdefault(entry.name, [])
        for path in sorted(entry.rglob("*")):
            if not path.is_file():
                continue
            # "._name.jpg" is macOS's resource fork beside a copied image, not an image
            if path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith("."):
                images.append(path)
            else:
                ignored.append(path)
    return classes


def _root(folder) -> Path:
    if folder is None or str(folder) == "":
        raise ConfigError(
            "dataset=image_folder needs dataset.folder=<a folder with one sub-folder of images per "
            "class, or train/ and test/ folders of such sub-folders>"
        )
    root = Path(str(folder)).expanduser()
    if not root.is_dir():
        why = "is not a folder" if root.exists() else "does not exist"
        raise ConfigError(f"dataset.folder={folder} {why}")
    return root.resolve()


def _image_size(value) -> tuple[int, int] | None:
    sides = None
    if isinstance(value, int) and not isinstance(value, bool):
        sides = (value, value)
    elif isinstance(value, (list, tuple, ListConfig)) and len(value) == 2:
        sides = tuple(value)
    if value is None:
        return None
    if sides is None or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sides):
        raise ConfigError(
            f"dataset.image_size={value} must be a positive side (e.g. 32), [height, width], or "
            "null to keep the files' own size"
        )
    return int(sides[0]), int(sides[1])


def _first_size(listing: Listing) -> tuple[int, int]:
    """image_size=null: the size of the first file that opens (every other file must match it)."""
    from PIL import Image

    for per_class in listing.files.values():
        for paths in per_class:
            for path in paths:
                try:
                    with Image.open(path) as image:
                        width, height = _oriented_size(image)
                    return height, width
                except Exception:  # an unreadable file is reported when decoding
                    continue
    raise ConfigError(f"no image in {listing.root} can be read")


def _oriented_size(image) -> tuple[int, int]:
    """(width, height) after the EXIF orientation is applied (a camera's portrait photo is stored sideways)."""
    orientation = image.getexif().get(0x0112, 1)
    width, height = image.size
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


# ------------------------------------------------------------------------------------------------ decoding
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # Pillow's modes of 16-bit grayscale files
SIXTEEN_TO_EIGHT = 257  # 65535 / 255: a 16-bit value k * 257 is the 8-bit value k


class UnreadableImage(ValueError):
    """A file that Pillow cannot decode; the message is the reason, one line."""


def open_image(path: Path, channels: int):
    """A file as a Pillow image of `channels` (1: "L", 3: "RGB") 8-bit channels, turned by its EXIF orientation.

    The one decoding of image files: `dataset=image_folder` trains on it and `incr predict` and `incr eval`
    read with it, so a file gives the same pixels everywhere. Pillow alone would saturate 16-bit grayscale
    (its conversion to "L" clips at 255, so a dark 16-bit image turns white): it is scaled to 8 bits instead.
    Palette images go through their colours (with alpha where the palette has transparency); alpha is then
    dropped."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as stored:
            image = ImageOps.exif_transpose(stored)
            image.load()
    except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError... for broken files
        reason = str(error).splitlines()[0] if str(error) else "unreadable"
        raise UnreadableImage(f"{type(error).__name__}: {reason}") from None
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.int64)
        eight = np.clip((values + SIXTEEN_TO_EIGHT // 2) // SIXTEEN_TO_EIGHT, 0, 255).astype(np.uint8)
        image = Image.fromarray(eight, "L")
    elif image.mode in ("P", "PA"):
        image = image.convert("RGBA" if image.mode == "PA" or "transparency" in image.info else "RGB")
    return image.convert(CHANNEL_MODES[channels])


def image_pixels(image, size: tuple[int, int], fit: str = "stretch") -> np.ndarray:
    """An image from `open_image` as uint8 [C, H, W], resized to `size` (height, width) with Pillow's bilinear
    filter (antialiased when shrinking) unless it has that size already. fit="center_crop" keeps the aspect
    ratio: the largest centred window of the target's shape is resized (for a square target, the short side
    becomes `size` and the centre is cut out, as ImageNet's Resize(256) + CenterCrop(256))."""
    from PIL import Image

    if image.size != (size[1], size[0]):
        box = None
        if fit == "center_crop":
            width, height = image.size
            scale = min(width / size[1], height / size[0])  # source pixels per target pixel
            box_w, box_h = size[1] * scale, size[0] * scale
            left, top = (width - box_w) / 2, (height - box_h) / 2
            box = (left, top, left + box_w, top + box_h)
        image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR, box=box)
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def _decode(plan: FolderPlan, mapped_cache: Path | None = None) -> dict:
    """Decode every listed file into one preallocated array; threads, since Pillow releases the GIL while it
    decodes and resizes. With `mapped_cache`, the array is a file on disk and the train and test splits are
    written to .npy files named in the returned state instead of held in memory."""
    global decoded_files

    listing = plan.listing
    entries = [
        (split, label, path)
        for split, per_class in listing.files.items()
        for label, paths in enumerate(per_class)
        for path in paths
    ]
    height, width = plan.size
    shape = (len(entries), plan.channels, height, width)
    if mapped_cache is None:
        pixels = np.empty(shape, dtype=np.uint8)
    else:
        mapped_cache.parent.mkdir(parents=True, exist_ok=True)
        scratch = mapped_cache.with_suffix(".decoding.npy")
        pixels = np.lib.format.open_memmap(scratch, mode="w+", dtype=np.uint8, shape=shape)

    def decode(row: int) -> tuple[int, int] | str:
        """The file's (width, height) as stored, or why it cannot be read."""
        try:
            image = open_image(entries[row][2], plan.channels)
        except UnreadableImage as error:
            return str(error)
        native = image.size
        if native != (width, height) and not plan.resize:
            return native
        pixels[row] = image_pixels(image, (height, width), plan.fit)
        return native

    workers = min(16, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(decode, range(len(entries))))
    decoded_files += len(entries)

    skipped, sizes, good = [], Counter(), np.ones(len(entries), dtype=bool)
    for row, result in enumerate(results):
        path = entries[row][2]
        if isinstance(result, str):
            if plan.on_bad_file == "stop":
                raise _unreadable(path, result)
            skipped.append([str(path.relative_to(listing.root)), result])
            good[row] = False
            continue
        sizes[result] += 1
        if not plan.resize and result != (width, height):
            first = next(entries[r][2] for r, s in enumerate(results) if s == (width, height))
            raise ConfigError(
                f"images differ in size: {first} is {height}x{width}, {path} is {result[1]}x{result[0]}; "
                "set dataset.image_size=<side> or [height, width] to resize them all"
            )

    labels = np.array([label for _, label, _ in entries], dtype=np.int64)
    splits = np.array([split for split, _, _ in entries])
    if listing.layout == "train/test":
        train_rows, test_rows = (
            np.flatnonzero(good & (splits == "train")),
            np.flatnonzero(good & (splits == "test")),
        )
    else:
        train_rows, test_rows = _hold_out(labels, good, plan.test_fraction)
    for label, name in enumerate(listing.classes):
        for split, rows in (("training", train_rows), ("test", test_rows)):
            if not (labels[rows] == label).any():
                raise ConfigError(
                    f"class '{name}' has no readable {split} image left after skipping unreadable "
                    "files (named in the log); fix or remove them, or remove the class folder"
                )
    if mapped_cache is None:
        train_x, test_x = torch.from_numpy(pixels[train_rows]), torch.from_numpy(pixels[test_rows])
    else:
        train_x = _write_rows(pixels, train_rows, mapped_cache.with_suffix(".train.npy"))
        test_x = _write_rows(pixels, test_rows, mapped_cache.with_suffix(".test.npy"))
        del pixels
        scratch.unlink(missing_ok=True)
    return {
        "train_x": train_x,
        "train_y": torch.from_numpy(labels[train_rows]),
        "test_x": test_x,
        "test_y": torch.from_numpy(labels[test_rows]),
        "skipped": skipped,
        "sizes": [[h, w, n] for (w, h), n in sorted(sizes.items(), key=lambda item: -item[1])],
    }


def _write_rows(pixels: np.ndarray, rows: np.ndarray, path: Path, chunk: int = 4096) -> str:
    """pixels[rows] into the .npy file `path`, a chunk at a time (never the whole split in memory); written
    under a temporary name and renamed, so that a cache never names a torn file. Returns the file's name."""
    partial = path.with_suffix(".partial.npy")
    out = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=(len(rows), *pixels.shape[1:]))
    for first in range(0, len(rows), chunk):
        out[first : first + chunk] = pixels[rows[first : first + chunk]]
    out.flush()
    del out
    os.replace(partial, path)
    return path.name


def _mapped(path: Path) -> torch.Tensor:
    """A uint8 tensor over the .npy file's pages: rows are read from disk when indexed. Copy-on-write, so the
    file is never changed."""
    return torch.from_numpy(np.load(path, mmap_mode="c"))


def _hold_out(labels: np.ndarray, good: np.ndarray, test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Per class, a seeded random test_fraction of its readable images (at least one, never all) is the test set."""
    generator = torch.Generator().manual_seed(SPLIT_SEED)
    train, test = [], []
    for label in range(int(labels.max()) + 1):
        members = np.flatnonzero(good & (labels == label))
        members = members[torch.randperm(len(members), generator=generator).numpy()]
        n_test = min(len(members) - 1, max(1, round(test_fraction * len(members))))
        test.append(np.sort(members[:n_test]))
        train.append(np.sort(members[n_test:]))
    return np.concatenate(train), np.concatenate(test)


def _unreadable(path: Path, reason: str) -> ConfigError:
    return ConfigError(
        f"{path} cannot be read as an image ({reason}); fix or remove it, or set "
        "dataset.on_bad_file=skip to leave it out"
    )


# ------------------------------------------------------------------------------------------------ normalisation
def pixel_sums(images: torch.Tensor | np.ndarray, chunk_bytes: int = 1 << 25) -> dict:
    """The number of uint8 images [N, C, H, W], and per channel the number of pixels, their sum and their sum
    of squares.
    Integers, so exact at any size; read a chunk of rows at a time, so that a memory-mapped split larger than
    the RAM is never held whole."""
    array = images.numpy() if isinstance(images, torch.Tensor) else images
    n, channels = array.shape[:2]
    rows = max(1, chunk_bytes // max(1, math.prod(array.shape[1:])))
    total, squares = np.zeros(channels, dtype=np.int64), np.zeros(channels, dtype=np.int64)
    for first in range(0, n, rows):
        block = np.asarray(array[first : first + rows], dtype=np.uint16)
        total += block.sum(axis=(0, 2, 3), dtype=np.int64)
        squares += (block * block).sum(axis=(0, 2, 3), dtype=np.int64)  # 255 ** 2 fits in 16 bits
    return {
        "images": n,
        "count": n * math.prod(array.shape[2:]),
        "sum": total.tolist(),
        "sum_squares": squares.tolist(),
    }


def add_pixel_sums(parts: list[dict]) -> dict:
    """The sums of several folders' training images together (dataset.domains=folders)."""
    return {
        "images": sum(p["images"] for p in parts),
        "count": sum(p["count"] for p in parts),
        "sum": [sum(values) for values in zip(*(p["sum"] for p in parts), strict=True)],
        "sum_squares": [sum(values) for values in zip(*(p["sum_squares"] for p in parts), strict=True)],
    }


def channel_mean_std(sums: dict, max_value: int = 255) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) standard deviation of the pixels scaled to [0, 1], as the
    preprocessing scales them before normalising. The variance is formed in integers: no cancellation."""
    count = sums["count"]
    mean = [total / count / max_value for total in sums["sum"]]
    std = [
        math.sqrt(count * squares - total * total) / count / max_value
        for total, squares in zip(sums["sum"], sums["sum_squares"], strict=True)
    ]
    return mean, std


def fill_normalization(dataset: DictConfig, sums: dict) -> None:
    """dataset.mean and dataset.std left null are set to the training images' per-channel values; given ones
    are kept. Written into the config, so the run's checkpoint carries them to `incr eval` and `incr predict`.
    A channel whose pixels are all equal has no spread to divide by: its std is 1."""
    if dataset.get("mean") is not None and dataset.get("std") is not None:
        return
    mean, std = channel_mean_std(sums)
    constant = [c for c, s in enumerate(std) if s == 0]
    std = [s or 1.0 for s in std]
    filled = [key for key in ("mean", "std") if dataset.get(key) is None]
    if "mean" in filled:
        dataset.mean = mean
    if "std" in filled:
        dataset.std = std
    if not dataset.get("normalize"):
        return
    log.info(
        "normalisation computed from the %d training images (dataset.%s=null): dataset.mean=[%s] "
        "dataset.std=[%s] (per channel, pixels in [0, 1])%s",
        sums["images"],
        "/".join(filled),
        ", ".join(f"{v:.4f}" for v in dataset.mean),
        ", ".join(f"{v:.4f}" for v in dataset.std),
        f"; channel(s) {constant} hold one value: std 1 there" if constant and "std" in filled else "",
    )


# ------------------------------------------------------------------------------------------------ cache
def _cache_path(data_root: Path, plan: FolderPlan) -> Path:
    """Keyed by every listed file's path, size and modification time and by the decoding settings: any change
    to the folder or the settings decodes afresh."""
    import PIL

    listing = plan.listing
    lines = [
        f"v{CACHE_VERSION}",
        f"pillow {PIL.__version__}",
        listing.layout,
        f"{plan.size} {plan.resize}" + ("" if plan.fit == "stretch" else f" {plan.fit}"),
        f"{plan.channels} {RESAMPLING}",
        f"{plan.test_fraction if listing.layout == 'one tree' else ''}",
    ]
    for split, per_class in listing.files.items():
        for name, paths in zip(listing.classes, per_class, strict=True):
            for path in paths:
                stat = path.stat()
                lines.append(
                    f"{split}|{name}|{path.relative_to(listing.root)}|{stat.st_size}|{stat.st_mtime_ns}"
                )
    key = hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]
    return data_root / ".incr-cache" / f"image_folder-{_folder_id(listing.root)}-{key}.pt"


def _folder_id(root: Path) -> str:
    return hashlib.sha256(str(root).encode()).hexdigest()[:12]


def _read_cache(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        state = torch.load(path, weights_only=True)
        named = [state.get(k) for k in ("train_x", "test_x") if isinstance(state.get(k), str)]
        if {"train_x", "train_y", "test_x", "test_y", "skipped", "sizes"} <= set(state) and all(
            (path.parent / name).is_file() for name in named
        ):
            return state
    except Exception:  # a damaged cache is rebuilt from the files
        pass
    log.info("the image cache %s cannot be read; decoding the folder again", path)
    return None


def _write_cache(path: Path, state: dict) -> None:
    from incr_cli.files import atomic_write

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda handle: torch.save(state, handle))
    except OSError as error:  # a read-only or full data.root only costs the decoding next time
        log.warning("the decoded images could not be cached in %s (%s)", path.parent, error)
        return
    # A folder's earlier caches describe files that have changed since: only the newest is kept.
    for older in path.parent.glob(f"image_folder-{path.name.split('-')[1]}-*"):
        if not older.name.startswith(path.stem):
            older.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------ report
def _log_report(plan: FolderPlan, state: dict, where: str) -> None:
    listing = plan.listing
    height, width = plan.size
    split = (
        "its train/ and test/ folders"
        if listing.layout == "train/test"
        else (f"test_fraction={plan.test_fraction} of each class held out, seed {SPLIT_SEED}")
    )
    log.info(
        "image folder %s: %d classes, %d training and %d test images (%s), %dx%d, %d channel(s); %s",
        listing.root,
        len(listing.classes),
        len(state["train_y"]),
        len(state["test_y"]),
        split,
        height,
        width,
        plan.channels,
        where,
    )
    sizes = state["sizes"]
    if len(sizes) > 1 or (sizes and (sizes[0][0], sizes[0][1]) != plan.size):
        shown = ", ".join(f"{h}x{w}: {n}" for h, w, n in sizes[:5]) + (", ..." if len(sizes) > 5 else "")
        log.info(
            "the images come in %d size(s) (%s); all resized to %dx%d (%s resampling, %s)",
            len(sizes),
            shown,
            height,
            width,
            RESAMPLING,
            "aspect ratio not kept" if plan.fit == "stretch" else "aspect ratio kept, centre cut out",
        )
    skipped = state["skipped"]
    if skipped:
        log.warning(
            "skipped %d unreadable image file(s) in %s (dataset.on_bad_file=skip):",
            len(skipped),
            listing.root,
        )
        for name, reason in skipped:
            log.warning("  skipped %s: %s", name, reason)
    if listing.left_out:
        log.warning(
            "left out %d class folder(s) without usable images (dataset.on_bad_file=skip):",
            len(listing.left_out),
        )
        for line in listing.left_out:
            log.warning("  left out class folder %s", line)
    if listing.ignored:
        names = [str(p.relative_to(listing.root)) for p in listing.ignored]
        log.info(
            "ignored %d file(s) that are not images (%s): %s",
            len(names),
            " ".join(IMAGE_SUFFIXES),
            ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else ""),
        )
