"""ImageNet, Tiny-ImageNet and CORe50 read from small generated folders in each one's on-disk layout: the right
classes in the right order, the right images in each split, one-line errors for a folder that is not the data
set, and a generated Tiny-ImageNet that trains."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from incr_cli.cli import main
from incr_cli.data.imagenet_subsets import LUCIR, PODNET, SEED_1993_ORDER
from incr_cli.data.large_image_sets import (
    list_core50,
    list_imagenet,
    list_imagenet_subset,
    list_tiny_imagenet,
)
from incr_cli.errors import ConfigError


def write_image(path: Path, shade: int, size: int = 12, suffix_format: str = "JPEG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (shade, 255 - shade, shade // 2)).save(path, suffix_format)


def counts(listing, split: str) -> list[int]:
    return [len(files) for files in listing.files[split]]


def test_imagenet_reads_train_and_val_class_folders(tmp_path):
    root = tmp_path / "imagenet"
    wnids = ["n02084071", "n01440764", "n04592741"]
    for k, wnid in enumerate(wnids):
        for i in range(4 + k):
            write_image(root / "train" / wnid / f"{wnid}_{i}.JPEG", 40 * k + i)
        for i in range(2):
            write_image(root / "val" / wnid / f"ILSVRC2012_val_{k}{i}.JPEG", 40 * k + i)
    listing = list_imagenet(root)
    assert listing.classes == sorted(wnids)  # label i: the i-th wnid in sorted order, as torchvision's
    assert counts(listing, "train") == [5, 4, 6] and counts(listing, "test") == [2, 2, 2]
    assert all(p.parent.parent.name == "val" for files in listing.files["test"] for p in files)
    (root / "val").rename(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="needs train/<wnid>/ and val/<wnid>/"):
        list_imagenet(root)


def test_the_imagenet_100_class_lists_are_pinned():
    # PODNet's: ILSVRC-2012's first 100 wnids in sorted order (n01440764, the tench, to n01855672)
    assert list(PODNET) == sorted(set(PODNET)) and len(PODNET) == 100
    assert (PODNET[0], PODNET[-1]) == ("n01440764", "n01855672")
    # LUCIR's: numpy's seed-1993 draw, listed sorted; only 9 classes in common with PODNet's
    assert list(LUCIR) == sorted(set(LUCIR)) and len(LUCIR) == 100
    assert len(set(PODNET) & set(LUCIR)) == 9
    for wnids, digest in ((PODNET, "e685f52fed1378fd"), (LUCIR, "fce943fa2f5b5888")):
        assert hashlib.sha256("\n".join(wnids).encode()).hexdigest()[:16] == digest
    # the class order both papers train in: numpy's legacy generator, seed 1993, shuffling 0..99
    np.random.seed(1993)
    order = np.arange(100)
    np.random.shuffle(order)
    assert list(SEED_1993_ORDER) == order.tolist()


def test_imagenet_subset_keeps_its_100_classes_in_sorted_order(tmp_path, capsys):
    root = tmp_path / "imagenet"
    extra = ["n09999999", "n00000001"]  # classes of the full ImageNet outside the subset
    for k, wnid in enumerate([*LUCIR, *extra]):
        write_image(root / "train" / wnid / f"{wnid}_0.JPEG", k % 256, size=2)
        write_image(root / "val" / wnid / f"{wnid}_v.JPEG", k % 256, size=2)
    listing = list_imagenet_subset("lucir", root)
    assert listing.classes == list(LUCIR)
    assert [p.parent.name for files in listing.files["train"] for p in files] == list(LUCIR)
    assert counts(listing, "test") == [1] * 100
    with pytest.raises(
        ConfigError, match=r"lacks 91 of the 100 classes of dataset.subset=podnet \(first: train/n01440764\)"
    ):
        list_imagenet_subset("podnet", root)
    with pytest.raises(ConfigError, match="dataset.subset=bic is not valid; choose one of: podnet, lucir"):
        list_imagenet_subset("bic", root)
    from conftest import compose_config

    cfg = compose_config(["dataset=imagenet_subset", "dataset.subset=lucir"])
    assert list(cfg.dataset.class_order) == list(SEED_1993_ORDER) and cfg.dataset.initial_classes == 50


def make_tiny_imagenet(root: Path, per_class: int = 3, val_per_class: int = 2, size: int = 12) -> list[str]:
    wnids = ["n09999999", "n01443537", "n02124075", "n01629819"]
    root.mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")  # not sorted, as the release's is not
    lines = []
    for k, wnid in enumerate(wnids):
        for i in range(per_class):
            write_image(root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", 50 * k + i, size)
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
        for i in range(val_per_class):
            name = f"val_{k * val_per_class + i}.JPEG"
            write_image(root / "val" / "images" / name, 50 * k + 10 + i, size)
            lines.append(f"{name}\t{wnid}\t0\t0\t{size}\t{size}")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return wnids


def test_tiny_imagenet_reads_its_validation_annotations(tmp_path):
    root = tmp_path / "tiny-imagenet-200"
    wnids = make_tiny_imagenet(root)
    listing = list_tiny_imagenet(root)
    assert listing.classes == sorted(wnids)
    assert counts(listing, "train") == [3, 3, 3, 3] and counts(listing, "test") == [2, 2, 2, 2]
    # the validation images of a class are the ones the annotation file gives it: wnids[0] wrote val_0, val_1
    label = listing.classes.index(wnids[0])
    assert [p.name for p in listing.files["test"][label]] == ["val_0.JPEG", "val_1.JPEG"]
    with (root / "val" / "val_annotations.txt").open("a") as handle:
        handle.write("val_99.JPEG\tn00000000\t0\t0\t1\t1\n")
    with pytest.raises(ConfigError, match=r"line 9: n00000000 is not in wnids.txt"):
        list_tiny_imagenet(root)


def test_core50_takes_objects_as_classes_and_its_test_sessions_as_the_test_set(tmp_path):
    root = tmp_path / "core50_128x128"
    for session in range(1, 12):
        for obj in (1, 2, 10):
            for i in range(2):
                write_image(
                    root / f"s{session}" / f"o{obj}" / f"C_{session:02d}_{obj:02d}_{i:03d}.png",
                    session,
                    8,
                    "PNG",
                )
    listing = list_core50(root)
    assert listing.classes == ["o1", "o2", "o10"]  # in object order, not in name order
    assert counts(listing, "train") == [16, 16, 16] and counts(listing, "test") == [6, 6, 6]
    test_sessions = {p.parent.parent.name for files in listing.files["test"] for p in files}
    assert test_sessions == {"s3", "s7", "s10"}
    (root / "s7").rename(tmp_path / "s7")
    with pytest.raises(ConfigError, match="session folder s7 is missing"):
        list_core50(root)


@pytest.mark.parametrize("name", ["imagenet", "imagenet_subset", "tiny_imagenet", "core50"])
def test_a_missing_folder_is_a_one_line_error_naming_the_layout(tmp_path, capsys, name):
    assert (
        main(["train", f"dataset={name}", f"data.root={tmp_path}", f"hydra.run.dir={tmp_path / 'run'}"]) == 2
    )
    error = capsys.readouterr().err.strip()
    assert (
        len(error.splitlines()) == 1 and "does not exist" in error and "/" in error.split(" is read from ")[1]
    )
    assert not (tmp_path / "run").exists()


def test_a_generated_tiny_imagenet_trains_and_caches_its_decoded_images(tmp_path):
    make_tiny_imagenet(tmp_path / "tiny-imagenet-200", per_class=6, size=8)
    settings = [
        "dataset=tiny_imagenet",
        f"data.root={tmp_path}",
        "dataset.num_classes=4",
        "dataset.input_shape=[3,8,8]",
        "dataset.image_size=8",
        "dataset.n_tasks=2",
        "model.width=4",
        "strategy=replay",
        "epochs=1",
        "batch_size=4",
        "hardware=cpu",
        "hardware.num_threads=1",
        "progress=false",
    ]
    assert main(["train", *settings, f"hydra.run.dir={tmp_path / 'run'}"]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert len(metrics["class_il"]["accuracy_matrix"]) == 2
    assert list((tmp_path / ".incr-cache").glob("image_folder-*.pt"))


def test_core50_ni_takes_each_training_session_as_a_task_tested_on_the_test_sessions(tmp_path):
    root = tmp_path / "core50" / "core50_128x128"
    for session in range(1, 12):
        for obj in (1, 2, 3, 4):
            for i in range(2):
                shade = 20 * session + 50 * obj
                write_image(
                    root / f"s{session}" / f"o{obj}" / f"C_{session:02d}_{obj:02d}_{i}.png", shade, 8, "PNG"
                )
    settings = [
        "dataset=core50_ni",
        f"data.root={tmp_path}",
        "dataset.num_classes=4",
        "dataset.image_size=8",
        "dataset.input_shape=[3,8,8]",
        "model=mlp",
        "epochs=1",
        "batch_size=4",
        "hardware=cpu",
        "progress=false",
    ]
    from conftest import compose_config

    from incr_cli.data.sources import load_source
    from incr_cli.data.stream import build_stream

    cfg = compose_config(settings)
    source = load_source(cfg.dataset.name, cfg.data, cfg.dataset)
    stream = build_stream(source, cfg.dataset)
    assert len(stream.tasks) == 8
    for k, task in enumerate(stream.tasks):
        assert (
            task.classes == [0, 1, 2, 3] and len(task.train_index) == 8
        )  # 4 objects x 2 images of session k
        assert source.train_domain[task.train_index].eq(k).all()
        assert task.test_index.tolist() == list(range(24))  # sessions 3, 7 and 10, for every task
    assert main(["train", *settings, f"hydra.run.dir={tmp_path / 'run'}"]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    matrix = metrics["class_il"]["accuracy_matrix"]
    assert len(matrix) == 8 and all(len(set(row)) == 1 for row in matrix)  # one test set: equal columns
