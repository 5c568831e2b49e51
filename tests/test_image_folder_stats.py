"""dataset=image_folder normalises with its own training images' per-channel mean and std: computed once (never
from the test images), cached with the decoded images, overridden by given values, and carried by the run's
checkpoint to `incr eval` and `incr predict`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_config, run_experiment
from PIL import Image

from incr_cli import inference
from incr_cli.cli import main
from incr_cli.config import check_config
from incr_cli.data import image_folder
from incr_cli.data.sources import load_source
from incr_cli.errors import ConfigError

SIZE = (5, 6)  # width, height of every file: decoded as stored (image_size=null), no resampling


def write_noise_folder(root: Path, seed: int = 0) -> np.ndarray:
    """root/train/<a|b>/ with noise images around different levels per channel, root/test/<a|b>/ all white
    (so that test pixels in the statistics would show). Returns the training images, [N, H, W, 3] uint8."""
    rng = np.random.default_rng(seed)
    training = []
    for label, name in enumerate(("a", "b")):
        for i in range(4):
            low = np.array([20, 70, 120]) + 30 * label
            pixels = (low + rng.integers(0, 80, (SIZE[1], SIZE[0], 3))).astype(np.uint8)
            (root / "train" / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(root / "train" / name / f"{i}.png")
            training.append(pixels)
        (root / "test" / name).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", SIZE, (255, 255, 255)).save(root / "test" / name / "0.png")
    return np.stack(training)


def by_hand(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """numpy's per-channel mean and (population) std of [N, H, W, C] pixels scaled to [0, 1]."""
    scaled = images.astype(np.float64) / 255
    return scaled.mean(axis=(0, 1, 2)), scaled.std(axis=(0, 1, 2))


def folder_dataset(folder: Path, data_root: Path, *overrides: str):
    cfg = compose_config(
        [
            "dataset=image_folder",
            f"dataset.folder={folder}",
            f"data.root={data_root}",
            "dataset.image_size=null",
            *overrides,
        ]
    )
    return cfg.dataset, cfg.data


@pytest.fixture
def folder(tmp_path) -> tuple[Path, np.ndarray]:
    return tmp_path / "pictures", write_noise_folder(tmp_path / "pictures")


def test_the_default_is_normalised_by_the_training_images_mean_and_std(folder, tmp_path, caplog):
    root, training = folder
    dataset, data = folder_dataset(root, tmp_path / "data")
    assert dataset.normalize is True and dataset.mean is None and dataset.std is None
    with caplog.at_level("INFO", logger="incr"):
        load_source("image_folder", data, dataset)
    mean, std = by_hand(training)
    np.testing.assert_allclose(list(dataset.mean), mean, rtol=1e-12)
    np.testing.assert_allclose(list(dataset.std), std, rtol=1e-12)
    # the white test images are not in it: with them every channel's mean would be clearly higher
    white = np.full((2, *training.shape[1:]), 255, dtype=np.uint8)
    assert all(by_hand(np.concatenate([training, white]))[0] > mean + 0.05)
    (line,) = [r.getMessage() for r in caplog.records if "normalisation computed" in r.getMessage()]
    assert "from the 8 training images" in line and f"dataset.mean=[{mean[0]:.4f}, {mean[1]:.4f}" in line


def test_a_second_load_takes_the_statistics_from_the_cache(folder, tmp_path, monkeypatch):
    root, _ = folder
    first, data = folder_dataset(root, tmp_path / "data")
    load_source("image_folder", data, first)

    def fail(*args, **kwargs):
        raise AssertionError("the statistics are computed again")

    monkeypatch.setattr(image_folder, "pixel_sums", fail)
    decoded = image_folder.decoded_files
    second, data = folder_dataset(root, tmp_path / "data")
    load_source("image_folder", data, second)
    assert image_folder.decoded_files == decoded
    assert list(second.mean) == list(first.mean) and list(second.std) == list(first.std)


def test_a_cache_without_statistics_gains_them_without_decoding(folder, tmp_path):
    root, training = folder
    dataset, data = folder_dataset(root, tmp_path / "data")
    load_source("image_folder", data, dataset)
    (cache,) = (tmp_path / "data" / ".incr-cache").glob("image_folder-*.pt")
    state = torch.load(cache, weights_only=True)
    del state["pixel_sums"]  # as an earlier version wrote it
    torch.save(state, cache)
    decoded = image_folder.decoded_files
    again, data = folder_dataset(root, tmp_path / "data")
    load_source("image_folder", data, again)
    assert image_folder.decoded_files == decoded
    np.testing.assert_allclose(list(again.mean), by_hand(training)[0], rtol=1e-12)
    assert "pixel_sums" in torch.load(cache, weights_only=True)


def test_given_values_win_and_a_missing_one_is_computed(folder, tmp_path):
    root, training = folder
    dataset, data = folder_dataset(root, tmp_path / "data", "dataset.mean=[0.1,0.2,0.3]")
    load_source("image_folder", data, dataset)
    assert list(dataset.mean) == [0.1, 0.2, 0.3]
    np.testing.assert_allclose(list(dataset.std), by_hand(training)[1], rtol=1e-12)
    both, data = folder_dataset(root, tmp_path / "data", "dataset.mean=[0.5]", "dataset.std=[0.25]")
    load_source("image_folder", data, both)
    assert list(both.mean) == [0.5] and list(both.std) == [0.25]


