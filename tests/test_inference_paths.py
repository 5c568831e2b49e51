"""`incr eval`, `incr predict` and `incr export` on the paths users walk: a new folder scored whole in the run's
tasks, unreadable and 16-bit or palette images, files that are not checkpoints, and --out places that cannot be
written; every bad input is one line and exit status 2."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_config, run_experiment
from omegaconf import OmegaConf
from PIL import Image

from incr_cli import inference
from incr_cli.cli import main
from incr_cli.data import image_folder
from incr_cli.data.sources import load_source

CLASSES = 6  # digits 0-5 in three tasks: (0, 1), (2, 3), (4, 5)
# the digits recipe (MLP) on 8x8 grayscale, no crop or flip: a run of a few seconds
FOLDER_RUN = [
    "dataset=image_folder",
    "recipe=digits",
    "dataset.augment.crop_padding=0",
    "dataset.augment.horizontal_flip=false",
    "dataset.image_size=8",
    "dataset.channels=1",
    "dataset.n_tasks=3",
    "strategy=replay",
    "epochs=2",
    "hardware=cpu",
    "seed=0",
]


def digit_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits 0-5 (both splits), pixels 0..16 stretched to 0..240 (multiples of 15)."""
    source = load_source("digits", OmegaConf.create({"root": "unused", "download": False}))
    images = torch.cat([source.train_x, source.test_x])[:, 0].numpy().astype(np.uint8) * 15
    labels = torch.cat([source.train_y, source.test_y]).numpy()
    keep = labels < CLASSES
    return images[keep], labels[keep]


def write_folder(root: Path, images: np.ndarray, labels: np.ndarray, names=None) -> list[Path]:
    """root/<class>/<i>.png, 8-bit grayscale; `names` maps a label to its folder name (default: the digit)."""
    paths = []
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        path = root / (names or str)(int(label)) / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, "L").save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """An image-folder run trained on every fourth digit 0-5, and the other digits for scoring."""
    base = tmp_path_factory.mktemp("paths")
    images, labels = digit_images()
    folder, run_dir = base / "digits", base / "run"
    write_folder(folder, images[::4], labels[::4])
    run_experiment(run_dir, [*FOLDER_RUN, f"dataset.folder={folder}", f"data.root={base / 'data'}"])
    unseen = np.ones(len(labels), dtype=bool)
    unseen[::4] = False
    return {
        "dir": run_dir,
        "folder": folder,
        "data": base / "data",
        "images": images[unseen],
        "labels": labels[unseen],
    }


