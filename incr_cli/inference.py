"""Using a trained model: a checkpoint becomes a ready classifier for `incr eval`, `incr predict` and `incr export`.

A checkpoint carries the run's resolved config and its class names, so nothing else is needed: the model is
rebuilt as the engine builds it, the strategy takes the saved shape and state (a grown network's
extractors, iCaRL's class means, BiC's correction), and the scores are the strategy's own `predict`."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from rich.table import Table
from torch import Tensor, nn

FORMATS = ("torchscript", "onnx")
# What `incr eval` may change: where the test data come from and how they are batched, never the model.
EVAL_KEYS = ("dataset", "data", "eval_batch_size", "evaluate_on")
# A folder scored whole is cut into the run's own tasks: these keys may only repeat the run's values
RUN_TASK_KEYS = (
    "dataset.n_tasks",
    "dataset.initial_classes",
    "dataset.class_order",
    "dataset.class_order_seed",
    "dataset.scenario",
)
SPLITS = ("folder", "test")
FULL_INTENSITY = 255  # images on disk and the exported model's input are 8-bit
CHECKPOINT_HINT = (
    "an incr checkpoint is a run directory's checkpoints/*.pt: give that file, or the run directory"
)


class InferenceError(ValueError):
    """Bad input to eval, predict or export: one line, exit status 2."""


# ---------------------------------------------------------------------------------------------- loading
@dataclass
class Loaded:
    """A checkpoint rebuilt into a model in eval mode, with its strategy and preprocessing."""

    path: Path
    cfg: DictConfig  # the run's resolved config
    model: nn.Module
    strategy: object  # incr_cli.strategies.base.Strategy
    preprocess: object  # incr_cli.data.batches.Preprocess, at the training data's max_value
    class_names: list[str]  # every class of the stream, by label
    tasks: list[dict]  # the run's tasks as metrics.json lists them: each one's classes, by label
    n_seen: int  # classes the model has been trained on: labels 0..n_seen-1
    trained_tasks: int  # tasks trained on, the one under way included (a step checkpoint)
    max_value: int  # full intensity of the training data's pixels (16 for digits, else 255)
    device: torch.device

    @property
    def seen_names(self) -> list[str]:
        return self.class_names[: self.n_seen]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.cfg.dataset.input_shape)


def checkpoint_path(path: Path) -> Path:
    """A checkpoint file, or a run directory standing for its checkpoints/last.pt."""
    if path.is_dir():
        last = path / "checkpoints" / "last.pt"
        if not last.is_file():
            raise InferenceError(
                f"{path} holds no checkpoints/last.pt; give a run directory or a checkpoint file"
            )
        return last
    if not path.exists():
        raise InferenceError(f"{path}: no such checkpoint or run directory")
    return path


def trained_tasks(position: dict) -> int:
    """Tasks trained so far: the finished ones and the one under way (a step checkpoint)."""
    return int(position["task"]) + (1 if position["started"] else 0)


def seen_classes(tasks: list[dict], position: dict) -> int:
    """Labels trained so far are 0..n-1: the classes of the tasks trained so far."""
    classes = [c for task in tasks[: trained_tasks(position)] for c in task["classes"]]
    return max(classes) + 1 if classes else 0


def stream_outline(tasks: list[dict], class_names: list[str], input_shape, max_value: int, device):
    """The stream without its data: the tasks and classes that a strategy's `setup` reads."""
    from incr_cli.data.stream import Stream, Task

    none = torch.zeros(0, dtype=torch.long)
    images = torch.zeros(0, *input_shape, dtype=torch.uint8)
    order = list(range(len(class_names)))
    for task in tasks:
        for label, original in zip(
            task["classes"], task.get("original_classes", task["classes"]), strict=True
        ):
            order[label] = int(original)
    outline = [Task(int(t["task"]), [int(c) for c in t["classes"]], none, none, none) for t in tasks]
    return Stream(images, none, images, none, outline, order, list(class_names), max_value).to(device)


def load(path: Path, device: str | torch.device = "cpu") -> Loaded:
    """Rebuild a checkpoint's model and strategy as `engine.Run` builds them, in eval mode on `device`."""
    from incr_cli import build
    from incr_cli.data.batches import Preprocess

    path, device = checkpoint_path(Path(path)), torch.device(device)
    state = read_checkpoint(path, device)
    cfg = OmegaConf.create(state["config"])
    tasks = state["metrics"]["tasks"]
    n_seen = seen_classes(tasks, state["position"])
    if n_seen == 0:
        raise InferenceError(f"{path} was written before the model learned any class")
    max_value = int(state["max_value"])
    with rebuilding(path):
        model = build.build_model(cfg, len(state["class_names"]), device)
    if cfg.dataset.get("normalize") and None in (cfg.dataset.get("mean"), cfg.dataset.get("std")):
        # training fills a null mean and std in before its first checkpoint; a config without them is not a run's
        raise InferenceError(f"{path} holds no normalisation values (dataset.mean, dataset.std): train again")
    preprocess = Preprocess(cfg.dataset, max_value, device)
    input_shape = tuple(int(s) for s in cfg.dataset.input_shape)
    stream = stream_outline(tasks, state["class_names"], input_shape, max_value, device)
    rng = torch.Generator(device=device).manual_seed(int(cfg.seed))
    with rebuilding(path):
        make_optimizer = build.optimizer_factory(cfg)
        strategy = build.build_strategy(cfg, model, stream, preprocess, rng, device, make_optimizer)
    build.load_trained(model, strategy, state)
    model.head.grow(n_seen)
    model.eval()
    return Loaded(
        path,
        cfg,
        model,
        strategy,
        preprocess,
        list(state["class_names"]),
        tasks,
        n_seen,
        trained_tasks(state["position"]),
        max_value,
        device,
    )


