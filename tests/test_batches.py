"""Device-resident mini-batches (order, resumption) and batched preprocessing and augmentation."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_config

from incr_cli.data.batches import Batch, DeviceBatches, Preprocess, random_crop, random_flip, random_rotation


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------- DeviceBatches
def numbered_batches(seed: int = 0, task_id: int = 0, batch_size: int = 16) -> DeviceBatches:
    """100 samples whose image and label are both their row number; an epoch visits rows 5..94 only."""
    rows = torch.arange(100)
    return DeviceBatches(rows.clone(), rows.clone(), torch.arange(5, 95), batch_size, seed, task_id)


def epoch_rows(batches: DeviceBatches, epoch: int, start: int = 0) -> list[list[int]]:
    return [batch.y.tolist() for batch in batches.epoch(epoch, start=start)]


def test_an_epoch_visits_every_index_exactly_once():
    batches = numbered_batches()
    # 90 rows in batches of 16: 5 full batches and one of 10 = ceil(90 / 16) = 6
    assert len(batches) == 6
    cut = list(batches.epoch(0))
    assert [len(b) for b in cut] == [16, 16, 16, 16, 16, 10]
    visited = [row for batch in cut for row in batch.y.tolist()]
    assert sorted(visited) == list(range(5, 95))
    assert visited != list(range(5, 95))  # shuffled
    for batch in cut:
        assert torch.equal(batch.x, batch.y)  # images travel with their labels


def test_the_order_depends_only_on_seed_task_and_epoch():
    # two separate objects (as in a resumed process) cut the same batches
    assert epoch_rows(numbered_batches(), 3) == epoch_rows(numbered_batches(), 3)
    reference = epoch_rows(numbered_batches(), 0)
    assert epoch_rows(numbered_batches(), 1) != reference  # another epoch
    assert epoch_rows(numbered_batches(task_id=1), 0) != reference  # another task
    assert epoch_rows(numbered_batches(seed=1), 0) != reference  # another seed


def test_start_resumes_at_batch_k_of_the_same_order():
    batches = numbered_batches()
    full = epoch_rows(batches, 2)
    assert epoch_rows(batches, 2, start=4) == full[4:]
    assert epoch_rows(batches, 2, start=len(batches)) == []


def test_joined_batches_keep_images_and_labels_together():
    a = Batch(torch.tensor([1, 2]), torch.tensor([10, 20]))
    b = Batch(torch.tensor([3]), torch.tensor([30]))
    joined = a.join(b)
    assert joined.x.tolist() == [1, 2, 3] and joined.y.tolist() == [10, 20, 30] and len(joined) == 3


# ----------------------------------------------------------------------------------------- Preprocess
def test_preprocess_scales_digits_pixels_to_the_unit_interval():
    preprocess = Preprocess(compose_config().dataset, max_value=16, device=torch.device("cpu"))
    x = torch.tensor([0, 4, 8, 16], dtype=torch.uint8).reshape(1, 1, 2, 2)
    # digits store 0..16; no normalisation on the digits stream: 0/16, 4/16, 8/16, 16/16
    assert preprocess(x).flatten().tolist() == [0.0, 0.25, 0.5, 1.0]


def test_preprocess_normalises_each_channel_with_the_data_sets_mean_and_std():
    dataset = compose_config(["dataset=cifar10"]).dataset
    preprocess = Preprocess(dataset, max_value=255, device=torch.device("cpu"))
    x = torch.zeros(1, 3, 2, 2, dtype=torch.uint8)
    x[:, :, 0, 0] = 255
    out = preprocess(x)  # no generator: the evaluation transform, no augmentation
    # full intensity: (255/255 - mean_c) / std_c; black: (0 - mean_c) / std_c, with cifar10.yaml's values
    white = [(1 - 0.4914) / 0.2470, (1 - 0.4822) / 0.2435, (1 - 0.4465) / 0.2615]  # 2.0591, 2.1265, 2.1166
    black = [-0.4914 / 0.2470, -0.4822 / 0.2435, -0.4465 / 0.2615]  # -1.9895, -1.9803, -1.7075
    assert out[0, :, 0, 0].tolist() == pytest.approx(white, abs=1e-5)
    assert out[0, :, 1, 1].tolist() == pytest.approx(black, abs=1e-5)
    assert out.dtype == torch.float32


def test_preprocess_uses_one_mean_for_all_pixels_of_a_grey_data_set():
    preprocess = Preprocess(compose_config(["dataset=fashion_mnist"]).dataset, 255, torch.device("cpu"))
    x = torch.tensor([0, 255], dtype=torch.uint8).reshape(1, 1, 1, 2)
    # Normalize(0.2860, 0.3530): (0 - 0.2860) / 0.3530 = -0.8102, (1 - 0.2860) / 0.3530 = 2.0227
    assert preprocess(x).flatten().tolist() == pytest.approx([-0.2860 / 0.3530, 0.7140 / 0.3530], abs=1e-5)


def test_training_transform_augments_deterministically_for_the_same_generator_state():
    dataset = compose_config(["dataset=cifar10"]).dataset  # crop 4 + flip
    preprocess = Preprocess(dataset, 255, torch.device("cpu"))
    x = torch.randint(0, 256, (64, 3, 32, 32), generator=generator(0), dtype=torch.uint8)
    first, again, other = (
        preprocess(x, generator(1)),
        preprocess(x, generator(1)),
        preprocess(x, generator(2)),
    )
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert not torch.equal(first, preprocess(x))  # the evaluation transform does not augment


def test_preprocess_can_return_channels_last_tensors():
    dataset = compose_config(["dataset=cifar10"]).dataset
    preprocess = Preprocess(dataset, 255, torch.device("cpu"), channels_last=True)
    x = torch.randint(0, 256, (2, 3, 8, 8), generator=generator(0), dtype=torch.uint8)
    out = preprocess(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, Preprocess(dataset, 255, torch.device("cpu"))(x))


# ----------------------------------------------------------------------------------------- augmentation
def distinct_images(n: int, c: int = 3, h: int = 6, w: int = 6, seed: int = 0) -> torch.Tensor:
    """Random values in [0.1, 1): no pixel is 0, so zero padding can never be mistaken for content."""
    return 0.1 + 0.9 * torch.rand(n, c, h, w, generator=generator(seed))


def test_random_crop_returns_a_shifted_window_of_the_padded_image():
    x, padding = distinct_images(200), 2
    out = random_crop(x, padding, generator(0))
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    offsets = []
    for i in range(len(x)):
        found = [
            (dy, dx)
            for dy in range(2 * padding + 1)
            for dx in range(2 * padding + 1)
            if torch.equal(out[i], padded[i, :, dy : dy + 6, dx : dx + 6])
        ]
        assert len(found) == 1, f"image {i} is not one window of its padded original"
        offsets.append(found[0])
    # 200 draws of 25 equally likely offsets leave one out with probability <= 25 * (24/25)^200 = 0.7%; asking
    # for 20 of them and for every shift in each direction stays safe if the random stream ever changes
    assert len(set(offsets)) >= 20
    assert {dy for dy, _ in offsets} == set(range(5)) and {dx for _, dx in offsets} == set(range(5))


def test_random_flip_mirrors_about_half_the_images():
    x = distinct_images(1000, c=1, h=4, w=4)
    out = random_flip(x, generator(0))
    flipped = torch.tensor([torch.equal(o, i.flip(2)) for o, i in zip(out, x, strict=True)])
    kept = torch.tensor([torch.equal(o, i) for o, i in zip(out, x, strict=True)])
    assert bool((flipped ^ kept).all())  # each image is either itself or its horizontal mirror
    # Binomial(1000, 0.5): mean 500, sd sqrt(250) = 15.8; 430..570 is about 4.4 sd
    assert 430 <= int(flipped.sum()) <= 570


def test_random_rotation_by_zero_degrees_is_the_identity():
    x = distinct_images(8)
    assert torch.allclose(random_rotation(x, 0.0, generator(0)), x, atol=1e-6)


def test_random_rotation_turns_the_image_about_its_centre():
    x = distinct_images(50, c=1, h=9, w=9)
    out = random_rotation(x, 30.0, generator(0))
    # the centre pixel of an odd-sized image sits on the rotation's axis: it keeps its value
    assert torch.allclose(out[:, :, 4, 4], x[:, :, 4, 4], atol=1e-5)
    # elsewhere the images changed (a random angle in [-30, 30] degrees is almost never 0)
    assert sum(not torch.allclose(o, i, atol=1e-3) for o, i in zip(out, x, strict=True)) >= 48


@pytest.mark.parametrize(
    "augment", [lambda x, g: random_crop(x, 3, g), random_flip, lambda x, g: random_rotation(x, 15.0, g)]
)
def test_augmentation_is_deterministic_for_the_same_generator_state(augment):
    x = distinct_images(32)
    assert torch.equal(augment(x, generator(5)), augment(x, generator(5)))
    assert not torch.equal(augment(x, generator(5)), augment(x, generator(6)))