def in_process(capsys, *args: str) -> tuple[int, str, str]:
    status = main([str(a) for a in args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def one_line_error(capsys, *args) -> str:
    """The command's stderr, checked to be exit status 2 and one `error:` line without a traceback."""
    status, _, err = in_process(capsys, *args)
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("error: "), (status, err)
    return lines[0]


def predictions(capsys, checkpoint: Path, *images: Path, extra: tuple = ()) -> tuple[dict[str, dict], str]:
    """`incr predict --json`: per file, its top class and probability; and stderr."""
    status, out, err = in_process(capsys, "predict", checkpoint, *images, "--json", "--top-k", "1", *extra)
    assert status == 0, err
    return {row["image"]: row["predictions"][0] for row in json.loads(out)}, err


# ----------------------------------------------------------------------------------------- eval: a folder
def test_eval_scores_every_image_of_a_new_folder_in_the_runs_tasks(run, tmp_path, capsys):
    """Classes 1, 4 and 5 only (tasks 1 and 3, none of task 2): all N images are scored, each task's accuracy
    is the share of its images that predict (the same decoding and model) labels right, task 2 has none."""
    images, labels = run["images"], run["labels"]
    chosen = np.flatnonzero(np.isin(labels, [1, 4, 5]))[::3]
    paths = write_folder(tmp_path / "new", images[chosen], labels[chosen])
    out = tmp_path / "eval.json"
    status, stdout, err = in_process(
        capsys, "eval", run["dir"], "dataset=image_folder", f"dataset.folder={tmp_path / 'new'}", "--out", out
    )
    assert status == 0, err
    result = json.loads(out.read_text())
    assert result["split"] == "folder" and result["images"] == len(paths)
    counts = {name: c["images"] for name, c in result["per_class"].items()}
    assert sum(counts.values()) == len(paths)
    assert counts == {str(k): int((labels[chosen] == k).sum()) for k in range(CLASSES)}

    predicted, _ = predictions(capsys, run["dir"], *paths)
    right = {str(p): predicted[str(p)]["class"] == p.parent.name for p in paths}
    task1 = [right[str(p)] for p in paths if p.parent.name == "1"]
    task3 = [right[str(p)] for p in paths if p.parent.name in ("4", "5")]
    accuracy = result["class_il"]["accuracy"]
    assert accuracy[0] == pytest.approx(sum(task1) / len(task1))
    assert accuracy[1] is None  # no image of classes 2 and 3
    assert accuracy[2] == pytest.approx(sum(task3) / len(task3))
    assert result["class_il"]["average_accuracy"] == pytest.approx((accuracy[0] + accuracy[2]) / 2)
    recall_4 = sum(right[str(p)] for p in paths if p.parent.name == "4") / counts["4"]
    assert result["per_class"]["4"]["recall"] == pytest.approx(recall_4)
    assert f"images: {len(paths)} of 3 classes" in stdout


def test_the_runs_own_test_split_stays_available_with_split_test(run, tmp_path, capsys):
    """--split test on the run's own folder holds out what training held out: the run's own last row."""
    out = tmp_path / "eval.json"
    status, _, err = in_process(
        capsys,
        "eval",
        run["dir"],
        f"dataset.folder={run['folder']}",
        "--split",
        "test",
        f"data.root={run['data']}",
        "--out",
        out,
    )
    assert status == 0, err
    result, metrics = json.loads(out.read_text()), json.loads((run["dir"] / "metrics.json").read_text())
    assert result["split"] == "test"
    assert result["class_il"]["accuracy"] == metrics["class_il"]["accuracy_matrix"][-1]
    assert result["images"] == sum(t["test_samples"] for t in metrics["tasks"])
    # and the default, a folder given: the same folder scored whole, training images included
    status, _, err = in_process(capsys, "eval", run["dir"], f"dataset.folder={run['folder']}", "--out", out)
    assert status == 0, err
    assert json.loads(out.read_text())["images"] == sum(1 for _ in run["folder"].rglob("*.png"))


def test_eval_refuses_what_a_folder_scored_whole_cannot_mean(run, tmp_path, capsys):
    first = [int(np.flatnonzero(run["labels"] == k)[0]) for k in range(CLASSES)]  # one image of each class
    images, labels = run["images"][first], run["labels"][first]
    names = {0: "0", 1: "1", 2: "cat", 3: "3", 4: "7", 5: "5"}
    write_folder(tmp_path / "odd", images, labels, names=lambda label: names[label])
    folder = ["dataset=image_folder", f"dataset.folder={tmp_path / 'odd'}"]
    line = one_line_error(capsys, "eval", run["dir"], *folder)
    assert "class folder(s) the run never saw: 7, cat" in line and "0, 1, 2, 3, 4, 5" in line
    assert "invalid choice: 'train'" in one_line_error(capsys, "eval", run["dir"], "--split", "train")


def test_eval_refuses_overrides_a_folder_scored_whole_would_ignore(run, tmp_path, capsys):
    write_folder(tmp_path / "good", run["images"][:6], run["labels"][:6])
    good = ["dataset=image_folder", f"dataset.folder={tmp_path / 'good'}"]
    assert "dataset.test_fraction splits a folder" in one_line_error(
        capsys, "eval", run["dir"], *good, "dataset.test_fraction=1.0"
    )
    assert "cut into the run's own tasks (dataset.n_tasks=3)" in one_line_error(
        capsys, "eval", run["dir"], *good, "dataset.n_tasks=2"
    )
    assert "--split folder scores an image folder" in one_line_error(
        capsys, "eval", run["dir"], "dataset=digits", "--split", "folder"
    )
    # the run's own value is no change: accepted
    status, _, err = in_process(capsys, "eval", run["dir"], *good, "dataset.n_tasks=3")
    assert status == 0, err


# ----------------------------------------------------------------------------------------- decoding
def test_16_bit_and_palette_pngs_decode_to_their_8_bit_values(tmp_path):
    values = np.arange(64, dtype=np.uint16).reshape(8, 8) * 4  # 0..252
    Image.fromarray(values * 257).save(tmp_path / "sixteen.png")  # mode I;16: value k * 257
    assert Image.open(tmp_path / "sixteen.png").mode == "I;16"
    grey = image_folder.image_pixels(image_folder.open_image(tmp_path / "sixteen.png", 1), (8, 8))
    np.testing.assert_array_equal(grey[0], values)
    Image.fromarray((values * 257).astype(np.int32), "I").save(tmp_path / "thirtytwo.tif")
    grey = image_folder.image_pixels(image_folder.open_image(tmp_path / "thirtytwo.tif", 1), (8, 8))
    np.testing.assert_array_equal(grey[0], values)

    colours = [(200, 30, 10), (0, 128, 255), (7, 7, 7)]
    palette = Image.new("P", (3, 2))
    palette.putpalette([c for colour in colours for c in colour])
    palette.putdata([0, 1, 2, 2, 1, 0])
    palette.save(tmp_path / "palette.png")
    rgb = image_folder.image_pixels(image_folder.open_image(tmp_path / "palette.png", 3), (2, 3))
    expected = np.array([colours[i] for i in (0, 1, 2, 2, 1, 0)], dtype=np.uint8).reshape(2, 3, 3)
    np.testing.assert_array_equal(rgb.transpose(1, 2, 0), expected)
    grey = image_folder.image_pixels(image_folder.open_image(tmp_path / "palette.png", 1), (2, 3))
    luma = [round((299 * r + 587 * g + 114 * b) / 1000) for r, g, b in colours]  # ITU-R 601-2, as Pillow's L
    np.testing.assert_allclose(grey[0], np.array([luma[i] for i in (0, 1, 2, 2, 1, 0)]).reshape(2, 3), atol=1)


def test_training_folders_and_predict_read_16_bit_and_palette_files_alike(tmp_path):
    """The same files through `dataset=image_folder` (train/ and test/ kept as they are) and predict's reader."""
    images, labels = digit_images()
    folder = tmp_path / "folder"
    for split, rows in (("train", range(0, 6)), ("test", range(6, 12))):
        for i in rows:
            path = folder / split / str(labels[i]) / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels = images[i].astype(np.uint16)
            (Image.fromarray(pixels * 257) if i % 2 else Image.fromarray(images[i], "L").convert("P")).save(
                path
            )
    cfg = compose_config(
        [
            "dataset=image_folder",
            f"dataset.folder={folder}",
            f"data.root={tmp_path / 'data'}",
            "dataset.image_size=8",
            "dataset.channels=1",
            "dataset.n_tasks=1",
        ]
    )
    source = load_source("image_folder", cfg.data, cfg.dataset)
    files = sorted((folder / "test").rglob("*.png"), key=lambda p: (p.parent.name, p.name))
    read, kept, skipped = inference.read_images(files, (1, 8, 8))
    assert kept == list(range(len(files))) and not skipped
    torch.testing.assert_close(read, source.test_x)
    expected = torch.from_numpy(np.stack([images[int(p.stem)] for p in files]))[:, None]
    torch.testing.assert_close(source.test_x, expected)  # not saturated: the digits' own values


def test_a_16_bit_png_predicts_as_its_8_bit_twin(run, tmp_path, capsys):
    image = run["images"][0]
    Image.fromarray(image, "L").save(tmp_path / "eight.png")
    Image.fromarray(image.astype(np.uint16) * 257).save(tmp_path / "sixteen.png")
    predicted, _ = predictions(capsys, run["dir"], tmp_path / "eight.png", tmp_path / "sixteen.png")
    assert predicted[str(tmp_path / "eight.png")] == predicted[str(tmp_path / "sixteen.png")]


# ----------------------------------------------------------------------------------------- predict
def test_an_unreadable_image_is_skipped_and_named_and_the_others_predicted(run, tmp_path, capsys):
    paths = write_folder(tmp_path / "imgs", run["images"][:3], run["labels"][:3])
    broken = paths[0].parent / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n cut off")
    predicted, err = predictions(capsys, run["dir"], tmp_path / "imgs")
    assert sorted(predicted) == sorted(map(str, paths))
    assert f"skipped {broken}: cannot be read as an image" in err and len(err.strip().splitlines()) == 1
    line = one_line_error(capsys, "predict", run["dir"], tmp_path / "imgs", "--on-bad-file", "stop")
    assert f"{broken} cannot be read as an image" in line
    assert "cannot be read as an image" in one_line_error(capsys, "predict", run["dir"], broken)


def test_predict_says_what_a_file_that_is_no_checkpoint_is(run, tmp_path, capsys):
    image = write_folder(tmp_path / "imgs", run["images"][:1], run["labels"][:1])[0]
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"\x08\x08\x12\x07pytorch\x1a\x032.0:")  # an ONNX file begins with its ir_version field
    status, _, err = in_process(capsys, "export", run["dir"], "--out", tmp_path / "model.torchscript")
    assert status == 0, err
    for path, kind in (
        (onnx, "an ONNX model"),
        (run["dir"] / "metrics.json", "a JSON file"),
        (tmp_path / "model.torchscript", "a TorchScript model"),
        (image, "an image"),
    ):
        line = one_line_error(capsys, "predict", path, image)
        assert f"{path} is not a usable incr checkpoint: it is {kind}" in line
        assert "run directory's checkpoints/*.pt" in line


# ----------------------------------------------------------------------------------------- --out
@pytest.fixture
def no_loading(monkeypatch):
    """A refused --out is refused before the checkpoint is loaded, so before anything is exported."""
    monkeypatch.setattr(inference, "load", lambda *a, **k: pytest.fail("loaded the checkpoint"))


def test_an_out_path_below_a_file_is_refused_before_exporting(run, tmp_path, capsys, no_loading):
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    out = tmp_path / "notes.txt" / "exports" / "m.onnx"
    line = one_line_error(capsys, "export", run["dir"], "--format", "torchscript", "--out", out)
    assert f"--out {out}: cannot write there, {tmp_path / 'notes.txt'} is a file, not a folder" in line
    line = one_line_error(capsys, "eval", run["dir"], "--out", out)
    assert f"--out {out}" in line and "is a file, not a folder" in line


def test_a_read_only_out_folder_is_refused_naming_it(run, tmp_path, capsys, monkeypatch, no_loading):
    """Tests run as root, whom permission bits do not stop: what a read-only place reports is simulated, once
    as the permission check sees it and once as the scratch write that follows it fails on a read-only mount."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = inference.os.access
    monkeypatch.setattr(
        inference.os, "access", lambda path, mode: Path(path) != locked and real_access(path, mode)
    )
    line = one_line_error(capsys, "export", run["dir"], "--out", locked / "sub" / "m.torchscript")
    assert f"--out {locked / 'sub' / 'm.torchscript'}: cannot write there, {locked} is read-only" in line
    monkeypatch.setattr(inference.os, "access", real_access)

    def read_only_mount(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(inference.tempfile, "TemporaryFile", read_only_mount)
    line = one_line_error(capsys, "export", run["dir"], "--out", locked / "m.torchscript")
    assert f"--out {locked / 'm.torchscript'}: cannot write in {locked} (Read-only file system)" in line
    assert not any(locked.iterdir())


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_an_out_folder_receives_model_dot_format(run, tmp_path, capsys):
    existing = tmp_path / "exports"
    existing.mkdir()
    for given, written in (
        (str(existing), existing / "model.torchscript"),
        (f"{tmp_path / 'new'}/", tmp_path / "new" / "model.torchscript"),
    ):
        status, out, err = in_process(capsys, "export", run["dir"], "--out", given)
        assert status == 0, err
        assert str(written) in out and written.is_file()
        assert json.loads(written.with_name("model.torchscript.classes.json").read_text())["class_names"] == [
            str(c) for c in range(CLASSES)
        ]
        torch.jit.load(str(written))