def read_checkpoint(path: Path, device: torch.device) -> dict:
    """The checkpoint's state, refused with one line when the file is not an incr checkpoint or predates the
    config, class names and pixel range that loading it needs."""
    from incr_cli import checkpoint

    other = other_kind_of_file(path)
    if other:
        raise InferenceError(f"{path} is not a usable incr checkpoint: it is {other}; {CHECKPOINT_HINT}")
    try:
        state = checkpoint.load(path, map_location=device)
    except checkpoint.CheckpointError as error:
        raise InferenceError(f"{error}; {CHECKPOINT_HINT}") from None
    if not {"config", "class_names", "max_value"} <= state.keys():
        raise InferenceError(
            f"{path} holds no config, class names and pixel range (written by an older incr): train it again"
        )
    return state


@contextmanager
def rebuilding(path: Path):
    """A config this version cannot build (e.g. a strategy it does not have) as one line naming the file."""
    from hydra.errors import HydraException

    try:
        yield
    except HydraException as error:
        raise InferenceError(
            f"{path}: cannot rebuild its model or strategy ({error})".splitlines()[0]
        ) from None


def other_kind_of_file(path: Path) -> str | None:
    """What a file given as a checkpoint is instead, judged by its first bytes (an exported model, a
    metrics.json, an image), or None for a file that torch.save may have written."""
    try:
        with path.open("rb") as handle:
            head = handle.read(8)
    except OSError as error:
        raise InferenceError(f"{path} cannot be read ({error.strerror or error})") from None
    if head.startswith(b"PK\x03\x04"):  # torch.save's zip, and TorchScript's
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (OSError, zipfile.BadZipFile):
            return None  # truncated: checkpoint.load says so
        if any(name.endswith("/constants.pkl") or "/code/" in name for name in names):
            return "a TorchScript model (incr export writes these)"
        return None
    if head[:1] == b"\x80":  # a pickle: torch.save's legacy format
        return None
    if path.suffix.lower() == ".onnx" or head[:1] == b"\x08":  # ONNX's protobuf starts with its ir_version
        return "an ONNX model (incr export --format onnx writes these)"
    if head.lstrip()[:1] in (b"{", b"["):
        return "a JSON file"
    if head.startswith(b"\x89PNG") or head.startswith(b"\xff\xd8\xff"):
        return "an image"
    return "not a file that PyTorch wrote"


class Classifier(nn.Module):
    """8-bit images -> scores over the classes seen so far, preprocessing included.

    Input: a float (or uint8) batch [N, C, H, W] of pixel values in 0..255, C, H and W those of the training
    data (`dataset.input_shape`). Pixels are first brought to the training data's levels (digits: 17 levels,
    0..16, rounded; 8-bit data sets: unchanged), then scaled and normalised as in training. Output: float32
    scores [N, n_seen], the strategy's own classifier (iCaRL's nearest mean, BiC's corrected logits, LUCIR's
    cosine); their softmax gives the probabilities `incr predict` prints."""

    def __init__(self, loaded: Loaded):
        super().__init__()
        self.model = loaded.model  # a submodule: tracing and export see its weights
        self.strategy, self.preprocess = loaded.strategy, loaded.preprocess
        self.n_seen, self.max_value = loaded.n_seen, loaded.max_value

    def forward(self, images: Tensor) -> Tensor:
        x = images.float()
        if self.max_value != FULL_INTENSITY:
            # the levels the model was trained on: an image written from the training data reads back exactly
            x = torch.round(x * (self.max_value / FULL_INTENSITY))
        return self.strategy.predict(self.preprocess(x))[:, : self.n_seen].float()


# ---------------------------------------------------------------------------------------------- eval
_ABSENT = object()


