"""Large-image training as the field does it: decode with the aspect ratio kept and the centre cut out, train on
random-resized crops batched on the device, evaluate on the centre crop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from conftest import compose_config, run_experiment
from PIL import Image

from incr_cli.cli import main
from incr_cli.config import network_input_shape
from incr_cli.data import batches
from incr_cli.data.batches import Preprocess, center_crop, resized_crop_windows, resized_crops
from incr_cli.data.image_folder import image_pixels

TORCHVISION_SCALE, TORCHVISION_RATIO = (0.08, 1.0), (3 / 4, 4 / 3)


def test_windows_are_drawn_as_torchvisions_randomresizedcrop_draws_them():
    from torchvision.transforms import RandomResizedCrop

    generator = torch.Generator().manual_seed(0)
    windows = resized_crop_windows(4000, 60, 80, TORCHVISION_SCALE, TORCHVISION_RATIO, generator)
    top, left, h, w = windows.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 60).all() and (left + w <= 80).all()
    torch.manual_seed(0)
    image = torch.zeros(1, 60, 80)
    reference = torch.tensor(
        [
            RandomResizedCrop.get_params(image, list(TORCHVISION_SCALE), list(TORCHVISION_RATIO))
            for _ in range(4000)
        ],
        dtype=torch.float32,
    )
    ref_h, ref_w = reference[:, 2], reference[:, 3]
    # the same distribution of area and aspect ratio (first fitting attempt of ten, rounded sides), and of place
    for ours, theirs in (
        (h * w / 4800, ref_h * ref_w / 4800),
        ((w / h).log(), (ref_w / ref_h).log()),
        (top / (60 - h + 1), reference[:, 0] / (60 - ref_h + 1)),
    ):
        assert abs(ours.mean() - theirs.mean()) < 0.02
        assert abs(ours.std() - theirs.std()) < 0.02


def test_an_image_no_window_fits_gets_its_centred_window_at_the_nearest_ratio():
    generator = torch.Generator().manual_seed(0)
    # the whole of a 40x40 image at ratio 2 cannot fit: the fallback is 40 wide, 20 tall, centred
    windows = resized_crop_windows(3, 40, 40, (1.0, 1.0), (2.0, 2.0), generator)
    assert windows.tolist() == [[10.0, 0.0, 20.0, 40.0]] * 3


def test_crops_equal_torchvisions_resized_crop_of_the_same_windows():
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(6, 3, 30, 40, generator=generator) * 255
    windows = resized_crop_windows(6, 30, 40, TORCHVISION_SCALE, TORCHVISION_RATIO, generator)
    crops = resized_crops(x, windows, 16)
    for image, window, crop in zip(x, windows.long().tolist(), crops, strict=True):
        top, left, h, w = window
        expected = TF.resized_crop(image, top, left, h, w, [16, 16], antialias=False)
        assert torch.allclose(crop, expected, atol=1e-3), window
    # a window of the image's own size is the image
    same = resized_crops(x, torch.tensor([[0.0, 0.0, 30.0, 40.0]]).expand(6, 4), 30)
    assert same.shape == (6, 3, 30, 30)
    assert torch.allclose(
        resized_crops(x[:, :, :, :30], torch.tensor([[0.0, 0.0, 30.0, 30.0]]).expand(6, 4), 30),
        x[:, :, :, :30],
        atol=1e-3,
    )


def test_crops_of_uint8_images_are_cut_a_few_images_at_a_time_with_the_same_result(monkeypatch):
    # a batch of large uint8 images never becomes floats whole: resized_crops converts a chunk at a time
    generator = torch.Generator().manual_seed(2)
    x = torch.randint(0, 256, (7, 3, 30, 40), dtype=torch.uint8, generator=generator)
    windows = resized_crop_windows(7, 30, 40, TORCHVISION_SCALE, TORCHVISION_RATIO, generator)
    whole = resized_crops(x.float(), windows, 16)
    converted = []
    original_float = torch.Tensor.float

    def counting_float(tensor):
        converted.append(len(tensor))
        return original_float(tensor)

    monkeypatch.setattr(batches, "RESIZE_CHUNK_BYTES", 2 * 3 * 30 * 40 * 4)  # two images' floats
    monkeypatch.setattr(torch.Tensor, "float", counting_float)
    chunked = resized_crops(x, windows, 16)
    assert converted == [2, 2, 2, 1]
    assert chunked.dtype == torch.float32 and torch.equal(chunked, whole)


def test_evaluation_takes_the_centre_crop_and_training_the_resized_crop():
    cfg = compose_config(
        [
            "dataset=synthetic",
            "dataset.input_shape=[3,12,12]",
            "+dataset.crop_size=8",
            "dataset.normalize=false",
        ]
    )
    cfg.dataset.augment.random_resized_crop = True
    preprocess = Preprocess(cfg.dataset, 255, torch.device("cpu"))
    x = torch.randint(0, 256, (5, 3, 12, 12), dtype=torch.uint8)
    evaluated = preprocess(x)
    assert evaluated.shape == (5, 3, 8, 8)
    assert torch.equal(evaluated, x[:, :, 2:10, 2:10].float() * (1 / 255))
    assert torch.equal(center_crop(torch.arange(25).reshape(1, 5, 5), 2), torch.tensor([[[6, 7], [11, 12]]]))
    trained = preprocess(x, torch.Generator().manual_seed(0))
    assert trained.shape == (5, 3, 8, 8) and not torch.equal(trained, evaluated)
    assert network_input_shape(cfg.dataset) == (3, 8, 8)


def test_center_crop_fit_keeps_the_aspect_ratio_and_cuts_out_the_centre():
    # a 40 x 20 (w x h) image in four vertical bands; square 10 x 10 target: short side to 10 (20 x 10), then the
    # middle 10 columns, i.e. the two inner bands
    bands = np.repeat(np.array([0, 80, 160, 240], dtype=np.uint8), 10)[None, :].repeat(20, 0)
    image = Image.fromarray(bands, "L")
    fitted = image_pixels(image, (10, 10), "center_crop")[0]
    reference = np.asarray(image.resize((20, 10), Image.Resampling.BILINEAR))[:, 5:15]
    assert np.abs(fitted.astype(int) - reference.astype(int)).max() <= 1
    assert fitted[:, 0].max() < 120 < fitted[:, -1].min()  # the outer bands are gone
    stretched = image_pixels(image, (10, 10))[0]
    assert stretched[:, 0].max() < 40  # stretching keeps the first band


@pytest.mark.parametrize(
    "override, words",
    [
        ("+dataset.crop_size=40", ["dataset.crop_size=40", "no larger than the images (8x8)"]),
        ("dataset.augment.random_resized_crop=true", ["random_resized_crop=true needs dataset.crop_size"]),
    ],
)
def test_crop_settings_the_images_cannot_satisfy_are_one_line_errors(capsys, override, words):
    assert main(["train", override, "progress=false"]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error
    for word in words:
        assert word in error


def write_imagenet(root, classes: int = 4, train: int = 6, val: int = 2) -> None:
    """ILSVRC-2012's layout with images of several sizes and aspect ratios, each class its own colour."""
    generator = np.random.default_rng(0)
    for c in range(classes):
        wnid = f"n{c:08d}"
        for split, count in (("train", train), ("val", val)):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for i in range(count):
                height, width = int(generator.integers(30, 60)), int(generator.integers(30, 60))
                pixels = generator.integers(0, 60, (height, width, 3)) + np.array([60 * c, 40, 200 - 50 * c])
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{wnid}_{i}.JPEG")


def test_a_generated_imagenet_trains_on_resized_crops_of_its_centre_squares(tmp_path):
    write_imagenet(tmp_path / "imagenet")
    metrics = run_experiment(
        tmp_path / "run",
        [
            "dataset=imagenet",
            f"data.root={tmp_path}",
            "dataset.image_size=20",
            "dataset.crop_size=16",
            "dataset.input_shape=[3,20,20]",
            "dataset.n_tasks=2",
            "dataset.num_classes=4",
            "model=mlp",
            "epochs=2",
            "batch_size=4",
            "hardware=cpu",
            "hardware.device_data_gb=0",
        ],
    )
    assert metrics["run"]["status"] == "finished"
    log = (tmp_path / "run" / "train.log").read_text()
    assert "aspect ratio kept, centre cut out" in log and "streamed to cpu" in log
    # colours separate the classes: the last task's classes are told apart after training on crops
    assert metrics["task_il"]["accuracy_matrix"][-1][-1] > 0.5
    assert math.isfinite(metrics["class_il"]["final_average_accuracy"])
