"""Structured configs (the schema Hydra validates types against) and the checks that run before training."""

from __future__ import annotations

import importlib
import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from incr_cli.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")
AMP_DTYPES = ("bfloat16", "float16")
NONFINITE_ACTIONS = ("stop", "skip_batch")


def config_dir() -> Path:
    """The folder of YAML config groups: inside the package in a wheel, at the repository top otherwise."""
    packaged = Path(__file__).resolve().parent / "configs"
    if (packaged / "train.yaml").is_file():
        return packaged
    return Path(__file__).resolve().parent.parent / "configs"


@dataclass
class AugmentConfig:
    crop_padding: int = 0  # random crop after zero-padding by this many pixels; 0: off
    horizontal_flip: bool = False
    rotation_degrees: float = 0.0  # random rotation within +-degrees; 0: off
    # a random crop of area scale x and aspect ratio in ratio, resized to dataset.crop_size (Szegedy et al. 2015,
    # torchvision's RandomResizedCrop); needs crop_size
    random_resized_crop: bool = False
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    crop_ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])


@dataclass
class DatasetConfig:
    """The keys every data set has. A data set's YAML (configs/dataset/) sets name, loader, num_classes and
    input_shape, and adds its loader's own keys (image_folder's folder, synthetic's train_per_class): the
    dataset node is open to them, and these keys are type-checked by check_dataset_types."""

    name: str = MISSING
    # {_target_: a function (dataset, data) -> Source, check: optional (dataset, data) -> None}; null: the
    # loader of the built-in data set of this name (configs saved before data sets named their loader)
    loader: Any = None
    num_classes: int | None = MISSING  # null: counted from the files by the loader's check (image_folder)
    input_shape: list[int] | None = MISSING  # [channels, height, width]; null: from the files, as num_classes
    n_tasks: int = 5
    initial_classes: int | None = None  # null: every task gets num_classes / n_tasks classes
    class_order: list[int] | None = None  # a list of class ids; null: 0..n-1, or shuffled by class_order_seed
    class_order_seed: int | None = None
    val_fraction: float = 0.0  # class-stratified hold-out from each task's training data
    # class_il | task_il | domain_il (with domains: permuted | rotated | folders | sessions)
    scenario: str = "class_il"
    domains: str | None = None
    domain_seed: int = 0
    rotation_degrees: list[float] | None = None
    normalize: bool = False  # false: pixels only scaled to [0, 1]; true: then (x - mean) / std per channel
    # null (dataset=image_folder only): the training images' own, filled in when the folder is loaded
    mean: list[float] | None = field(default_factory=lambda: [0.0])
    std: list[float] | None = field(default_factory=lambda: [1.0])
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # the network's input side when it is smaller than the stored images: evaluation takes their center crop,
    # training the random-resized crop (augment.random_resized_crop) or also the center crop; null: the whole image
    crop_size: int | None = None


def dataset_defaults() -> dict:
    """DatasetConfig's keys and defaults as a plain dict: the schema's dataset node, open to a YAML's own keys."""
    return OmegaConf.to_container(OmegaConf.structured(DatasetConfig))


@dataclass
class HardwareConfig:
    device: str = "auto"
    amp: bool = False
    amp_dtype: str = "bfloat16"
    num_threads: int | None = None
    deterministic: bool = False
    channels_last: bool = False
    compile: bool = False
    distributed: bool = False
    device_data_gb: float | None = None


@dataclass
class DataConfig:
    root: str = "~/.cache/incr/data"
    download: bool = False


@dataclass
class LoopConfig:
    on_nonfinite: str = "stop"
    online: bool = False


@dataclass
class CheckpointConfig:
    every_steps: int | None = None
    every_seconds: float | None = 120.0
    keep_last: int = 2


@dataclass
class TrainConfig:
    model: Any = None
    # Untyped, unlike hardware or data below, so that a data set's YAML may add keys; Hydra still closes it after
    # composing (a misspelt dataset.KEY=... fails) and check_dataset_types checks DatasetConfig's types.
    dataset: Any = field(default_factory=dataset_defaults)
    strategy: Any = None
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    optimizer: Any = None
    scheduler: Any = None
    logger: Any = None
    seed: int = 0
    epochs: int = 10
    batch_size: int = 32
    eval_batch_size: int = 1000
    evaluate_on: str = "test"
    progress: bool = True
    resume: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