def eval_config(loaded: Loaded, overrides: Sequence[str], whole_folder: bool = False) -> DictConfig:
    """The run's config with the test-data overrides of `incr eval` applied and checked. A data set chosen
    with dataset=image_folder takes the model's image size and channels unless they are given. With
    `whole_folder` the folder is not checked as a data set to split and cut into tasks (`folder_stream` reads
    it whole, in the run's tasks)."""
    from incr_cli.config import check_stream
    from incr_cli.data.sources import check_available
    from incr_cli.errors import ConfigError

    cfg = OmegaConf.create(OmegaConf.to_container(loaded.cfg))
    parsed = []
    for override in overrides:
        key, equals, value = override.partition("=")
        if not equals or not key:
            raise InferenceError(f"'{override}' is not an override; write KEY=VALUE, e.g. dataset.n_tasks=2")
        if key.split(".")[0] not in EVAL_KEYS:
            raise InferenceError(
                f"{key} would change the model, not the test data; incr eval accepts only "
                "dataset=NAME, dataset.KEY=..., data.KEY=..., eval_batch_size=..., evaluate_on=..."
            )
        parsed.append((key, value, override))
    for key, value, _ in parsed:  # a new data set first: its own keys may follow in any order
        if key == "dataset":
            cfg.dataset = composed_dataset(value)
            given = {k for k, _, _ in parsed}
            if cfg.dataset.name == "image_folder" and not given & {"dataset.image_size", "dataset.channels"}:
                channels, height, width = loaded.input_shape
                cfg.dataset.image_size, cfg.dataset.channels = [height, width], channels
            for key in ("normalize", "mean", "std"):  # the model's own (its preprocessing is what evaluates):
                cfg.dataset[key] = loaded.cfg.dataset[key]  # nothing computed from the test data set's images
    dotted = []
    for key, _, override in parsed:
        if key == "dataset":
            continue
        if OmegaConf.select(cfg, key, default=_ABSENT) is _ABSENT:
            parent = key.rpartition(".")[0]
            node = OmegaConf.select(cfg, parent, default=None) if parent else cfg
            valid = (
                ", ".join(f"{parent}.{k}" if parent else str(k) for k in node)
                if isinstance(node, DictConfig)
                else ""
            )
            raise InferenceError(f"unknown key {key}" + (f"; valid: {valid}" if valid else ""))
        dotted.append(override)
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(dotted))
    if not isinstance(cfg.eval_batch_size, int) or cfg.eval_batch_size < 1:
        raise InferenceError(f"eval_batch_size={cfg.eval_batch_size} must be a positive integer")
    if cfg.evaluate_on not in ("test", "val"):
        raise InferenceError(f"evaluate_on={cfg.evaluate_on} is not valid; choose one of: test, val")
    if whole_folder:
        return cfg
    try:
        check_available(cfg.dataset.name, cfg.data, cfg.dataset)  # an image folder fills in its shape here
        check_stream(cfg.dataset)
    except ConfigError as error:
        raise InferenceError(str(error)) from None
    if cfg.evaluate_on == "val" and not cfg.dataset.val_fraction:
        raise InferenceError("evaluate_on=val needs a held-out part: set dataset.val_fraction, e.g. 0.1")
    return cfg


