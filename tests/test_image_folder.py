"""dataset=image_folder: the user's own images, one sub-folder per class, read into the same uint8 source as the
built-in data sets, cached on disk, trained on end to end, and every file or folder left out reported."""

from __future__ import annotations

import os
from collections import Counter
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_config, final_accuracy, run_experiment
from omegaconf import OmegaConf
from PIL import Image

from incr_cli.cli import main
from incr_cli.data import image_folder
from incr_cli.data.sources import load_source
from incr_cli.errors import ConfigError

DIGIT_CLASSES = 6  # digits 0-5: three tasks of two classes


@cache
def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits (both splits), pixels 0..16 stretched to 0..240."""
    source = load_source("digits", OmegaConf.create({"root": "unused", "download": False}))
    images = torch.cat([source.train_x, source.test_x])[:, 0].numpy()
    return images * 15, torch.cat([source.train_y, source.test_y]).numpy()


def write_digit_folder(root: Path) -> Counter:
    """Digits 0-5 as root/<digit>/<i>.png or .jpg: grayscale PNGs upscaled to 16x16, and every third image a
    20x24 RGB JPEG; beside them a corrupt .png, an empty class folder and a text file. Returns the readable
    images per class."""
    images, labels = digits()
    readable = Counter()
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        if label >= DIGIT_CLASSES:
            continue
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        picture = Image.fromarray(image)
        if i % 3 == 0:
            picture.convert("RGB").resize((20, 24), Image.Resampling.BILINEAR).save(
                folder / f"{i}.jpg", quality=95
            )
        else:
            picture.resize((16, 16), Image.Resampling.NEAREST).save(folder / f"{i}.png")
        readable[str(label)] += 1
    (root / "3" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"cut off by a failed copy")
    (root / "empty").mkdir()
    (root / "notes.txt").write_text("where these images came from\n")
    return readable


def write_solid(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (10, 8)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def folder_settings(folder: Path, data_root: Path, *overrides: str):
    """The (dataset, data) nodes of `incr train dataset=image_folder dataset.folder=FOLDER ...`."""
    cfg = compose_config(
        ["dataset=image_folder", f"dataset.folder={folder}", f"data.root={data_root}", *overrides]
    )
    return cfg.dataset, cfg.data


def load(folder: Path, data_root: Path, *overrides: str):
    dataset, data = folder_settings(folder, data_root, *overrides)
    return load_source("image_folder", data, dataset), dataset


# the digits recipe (MLP), not image_folder's ResNet-18 for photos, and no crop or flip on digits
DIGIT_RUN = [
    "dataset=image_folder",
    "recipe=digits",
    "dataset.augment.crop_padding=0",
    "dataset.augment.horizontal_flip=false",
    "dataset.image_size=12",
    "dataset.channels=1",
    "dataset.n_tasks=3",
    "strategy=replay",
    "epochs=5",
]


@pytest.fixture(scope="module")
def digit_run(tmp_path_factory) -> dict:
    """One end-to-end `incr train dataset=image_folder` on the digit folder."""
    base = tmp_path_factory.mktemp("image_folder")
    folder, data_root, run_dir = base / "digits", base / "data", base / "run"
    readable = write_digit_folder(folder)
    metrics = run_experiment(run_dir, [*DIGIT_RUN, f"dataset.folder={folder}", f"data.root={data_root}"])
    return {
        "folder": folder,
        "data_root": data_root,
        "run_dir": run_dir,
        "metrics": metrics,
        "readable": readable,
    }


# ----------------------------------------------------------------------------------------- end to end
def test_a_folder_of_mixed_png_and_jpeg_files_trains_end_to_end_well_above_chance(digit_run):
    metrics = digit_run["metrics"]
    assert metrics["run"]["status"] == "finished" and metrics["run"]["dataset"] == "image_folder"
    # the empty folder is no class: six classes in three tasks, named by their folders
    assert [t["class_names"] for t in metrics["tasks"]] == [["0", "1"], ["2", "3"], ["4", "5"]]
    # every readable image is used once, the corrupt one is not
    used = sum(t["train_samples"] + t["test_samples"] for t in metrics["tasks"])
    assert used == sum(digit_run["readable"].values())
    # chance is 1/6 over the six classes
    assert final_accuracy(metrics) > 0.6


def test_the_corrupt_file_the_empty_class_and_the_other_files_are_counted_in_the_log(digit_run):
    log = (digit_run["run_dir"] / "train.log").read_text()
    assert "skipped 1 unreadable image file(s)" in log
    assert f"skipped {Path('3') / 'broken.png'}: UnidentifiedImageError" in log
    assert (
        "left out 1 class folder(s) without usable images" in log
        and str(digit_run["folder"] / "empty") in log
    )
    assert "ignored 1 file(s) that are not images" in log and "notes.txt" in log
    assert "come in 2 size(s) (16x16: " in log and "24x20: " in log and "resized to 12x12" in log


def test_a_second_load_reads_the_cache_and_a_changed_file_decodes_afresh(digit_run):
    folder, data_root = digit_run["folder"], digit_run["data_root"]
    overrides = ("dataset.image_size=12", "dataset.channels=1")
    (cached,) = (data_root / ".incr-cache").glob("image_folder-*.pt")
    before = image_folder.decoded_files
    source, dataset = load(folder, data_root, *overrides)
    assert image_folder.decoded_files == before  # nothing decoded: the training run's cache was read
    assert dataset.num_classes == DIGIT_CLASSES and list(dataset.input_shape) == [1, 12, 12]
    assert source.train_x.dtype == torch.uint8 and source.train_x.shape[1:] == (1, 12, 12)
    assert source.train_y.dtype == torch.int64 and source.class_names == [
        str(c) for c in range(DIGIT_CLASSES)
    ]

    changed = next((folder / "0").glob("*.png"))
    stat = changed.stat()
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    again, _ = load(folder, data_root, *overrides)
    assert (
        image_folder.decoded_files == before + sum(digit_run["readable"].values()) + 1
    )  # + the corrupt file
    (replaced,) = (data_root / ".incr-cache").glob("image_folder-*.pt")  # the stale cache is gone
    assert replaced != cached
    assert torch.equal(again.train_x, source.train_x) and torch.equal(again.test_y, source.test_y)


def test_a_finished_image_folder_run_resumes_as_finished(digit_run):
    # the folder is counted again on resume: the same num_classes, so the same config as the run's own
    assert main(["resume", str(digit_run["run_dir"])]) == 0
    assert "this run already finished" in (digit_run["run_dir"] / "train.log").read_text()


def test_on_bad_file_stop_refuses_the_empty_class_folder_before_anything_runs(digit_run, tmp_path, capsys):
    status = main(
        [
            "train",
            *DIGIT_RUN,
            f"dataset.folder={digit_run['folder']}",
            "dataset.on_bad_file=stop",
            f"data.root={tmp_path / 'data'}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ]
    )
    assert status == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        line.startswith("error: ") and str(digit_run["folder"] / "empty") in line and "has no images" in line
    )
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------- unreadable files
@pytest.fixture
def folder_with_a_broken_file(tmp_path) -> Path:
    folder = tmp_path / "pictures"
    for i in range(3):
        write_solid(folder / "cat" / f"{i}.png", (200, 10, 10))
        write_solid(folder / "dog" / f"{i}.png", (10, 10, 200))
    (folder / "dog" / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(20))
    return folder


def test_on_bad_file_stop_exits_2_before_training_naming_the_file(
    folder_with_a_broken_file, tmp_path, capsys
):
    with pytest.raises(SystemExit) as stopped:
        main(
            [
                "train",
                "dataset=image_folder",
                f"dataset.folder={folder_with_a_broken_file}",
                "dataset.n_tasks=1",
                "dataset.on_bad_file=stop",
                "progress=false",
                f"data.root={tmp_path / 'data'}",
                f"hydra.run.dir={tmp_path / 'run'}",
            ]
        )
    assert stopped.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: ") and str(folder_with_a_broken_file / "dog" / "truncated.jpg") in line
    assert "dataset.on_bad_file=skip" in line
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_a_file_skipped_into_the_cache_still_stops_a_run_with_on_bad_file_stop(
    folder_with_a_broken_file, tmp_path
):
    source, _ = load(folder_with_a_broken_file, tmp_path / "data", "dataset.on_bad_file=skip")
    assert (
        len(source.train_y) + len(source.test_y) == 6
    )  # three cats and three dogs: the broken file is left out
    with pytest.raises(ConfigError, match="truncated.jpg cannot be read as an image"):
        load(folder_with_a_broken_file, tmp_path / "data", "dataset.on_bad_file=stop")


# ----------------------------------------------------------------------------------------- layouts
COLORS = {"b_owl": (250, 0, 0), "a_fox": (0, 250, 0), "c_elk": (0, 0, 250)}


def test_a_train_test_tree_keeps_its_split_with_classes_named_by_sorted_folders(tmp_path):
    for name, color in COLORS.items():
        for i in range(4):
            write_solid(tmp_path / "tree" / "train" / name / f"{i}.png", color)
        for i in range(2):
            write_solid(tmp_path / "tree" / "test" / name / f"{i}.bmp", color, size=(7, 9))
    source, dataset = load(tmp_path / "tree", tmp_path / "data", "dataset.image_size=[6,10]")
    assert source.class_names == ["a_fox", "b_owl", "c_elk"]
    assert dataset.num_classes == 3 and list(dataset.input_shape) == [3, 6, 10]
    assert source.train_x.shape == (12, 3, 6, 10) and source.test_x.shape == (6, 3, 6, 10)
    assert source.train_y.tolist() == [0] * 4 + [1] * 4 + [2] * 4 and source.test_y.tolist() == [
        0,
        0,
        1,
        1,
        2,
        2,
    ]
    for label, name in enumerate(source.class_names):  # label i holds the i-th folder's pixels, channels RGB
        expected = torch.tensor(COLORS[name], dtype=torch.uint8)[:, None, None].expand(3, 6, 10)
        assert all(torch.equal(image, expected) for image in source.train_x[source.train_y == label])
    gray, _ = load(tmp_path / "tree", tmp_path / "data", "dataset.image_size=[6,10]", "dataset.channels=1")
    assert gray.train_x.shape == (12, 1, 6, 10)
    assert gray.train_x[0, 0, 0, 0] == Image.new("RGB", (1, 1), COLORS["a_fox"]).convert("L").getpixel((0, 0))


def test_one_tree_is_split_by_test_fraction_per_class_with_a_fixed_seed(tmp_path):
    # every image a different gray level, so that the split can be read back from the pixels
    for i in range(15):
        write_solid(tmp_path / "tree" / ("many" if i < 10 else "few") / f"{i}.png", (i, i, i))
    source, _ = load(tmp_path / "tree", tmp_path / "data", "dataset.test_fraction=0.2", "dataset.channels=1")
    assert source.class_names == ["few", "many"]
    assert Counter(source.test_y.tolist()) == {0: 1, 1: 2}  # 20% of 5 and of 10 images
    assert Counter(source.train_y.tolist()) == {0: 4, 1: 8}
    levels = sorted(source.train_x[:, 0, 0, 0].tolist() + source.test_x[:, 0, 0, 0].tolist())
    assert levels == list(range(15))  # each image once, in one split only
    fresh, _ = load(
        tmp_path / "tree", tmp_path / "other_cache", "dataset.test_fraction=0.2", "dataset.channels=1"
    )
    assert torch.equal(fresh.test_x, source.test_x) and torch.equal(fresh.train_x, source.train_x)


# ----------------------------------------------------------------------------------------- clear errors
def test_image_size_null_keeps_the_files_size_and_refuses_mixed_sizes(tmp_path):
    for i in range(2):
        write_solid(tmp_path / "tree" / "a" / f"{i}.png", (9, 9, 9), size=(5, 4))
        write_solid(tmp_path / "tree" / "b" / f"{i}.png", (9, 9, 9), size=(5, 4))
    source, dataset = load(tmp_path / "tree", tmp_path / "data", "dataset.image_size=null")
    assert source.train_x.shape[1:] == (3, 4, 5) and list(dataset.input_shape) == [3, 4, 5]
    write_solid(tmp_path / "tree" / "b" / "2.png", (9, 9, 9), size=(6, 6))
    with pytest.raises(
        ConfigError, match=r"images differ in size: .* is 4x5, .*2\.png is 6x6; set dataset.image_size"
    ):
        load(tmp_path / "tree", tmp_path / "data", "dataset.image_size=null")


@pytest.mark.parametrize(
    "overrides, layout, words",
    [
        (["dataset.num_classes=3"], "flat", ["dataset.num_classes=3", "2 class folders", "(a, b)"]),
        (["dataset.input_shape=[1,32,32]"], "flat", ["dataset.input_shape=[1, 32, 32]", "32x32"]),
        (["dataset.max_decoded_gb=0.000001"], "flat", ["max_decoded_gb=1e-06", "4 images of 3x32x32"]),
        (["dataset.channels=2"], "flat", ["dataset.channels=2", "1 (grayscale) or 3 (RGB)"]),
        (["dataset.image_size=[0,4]"], "flat", ["dataset.image_size=[0, 4]", "[height, width]"]),
        (["dataset.on_bad_file=ignore"], "flat", ["dataset.on_bad_file=ignore", "skip, stop"]),
        (["dataset.test_fraction=0"], "flat", ["dataset.test_fraction=0", "train/ and test/"]),
        ([], "train only", ["has train/ but no test/"]),
        (["dataset.folder=null"], "flat", ["needs dataset.folder="]),
    ],
)
def test_settings_the_folder_cannot_satisfy_are_one_line_errors(tmp_path, overrides, layout, words):
    for name in ("a", "b"):
        for i in range(2):
            prefix = "train/" if layout == "train only" else ""
            write_solid(tmp_path / "tree" / f"{prefix}{name}" / f"{i}.png", (1, 2, 3))
    dataset, _ = folder_settings(tmp_path / "tree", tmp_path / "data", *overrides)
    with pytest.raises(ConfigError) as error:
        image_folder.check_image_folder(dataset)
    message = str(error.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_a_folder_over_memory_map_gb_trains_from_disk_to_the_same_numbers(digit_run, tmp_path):
    # memory_map_gb=0: every folder counts as too large for memory; the images are decoded into .npy files
    # in the cache and read from disk through memory maps, and the run must equal the in-memory one.
    from incr_cli.data.image_folder import _cache_path, check_image_folder, load_image_folder

    settings = [
        *DIGIT_RUN,
        f"dataset.folder={digit_run['folder']}",
        f"data.root={tmp_path / 'data'}",
        "dataset.memory_map_gb=0",
    ]
    metrics = run_experiment(tmp_path / "run", settings)
    cached = sorted(p.name.split(".", 1)[1] for p in (tmp_path / "data" / ".incr-cache").iterdir())
    assert cached == ["pt", "test.npy", "train.npy"]  # the splits on disk, beside the cache's metadata
    assert metrics["class_il"]["accuracy_matrix"] == digit_run["metrics"]["class_il"]["accuracy_matrix"]
    assert "memory-mapped from disk" in (tmp_path / "run" / "train.log").read_text()

    cfg = compose_config(settings)
    source = load_image_folder(cfg.dataset, cfg.data)  # from the cache: the tensors are views of the files
    train_file = _cache_path(tmp_path / "data", check_image_folder(cfg.dataset)).with_suffix(".train.npy")
    on_disk = np.load(train_file, mmap_mode="r")
    assert torch.equal(source.train_x, torch.from_numpy(np.array(on_disk)))
    assert not source.train_x.untyped_storage().resizable()  # not an ordinary tensor: memory it does not own


def test_a_memory_mapped_folder_streamed_from_its_files_trains_to_the_same_numbers(digit_run, tmp_path):
    # device budget 0: rows are read from the cache's .npy files by the background reader (pread), not through
    # the memory map; the run must still equal the in-memory one
    settings = [
        *DIGIT_RUN,
        f"dataset.folder={digit_run['folder']}",
        f"data.root={tmp_path / 'data'}",
        "dataset.memory_map_gb=0",
        "hardware.device_data_gb=0",
    ]
    metrics = run_experiment(tmp_path / "run", settings)
    assert "streamed to cpu from the cache's files on disk" in (tmp_path / "run" / "train.log").read_text()
    for scenario in ("class_il", "task_il"):
        assert metrics[scenario]["accuracy_matrix"] == digit_run["metrics"][scenario]["accuracy_matrix"]