def register_schema() -> None:
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


def check_config(cfg: DictConfig, *, check_data: bool = True, ranks_start_later: bool = False) -> None:
    """Every check that can fail before a batch is trained; raises ConfigError naming key, value and what is valid.
    `ranks_start_later`: the command submits its jobs to SLURM, whose tasks become hardware=ddp's ranks there."""
    unknown = sorted(set(cfg.keys()) - set(TrainConfig.__dataclass_fields__))
    if unknown:
        raise ConfigError(
            f"unknown top-level key '{unknown[0]}'; valid: {', '.join(TrainConfig.__dataclass_fields__)}"
        )
    _check_positive(cfg, "epochs", "batch_size", "eval_batch_size")
    from incr_cli.data.sources import check_available, loader

    check_dataset_types(cfg.dataset)
    # A data set whose num_classes or input_shape is null learns them from its files (an image folder is
    # listed): its check runs first, as the checks below need them, and even when data is not looked for.
    from_files = cfg.dataset.num_classes is None or cfg.dataset.input_shape is None
    if from_files:
        check_available(cfg.dataset.name, cfg.data, cfg.dataset)
    check_stream(cfg.dataset)
    _check_hardware(cfg.hardware, ranks_start_later)
    _check_choice("train.on_nonfinite", cfg.train.on_nonfinite, NONFINITE_ACTIONS)
    _check_choice("evaluate_on", cfg.evaluate_on, ("test", "val"))
    if cfg.evaluate_on == "val" and cfg.dataset.val_fraction == 0:
        raise ConfigError("evaluate_on=val needs a held-out part: set dataset.val_fraction, e.g. 0.1")
    for key in ("every_steps", "every_seconds"):
        value = cfg.checkpoint[key]
        if value is not None and value <= 0:
            raise ConfigError(f"checkpoint.{key}={value} must be positive or null")
    if cfg.checkpoint.keep_last < 1:
        raise ConfigError(f"checkpoint.keep_last={cfg.checkpoint.keep_last} must be at least 1")
    from incr_cli.loggers import check_logger

    if cfg.logger is not None and (problem := check_logger(cfg.logger)):
        raise ConfigError(problem)
    for group in ("model", "strategy", "optimizer", "scheduler"):
        if cfg[group] is not None:
            check_target(group, cfg[group])
    check_recipe(cfg)
    _check_model_fits(cfg.model, cfg.dataset)
    memory = cfg.strategy.get("memory") if isinstance(cfg.strategy, DictConfig) else None
    if isinstance(memory, DictConfig):
        from incr_cli.memory import SELECTIONS

        if memory.get("size", 0) < 0:
            raise ConfigError(f"strategy.memory.size={memory.size} must be 0 or more")
        _check_choice("strategy.memory.selection", memory.get("selection", "reservoir"), SELECTIONS)
    strategy = _check_builds("strategy", cfg.strategy)
    name = cfg.strategy._target_.rsplit(".", 1)[-1]
    if cfg.dataset.scenario not in strategy.scenarios:
        raise ConfigError(
            f"{name} is not made for dataset.scenario={cfg.dataset.scenario}; its scenarios: "
            f"{', '.join(strategy.scenarios)}"
        )
    if cfg.train.online and not strategy.supports_online:
        raise ConfigError(
            f"{name} does not learn online (train.online=true); strategies that do: "
            f"{', '.join(_strategies_with('supports_online'))}"
        )
    if cfg.hardware.distributed and not getattr(strategy, "supports_distributed", False):
        raise ConfigError(
            f"{name} does not run under hardware=ddp yet; strategies that do: "
            f"{', '.join(_strategies_with('supports_distributed'))}"
        )
    if check_data and not from_files:
        check_available(cfg.dataset.name, cfg.data, cfg.dataset)
    else:
        loader(cfg.dataset.name, cfg.dataset)  # its functions import: a misspelt _target_ fails here


