"""Images that stay in host memory or on disk, read a batch at a time: the data path for data sets larger than
the training device's budget (`hardware.device_data_gb`).

Every consumer indexes the images as it indexes a device tensor (`images[rows]`, a uint8 batch on the device),
so training batches, replay memories, herding, evaluation and `incr eval` need no second code path. Rows of a
memory-mapped image-folder cache are read with `pread` straight into the batch buffer rather than through the
memory map: mapped pages count toward the process's resident memory for as long as they stay mapped, read ones
only toward the kernel's page cache, which it can drop.

`prefetched` reads the next batches in a background thread while the current one computes; on a GPU into
pinned host buffers, copied to the device on a side CUDA stream. It holds no state a checkpoint needs: batch
order comes from the caller (from the seed), so a resumed run reads exactly the rows it would have read."""

from __future__ import annotations

import logging
import math
import os
import queue
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor

from incr_cli.data.stream import Stream

log = logging.getLogger("incr")

# With hardware.device_data_gb null, the images are kept on the device when they take at most this fraction of
# its free memory (a GPU) or of the memory the kernel reports available (the CPU); the rest is left for the
# model, its activations, the optimizer and the method's own copies.
DEFAULT_BUDGET_FRACTION = 0.5
PREFETCH_DEPTH = 2  # batches read ahead: one being read while one waits, so reading never stalls compute
# ... unless they are large (an evaluation batch of 256-pixel images): then one, so that the batches held at
# once (the one in use, the one waiting, the one being read) stay within a few times this many bytes
READ_AHEAD_BYTES = 64 * 2**20


class StreamedImages:
    """uint8 images [N, C, H, W] kept off the training device; `images[rows]` is those rows on the device."""

    def __init__(self, host: Tensor, device: torch.device, file: Path | None = None):
        if host.device.type != "cpu":
            raise ValueError("streamed images live in host memory or on disk")
        self.host, self.device = host, torch.device(device)
        self.shape, self.dtype = host.shape, host.dtype
        self.row_bytes = math.prod(host.shape[1:]) * host.element_size()
        self.file, self.offset = file, None
        if file is not None:  # read rows from the .npy file itself (see the module docstring)
            header = np.load(file, mmap_mode="r")
            if tuple(header.shape) != tuple(host.shape) or not header.flags.c_contiguous:
                raise ValueError(f"{file} does not hold these images as one C-ordered array")
            self.offset = int(header.offset)
            del header
        self._descriptor: int | None = None

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        return len(self) * self.row_bytes

    def gather(self, rows: Tensor, out: Tensor | None = None) -> Tensor:
        """The rows in host memory (into `out`, a [len(rows), C, H, W] buffer, when given)."""
        rows = rows.cpu()
        if out is None:
            out = torch.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        if self.file is None:
            torch.index_select(self.host, 0, rows, out=out)
            return out
        if not len(rows):
            return out
        descriptor = self._open()
        buffer = out.numpy().reshape(len(rows), -1)
        for i, row in enumerate(rows.tolist()):
            if not 0 <= row < len(self):
                raise IndexError(f"row {row} is out of range for {len(self)} images")
            done = os.preadv(descriptor, [buffer[i]], self.offset + row * self.row_bytes)
            if done != self.row_bytes:
                raise OSError(f"{self.file}: short read of row {row} ({done} of {self.row_bytes} bytes)")
        return out

    def __getitem__(self, rows) -> Tensor:
        if isinstance(rows, slice):
            rows = torch.arange(len(self))[rows]
        rows = torch.as_tensor(rows)
        if rows.dtype == torch.bool:
            rows = torch.nonzero(rows.cpu()).flatten()
        if rows.dim() == 0:
            return self.gather(rows.reshape(1))[0].to(self.device)
        return self.gather(rows).to(self.device)

    def _open(self) -> int:
        if self._descriptor is None:
            self._descriptor = os.open(self.file, os.O_RDONLY)
        return self._descriptor

    def __del__(self) -> None:
        if getattr(self, "_descriptor", None) is not None:
            os.close(self._descriptor)


class StreamedRows:
    """Some rows of streamed images, read only when indexed (`rows_view[i]` is images[rows[i]] on the device):
    what a strategy offers its memory at a task's end, so that only the samples the memory keeps, and the
    batches its selection scores, are ever read, never the task's images at once."""

    def __init__(self, images: StreamedImages, rows: Tensor):
        self.images, self.rows = images, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index) -> Tensor:
        if isinstance(index, Tensor):
            index = index.to(self.rows.device)
        return self.images[self.rows[index]]


def budget_bytes(hardware: DictConfig, device: torch.device) -> float:
    """How many bytes of images may live on `device`: hardware.device_data_gb, or by default a safe fraction
    of what the device has free."""
    given = hardware.get("device_data_gb")
    if given is not None:
        return float(given) * 1e9
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return DEFAULT_BUDGET_FRACTION * free
    return DEFAULT_BUDGET_FRACTION * available_host_bytes()