def composed_dataset(name: str) -> DictConfig:
    """The `dataset` group's choice `name`, as `incr train dataset=NAME` would compose it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException, MissingConfigException

    from incr_cli.config import config_dir, register_schema

    register_schema()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(config_dir()), version_base="1.3"):
            dataset = compose("train", overrides=[f"dataset={name}"]).dataset
        return OmegaConf.create(OmegaConf.to_container(dataset, resolve=True))
    except MissingConfigException:
        choices = sorted(p.stem for p in (config_dir() / "dataset").glob("*.yaml"))
        raise InferenceError(f"unknown dataset '{name}'; valid: {', '.join(choices)}") from None
    except HydraException as error:
        raise InferenceError(str(error).splitlines()[0]) from None
    finally:
        GlobalHydra.instance().clear()


def to_levels(images: Tensor, max_value: int, levels: int) -> Tensor:
    """uint8 pixels of full intensity `max_value` brought to a model's `levels` (its training data's full
    intensity), rounded as `Classifier` rounds 8-bit input."""
    if max_value == levels:
        return images
    return torch.round(images.float() * (levels / max_value)).to(torch.uint8)


def eval_split(loaded: Loaded, overrides: Sequence[str], split: str | None) -> str:
    """`--split`, or its default: `folder` when a folder is given (dataset.folder=...), else `test`."""
    if split is None:
        given = any(o.partition("=")[0] == "dataset.folder" for o in overrides)
        return "folder" if given else "test"
    if split not in SPLITS:
        raise InferenceError(f"--split {split} is not valid; choose one of: {', '.join(SPLITS)}")
    return split


def evaluate(loaded: Loaded, overrides: Sequence[str] = (), split: str | None = None) -> dict:
    """Class-IL and task-IL accuracy of the checkpoint on every task of a data set's test stream (the run's
    own by default), with the trained tasks' precision, recall, F1 and confusion, as the engine measures them.
    `split="folder"` (the default when dataset.folder is given) scores every image of the folder instead, each
    in the task the run trained its class in."""
    from incr_cli import evaluation
    from incr_cli.data.streamed import place
    from incr_cli.step import Hardware

    split = eval_split(loaded, overrides, split)
    cfg = eval_config(loaded, overrides, whole_folder=split == "folder")
    if split == "folder":
        stream, skipped = folder_stream(loaded, cfg, overrides)
    else:
        stream, skipped = test_stream(loaded, cfg), []
    stream = place(stream, loaded.device, cfg.hardware)
    if cfg.dataset.scenario == "domain_il":  # every task has every class: the first domains are the trained
        seen_tasks = min(loaded.trained_tasks, len(stream.tasks))
    else:
        seen_tasks = sum(1 for t in stream.tasks if t.classes[0] < loaded.n_seen)
    amp = getattr(torch, cfg.hardware.amp_dtype) if cfg.hardware.amp else None
    class_il, task_il, final = evaluation.evaluate(
        loaded.model,
        loaded.strategy,
        stream,
        loaded.preprocess,
        Hardware(loaded.device, amp),
        split=cfg.evaluate_on,
        batch_size=cfg.eval_batch_size,
        n_seen=loaded.n_seen,
        trained_tasks=seen_tasks,
    )
    labels = stream.evaluation_split(cfg.evaluate_on)[2]

    def summary(row: list[float]) -> dict:
        row = [None if math.isnan(v) else v for v in row]  # a task without images in the folder: no accuracy
        scored = [v for v in row[:seen_tasks] if v is not None]
        return {"accuracy": row, "average_accuracy": sum(scored) / len(scored) if scored else None}

    return {
        "checkpoint": str(loaded.path),
        "dataset": cfg.dataset.name,
        "split": split,
        "folder": str(cfg.dataset.folder) if split == "folder" else None,
        "scenario": cfg.dataset.scenario,
        "evaluated_on": cfg.evaluate_on,
        "seen_classes": loaded.n_seen,
        "seen_tasks": seen_tasks,
        "images": len(labels),
        "skipped": skipped,
        "class_il": summary(class_il),
        "task_il": summary(task_il),
        "per_class": per_class(labels.cpu(), final, loaded),
        "final": final,
    }


def test_stream(loaded: Loaded, cfg: DictConfig):
    """The data set's test stream (or held-out part) as `incr train` splits it, at the model's pixel levels."""
    from incr_cli.data.sources import load_source
    from incr_cli.data.stream import build_stream
    from incr_cli.errors import ConfigError

    if list(cfg.dataset.input_shape) != list(loaded.input_shape):
        raise InferenceError(
            f"{cfg.dataset.name}'s images are {list(cfg.dataset.input_shape)}; the model takes "
            f"{list(loaded.input_shape)}"
        )
    try:
        stream = build_stream(load_source(cfg.dataset.name, cfg.data, cfg.dataset), cfg.dataset)
    except ConfigError as error:
        raise InferenceError(str(error)) from None
    if stream.class_names != loaded.class_names:
        raise InferenceError(
            f"{cfg.dataset.name}'s classes in label order {stream.class_names} are not the "
            f"checkpoint's {loaded.class_names}; set dataset.class_order to match"
        )
    # pixels at the model's levels, then the model's own scaling and normalisation
    split = "test_x" if cfg.evaluate_on == "test" else "train_x"
    images = getattr(stream, split)
    converted = to_levels(images, stream.max_value, loaded.max_value)
    if converted is not images:  # no longer the cache's memory-mapped file
        setattr(stream, split, converted)
        stream.image_files = {k: v for k, v in stream.image_files.items() if k != split}
    return stream


def folder_stream(loaded: Loaded, cfg: DictConfig, overrides: Sequence[str]):
    """Every image of an image folder (of its test/ folder, where it is split into train/ and test/) as the
    test set of the run's own tasks: a class folder is matched to the run's class of that name, and the image
    goes to the task the run learned that class in. Returns the stream and the files skipped as unreadable."""
    from incr_cli.data.image_folder import BAD_FILE_ACTIONS, _class_files, _image_size, _root
    from incr_cli.errors import ConfigError

    check_folder_overrides(loaded, cfg, overrides)
    try:
        root = _root(cfg.dataset.get("folder"))
        size = _image_size(cfg.dataset.get("image_size")) or tuple(loaded.input_shape[1:])
    except ConfigError as error:
        raise InferenceError(str(error)) from None
    shape = [cfg.dataset.channels, *size]
    if shape != list(loaded.input_shape):
        raise InferenceError(
            f"dataset.channels={cfg.dataset.channels} and dataset.image_size={list(size)} give "
            f"images of {shape}; the model takes {list(loaded.input_shape)}"
        )
    if cfg.dataset.on_bad_file not in BAD_FILE_ACTIONS:
        raise InferenceError(
            f"dataset.on_bad_file={cfg.dataset.on_bad_file} is not valid; choose one of: "
            f"{', '.join(BAD_FILE_ACTIONS)}"
        )
    scored = root / "test" if (root / "train").is_dir() and (root / "test").is_dir() else root
    per_class = {name: files for name, files in _class_files(scored, []).items() if files}
    if not per_class:
        raise InferenceError(
            f"{scored} holds no class folder with images; expected {scored}/<class>/*.png (or "
            ".jpg, .jpeg, .bmp, .gif, .webp), one folder per class named as the run's classes"
        )
    unknown = sorted(set(per_class) - set(loaded.class_names))
    if unknown:
        raise InferenceError(
            f"{scored} has class folder(s) the run never saw: {shown(unknown)}; the run's classes "
            f"are {shown(loaded.class_names)} (remove or rename the others)"
        )
    files = [path for files in per_class.values() for path in files]
    label_of = {name: label for label, name in enumerate(loaded.class_names)}
    labels = torch.tensor([label_of[name] for name, files in per_class.items() for _ in files])
    images, kept, skipped = read_images(
        files, loaded.input_shape, cfg.dataset.on_bad_file, loaded.cfg.dataset.get("fit", "stretch")
    )
    labels = labels[kept]
    stream = stream_outline(loaded.tasks, loaded.class_names, loaded.input_shape, loaded.max_value, "cpu")
    stream.test_x, stream.test_y = to_levels(images, FULL_INTENSITY, loaded.max_value), labels
    for task in stream.tasks:
        task.test_index = torch.nonzero(torch.isin(labels, torch.tensor(task.classes))).flatten()
    return stream, [[str(path), reason] for path, reason in skipped]


def check_folder_overrides(loaded: Loaded, cfg: DictConfig, overrides: Sequence[str]) -> None:
    """A folder scored whole has no split to choose and takes the run's tasks: an override that would choose
    them otherwise is refused, not ignored."""
    if cfg.dataset.name != "image_folder":
        raise InferenceError(
            "--split folder scores an image folder: give dataset=image_folder "
            "dataset.folder=FOLDER, or --split test for the data set's test split"
        )
    if cfg.dataset.get("domains") == "folders" or cfg.dataset.scenario == "domain_il":
        raise InferenceError(
            "a domain-IL run's tasks are domains, which a folder of classes does not name: "
            "give --split test (with dataset.domains=folders, one folder per domain)"
        )
    if cfg.evaluate_on != "test":
        raise InferenceError(
            "evaluate_on=val is a held-out part of the training images; a folder scored whole "
            "(--split folder) has none: give --split test"
        )
    for override in overrides:
        key = override.partition("=")[0]
        if key in ("dataset.test_fraction", "dataset.val_fraction"):
            raise InferenceError(
                f"{key} splits a folder; --split folder (the default with dataset.folder) "
                "scores every image: leave it out, or give --split test"
            )
        if key in RUN_TASK_KEYS:
            value, run = OmegaConf.select(cfg, key), OmegaConf.select(loaded.cfg, key)
            if plain(value) != plain(run):
                raise InferenceError(
                    f"{override}: a folder scored whole (--split folder) is cut into the run's own "
                    f"tasks ({key}={plain(run)}); leave it out, or give --split test"
                )


def plain(value):
    return OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value


def shown(names: Sequence[str], limit: int = 10) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def per_class(labels: Tensor, final: dict, loaded: Loaded) -> dict:
    """Per class name: the images evaluated and, for a class of a trained task, its class-IL recall."""
    counts = torch.bincount(labels, minlength=len(loaded.class_names)).tolist()
    confusion = final.get("confusion_matrix", [])
    result = {}
    for label, name in enumerate(loaded.class_names):
        row = confusion[label] if label < len(confusion) else []
        result[name] = {"images": counts[label], "recall": row[label] / sum(row) if sum(row) else None}
    return result


def evaluation_table(result: dict) -> Table:
    n_tasks = len(result["class_il"]["accuracy"])
    part = "every image" if result["split"] == "folder" else result["evaluated_on"]
    title = f"{result['folder'] or result['dataset']} ({part}), {result['seen_classes']} classes seen"
    table = Table(title=title, title_justify="left")
    table.add_column("accuracy")
    for j in range(n_tasks):
        table.add_column(f"T{j + 1}", justify="right")
    table.add_column("avg", justify="right", style="bold")
    for scenario, name in (("class_il", "class-IL"), ("task_il", "task-IL")):
        row = result[scenario]["accuracy"]
        # tasks the model has not trained on yet are dimmed, as in the training tables; "-": no image of the task
        cells = [number(v) if j < result["seen_tasks"] else f"[dim]{number(v)}[/]" for j, v in enumerate(row)]
        table.add_row(name, *cells, number(result[scenario]["average_accuracy"]))
    return table


def number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def evaluation_lines(result: dict) -> list[str]:
    lines = [f"checkpoint: {result['checkpoint']}"]
    classes = sum(1 for c in result["per_class"].values() if c["images"])
    lines.append(
        f"images: {result['images']} of {classes} classes"
        + (f" ({len(result['skipped'])} unreadable file(s) skipped)" if result["skipped"] else "")
    )
    final = result["final"]
    if final:
        lines.append(
            f"trained tasks: precision {final['precision']:.4f}, recall {final['recall']:.4f}, "
            f"F1 {final['f1']:.4f} (macro over the {result['seen_classes']} classes seen)"
        )
    return lines


# ---------------------------------------------------------------------------------------------- predict
def image_files(paths: Sequence[Path]) -> list[Path]:
    """The image files named, and those under the folders named (recursively, sorted): the suffixes that
    `dataset=image_folder` reads."""
    from incr_cli.data.image_folder import IMAGE_SUFFIXES

    files = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            raise InferenceError(f"{path}: no such image file or folder")
    if not files:
        raise InferenceError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(map(str, paths))}")
    return files


def read_image(path: Path, shape: Sequence[int], fit: str = "stretch") -> Tensor:
    """An image file as uint8 [C, H, W] in 0..255, decoded by `dataset=image_folder`'s own decoding (EXIF
    orientation, 16-bit and palette files to 8-bit grayscale or RGB as the training data, Pillow's bilinear
    resize to H x W), so that a file of a training folder gives the pixels it trained on. Raises
    UnreadableImage for a file that cannot be decoded."""
    from incr_cli.data.image_folder import CHANNEL_MODES, image_pixels, open_image

    channels, height, width = shape
    if channels not in CHANNEL_MODES:
        raise InferenceError(
            f"the model takes {channels}-channel images; predict reads 1 (grayscale) or 3 (RGB)"
        )
    pixels = image_pixels(open_image(path, channels), (height, width), fit)
    return torch.tensor(pixels)  # a copy: Pillow's array is read-only


def read_images(
    files: Sequence[Path], shape: Sequence[int], on_bad_file: str = "skip", fit: str = "stretch"
) -> tuple[Tensor, list[int], list[tuple[Path, str]]]:
    """The files as one uint8 batch [N, C, H, W], decoded in threads (Pillow releases the GIL). An unreadable
    file stops everything with on_bad_file="stop"; with "skip" it is named in a warning and left out, and only
    a batch with no readable file at all is an error. Returns the batch, the indices of the files in it and the
    skipped files with the reason."""
    from concurrent.futures import ThreadPoolExecutor

    from incr_cli.console import errors
    from incr_cli.data.image_folder import UnreadableImage

    def decode(path: Path) -> Tensor | str:
        try:
            return read_image(path, shape, fit)
        except UnreadableImage as error:
            return str(error)

    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        decoded = list(pool.map(decode, files))
    kept = [i for i, image in enumerate(decoded) if isinstance(image, Tensor)]
    skipped = [(files[i], image) for i, image in enumerate(decoded) if isinstance(image, str)]
    if skipped and (on_bad_file == "stop" or not kept):
        path, reason = skipped[0]
        more = f" (none of the {len(files)} files can be read)" if len(files) > 1 and not kept else ""
        advice = "; fix or remove it, or give --on-bad-file skip" if on_bad_file == "stop" else ""
        raise InferenceError(f"{path} cannot be read as an image ({reason}){more}{advice}")
    for path, reason in skipped:
        errors.print(
            f"[bold yellow]warning:[/] skipped {path}: cannot be read as an image ({reason})",
            highlight=False,
            soft_wrap=True,
        )
    return torch.stack([decoded[i] for i in kept]), kept, skipped


@torch.no_grad()
def predict(
    loaded: Loaded, images: Tensor, top_k: int, batch_size: int = 256
) -> list[list[tuple[int, float]]]:
    """Per image, the top-k (label, probability): softmax of the scores over the classes seen so far."""
    classifier = Classifier(loaded)
    k = min(top_k, loaded.n_seen)
    results = []
    for first in range(0, len(images), batch_size):
        scores = classifier(images[first : first + batch_size].to(loaded.device))
        probabilities, labels = torch.softmax(scores, dim=1).topk(k, dim=1)
        results += [
            list(zip(row_labels.tolist(), row_p.tolist(), strict=True))
            for row_labels, row_p in zip(labels, probabilities, strict=True)
        ]
    return results


def prediction_table(files: Sequence[Path], predictions: list, names: list[str]) -> Table:
    k = len(predictions[0]) if predictions else 0
    table = Table(title=f"top-{k} of {len(names)} classes seen", title_justify="left")
    table.add_column("image", overflow="fold")  # a path wraps rather than lose its file name
    for rank in range(k):
        table.add_column(f"#{rank + 1}")
    for path, top in zip(files, predictions, strict=True):
        table.add_row(str(path), *(f"{names[label]} [dim]{p:.3f}[/]" for label, p in top))
    return table


# ---------------------------------------------------------------------------------------------- export
def default_export_path(checkpoint: Path, fmt: str) -> Path:
    # not *.pt: the checkpoints folder's *.pt files are what resume reads
    return checkpoint.with_suffix(f".{fmt}")


def writable_file(given: str, name_in_folder: str, option: str = "--out") -> Path:
    """The file that `option GIVEN` names, checked before any work: a folder (one that exists, or a path
    ending in /) stands for FOLDER/`name_in_folder`. Refused with one line naming the path and why: below a
    file, in a read-only or unwritable place. Nothing is created; the missing folders are made when writing."""
    path = Path(given).expanduser()
    if given.endswith(("/", os.sep)) or path.is_dir():
        path = path / name_in_folder
    if path.is_dir():
        raise InferenceError(f"{option} {given}: {path} is a folder; give a file name")
    existing = path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise InferenceError(f"{option} {given}: cannot write there, {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        where = path if path.exists() else existing
        raise InferenceError(
            f"{option} {given}: cannot write there, {where} is read-only (or not yours to write)"
        )
    try:  # os.access reads permission bits; some file systems refuse more: a scratch file is the real test
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise InferenceError(
            f"{option} {given}: cannot write in {existing} ({error.strerror or error})"
        ) from None
    return path


def export(loaded: Loaded, fmt: str, out: Path) -> Path:
    """Write the classifier (preprocessing included) as TorchScript or ONNX, and its class names beside it."""
    if fmt not in FORMATS:
        raise InferenceError(f"unknown format '{fmt}'; valid: {', '.join(FORMATS)}")
    if loaded.device.type != "cpu":
        raise InferenceError("export runs on the CPU: load the checkpoint with device=cpu")
    classifier = Classifier(loaded).eval()
    # pixel values in 0..255, batch of 2: tracing records the batch size as a variable
    example = torch.randint(
        0, FULL_INTENSITY + 1, (2, *loaded.input_shape), generator=torch.Generator().manual_seed(0)
    ).float()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_model(classifier, example, fmt, out)
        classes = {
            "class_names": loaded.seen_names,
            "input": f"float32 [N, {', '.join(map(str, loaded.input_shape))}], pixel values 0..255 "
            f"({'grayscale' if loaded.input_shape[0] == 1 else 'RGB'})",
            "output": f"float32 [N, {loaded.n_seen}], scores of the classes in class_names' order; softmax: "
            "probabilities",
            "checkpoint": str(loaded.path),
        }
        out.with_name(out.name + ".classes.json").write_text(json.dumps(classes, indent=2) + "\n")
    except OSError as error:  # checked before; a disk that fills or goes away meanwhile
        raise InferenceError(f"writing {out} failed ({error.strerror or error})") from None
    return out


def write_model(classifier: nn.Module, example: Tensor, fmt: str, out: Path) -> None:
    if fmt == "torchscript":
        with torch.no_grad(), warnings.catch_warnings():
            # torch.jit is deprecated in favour of torch.export, still loads everywhere; the tracer's shape
            # warnings concern sizes that are fixed in a trained model (the head's rows)
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            traced = torch.jit.trace(classifier, example, check_trace=False)
        traced.save(str(out))
    else:
        check_onnx()
        export_onnx(classifier, example, out)


def check_onnx() -> None:
    # torch's ONNX exporter writes through onnxscript, which needs onnx
    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise InferenceError(
            f"--format onnx needs {' and '.join(missing)}: pip install onnx onnxscript "
            "(and onnxruntime to run the file)"
        )


def export_onnx(classifier: nn.Module, example: Tensor, out: Path) -> None:
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        torch.onnx.export(
            classifier,
            (example,),
            str(out),
            input_names=["images"],
            output_names=["scores"],
            dynamic_shapes={"images": {0: batch}},
            dynamo=True,
            external_data=False,
            verbose=False,
        )


# ---------------------------------------------------------------------------------------------- commands
class _Parser(argparse.ArgumentParser):
    """argparse that reports bad arguments as incr's one-line error."""

    def error(self, message: str):
        raise InferenceError(f"{self.prog}: {message}")