def check_target(key: str, node: DictConfig) -> None:
    """torchtune's habit: every key under a `_target_` must be a parameter of what it builds."""
    target = node.get("_target_")
    if target is None:
        raise ConfigError(f"{key} needs a _target_ naming the class to build")
    module_name, _, attribute = str(target).rpartition(".")
    try:
        built = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError):
        raise ConfigError(f"{key}._target_={target} cannot be imported") from None
    parameters = inspect.signature(built).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    given = [k for k in node.keys() if not str(k).startswith("_")]
    unknown = [k for k in given if k not in parameters]
    if unknown:
        valid = ", ".join(k for k, p in parameters.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL)
        raise ConfigError(f"{key}.{unknown[0]} is not a parameter of {attribute}; valid: {valid}")
    for k in given:
        if isinstance(node[k], DictConfig) and "_target_" in node[k]:
            check_target(f"{key}.{k}", node[k])


# Recipe values by parameter name, for any optimizer or scheduler that has them: (a check of what torch lets
# through although training would be meaningless, or None where torch's own validation decides; what is valid).
OPTIMIZER_VALUES: dict[str, tuple[Any, str]] = {
    "lr": (None, "a number >= 0"),
    "momentum": (lambda v: 0 <= v < 1, "a number in [0, 1)"),  # torch takes any v >= 0; v >= 1 never decays
    "dampening": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "weight_decay": (None, "a number >= 0"),
    "eps": (None, "a number >= 0"),
    "betas": (lambda v: len(v) == 2, "two numbers in [0, 1), e.g. [0.9, 0.999]"),
    "nesterov": (None, "true (needs momentum > 0 and dampening 0) or false"),
}
SCHEDULER_VALUES: dict[str, tuple[Any, str]] = {
    "gamma": (lambda v: v > 0, "a number > 0 (the factor applied to the learning rate)"),
    "milestones": (
        lambda v: len(v) > 0 and all(_is_integer(m) and m >= 1 for m in v),
        "a list of epochs >= 1 (counted within each task), e.g. [49, 63]",
    ),
    "T_max": (lambda v: _is_integer(v) and v >= 1, "a whole number of epochs >= 1"),
    "eta_min": (lambda v: v >= 0, "a number >= 0"),
    "step_size": (lambda v: _is_integer(v) and v >= 1, "a whole number of epochs >= 1"),
}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _show(value: Any) -> str:
    """A value as it is written on the command line."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return f"[{','.join(_show(v) for v in value)}]"
    return "null" if value is None else str(value)


def check_recipe(cfg: DictConfig) -> None:
    """The optimizer's and scheduler's values, checked like the rest of the config: every number finite, the
    checks of OPTIMIZER_VALUES and SCHEDULER_VALUES, then torch's own validation (the optimizer built on a
    dummy parameter and stepped once; the scheduler stepped through one task's epochs, the learning rate
    staying finite and >= 0). An optimizer or scheduler YAML with other parameters is covered by the last."""
    import torch

    epochs = 1 if cfg.train.online else cfg.epochs
    optimizer = _recipe_values(cfg.optimizer)
    if optimizer is not None:
        target, values = optimizer
        _check_values("optimizer", target, values, OPTIMIZER_VALUES)
        _check_torch(
            "optimizer", target, values, OPTIMIZER_VALUES, lambda kwargs: _try_optimizer(target, kwargs)
        )
    scheduler = _recipe_values(cfg.scheduler)
    if scheduler is not None:
        target, values = scheduler

        def make_optimizer():
            parameter = torch.nn.Parameter(torch.zeros(1))
            if optimizer is None:
                return torch.optim.SGD([parameter], lr=0.1)
            return _build(optimizer[0])([parameter], **optimizer[1])

        _check_values("scheduler", target, values, SCHEDULER_VALUES)
        _check_torch(
            "scheduler",
            target,
            values,
            SCHEDULER_VALUES,
            lambda kwargs: _try_schedule(target, kwargs, make_optimizer(), epochs),
        )


def _recipe_values(node: Any) -> tuple[str, dict] | None:
    if not isinstance(node, DictConfig):
        return None
    values = to_container(node)
    return str(values.pop("_target_")), {k: v for k, v in values.items() if not str(k).startswith("_")}


def _build(target: str) -> Any:
    module_name, _, attribute = target.rpartition(".")
    return getattr(importlib.import_module(module_name), attribute)


def _check_values(group: str, target: str, values: dict, rules: dict[str, tuple[Any, str]]) -> None:
    name = target.rsplit(".", 1)[-1]
    for key, value in values.items():
        check, valid = rules.get(key, (None, "a finite number"))
        numbers = value if isinstance(value, list) else [value]
        if any(_is_number(v) and not math.isfinite(v) for v in numbers):
            raise ConfigError(f"{group}.{key}={_show(value)} is not a finite number; valid: {valid}")
        if check is None:
            continue
        shape = isinstance(value, list) == (key in ("betas", "milestones")) and all(map(_is_number, numbers))
        if not (shape and check(value)):
            raise ConfigError(f"{group}.{key}={_show(value)} is not valid for {name}; valid: {valid}")


def _check_torch(group: str, target: str, values: dict, rules: dict[str, tuple[Any, str]], attempt) -> None:
    """torch's own verdict; a refusal is pinned on the one value that alone, beside the class's defaults for
    the others (and any required values), brings it about."""
    problem = attempt(values)
    if problem is None:
        return
    name = target.rsplit(".", 1)[-1]
    parameters = inspect.signature(_build(target)).parameters
    empty = inspect.Parameter.empty
    required = {k: v for k, v in values.items() if k in parameters and parameters[k].default is empty}
    if attempt(required) is not None:
        culprit = next(iter(required)) if len(required) == 1 else None
    else:
        culprit = next((k for k in values if k not in required and attempt({**required, k: values[k]})), None)
    if culprit is None:
        given = "".join(f" {group}.{k}={_show(v)}" for k, v in values.items())
        raise ConfigError(f"{group}={name}{given} does not work as incr runs it: {problem}")
    valid = rules[culprit][1] if culprit in rules else f"what {target} accepts"
    raise ConfigError(
        f"{group}.{culprit}={_show(values[culprit])} is refused by {name} ({problem}); valid: {valid}"
    )


_TORCH_REFUSALS = (ValueError, TypeError, IndexError, KeyError, ZeroDivisionError, RuntimeError)


def _try_optimizer(target: str, values: dict) -> str | None:
    import torch

    parameter = torch.nn.Parameter(torch.zeros(1))
    try:
        optimizer = _build(target)([parameter], **values)
        parameter.grad = torch.zeros_like(parameter)
        optimizer.step()  # some values are only read at the first step (Adam's betas)
    except _TORCH_REFUSALS as error:
        return str(error).splitlines()[0] if str(error) else type(error).__name__
    return None


def _try_schedule(target: str, values: dict, optimizer, epochs: int) -> str | None:
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scheduler = _build(target)(optimizer, **values)
            for epoch in range(1, epochs + 1):  # as the engine steps it: once per epoch of a task
                optimizer.step()
                scheduler.step()
                lr = optimizer.param_groups[0]["lr"]
                if not (math.isfinite(lr) and lr >= 0):
                    return f"the learning rate becomes {lr:g} after epoch {epoch}"
    except _TORCH_REFUSALS as error:
        return str(error).splitlines()[0] if str(error) else type(error).__name__
    return None


def _check_builds(key: str, node: DictConfig) -> Any:
    """Build the object once (cheap: no data) so that its own checks of its values speak before training."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node)
    except InstantiationException as error:
        cause = error.__cause__ if error.__cause__ is not None else error
        raise ConfigError(f"{key}: {cause}".splitlines()[0]) from None