def test_a_memory_mapped_folder_is_summed_in_chunks_to_the_same_values(folder, tmp_path):
    root, training = folder
    dataset, data = folder_dataset(root, tmp_path / "data", "dataset.memory_map_gb=0")
    source = load_source("image_folder", data, dataset)
    assert not source.train_x.untyped_storage().resizable()  # read from the .npy file
    np.testing.assert_allclose(list(dataset.mean), by_hand(training)[0], rtol=1e-12)
    # a chunk of one image at a time sums to what one pass over the whole array gives
    pixels = np.ascontiguousarray(training.transpose(0, 3, 1, 2))
    assert image_folder.pixel_sums(pixels, chunk_bytes=1) == image_folder.pixel_sums(pixels)
    assert image_folder.pixel_sums(pixels)["sum_squares"] == [
        int((pixels[:, c].astype(np.int64) ** 2).sum()) for c in range(3)
    ]


def test_one_valued_channels_keep_a_std_of_one():
    sums = image_folder.pixel_sums(np.full((2, 1, 3, 3), 51, dtype=np.uint8))
    assert image_folder.channel_mean_std(sums) == ([0.2], [0.0])
    from omegaconf import OmegaConf

    dataset = OmegaConf.create({"normalize": True, "mean": None, "std": None, "input_shape": [1, 3, 3]})
    image_folder.fill_normalization(dataset, sums)
    assert list(dataset.mean) == [0.2] and list(dataset.std) == [1.0]


def test_domain_folders_are_normalised_over_every_domains_training_images(tmp_path):
    first = write_noise_folder(tmp_path / "domains" / "a", seed=1)
    second = write_noise_folder(tmp_path / "domains" / "b", seed=2) // 2
    for i, image in enumerate(second):  # the second domain darker
        name = "a" if i < 4 else "b"
        Image.fromarray(image).save(tmp_path / "domains" / "b" / "train" / name / f"{i % 4}.png")
    dataset, data = folder_dataset(
        tmp_path / "domains",
        tmp_path / "data",
        "dataset.scenario=domain_il",
        "dataset.domains=folders",
        "dataset.n_tasks=2",
    )
    load_source("image_folder", data, dataset)
    mean, std = by_hand(np.concatenate([first, second]))
    np.testing.assert_allclose(list(dataset.mean), mean, rtol=1e-12)
    np.testing.assert_allclose(list(dataset.std), std, rtol=1e-12)


def test_null_mean_is_refused_for_a_data_set_that_cannot_compute_it():
    cfg = compose_config(["dataset=digits", "dataset.normalize=true", "dataset.mean=null"])
    with pytest.raises(ConfigError, match=r"dataset.mean=null .* is for dataset=image_folder"):
        check_config(cfg)


def test_eval_and_predict_normalise_as_training_did(folder, tmp_path, capsys):
    root, training = folder
    run_dir = tmp_path / "run"
    metrics = run_experiment(
        run_dir,
        [
            "dataset=image_folder",
            f"dataset.folder={root}",
            "dataset.image_size=null",
            "dataset.n_tasks=2",
            f"data.root={tmp_path / 'data'}",
            "debug=quick",
            "hardware=cpu",
        ],
    )
    mean, std = by_hand(training)
    assert "normalisation computed from the 8 training images" in (run_dir / "train.log").read_text()
    saved = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["config"]["dataset"]
    np.testing.assert_allclose(saved["mean"], mean, rtol=1e-12)
    loaded = inference.load(run_dir)
    np.testing.assert_allclose(loaded.preprocess.mean.flatten().tolist(), mean, rtol=1e-6)  # float32
    np.testing.assert_allclose(loaded.preprocess.std.flatten().tolist(), std, rtol=1e-6)
    # predict: a file's scores are the model's on (x / 255 - mean) / std
    image = root / "train" / "a" / "0.png"
    pixels = torch.from_numpy(np.array(Image.open(image))).permute(2, 0, 1)[None].float()
    mean_t, std_t = (torch.tensor(v, dtype=torch.float32)[:, None, None] for v in (mean, std))
    normalised = (pixels / 255 - mean_t) / std_t
    with torch.no_grad():
        expected = loaded.strategy.predict(normalised)[:, : loaded.n_seen].softmax(1)[0]
    capsys.readouterr()
    assert main(["predict", str(run_dir), str(image), "--json", "--top-k", "2"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    for prediction in row["predictions"]:
        assert prediction["probability"] == pytest.approx(expected[prediction["label"]].item(), abs=1e-5)
    # eval: the run's own figures from its own checkpoint
    out = tmp_path / "eval.json"
    assert main(["eval", str(run_dir), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["class_il"]["accuracy"] == metrics["class_il"]["accuracy_matrix"][-1]
