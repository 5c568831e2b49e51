"""Files on disk -> uint8 tensors: small files written in the real MNIST (IDX) and CIFAR (python pickle)
formats, read back through `load_source`, and trained on end to end."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_config, run_experiment

from incr_cli.data.mnist import FASHION_CLASSES
from incr_cli.data.sources import load_source
from incr_cli.errors import ConfigError

TRAIN_PER_CLASS, TEST_PER_CLASS = 20, 5


# ----------------------------------------------------------------------------------------- writers
def write_idx(path: Path, array: np.ndarray, *, gz: bool, keep_values: int | None = None) -> Path:
    """LeCun's IDX format: 0x00 0x00, type 0x08 (uint8), number of dimensions, each dimension as a big-endian
    int32, then the values. `keep_values` cuts the data short (a truncated file)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = array.astype(np.uint8).tobytes()
    if keep_values is not None:
        data = data[:keep_values]
    path = path.with_name(path.name + ".gz") if gz else path
    path.parent.mkdir(parents=True, exist_ok=True)
    with (gzip.open if gz else open)(path, "wb") as handle:
        handle.write(header + data)
    return path


def labels_for(per_class: int, n_classes: int = 10) -> np.ndarray:
    return np.tile(np.arange(n_classes), per_class).astype(np.uint8)  # interleaved: sample i has class i % n


def mnist_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    n_train, n_test = 10 * TRAIN_PER_CLASS, 10 * TEST_PER_CLASS
    return {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": labels_for(TRAIN_PER_CLASS),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": labels_for(TEST_PER_CLASS),
    }


def write_mnist(folder: Path, *, gz: bool = True) -> dict[str, np.ndarray]:
    arrays = mnist_arrays()
    for stem, array in arrays.items():
        write_idx(folder / stem, array, gz=gz)
    return arrays


def write_pickle(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        pickle.dump(data, handle, protocol=2)


def cifar_rows(n: int, rng: np.random.Generator) -> np.ndarray:
    """n images as the release stores them: 3072 bytes per row, the red plane, then green, then blue."""
    return rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)


def write_cifar10(root: Path) -> dict[str, np.ndarray]:
    rng, folder = np.random.default_rng(0), root / "cifar-10-batches-py"
    labels = labels_for(TRAIN_PER_CLASS).astype(np.int64)
    data = cifar_rows(len(labels), rng)
    for i, rows in enumerate(np.array_split(np.arange(len(labels)), 5)):
        write_pickle(
            folder / f"data_batch_{i + 1}",
            {
                "batch_label": f"training batch {i + 1} of 5",
                "labels": labels[rows].tolist(),
                "data": data[rows],
                "filenames": [f"{r}.png" for r in rows],
            },
        )
    test_labels = labels_for(TEST_PER_CLASS).astype(np.int64)
    test_data = cifar_rows(len(test_labels), rng)
    write_pickle(
        folder / "test_batch",
        {
            "batch_label": "testing batch 1 of 1",
            "labels": test_labels.tolist(),
            "data": test_data,
            "filenames": [],
        },
    )
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    write_pickle(folder / "batches.meta", {"num_cases_per_batch": 40, "label_names": names, "num_vis": 3072})
    return {"train_x": data, "train_y": labels, "test_x": test_data, "test_y": test_labels}


