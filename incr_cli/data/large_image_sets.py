"""ImageNet (ILSVRC-2012) and its 100-class subsets, Tiny-ImageNet and CORe50 read from their usual on-disk layouts under data.root (never
downloaded: their licences ask each user to fetch them). Each is listed here and then decoded, cached and
memory-mapped by the image-folder machinery (data/image_folder.py), so they share its cache, its check of
unreadable files and its memory map for data sets larger than the RAM."""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path

import torch
from omegaconf import DictConfig

from incr_cli.data import image_folder
from incr_cli.data.image_folder import IMAGE_SUFFIXES, Lister, Listing, list_split_folders
from incr_cli.data.imagenet_subsets import SUBSETS
from incr_cli.data.source import Source
from incr_cli.errors import ConfigError

# CORe50's NC, NI and NIC protocols train on eight of its eleven acquisition sessions and test on the other three
# (Lomonaco and Maltoni 2017, section 4).
CORE50_TRAIN_SESSIONS = (1, 2, 4, 5, 6, 8, 9, 11)
CORE50_TEST_SESSIONS = (3, 7, 10)


def _images(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )


def _folder(dataset: DictConfig, layout: str) -> None:
    """dataset.folder must exist; the message names the layout the data set's files come in."""
    folder = Path(str(dataset.folder)).expanduser()
    if not folder.is_dir():
        raise ConfigError(
            f"dataset.folder={dataset.folder} does not exist; {dataset.name} is read from {layout} there "
            "(set dataset.folder, or data.root to the folder that holds it)"
        )


def list_imagenet(root: Path) -> Listing:
    """ILSVRC-2012 as the usual preparation leaves it: train/<wnid>/*.JPEG and val/<wnid>/*.JPEG (the 50,000
    validation images sorted into class folders); label i is the i-th wnid in sorted order (torchvision's)."""
    if not (root / "train").is_dir() or not (root / "val").is_dir():
        raise ConfigError(
            f"{root} needs train/<wnid>/ and val/<wnid>/ folders (ILSVRC-2012, val sorted by class)"
        )
    return list_split_folders(root, "train", "val")


def list_imagenet_subset(subset: str, root: Path) -> Listing:
    """ImageNet's layout (`list_imagenet`) restricted to one of the pinned 100-class lists (imagenet_subsets.py);
    label i is the i-th wnid of the subset in sorted order, as both papers' loaders number them."""
    if subset not in SUBSETS:
        raise ConfigError(f"dataset.subset={subset} is not valid; choose one of: {', '.join(SUBSETS)}")
    whole = list_imagenet(root)
    wanted = sorted(SUBSETS[subset])
    position = {wnid: i for i, wnid in enumerate(whole.classes)}
    missing = [wnid for wnid in wanted if wnid not in position]
    if missing:
        raise ConfigError(
            f"{root} lacks {len(missing)} of the {len(wanted)} classes of dataset.subset={subset} (first: "
            f"train/{missing[0]}); give the full ILSVRC-2012 train/ and val/ folders, or a folder with these classes"
        )
    files = {split: [per_class[position[w]] for w in wanted] for split, per_class in whole.files.items()}
    return Listing(root, whole.layout, wanted, files, [], whole.ignored)


def list_tiny_imagenet(root: Path) -> Listing:
    """Tiny-ImageNet-200 as released: wnids.txt, train/<wnid>/images/*.JPEG, and val/images/*.JPEG named by
    val/val_annotations.txt (file, wnid, box per line); the validation set is the test set, as in Mammoth."""
    wnids_file, annotations = root / "wnids.txt", root / "val" / "val_annotations.txt"
    for needed in (wnids_file, annotations, root / "train"):
        if not needed.exists():
            raise ConfigError(f"{root} is not Tiny-ImageNet: {needed.relative_to(root)} is missing")
    classes = sorted(line.strip() for line in wnids_file.read_text().splitlines() if line.strip())
    label = {wnid: i for i, wnid in enumerate(classes)}
    train = [_images(root / "train" / wnid / "images") for wnid in classes]
    test: list[list[Path]] = [[] for _ in classes]
    for number, line in enumerate(annotations.read_text().splitlines(), 1):
        if not line.strip():
            continue
        name, wnid = line.split("\t")[:2]
        if wnid not in label:
            raise ConfigError(f"{annotations} line {number}: {wnid} is not in wnids.txt")
        test[label[wnid]].append(root / "val" / "images" / name)
    left_out = [
        f"{root / 'train' / c} has no images" for c, files in zip(classes, train, strict=True) if not files
    ]
    if left_out:
        raise ConfigError(f"Tiny-ImageNet class folder {left_out[0]}")
    return Listing(root, "train/test", classes, {"train": train, "test": [sorted(t) for t in test]}, [], [])