def _strategies_with(flag: str) -> list[str]:
    """strategy= choices whose class sets `flag` (supports_distributed, supports_online)."""
    from hydra.utils import get_class

    names = []
    for path in sorted((config_dir() / "strategy").glob("*.yaml")):
        target = OmegaConf.load(path).get("_target_")
        if target and getattr(get_class(target), flag, False):
            names.append(path.stem)
    return names


def _check_positive(cfg: DictConfig, *keys: str) -> None:
    for key in keys:
        if cfg[key] < 1:
            raise ConfigError(f"{key}={cfg[key]} must be a positive integer")


def _check_choice(key: str, value: Any, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(f"{key}={value} is not valid; choose one of: {', '.join(valid)}")


SCENARIOS = ("class_il", "task_il", "domain_il")
DOMAINS = ("permuted", "rotated", "folders", "sessions")


def _check_domains(dataset: DictConfig) -> None:
    if dataset.domains not in DOMAINS:
        raise ConfigError(
            f"dataset.scenario=domain_il needs dataset.domains: one of {', '.join(DOMAINS)} "
            f"(got {dataset.domains})"
        )
    if dataset.domains == "folders" and dataset.name != "image_folder":
        raise ConfigError(
            "dataset.domains=folders reads one image folder per domain: use dataset=image_folder "
            "with dataset.folder=<a folder of domain folders>"
        )
    if dataset.domains == "sessions" and dataset.name != "core50_ni":
        raise ConfigError(
            "dataset.domains=sessions takes CORe50's acquisition sessions as domains: use dataset=core50_ni"
        )
    angles = dataset.rotation_degrees
    if dataset.domains == "rotated" and angles is not None and len(angles) != dataset.n_tasks:
        raise ConfigError(
            f"dataset.rotation_degrees lists {len(angles)} angles for {dataset.n_tasks} tasks; "
            "give one per task, or null for evenly spaced angles"
        )


def check_dataset_types(dataset: DictConfig) -> None:
    """DatasetConfig's keys against their types, as Hydra checks a typed node (the dataset node is open for a
    data set's own keys). A plain value is written back as a typed node holds it (0 -> 0.0); interpolations
    (class_order_seed: ${seed}) are left as they are."""
    missing = sorted(OmegaConf.missing_keys(dataset))
    if missing:
        raise ConfigError(f"dataset.{missing[0]} has no value; the data set's YAML must set it")
    try:
        common = {key: dataset[key] for key in DatasetConfig.__dataclass_fields__ if key in dataset}
        typed = OmegaConf.merge(OmegaConf.structured(DatasetConfig), common)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None)
        where = f"dataset.{key}={_show(OmegaConf.select(dataset, key))}: " if key else "dataset: "
        raise ConfigError(where + str(error).splitlines()[0]) from None
    for key, value in common.items():
        if not isinstance(value, (DictConfig, ListConfig)) and not OmegaConf.is_interpolation(dataset, key):
            dataset[key] = typed[key]


