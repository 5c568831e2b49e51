"""A data set is one loader and one YAML: added the way a user adds one, from outside the package (the module
on the Python path, the YAML in a config folder given with hydra.searchpath), with nothing in incr_cli/ or
configs/ changed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from incr_cli.cli import main

LOADER = '''"""Two classes of 4x4 grey images: dark ones and bright ones."""

import torch

from incr_cli.data.source import Source
from incr_cli.errors import ConfigError


def load_squares(dataset, data):
    generator = torch.Generator().manual_seed(dataset.noise_seed)

    def split(per_class):
        labels = torch.arange(2).repeat_interleave(per_class)
        noise = torch.randint(0, 128, (len(labels), 1, 4, 4), generator=generator)
        return (labels[:, None, None, None] * 128 + noise).to(torch.uint8), labels

    return Source(*split(dataset.per_class), *split(dataset.per_class // 4), ["dark", "bright"])


def check_squares(dataset, data):
    if dataset.per_class < 4:
        raise ConfigError(f"dataset.per_class={dataset.per_class}: give at least 4 images per class")
'''

YAML = """name: squares
loader:
  _target_: {module}.load_squares
  check: {module}.check_squares
num_classes: 2
input_shape: [1, 4, 4]
n_tasks: 2
per_class: 40      # this data set's own keys: no schema knows them
noise_seed: 0
"""


def add_dataset(tmp_path: Path, monkeypatch, yaml_text: str, module: str = "squares_loader") -> str:
    """The loader module on the Python path and configs/dataset/squares.yaml in a folder of the user's own;
    returns the override that adds that folder to Hydra's search path."""
    code = tmp_path / "code"
    code.mkdir()
    (code / f"{module}.py").write_text(LOADER)
    monkeypatch.syspath_prepend(str(code))
    configs = tmp_path / "configs" / "dataset"
    configs.mkdir(parents=True)
    (configs / "squares.yaml").write_text(yaml_text.format(module=module))
    return f"hydra.searchpath=[file://{configs.parent}]"


def one_line_error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_a_dataset_added_from_outside_the_package_trains(tmp_path, monkeypatch):
    searchpath = add_dataset(tmp_path, monkeypatch, YAML)
    run = tmp_path / "run"
    status = main(
        [
            "train",
            searchpath,
            "dataset=squares",
            "debug=quick",
            "strategy=finetune",
            "hardware=cpu",
            f"hydra.run.dir={run}",
            "progress=false",
        ]
    )
    assert status == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["run"]["status"] == "finished"
    assert [task["class_names"] for task in metrics["tasks"]] == [["dark"], ["bright"]]


def test_its_check_fails_before_training_in_one_line(tmp_path, monkeypatch, capsys):
    searchpath = add_dataset(tmp_path, monkeypatch, YAML, module="squares_checked")
    status = main(
        ["train", searchpath, "dataset=squares", "dataset.per_class=2", f"hydra.run.dir={tmp_path / 'run'}"]
    )
    assert status == 2
    assert "dataset.per_class=2" in one_line_error(capsys)
    assert not (tmp_path / "run").exists()


def test_a_loader_that_cannot_be_imported_is_one_line_naming_it(tmp_path, monkeypatch, capsys):
    broken = YAML.replace("{module}.load_squares", "no_such_module.load_squares")
    searchpath = add_dataset(tmp_path, monkeypatch, broken, module="squares_broken")
    status = main(["train", searchpath, "dataset=squares", f"hydra.run.dir={tmp_path / 'run'}"])
    assert status == 2
    line = one_line_error(capsys)
    assert "dataset.loader._target_=no_such_module.load_squares cannot be imported" in line
    assert "No module named 'no_such_module'" in line
    assert not (tmp_path / "run").exists()


def test_an_unknown_dataset_lists_the_valid_ones(tmp_path, capsys):
    status = main(["train", "dataset=NOPE", f"hydra.run.dir={tmp_path / 'run'}"])
    assert status == 2
    line = one_line_error(capsys)
    assert "NOPE" in line
    for name in ("digits", "fashion_mnist", "image_folder", "synthetic"):
        assert name in line


@pytest.mark.parametrize(
    "name, module, function",
    [
        ("digits", "digits", "load_digits"),
        ("cifar100", "cifar", "load_cifar100"),
        ("permuted_mnist", "mnist", "load_mnist"),
    ],  # permuted_mnist builds on mnist.yaml
)
def test_a_name_alone_finds_the_built_in_loader(name, module, function):
    """Callers that give only a name (and configs saved before data sets named their loader) get the YAML's."""
    import importlib

    from incr_cli.data.sources import loader

    _, load, _ = loader(name)
    assert load is getattr(importlib.import_module(f"incr_cli.data.{module}"), function)