def place(stream: Stream, device: torch.device, hardware: DictConfig) -> Stream:
    """The stream on the training device: whole when its images fit the budget (`budget_bytes`), else with
    labels and task indices on the device and the images streamed (`StreamedImages`)."""
    size = stream.train_x.nbytes + stream.test_x.nbytes
    budget = budget_bytes(hardware, device)
    if size <= budget:
        return stream.to(device)
    files = stream.image_files
    log.info(
        "%.2f GB of images above the device budget of %.2f GB (hardware.device_data_gb): streamed to %s from %s",
        size / 1e9,
        budget / 1e9,
        device,
        "the cache's files on disk" if files else "host memory",
    )
    placed = stream.to(device, images=False)
    placed.train_x = StreamedImages(stream.train_x, device, files.get("train_x"))
    placed.test_x = StreamedImages(stream.test_x, device, files.get("test_x"))
    return placed


def available_host_bytes() -> float:
    """MemAvailable from /proc/meminfo (Linux); elsewhere no limit is known."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return math.inf


def prefetched(images, batches: Iterable[tuple[Tensor, float]]) -> Iterator[tuple[Tensor, Tensor, float]]:
    """(x, rows, weight) for each (rows, weight) of `batches`: x = images[rows] and rows, both on the training
    device. With streamed images a background thread reads up to PREFETCH_DEPTH batches ahead; device-resident
    images are sliced in place."""
    if not isinstance(images, StreamedImages):
        for rows, weight in batches:
            yield images[rows], rows, weight
        return
    reader = _Prefetcher(images, iter(batches))
    try:
        while (item := reader.next()) is not None:
            yield item
    finally:
        reader.close()


class _Prefetcher:
    """The background reader of `prefetched`: rows -> host buffer -> (GPU: pinned, copied on a side stream)."""

    def __init__(self, images: StreamedImages, batches: Iterator[tuple[Tensor, float]]):
        self.images, self.batches = images, batches
        self.cuda = images.device.type == "cuda"
        self.queue: queue.Queue = queue.Queue(maxsize=PREFETCH_DEPTH)  # resized by the first batch (`_put`)
        self.stopping = threading.Event()
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(images.device)
            # one more buffer than can wait in the queue, plus the one being filled: a buffer is refilled only
            # after the copy that read it has finished (its event)
            slots = PREFETCH_DEPTH + 2
            self.buffers: list[tuple[Tensor | None, torch.cuda.Event | None]] = [(None, None)] * slots
        self.thread = threading.Thread(target=self._work, name="incr-prefetch", daemon=True)
        self.thread.start()

    def _work(self) -> None:
        try:
            if self.cuda:  # the current device is per thread: this rank's GPU, not device 0
                torch.cuda.set_device(self.images.device)
            for number, (rows, weight) in enumerate(self.batches):
                if self.stopping.is_set():
                    return
                if number == 0 and len(rows) * self.images.row_bytes > READ_AHEAD_BYTES // PREFETCH_DEPTH:
                    self.queue.maxsize = 1  # large batches: one waits, not two
                x, ready = self._read(number, rows)
                if not self._put((rows, x, weight, ready)):
                    return
        except BaseException as error:  # handed to the consumer, which raises it
            self._put(error)
            return
        self._put(None)

    def _read(self, number: int, rows: Tensor) -> tuple[Tensor, torch.cuda.Event | None]:
        if not self.cuda:
            return self.images.gather(rows), None
        slot = number % len(self.buffers)
        buffer, copied = self.buffers[slot]
        if copied is not None:
            copied.synchronize()
        shape = (len(rows), *self.images.shape[1:])
        if buffer is None or buffer.shape[0] < len(rows):
            buffer = torch.empty(shape, dtype=self.images.dtype, pin_memory=True)
        host = self.images.gather(rows, out=buffer[: len(rows)])
        with torch.cuda.stream(self.copy_stream):
            x = host.to(self.images.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.copy_stream)
        self.buffers[slot] = (buffer, done)
        return x, done

    def _put(self, item) -> bool:
        while not self.stopping.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def next(self) -> tuple[Tensor, Tensor, float] | None:
        """The next batch's images and rows on the device, and its weight; None after the last."""
        item = self.queue.get()
        if isinstance(item, BaseException):
            raise item
        if item is None:
            return None
        rows, x, weight, ready = item
        if ready is not None:  # the compute stream waits for the copy, and owns the tensor from here
            current = torch.cuda.current_stream(self.images.device)
            current.wait_event(ready)
            x.record_stream(current)
        return x, rows.to(self.images.device), weight

    def close(self) -> None:
        self.stopping.set()
        while self.thread.is_alive():
            try:
                self.queue.get(timeout=0.1)
            except queue.Empty:
                pass
        self.thread.join()