def _run(command, argv: list[str]) -> int:
    from incr_cli.console import fail
    from incr_cli.errors import ConfigError

    try:
        return command(argv)
    except (InferenceError, ConfigError) as error:
        fail(str(error))
        return 2


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace | int:
    try:  # options may come between the positional arguments: `incr eval RUN --split test dataset.folder=F`
        return parser.parse_intermixed_args(argv)
    except SystemExit as stop:  # --help
        return int(stop.code or 0)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InferenceError("--device cuda but no CUDA GPU is visible; use --device cpu or auto")
    return torch.device(name)


def eval_command(argv: list[str]) -> int:
    return _run(_eval, argv)


def _eval(argv: list[str]) -> int:
    from incr_cli.console import console
    from incr_cli.files import write_json

    parser = _Parser(
        prog="incr eval",
        description="Accuracy of a checkpoint on every task of a data set's test "
        "stream (the run's own by default), the tables of incr train. A folder given with "
        "dataset=image_folder dataset.folder=FOLDER is scored whole: every image of FOLDER/<class>/ "
        "(of FOLDER/test/<class>/ where FOLDER has train/ and test/), each class folder matched by "
        "name to the run's class and scored in the task the run learned it in; a class the run "
        "never saw is refused.",
    )
    parser.add_argument(
        "checkpoint", type=Path, help="a checkpoint file, or a run directory (its checkpoints/last.pt)"
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="OVERRIDE",
        help="dataset=NAME, dataset.KEY=VALUE, data.KEY=VALUE, eval_batch_size=N, evaluate_on=test|val",
    )
    parser.add_argument(
        "--split",
        choices=SPLITS,
        default=None,
        help="folder: every image of dataset.folder, in the run's tasks (the default when "
        "dataset.folder is given); test: the test split as incr train holds it out "
        "(dataset.test_fraction of each class, or FOLDER/test/), cut into dataset.n_tasks "
        "tasks (the default otherwise: the run's own test stream)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="also write the results (per-task and per-class) here as JSON; a folder: FOLDER/eval.json",
    )
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = _parse(parser, argv)
    if isinstance(args, int):
        return args
    out = writable_file(args.out, "eval.json") if args.out is not None else None
    loaded = load(args.checkpoint, _device(args.device))
    result = evaluate(loaded, args.overrides, args.split)
    console.print(evaluation_table(result))
    for line in evaluation_lines(result):
        console.print(line, highlight=False, soft_wrap=True)
    if out is not None:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            write_json(out, result)
        except OSError as error:  # a full disk included
            raise InferenceError(
                f"writing {out} failed ({getattr(error, 'strerror', None) or error})"
            ) from None
    return 0


