"""Each data set's recipe (configs/recipe/) runs as composed: on tiny generated files in the real on-disk
formats, and on the real Fashion-MNIST, where its first task must be learnt."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import test_sources
from conftest import FASHION_MNIST, needs_fashion_mnist, run_experiment
from omegaconf import OmegaConf
from PIL import Image
from test_sources import write_cifar10, write_cifar100, write_mnist

from incr_cli.data.mnist import read_idx


def saved_config(run_dir: Path):
    return OmegaConf.load(run_dir / ".hydra" / "config.yaml")


@pytest.mark.slow  # 28 s (MNIST) to 51 s (ResNet-18) per run on a shared 2-core machine
@pytest.mark.parametrize(
    ("dataset", "write", "model", "backbone"),
    [
        ("mnist", lambda root: write_mnist(root, gz=True), "mnist_mlp", "MLP"),
        ("cifar10", write_cifar10, "resnet18", "ResNet18"),
        ("cifar100", write_cifar100, "resnet32", "ResNet32"),
    ],
)
def test_replay_runs_with_the_recipe_of_each_file_dataset(
    tmp_path, monkeypatch, dataset, write, model, backbone
):
    # a few images per class keep the recipe's backbone (ResNet-18 for CIFAR-10) fast on a CPU
    monkeypatch.setattr(test_sources, "TRAIN_PER_CLASS", 4)
    monkeypatch.setattr(test_sources, "TEST_PER_CLASS", 2)
    write(tmp_path / "data")
    run_dir = tmp_path / "run"
    metrics = run_experiment(
        run_dir,
        [
            f"dataset={dataset}",
            f"data.root={tmp_path / 'data'}",
            "strategy=replay",
            "epochs=1",
            "hardware=cpu",
        ],
    )
    assert (run_dir / "metrics.json").is_file()
    assert metrics["run"]["status"] == "finished" and metrics["run"]["model"] == model
    config = saved_config(run_dir)
    assert config.model._target_.endswith(backbone) and config.epochs == 1
    assert len(metrics["class_il"]["accuracy_matrix"]) == config.dataset.n_tasks


@pytest.mark.slow
@needs_fashion_mnist
def test_fashion_mnist_recipe_learns_the_first_task(tmp_path):
    # val_fraction=0.5 trains on half of each task's images (6,000 of task 1's 12,000), for speed
    metrics = run_experiment(
        tmp_path / "run",
        [
            "dataset=fashion_mnist",
            "dataset.n_tasks=5",
            "strategy=finetune",
            "dataset.val_fraction=0.5",
            f"data.root={tmp_path / 'data'}",
            "hardware=cpu",
        ],
    )
    config = saved_config(tmp_path / "run")
    # the recipe of configs/recipe/mnist.yaml: MLP 100-100, SGD lr 0.03, 1 epoch of batch 10
    assert list(config.model.hidden_sizes) == [100, 100] and config.optimizer.lr == 0.03
    assert (config.epochs, config.batch_size) == (1, 10)
    assert metrics["class_il"]["accuracy_matrix"][0][0] >= 0.95  # measured: 0.9805


def write_fashion_folder(folder: Path, train_per_class: int = 300, test_per_class: int = 100) -> None:
    """Fashion-MNIST's classes 0 and 1 as 32x32 RGB PNGs in FOLDER/train/<class>/ and FOLDER/test/<class>/."""
    for split, prefix, per_class in (("train", "train", train_per_class), ("test", "t10k", test_per_class)):
        images = read_idx(FASHION_MNIST / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(FASHION_MNIST / f"{prefix}-labels-idx1-ubyte.gz")
        for label in (0, 1):
            target = folder / split / f"class{label}"
            target.mkdir(parents=True)
            for i, index in enumerate(np.flatnonzero(labels == label)[:per_class]):
                Image.fromarray(images[index]).convert("RGB").resize((32, 32)).save(target / f"{i}.png")


@pytest.mark.slow
@needs_fashion_mnist
def test_image_folder_recipe_learns_natural_images(tmp_path):
    write_fashion_folder(tmp_path / "images")
    metrics = run_experiment(
        tmp_path / "run",
        [
            "dataset=image_folder",
            f"dataset.folder={tmp_path / 'images'}",
            "dataset.n_tasks=1",
            "epochs=1",
            "strategy=finetune",
            "hardware=cpu",
            f"data.root={tmp_path / 'data'}",
        ],
    )
    config = saved_config(tmp_path / "run")
    assert config.model._target_.endswith("ResNet18") and config.optimizer.lr == 0.01
    assert metrics["tasks"][0]["train_samples"] == 600 and metrics["tasks"][0]["test_samples"] == 200
    assert metrics["class_il"]["accuracy_matrix"][0][0] > 0.8  # measured: 0.93 (chance: 0.5)
