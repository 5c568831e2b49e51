"""A data set's files -> a Source, through the loader its YAML names (configs/dataset/<name>.yaml):

    loader:
      _target_: incr_cli.data.cifar.load_cifar10   # (dataset config, data config) -> Source
      check: incr_cli.data.cifar.check_cifar10     # optional, (dataset, data) -> None: fails before training

A new data set is such a function in any importable module and a YAML in any config folder Hydra searches
(hydra.searchpath); nothing here lists data sets."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

from incr_cli.errors import ConfigError

if TYPE_CHECKING:
    from incr_cli.data.source import Source

Loader = Callable[[DictConfig, DictConfig], "Source"]
Check = Callable[[DictConfig, DictConfig], None]
LOADER_KEYS = ("_target_", "check")

# The YAMLs of the data sets incr ships, for a caller that gives a name without its config (or a config saved
# before data sets named their loader). configs/ is shipped inside the package and sits beside it in a checkout.
_PACKAGE = Path(__file__).resolve().parent.parent
BUILTIN_FOLDERS = (_PACKAGE / "configs" / "dataset", _PACKAGE.parent / "configs" / "dataset")


def load_source(name: str, data: DictConfig, dataset: DictConfig | None = None) -> Source:
    """The data set's files as uint8 tensors, read by the function `dataset.loader._target_` names. A loader
    may write what it finds into `dataset` (an image folder's computed mean and std)."""
    dataset, load, _ = loader(name, dataset)
    return load(dataset, data)


def check_available(name: str, data: DictConfig, dataset: DictConfig | None = None) -> None:
    """The loader's check, when it has one: fails with a message that says how to get the files, before
    anything is trained; it decodes nothing, and may fill in what it finds (an image folder's class count)."""
    dataset, _, check = loader(name, dataset)
    if check is not None:
        check(dataset, data)


def loader(name: str, dataset: DictConfig | None = None) -> tuple[DictConfig, Loader, Check | None]:
    """The dataset config and the functions its `loader` names, imported. Without a config, or with one that
    names no loader, the built-in data set of that name gives them."""
    node = dataset.get("loader") if dataset is not None else None
    if node is None:
        builtin = builtin_dataset(name)
        if builtin is None:
            raise ConfigError(
                f"dataset {name!r} names no loader: its YAML needs loader._target_, a function (dataset, data) "
                f"-> Source; the built-in data sets: {', '.join(builtin_names())}"
            )
        node, dataset = builtin.loader, builtin if dataset is None else dataset
    if not isinstance(node, DictConfig) or node.get("_target_") is None:
        raise ConfigError("dataset.loader needs a _target_ naming the function that loads the data set")
    unknown = [str(k) for k in node if k not in LOADER_KEYS]
    if unknown:
        raise ConfigError(f"dataset.loader.{unknown[0]} is not a loader key; valid: {', '.join(LOADER_KEYS)}")
    check = node.get("check")
    return (
        dataset,
        _function("dataset.loader._target_", node._target_),
        None if check is None else _function("dataset.loader.check", check),
    )


def builtin_dataset(name: str) -> DictConfig | None:
    """configs/dataset/<name>.yaml as shipped, over the data sets its defaults list builds on
    (permuted_mnist: mnist); None when incr ships no data set of that name."""
    path = next(
        (folder / f"{name}.yaml" for folder in BUILTIN_FOLDERS if (folder / f"{name}.yaml").is_file()), None
    )
    if path is None:
        return None
    own = OmegaConf.load(path)
    merged = OmegaConf.create()
    for entry in own.pop("defaults", []):
        if isinstance(entry, str) and entry != "_self_" and "/" not in entry:
            merged = OmegaConf.merge(merged, builtin_dataset(entry))
    return OmegaConf.merge(merged, own)


def builtin_names() -> list[str]:
    folder = next((f for f in BUILTIN_FOLDERS if f.is_dir()), None)
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder is not None else []


def _function(key: str, path: object) -> Callable:
    module_name, _, attribute = str(path).rpartition(".")
    try:
        function = getattr(importlib.import_module(module_name), attribute)
    except Exception as error:  # not on the Python path, a misspelt name, or a module that fails as it loads
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigError(
            f"{key}={path} cannot be imported ({reason}); the module must be importable (on PYTHONPATH)"
        ) from None
    if not callable(function):
        raise ConfigError(f"{key}={path} is not a function")
    return function