def predict_command(argv: list[str]) -> int:
    return _run(_predict, argv)


def _predict(argv: list[str]) -> int:
    from incr_cli.console import console

    parser = _Parser(
        prog="incr predict",
        description="Class names and probabilities of image files, from a "
        "checkpoint alone (no training data needed).",
    )
    parser.add_argument(
        "checkpoint", type=Path, help="a checkpoint file, or a run directory (its checkpoints/last.pt)"
    )
    parser.add_argument("images", nargs="+", type=Path, help="image files, or folders searched for them")
    parser.add_argument("--top-k", type=int, default=3, help="classes shown per image (default 3)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--on-bad-file",
        choices=("skip", "stop"),
        default="skip",
        help="an unreadable image file: skip names it on stderr and predicts the others "
        "(default); stop exits with status 2 naming it",
    )
    parser.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    args = _parse(parser, argv)
    if isinstance(args, int):
        return args
    if args.top_k < 1:
        raise InferenceError(f"--top-k {args.top_k} must be 1 or more")
    files = image_files(args.images)
    loaded = load(args.checkpoint, _device(args.device))
    images, kept, _ = read_images(
        files, loaded.input_shape, args.on_bad_file, loaded.cfg.dataset.get("fit", "stretch")
    )
    files = [files[i] for i in kept]
    predictions = predict(loaded, images, args.top_k)
    names = loaded.seen_names
    if args.json:
        rows = [
            {
                "image": str(path),
                "predictions": [
                    {"class": names[label], "label": label, "probability": p} for label, p in top
                ],
            }
            for path, top in zip(files, predictions, strict=True)
        ]
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
    else:
        console.print(prediction_table(files, predictions, names))
    return 0


