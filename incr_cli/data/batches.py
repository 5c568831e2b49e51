"""Mini-batches cut from device-resident tensors, and batched preprocessing and augmentation on the device."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor

from incr_cli import distributed
from incr_cli.data.streamed import StreamedImages, prefetched

log = logging.getLogger("incr")

# resized crops turn at most this many bytes of uint8 images into floats at once (see `resized_crops`)
RESIZE_CHUNK_BYTES = 16 * 2**20


@dataclass
class Batch:
    """Raw uint8 images and their labels; strategies join replayed samples before preprocessing."""

    x: Tensor
    y: Tensor
    # hardware=ddp: this rank's share of the global batch, its weight in the gradient average
    weight: float = 1.0

    def __len__(self) -> int:
        return len(self.y)

    def join(self, other: Batch) -> Batch:
        return Batch(torch.cat([self.x, other.x]), torch.cat([self.y, other.y]), self.weight)


class DeviceBatches:
    """Shuffled mini-batches of `index` into tensors that already live on the training device.

    Each epoch's order comes from a generator seeded by (seed, task, epoch) alone, so a run resumed in the
    middle of an epoch cuts exactly the batches the uninterrupted run would have cut, and under hardware=ddp
    every rank cuts the same global batches and keeps its own slice."""

    def __init__(self, x: Tensor, y: Tensor, index: Tensor, batch_size: int, seed: int, task_id: int):
        self.x, self.y, self.index = x, y, index
        self.batch_size, self.seed, self.task_id = batch_size, seed, task_id

    def __len__(self) -> int:
        return math.ceil(len(self.index) / self.batch_size)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_000 + self.task_id * 1_000 + epoch)
        permutation = torch.randperm(len(self.index), generator=generator)
        if isinstance(self.x, StreamedImages):  # rows stay on the host, where the reading thread needs them
            order = self.index.cpu()[permutation]
        else:
            order = self.index[permutation.to(self.index.device)]
        # hardware=ddp: each rank reads only its own slice of every global batch
        shards = (
            distributed.shard(order[first : first + self.batch_size])
            for first in range(start * self.batch_size, len(order), self.batch_size)
        )
        for x, rows, weight in prefetched(self.x, shards):
            yield Batch(x, self.y[rows], weight)


def eval_batches(x: Tensor | StreamedImages, rows: Tensor, batch_size: int) -> Iterator[Tensor]:
    """x[rows] a batch at a time: a memory-mapped or streamed data set is read batch by batch, never whole."""
    if isinstance(x, StreamedImages):
        rows = rows.cpu()
    chunks = ((rows[first : first + batch_size], 1.0) for first in range(0, len(rows), batch_size))
    for images, _, _ in prefetched(x, chunks):
        yield images


class Preprocess:
    """uint8 -> float in [0, 1] -> normalised, with optional augmentation, all as batched tensor ops."""

    def __init__(
        self, dataset: DictConfig, max_value: int, device: torch.device, channels_last: bool = False
    ):
        channels = dataset.input_shape[0]
        self.scale = 1.0 / max_value
        mean = torch.tensor(list(dataset.mean) if dataset.normalize else [0.0], dtype=torch.float32)
        std = torch.tensor(list(dataset.std) if dataset.normalize else [1.0], dtype=torch.float32)
        self.mean = mean.expand(channels).reshape(1, channels, 1, 1).to(device)
        self.std = std.expand(channels).reshape(1, channels, 1, 1).to(device)
        self.crop_padding = int(dataset.augment.crop_padding)
        self.flip = bool(dataset.augment.horizontal_flip)
        self.rotation = float(dataset.augment.rotation_degrees)
        self.crop_size = dataset.get("crop_size")
        self.resized_crop = bool(dataset.augment.get("random_resized_crop", False))
        self.crop_scale = tuple(dataset.augment.get("crop_scale", (0.08, 1.0)))
        self.crop_ratio = tuple(dataset.augment.get("crop_ratio", (3 / 4, 4 / 3)))
        self.channels_last = channels_last
        self.rank_generator: torch.Generator | None = None

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Evaluation transform without a generator; with one, the training transform (augmentation)."""
        resized_crop = generator is not None and self.resized_crop
        if generator is not None and distributed.active():
            # Ranks augment slices of different sizes: drawing from the shared run generator would make its
            # state, and so every later shared draw (replay samples), differ from rank to rank.
            generator = self._rank_generator(generator.device)
        if resized_crop:
            # cut from the uint8 pixels, so that only the crops, never the whole large images, become floats
            x = random_resized_crop(x, self.crop_size, self.crop_scale, self.crop_ratio, generator)
        elif self.crop_size is not None:
            x = center_crop(x, self.crop_size)  # on the uint8 pixels: a slice, before any arithmetic
        x = x.float() * self.scale
        if generator is not None and (self.crop_padding or self.flip or self.rotation):
            if self.crop_padding:
                x = random_crop(x, self.crop_padding, generator)
            if self.flip:
                x = random_flip(x, generator)
            if self.rotation:
                x = random_rotation(x, self.rotation, generator)
        x = (x - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def rank_generator_states(self) -> list[Tensor] | None:
        """hardware=ddp: every rank's augmentation generator state, in rank order, for rank 0's checkpoint (a
        collective: every rank calls it); None otherwise, where augmentation draws from the run generator."""
        if not distributed.active():
            return None
        return distributed.gather(self._rank_generator(self.mean.device).get_state())

    def restore_rank_generators(self, states: list[Tensor] | None) -> None:
        """This rank's augmentation generator as a checkpoint saved it (`rank_generator_states`)."""
        if not distributed.active() or states is None:
            return
        if len(states) != distributed.world_size():
            log.warning(
                "the checkpoint holds the augmentation state of %d ranks, not %d: augmentation restarts from "
                "its seed, so the resumed run will not repeat the uninterrupted one exactly",
                len(states),
                distributed.world_size(),
            )
            return
        self._rank_generator(self.mean.device).set_state(states[distributed.rank()])

    def _rank_generator(self, device: torch.device) -> torch.Generator:
        if self.rank_generator is None:
            seed = torch.initial_seed() + 7919 * distributed.rank()
            self.rank_generator = torch.Generator(device=device).manual_seed(seed)
        return self.rank_generator


def random_crop(x: Tensor, padding: int, generator: torch.Generator) -> Tensor:
    """Zero-pad by `padding` and cut a random HxW window per image (the CIFAR crop of He et al. 2016)."""
    n, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=x.device)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=x.device)
    rows = (torch.arange(h, device=x.device) + dy[:, None])[:, None, :, None]
    cols = (torch.arange(w, device=x.device) + dx[:, None])[:, None, None, :]
    samples = torch.arange(n, device=x.device)[:, None, None, None]
    channels = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[samples, channels, rows, cols]