def list_core50(root: Path) -> Listing:
    """CORe50 at 128x128 (core50_128x128/s<session>/o<object>/*.png): the 50 objects are the classes (o1 to
    o50, in that order), trained on sessions 1, 2, 4, 5, 6, 8, 9 and 11 and tested on 3, 7 and 10."""
    sessions = {
        int(m.group(1)): p for p in root.iterdir() if (m := re.fullmatch(r"s(\d+)", p.name)) and p.is_dir()
    }
    missing = [s for s in (*CORE50_TRAIN_SESSIONS, *CORE50_TEST_SESSIONS) if s not in sessions]
    if missing:
        raise ConfigError(
            f"{root} is not CORe50's core50_128x128 folder: session folder s{missing[0]} is missing"
        )
    objects = sorted(
        {p.name for s in sessions.values() for p in s.iterdir() if re.fullmatch(r"o\d+", p.name)},
        key=lambda name: int(name[1:]),
    )

    def files(session_numbers: tuple[int, ...]) -> list[list[Path]]:
        return [
            [f for s in session_numbers if (sessions[s] / name).is_dir() for f in _images(sessions[s] / name)]
            for name in objects
        ]

    return Listing(
        root,
        "train/test",
        objects,
        {"train": files(CORE50_TRAIN_SESSIONS), "test": files(CORE50_TEST_SESSIONS)},
        [],
        [],
    )


def _check(lister: Lister, layout: str, dataset: DictConfig, data: DictConfig) -> None:
    _folder(dataset, layout)
    image_folder.check_image_folder(dataset, lister)


def _load(lister: Lister, layout: str, dataset: DictConfig, data: DictConfig) -> Source:
    _folder(dataset, layout)
    return image_folder.load_image_folder(dataset, data, lister)


IMAGENET = "train/<wnid>/ and val/<wnid>/"
TINY_IMAGENET = "wnids.txt, train/<wnid>/images/ and val/ with val_annotations.txt"
CORE50 = "core50_128x128/s1 ... s11/o1 ... o50/"

# What configs/dataset/{imagenet,tiny_imagenet,core50}.yaml name: loader._target_ and loader.check.
load_imagenet, check_imagenet = (
    partial(_load, list_imagenet, IMAGENET),
    partial(_check, list_imagenet, IMAGENET),
)


def load_imagenet_subset(dataset: DictConfig, data: DictConfig) -> Source:
    return _load(partial(list_imagenet_subset, dataset.subset), IMAGENET, dataset, data)


def check_imagenet_subset(dataset: DictConfig, data: DictConfig) -> None:
    _check(partial(list_imagenet_subset, dataset.subset), IMAGENET, dataset, data)


load_tiny_imagenet = partial(_load, list_tiny_imagenet, TINY_IMAGENET)
check_tiny_imagenet = partial(_check, list_tiny_imagenet, TINY_IMAGENET)
load_core50, check_core50 = partial(_load, list_core50, CORE50), partial(_check, list_core50, CORE50)


def load_core50_ni(dataset: DictConfig, data: DictConfig) -> Source:
    """CORe50's New Instances scenario: the NC data (`list_core50`), each training image's task its session (s1,
    s2, s4, s5, s6, s8, s9, s11 in that order), every task tested on sessions 3, 7 and 10 together."""
    source = _load(list_core50, CORE50, dataset, data)
    listing = list_core50(Path(str(dataset.folder)).expanduser().resolve())
    # rows follow the listing, label by label, file by file (on_bad_file=stop: none is left out)
    sessions = [int(p.parent.parent.name[1:]) for per_class in listing.files["train"] for p in per_class]
    if len(sessions) != len(source.train_y):
        raise ConfigError(
            f"core50_ni found {len(sessions)} training images but decoded {len(source.train_y)}; "
            "set dataset.on_bad_file=stop to name the unreadable file"
        )
    source.train_domain = torch.tensor([CORE50_TRAIN_SESSIONS.index(s) for s in sessions])
    return source


check_core50_ni = check_core50