def export_command(argv: list[str]) -> int:
    return _run(_export, argv)


def _export(argv: list[str]) -> int:
    from incr_cli.console import console

    parser = _Parser(
        prog="incr export",
        description="A model file that scores the classes seen so far, "
        "preprocessing included; input: float [N, C, H, W] pixel values 0..255. The class names "
        "are written beside it (FILE.classes.json).",
    )
    parser.add_argument(
        "checkpoint", type=Path, help="a checkpoint file, or a run directory (its checkpoints/last.pt)"
    )
    parser.add_argument(
        "--format", default="torchscript", help=f"{' | '.join(FORMATS)} (default torchscript)"
    )
    parser.add_argument(
        "--out",
        default=None,
        help="the model file (default: beside the checkpoint, .torchscript or .onnx); a folder "
        "(one that exists, or a path ending in /): FOLDER/model.torchscript or FOLDER/model.onnx. "
        "A place that cannot be written is refused before exporting",
    )
    args = _parse(parser, argv)
    if isinstance(args, int):
        return args
    if args.format not in FORMATS:
        raise InferenceError(f"unknown format '{args.format}'; valid: {', '.join(FORMATS)}")
    if args.format == "onnx":
        check_onnx()
    if args.out is None:
        default = default_export_path(checkpoint_path(args.checkpoint), args.format)
        out = writable_file(str(default), "", option="the model file (no --out given)")
    else:
        out = writable_file(args.out, f"model.{args.format}")
    loaded = load(args.checkpoint, "cpu")
    export(loaded, args.format, out)
    console.print(
        f"{args.format} model: {out} ({loaded.n_seen} classes; names in {out.name}.classes.json)",
        highlight=False,
        soft_wrap=True,
    )
    return 0