def center_crop(x: Tensor, size: int) -> Tensor:
    """The central size x size window of each image; an odd margin leaves its extra pixel at the bottom and right."""
    height, width = x.shape[-2:]
    top, left = (height - size) // 2, (width - size) // 2
    return x[..., top : top + size, left : left + size]


def random_resized_crop(
    x: Tensor, size: int, scale: tuple[float, float], ratio: tuple[float, float], generator: torch.Generator
) -> Tensor:
    """torchvision's RandomResizedCrop, batched: each image's window (`resized_crop_windows`) resized to
    size x size."""
    windows = resized_crop_windows(len(x), *x.shape[-2:], scale, ratio, generator)
    return resized_crops(x, windows, size)


def resized_crop_windows(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
    attempts: int = 10,
) -> Tensor:
    """[n, 4] windows (top, left, height, width): area a uniform fraction `scale` of the image's, aspect ratio
    (w / h) log-uniform in `ratio`, sides rounded, position uniform. As in torchvision, up to `attempts`
    windows are drawn per image and the first that fits is kept; an image with none gets its whole, centred
    window at the nearest allowed ratio."""
    device = generator.device
    area = height * width * torch.empty(n, attempts, device=device).uniform_(*scale, generator=generator)
    log_ratio = torch.empty(n, attempts, device=device).uniform_(
        math.log(ratio[0]), math.log(ratio[1]), generator=generator
    )
    aspect = log_ratio.exp()
    w, h = (area * aspect).sqrt().round(), (area / aspect).sqrt().round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    found = fits.any(1)
    pick = fits.float().argmax(1, keepdim=True)  # the first attempt that fits
    w, h = w.gather(1, pick)[:, 0], h.gather(1, pick)[:, 0]
    whole = width / height
    fallback_w = min(width, round(height * ratio[1])) if whole > ratio[1] else width
    fallback_h = min(height, round(width / ratio[0])) if whole < ratio[0] else height
    w = torch.where(found, w, torch.full_like(w, fallback_w))
    h = torch.where(found, h, torch.full_like(h, fallback_h))
    u = torch.rand(n, 2, device=device, generator=generator)
    top = torch.where(found, (u[:, 0] * (height - h + 1)).floor(), ((height - h) / 2).floor())
    left = torch.where(found, (u[:, 1] * (width - w + 1)).floor(), ((width - w) / 2).floor())
    return torch.stack([top, left, h, w], 1)


def resized_crops(x: Tensor, windows: Tensor, size: int) -> Tensor:
    """Each image's window (top, left, height, width) resized bilinearly to size x size, sampled as
    F.interpolate(align_corners=False) samples the cut-out window (no antialiasing; positions past the
    window's edge pixels are clamped to them), in one grid_sample over the batch."""
    n, _, height, width = x.shape
    top, left, h, w = windows.to(x.device, torch.float32).unbind(1)
    steps = torch.arange(size, device=x.device, dtype=torch.float32) + 0.5

    def normalised(start: Tensor, length: Tensor, side: int) -> Tensor:
        """Output positions -> source pixel coordinates in the window -> grid_sample's [-1, 1]."""
        source = steps[None] * (length / size)[:, None] - 0.5
        source = torch.minimum(source.clamp(min=0), (length - 1)[:, None]) + start[:, None]
        return (2 * source + 1) / side - 1

    rows, cols = normalised(top, h, height), normalised(left, w, width)
    grid = torch.stack(torch.broadcast_tensors(cols[:, None, :], rows[:, :, None]), dim=-1)
    # grid_sample needs floats: convert a few images at a time, so that a batch of large uint8 images never
    # exists as floats whole (4 bytes a pixel; 50 MB for 64 images at 256x256)
    per_chunk = max(1, RESIZE_CHUNK_BYTES // (x[0].numel() * 4))
    out = torch.empty((n, x.shape[1], size, size), device=x.device, dtype=torch.float32)
    for first in range(0, n, per_chunk):
        chunk = slice(first, first + per_chunk)
        out[chunk] = F.grid_sample(
            x[chunk].float(), grid[chunk], mode="bilinear", padding_mode="border", align_corners=False
        )
    return out


def random_flip(x: Tensor, generator: torch.Generator) -> Tensor:
    flip = torch.rand(len(x), generator=generator, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def random_rotation(x: Tensor, degrees: float, generator: torch.Generator) -> Tensor:
    """Rotate each image by an angle drawn uniformly from [-degrees, degrees], bilinear, zeros outside."""
    angle = (torch.rand(len(x), generator=generator, device=x.device) * 2 - 1) * math.radians(degrees)
    cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
