"""Streamed images (hardware.device_data_gb): rows read a batch at a time from host memory or a .npy file, the
same batches and the same numbers as device-resident images, a background reader that stops cleanly."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from conftest import assert_resumes_exactly, compose_config, run_experiment

from incr_cli.cli import main
from incr_cli.data.batches import DeviceBatches, eval_batches
from incr_cli.data.stream import Stream, Task
from incr_cli.data.streamed import StreamedImages, budget_bytes, place, prefetched

ONE_EPOCH = ["hardware=cpu", "epochs=1"]


def numbered_images(n: int = 50) -> torch.Tensor:
    """n images of 2x3x4 whose every pixel is (row number + channel) mod 256: a row read is recognisable."""
    rows = torch.arange(n).reshape(n, 1, 1, 1) + torch.arange(2).reshape(1, 2, 1, 1)
    return (rows % 256).expand(n, 2, 3, 4).to(torch.uint8).contiguous()


@pytest.fixture
def images_file(tmp_path):
    path = tmp_path / "images.npy"
    np.save(path, numbered_images().numpy())
    return path


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "incr-prefetch"]


# ----------------------------------------------------------------------------------------- reading rows
def test_rows_read_from_a_npy_file_equal_the_arrays_rows(images_file):
    host = torch.from_numpy(np.load(images_file, mmap_mode="c"))
    streamed = StreamedImages(host, torch.device("cpu"), images_file)
    expected = numbered_images()
    rows = torch.tensor([7, 0, 49, 7])
    assert torch.equal(streamed[rows], expected[rows])
    assert torch.equal(streamed[3:6], expected[3:6])
    assert torch.equal(streamed[torch.tensor(12)], expected[12])
    assert streamed[0:0].shape == (0, 2, 3, 4)
    mask = torch.zeros(50, dtype=torch.bool)
    mask[[1, 4]] = True
    assert torch.equal(streamed[mask], expected[mask])
    assert len(streamed) == 50 and streamed.nbytes == expected.numel()
    with pytest.raises(IndexError, match="row 50 is out of range for 50 images"):
        streamed[torch.tensor([50])]


def test_rows_of_an_in_memory_tensor_come_from_the_tensor():
    images = numbered_images()
    streamed = StreamedImages(images, torch.device("cpu"))
    out = torch.full((2, 2, 3, 4), 255, dtype=torch.uint8)
    assert streamed.gather(torch.tensor([5, 6]), out=out) is out
    assert torch.equal(out, images[5:7])


# ----------------------------------------------------------------------------------------- the reader
def test_prefetched_batches_are_the_resident_batches_in_order(images_file):
    host = torch.from_numpy(np.load(images_file, mmap_mode="c"))
    streamed = StreamedImages(host, torch.device("cpu"), images_file)
    chunks = [(torch.randperm(50)[:8], 0.5) for _ in range(9)]
    got = list(prefetched(streamed, iter(chunks)))
    assert len(got) == 9
    for (x, rows, weight), (expected_rows, expected_weight) in zip(got, chunks, strict=True):
        assert torch.equal(rows, expected_rows) and weight == expected_weight
        assert torch.equal(x, numbered_images()[expected_rows])
    assert not prefetch_threads()


def test_leaving_an_epoch_early_stops_the_reading_thread():
    streamed = StreamedImages(numbered_images(), torch.device("cpu"))
    batches = prefetched(streamed, ((torch.tensor([i]), 1.0) for i in range(50)))
    next(batches)
    assert prefetch_threads()  # reading ahead
    batches.close()  # what a checkpoint-and-stop or an exception in the training step does
    assert not prefetch_threads()


def test_a_read_error_reaches_the_consumer_at_its_batch(images_file):
    host = torch.from_numpy(np.load(images_file, mmap_mode="c"))
    streamed = StreamedImages(host, torch.device("cpu"), images_file)
    batches = prefetched(streamed, iter([(torch.tensor([1]), 1.0), (torch.tensor([99]), 1.0)]))
    x, _, _ = next(batches)
    assert x[0, 0, 0, 0] == 1
    with pytest.raises(IndexError, match="row 99"):
        next(batches)
    assert not prefetch_threads()


def test_device_batches_and_evaluation_batches_are_the_same_streamed_or_resident():
    images, labels = numbered_images(), torch.arange(50)
    index = torch.arange(3, 47)
    resident = DeviceBatches(images, labels, index, 6, seed=4, task_id=2)
    streamed = DeviceBatches(StreamedImages(images, torch.device("cpu")), labels, index, 6, seed=4, task_id=2)
    for start in (0, 3):
        expected = list(resident.epoch(1, start=start))
        got = list(streamed.epoch(1, start=start))
        assert [b.y.tolist() for b in got] == [b.y.tolist() for b in expected]
        assert all(torch.equal(a.x, b.x) for a, b in zip(got, expected, strict=True))
    rows = torch.tensor([9, 2, 40, 41, 0])
    chunks = list(eval_batches(StreamedImages(images, torch.device("cpu")), rows, 2))
    assert [len(c) for c in chunks] == [2, 2, 1]
    assert torch.equal(torch.cat(chunks), images[rows])


# ----------------------------------------------------------------------------------------- the budget
def tiny_stream(images: torch.Tensor, files: dict | None = None) -> Stream:
    labels = torch.arange(len(images)) % 2
    task = Task(0, [0, 1], torch.arange(len(images)), torch.arange(0), torch.arange(len(images)))
    return Stream(images, labels, images, labels, [task], [0, 1], ["a", "b"], 255, files or {})


def test_images_over_the_budget_are_streamed_and_under_it_stay_resident(images_file):
    host = torch.from_numpy(np.load(images_file, mmap_mode="c"))
    stream = tiny_stream(host, {"train_x": images_file, "test_x": images_file})
    size_gb = 2 * host.numel() / 1e9
    over = place(
        stream, torch.device("cpu"), compose_config([f"hardware.device_data_gb={size_gb / 2}"]).hardware
    )
    assert isinstance(over.train_x, StreamedImages) and over.train_x.file == images_file
    assert isinstance(over.test_x, StreamedImages)
    assert torch.equal(over.train_y, stream.train_y)
    under = place(
        stream, torch.device("cpu"), compose_config([f"hardware.device_data_gb={size_gb}"]).hardware
    )
    assert isinstance(under.train_x, torch.Tensor)


def test_the_default_budget_is_half_of_what_the_device_has_free(monkeypatch):
    monkeypatch.setattr("incr_cli.data.streamed.available_host_bytes", lambda: 8e9)
    assert budget_bytes(compose_config().hardware, torch.device("cpu")) == 4e9
    assert (
        budget_bytes(compose_config(["hardware.device_data_gb=1.5"]).hardware, torch.device("cpu")) == 1.5e9
    )


def test_a_negative_budget_is_a_one_line_error(capsys):
    assert main(["train", "hardware.device_data_gb=-1", "progress=false"]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error
    assert "hardware.device_data_gb=-1" in error and "0 or more" in error


# ----------------------------------------------------------------------------------------- whole runs
@pytest.mark.parametrize("strategy", ["replay", "derpp"])
def test_a_streamed_run_equals_the_resident_run(tmp_path, strategy):
    settings = [f"strategy={strategy}", *ONE_EPOCH]
    resident = run_experiment(tmp_path / "resident", settings)
    streamed = run_experiment(tmp_path / "streamed", [*settings, "hardware.device_data_gb=0"])
    assert "streamed to cpu from host memory" in (tmp_path / "streamed" / "train.log").read_text()
    assert "streamed to" not in (tmp_path / "resident" / "train.log").read_text()
    for scenario in ("class_il", "task_il"):
        assert streamed[scenario]["accuracy_matrix"] == resident[scenario]["accuracy_matrix"]


def test_a_streamed_run_killed_and_resumed_equals_the_uninterrupted_one(tmp_path):
    resumed = assert_resumes_exactly(tmp_path, ["strategy=derpp", "epochs=1", "hardware.device_data_gb=0"])
    assert resumed["run"]["status"] == "finished"
    assert "streamed to cpu" in (tmp_path / "interrupted" / "train.log").read_text()


def test_herding_and_mas_read_their_task_through_the_streamed_path(tmp_path):
    for strategy in ("icarl", "mas"):
        settings = [f"strategy={strategy}", *ONE_EPOCH, "dataset.n_tasks=2"]
        resident = run_experiment(tmp_path / f"{strategy}_resident", settings)
        streamed = run_experiment(tmp_path / f"{strategy}_streamed", [*settings, "hardware.device_data_gb=0"])
        assert streamed["class_il"]["accuracy_matrix"] == resident["class_il"]["accuracy_matrix"]


@pytest.mark.parametrize("selection", ["reservoir", "class_balanced"])
def test_a_memory_offered_streamed_rows_reads_only_what_it_keeps(selection, monkeypatch):
    from incr_cli.data.streamed import StreamedRows
    from incr_cli.memory import Memory

    images, labels = numbered_images(), torch.arange(50) % 5
    rows = torch.arange(10, 50)
    resident = Memory(6, selection=selection)
    resident.add(images[rows], labels[rows], torch.Generator().manual_seed(3))
    read = []
    streamed_images = StreamedImages(images, torch.device("cpu"))
    gather = streamed_images.gather
    monkeypatch.setattr(streamed_images, "gather", lambda r, out=None: read.append(len(r)) or gather(r, out))
    streamed = Memory(6, selection=selection)
    streamed.add(StreamedRows(streamed_images, rows), labels[rows], torch.Generator().manual_seed(3))
    assert torch.equal(streamed.x, resident.x) and torch.equal(streamed.y, resident.y)
    # the kept samples (reservoir: the first six, then the later ones that replace some), never the 40 offered
    assert sum(read) <= 2 * 6


def test_under_ddp_each_rank_reads_only_its_slice_of_every_batch(monkeypatch):
    # this rank's slice: the second half of every global batch (distributed.shard under 2 ranks, rank 1)
    monkeypatch.setattr(
        "incr_cli.data.batches.distributed.shard",
        lambda rows: (rows[len(rows) // 2 :], len(rows[len(rows) // 2 :]) / len(rows)),
    )
    images = StreamedImages(numbered_images(), torch.device("cpu"))
    read = []
    gather = images.gather
    monkeypatch.setattr(images, "gather", lambda r, out=None: read.append(r.tolist()) or gather(r, out))
    batches = list(DeviceBatches(images, torch.arange(50), torch.arange(40), 8, seed=0, task_id=0).epoch(0))
    assert [b.y.tolist() for b in batches] == read  # what was read is exactly what each batch trains on
    assert sum(len(r) for r in read) == 20 and all(len(r) == 4 for r in read)
    assert all(b.weight == 0.5 for b in batches)