def write_cifar100(root: Path) -> dict[str, np.ndarray]:
    rng, folder = np.random.default_rng(1), root / "cifar-100-python"
    train_y, test_y = labels_for(2, 100).astype(np.int64), labels_for(1, 100).astype(np.int64)
    train_x, test_x = cifar_rows(len(train_y), rng), cifar_rows(len(test_y), rng)
    for name, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
        write_pickle(
            folder / name,
            {
                "filenames": [],
                "batch_label": name,
                "fine_labels": y.tolist(),
                "coarse_labels": (y // 5).tolist(),
                "data": x,
            },
        )
    write_pickle(
        folder / "meta",
        {
            "fine_label_names": [f"fine{c}" for c in range(100)],
            "coarse_label_names": [f"coarse{c}" for c in range(20)],
        },
    )
    return {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}


def data_config(root: Path, *overrides: str):
    """The `data` node of the config `incr train data.root=ROOT ...` composes."""
    return compose_config([f"data.root={root}", *overrides]).data


# ----------------------------------------------------------------------------------------- MNIST family
@pytest.mark.parametrize("gz", [True, False], ids=["gzipped", "plain"])
@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_mnist_idx_files_load_in_both_layouts(tmp_path, layout, gz):
    folder = tmp_path if layout == "flat" else tmp_path / "MNIST" / "raw"
    arrays = write_mnist(folder, gz=gz)
    source = load_source("mnist", data_config(tmp_path))
    assert source.train_x.shape == (200, 1, 28, 28) and source.train_x.dtype == torch.uint8
    assert source.test_x.shape == (50, 1, 28, 28) and source.test_y.dtype == torch.int64
    assert np.array_equal(source.train_x[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    assert np.array_equal(source.test_x[:, 0].numpy(), arrays["t10k-images-idx3-ubyte"])
    assert source.train_y.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert source.test_y.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    assert source.class_names == [str(c) for c in range(10)] and source.max_value == 255


def test_fashion_mnist_reads_torchvisions_folder_and_names_its_classes(tmp_path):
    arrays = write_mnist(tmp_path / "FashionMNIST" / "raw")
    source = load_source("fashion_mnist", data_config(tmp_path, "dataset=fashion_mnist"))
    assert np.array_equal(source.train_x[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    assert source.class_names == FASHION_CLASSES
    assert source.class_names[9] == "Ankle boot"


def test_decoded_idx_tensors_are_cached_and_a_changed_file_is_read_again(tmp_path):
    arrays = write_mnist(tmp_path)
    first = load_source("mnist", data_config(tmp_path))
    caches = list((tmp_path / ".incr-cache").glob("mnist-*.pt"))
    assert len(caches) == 1
    cached = load_source("mnist", data_config(tmp_path))
    assert torch.equal(cached.train_x, first.train_x) and torch.equal(cached.test_y, first.test_y)
    # new labels in a file of the same size: the cache is keyed by size and modification time
    path = write_idx(
        tmp_path / "train-labels-idx1-ubyte", (arrays["train-labels-idx1-ubyte"] + 1) % 10, gz=True
    )
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    changed = load_source("mnist", data_config(tmp_path))
    assert changed.train_y.tolist() == ((arrays["train-labels-idx1-ubyte"] + 1) % 10).tolist()


def test_a_damaged_cache_is_rebuilt_from_the_files(tmp_path):
    arrays = write_mnist(tmp_path)
    load_source("mnist", data_config(tmp_path))
    (cache,) = (tmp_path / ".incr-cache").glob("mnist-*.pt")
    cache.write_bytes(b"not a tensor file")
    source = load_source("mnist", data_config(tmp_path))
    assert np.array_equal(source.train_x[:, 0].numpy(), arrays["train-images-idx3-ubyte"])


@pytest.mark.parametrize("gz", [True, False], ids=["gzipped", "plain"])
def test_a_truncated_idx_file_is_a_config_error_naming_the_file(tmp_path, gz):
    write_mnist(tmp_path, gz=gz)
    images = mnist_arrays()["train-images-idx3-ubyte"]
    # the header promises 200 images of 28x28 = 156,800 values; only 1,000 follow
    broken = write_idx(tmp_path / "train-images-idx3-ubyte", images, gz=gz, keep_values=1000)
    with pytest.raises(ConfigError, match="truncated") as error:
        load_source("mnist", data_config(tmp_path))
    assert str(broken) in str(error.value)
    assert "156800" in str(error.value) and "1000" in str(error.value)


def test_a_gzip_file_cut_short_is_a_config_error_naming_the_file(tmp_path):
    write_mnist(tmp_path, gz=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # an interrupted download
    with pytest.raises(ConfigError, match=str(path)):
        load_source("mnist", data_config(tmp_path))


def test_a_file_that_is_not_uint8_idx_is_a_config_error(tmp_path):
    write_mnist(tmp_path, gz=False)
    path = tmp_path / "t10k-labels-idx1-ubyte"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(ConfigError, match="not a uint8 IDX file") as error:
        load_source("mnist", data_config(tmp_path))
    assert str(path) in str(error.value)


@pytest.mark.parametrize("name", ["mnist", "cifar10", "cifar100"])
def test_missing_files_are_a_config_error_that_suggests_download(tmp_path, name):
    with pytest.raises(ConfigError, match="data.download=true") as error:
        load_source(name, data_config(tmp_path, f"dataset={name}"))
    assert name in str(error.value) and str(tmp_path) in str(error.value)


def test_an_incomplete_mnist_folder_counts_as_missing(tmp_path):
    write_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(ConfigError, match="data.download=true"):
        load_source("mnist", data_config(tmp_path))


# ----------------------------------------------------------------------------------------- CIFAR
def test_cifar10_python_batches_load_with_pixels_in_channel_row_column_order(tmp_path):
    written = write_cifar10(tmp_path)
    source = load_source("cifar10", data_config(tmp_path, "dataset=cifar10"))
    assert source.train_x.shape == (200, 3, 32, 32) and source.train_x.dtype == torch.uint8
    assert source.test_x.shape == (50, 3, 32, 32)
    assert source.train_y.dtype == torch.int64
    # the five training batches in order, then the test batch
    assert source.train_y.tolist() == written["train_y"].tolist()
    assert source.test_y.tolist() == written["test_y"].tolist()
    # pixel (n, c, h, w) is byte c * 1024 + h * 32 + w of row n
    n, c, h, w = 123, 2, 5, 17
    assert source.train_x[n, c, h, w] == written["train_x"][n, c * 1024 + h * 32 + w]
    assert np.array_equal(source.train_x.reshape(200, -1).numpy(), written["train_x"])
    assert np.array_equal(source.test_x.reshape(50, -1).numpy(), written["test_x"])
    assert source.class_names[0] == "airplane" and source.class_names[9] == "truck"


def test_cifar100_reads_the_fine_labels_and_their_names(tmp_path):
    written = write_cifar100(tmp_path)
    source = load_source("cifar100", data_config(tmp_path, "dataset=cifar100"))
    assert source.train_x.shape == (200, 3, 32, 32) and source.test_x.shape == (100, 3, 32, 32)
    assert source.train_y.tolist() == written["train_y"].tolist()  # fine, not coarse, labels
    assert int(source.train_y.max()) == 99
    assert np.array_equal(source.test_x.reshape(100, -1).numpy(), written["test_x"])
    assert source.class_names == [f"fine{c}" for c in range(100)]


# ----------------------------------------------------------------------------------------- end to end
def assert_complete_tiny_run(metrics: dict, dataset: str, model: str) -> None:
    assert metrics["run"]["status"] == "finished"
    assert (metrics["run"]["dataset"], metrics["run"]["model"]) == (dataset, model)
    # 20 training and 5 test images per class, 2 classes per task
    assert [t["train_samples"] for t in metrics["tasks"]] == [40] * 5
    assert [t["test_samples"] for t in metrics["tasks"]] == [10] * 5
    matrix = metrics["class_il"]["accuracy_matrix"]
    assert len(matrix) == 5 and all(len(row) == 5 and all(0 <= v <= 1 for v in row) for row in matrix)
    # class-IL cannot predict a class not seen yet: future tasks score 0
    assert all(matrix[i][j] == 0 for i in range(5) for j in range(i + 1, 5))


def test_trains_end_to_end_on_cifar10_files_with_the_cifar_cnn(tmp_path):
    write_cifar10(tmp_path / "data")
    metrics = run_experiment(
        tmp_path / "run",
        [
            "dataset=cifar10",
            f"data.root={tmp_path / 'data'}",
            "model=cifar_cnn",
            "epochs=1",
            "strategy.memory.size=20",
        ],
    )
    assert_complete_tiny_run(metrics, "cifar10", "cifar_cnn")
    assert metrics["per_task"][-1]["memory_samples"] == 20


def test_trains_end_to_end_on_mnist_files_with_the_convnet(tmp_path):
    write_mnist(tmp_path / "data", gz=True)
    metrics = run_experiment(
        tmp_path / "run",
        ["dataset=mnist", f"data.root={tmp_path / 'data'}", "model=convnet", "epochs=1", "strategy=finetune"],
    )
    assert_complete_tiny_run(metrics, "mnist", "convnet")


def test_synthetic_data_is_cifar_shaped_and_depends_on_its_seed_alone():
    from omegaconf import OmegaConf

    from incr_cli.data.synthetic import load_synthetic

    dataset = OmegaConf.create(
        {
            "num_classes": 5,
            "input_shape": [3, 32, 32],
            "train_per_class": 4,
            "test_per_class": 2,
            "generator_seed": 0,
        }
    )
    source = load_synthetic(dataset)
    assert source.train_x.shape == (20, 3, 32, 32) and source.train_x.dtype == torch.uint8
    assert source.train_y.tolist() == [c for c in range(5) for _ in range(4)] and len(source.test_y) == 10
    assert torch.equal(load_synthetic(dataset).train_x, source.train_x)  # seeded
    dataset.generator_seed = 1
    assert not torch.equal(load_synthetic(dataset).train_x, source.train_x)
    # images of one class share their template: closer to each other than to another class's
    x = source.train_x.float().flatten(1)
    same = (x[0] - x[1]).abs().mean()
    other = (x[0] - x[4]).abs().mean()
    assert same < other - 10