def check_stream(dataset: DictConfig) -> None:
    """The stream's settings: scenario and domains, the class split, class order, hold-out, normalisation."""
    check_dataset_types(dataset)
    n_classes, n_tasks, initial = dataset.num_classes, dataset.n_tasks, dataset.initial_classes
    if n_tasks < 1:
        raise ConfigError(f"dataset.n_tasks={n_tasks} must be at least 1")
    _check_choice("dataset.scenario", dataset.scenario, SCENARIOS)
    if dataset.scenario == "domain_il":
        _check_domains(dataset)
    elif dataset.domains is not None:
        raise ConfigError(f"dataset.domains={dataset.domains} needs dataset.scenario=domain_il")
    if dataset.scenario == "domain_il":
        pass  # every task has every class: nothing to divide
    elif initial is None:
        if n_classes % n_tasks:
            divisors = [d for d in range(1, n_classes + 1) if n_classes % d == 0]
            raise ConfigError(
                f"dataset.n_tasks={n_tasks} does not divide the {n_classes} classes of {dataset.name}; "
                f"valid: {', '.join(map(str, divisors))}, or set dataset.initial_classes"
            )
    else:
        rest = n_classes - initial
        if (
            not 0 < initial <= n_classes
            or (n_tasks == 1 and rest)
            or (n_tasks > 1 and (rest <= 0 or rest % (n_tasks - 1)))
        ):
            raise ConfigError(
                f"dataset.initial_classes={initial} with n_tasks={n_tasks} does not split {n_classes} classes: "
                f"the {n_classes} - initial_classes remaining classes must divide into n_tasks - 1 equal tasks"
            )
    order = dataset.class_order
    if order is not None and sorted(order) != list(range(n_classes)):
        raise ConfigError(
            f"dataset.class_order={list(order)} must be a permutation of 0..{n_classes - 1} (each class once)"
        )
    if not 0.0 <= dataset.val_fraction < 1.0:
        raise ConfigError(f"dataset.val_fraction={dataset.val_fraction} must be in [0, 1)")
    channels = dataset.input_shape[0]
    for key in ("mean", "std"):
        if dataset[key] is None:  # dataset=image_folder computes it from the training images when loading
            if dataset.name != "image_folder":
                raise ConfigError(
                    f"dataset.{key}=null (computed from the training images) is for "
                    f"dataset=image_folder; give {dataset.name}'s values (one, or one per channel)"
                )
        elif len(dataset[key]) not in (1, channels):
            raise ConfigError(
                f"dataset.{key}={list(dataset[key])} needs 1 or {channels} values (one per channel)"
            )
    if any(s <= 0 for s in dataset.std or []):
        raise ConfigError(f"dataset.std={list(dataset.std)} must be positive")
    augment = dataset.augment
    crop = dataset.get("crop_size")
    if crop is not None and not (isinstance(crop, int) and 0 < crop <= min(dataset.input_shape[1:])):
        raise ConfigError(
            f"dataset.crop_size={crop} must be a positive side no larger than the images "
            f"({dataset.input_shape[1]}x{dataset.input_shape[2]}), or null for the whole image"
        )
    if augment.random_resized_crop:
        scale, ratio = list(augment.crop_scale), list(augment.crop_ratio)
        if crop is None:
            raise ConfigError(
                "dataset.augment.random_resized_crop=true needs dataset.crop_size (the side it resizes to)"
            )
        if not (
            len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1 and len(ratio) == 2 and 0 < ratio[0] <= ratio[1]
        ):
            raise ConfigError(
                f"dataset.augment crop_scale={scale}, crop_ratio={ratio}: each must be [low, high] with "
                "0 < low <= high (scale at most 1)"
            )
    if (
        augment.crop_padding < 0
        or augment.rotation_degrees < 0
        or not math.isfinite(augment.rotation_degrees)
    ):
        raise ConfigError(
            f"dataset.augment crop_padding={augment.crop_padding}, rotation_degrees={augment.rotation_degrees}: "
            "both must be 0 (off) or positive"
        )


def _check_hardware(hardware: DictConfig, ranks_start_later: bool = False) -> None:
    _check_choice("hardware.device", hardware.device, DEVICES)
    _check_choice("hardware.amp_dtype", hardware.amp_dtype, AMP_DTYPES)
    if hardware.num_threads is not None and hardware.num_threads < 1:
        raise ConfigError(f"hardware.num_threads={hardware.num_threads} must be a positive integer or null")
    budget = hardware.get("device_data_gb")
    if budget is not None and not budget >= 0:
        raise ConfigError(
            f"hardware.device_data_gb={budget} must be 0 or more (0 streams every data set), or null for half "
            "of the device's free memory"
        )
    if hardware.distributed and not ranks_start_later:
        from incr_cli.distributed import launched

        if not launched():
            raise ConfigError(
                "hardware=ddp runs under torchrun: torchrun --nproc_per_node=N -m incr_cli train "
                "hardware=ddp ... , or as the tasks of SLURM jobs (-m hydra/launcher=slurm "
                "hydra.launcher.tasks_per_node=N); or choose hardware=auto, cpu, gpu or amp"
            )
    if hardware.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(
                "hardware=gpu (hardware.device=cuda) but no CUDA GPU is visible; use hardware=cpu or auto"
            )


def network_input_shape(dataset: DictConfig) -> tuple[int, int, int]:
    """[channels, height, width] the network takes: the stored images' (input_shape), or their crop."""
    channels, height, width = (int(s) for s in dataset.input_shape)
    crop = dataset.get("crop_size")
    return (channels, height, width) if crop is None else (channels, int(crop), int(crop))


def _check_model_fits(model: DictConfig, dataset: DictConfig) -> None:
    size = model.get("input_size")
    height, width = network_input_shape(dataset)[1:]
    if size is not None and (size, size) != (height, width):
        raise ConfigError(
            f"model.input_size={size} does not fit {dataset.name}'s {height}x{width} images; "
            f"use a model made for {height}x{width} (mlp, resnet18, resnet32) or set model.input_size={height}"
        )


def to_container(cfg: DictConfig | ListConfig) -> Any:
    return OmegaConf.to_container(cfg, resolve=True)
