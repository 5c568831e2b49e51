"""Using a trained model: a checkpoint becomes a ready classifier for `incr eval`, `incr predict` and `incr export`.

A checkpoint carries the run's resolved config and its class names, so nothing else is needed: the model is
rebuilt as the engine builds it, the strategy takes the saved shape and state (a grown network's
extractors, iCaRL's class means, BiC's correction), and the scores are the strategy's own `predict`."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from rich.table import Table
from torch import Tensor, nn

FORMATS = ("torchscript", "onnx")
# What `incr eval` may change: where the test data come from and how they are batched, never the model.
EVAL_KEYS = ("dataset", "data", "eval_batch_size", "evaluate_on")
FULL_INTENSITY = 255  # images on disk and the exported model's input are 8-bit


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
    """Rebuild a checkpoint's model and strategy as `engine.Run` does, in eval mode on `device`."""
    from hydra.errors import HydraException
    from hydra.utils import instantiate

    from incr_cli import checkpoint
    from incr_cli.data.batches import Preprocess
    from incr_cli.models.head import IncrementalNet
    from incr_cli.strategies.base import Context

    path, device = checkpoint_path(Path(path)), torch.device(device)
    try:
        state = checkpoint.load(path, map_location=device)
    except checkpoint.CheckpointError as error:
        raise InferenceError(str(error)) from None
    if not {"config", "class_names", "max_value"} <= state.keys():
        raise InferenceError(
            f"{path} holds no config, class names and pixel range (written by an older incr): train it again"
        )
    cfg = OmegaConf.create(state["config"])
    tasks = state["metrics"]["tasks"]
    n_seen = seen_classes(tasks, state["position"])
    if n_seen == 0:
        raise InferenceError(f"{path} was written before the model learned any class")
    max_value = int(state["max_value"])
    input_shape = tuple(int(s) for s in cfg.dataset.input_shape)
    try:
        backbone = instantiate(cfg.model, input_shape=input_shape)
        strategy = instantiate(cfg.strategy)
    except HydraException as error:  # e.g. a checkpoint of a strategy this version does not have
        raise InferenceError(
            f"{path}: cannot rebuild its model or strategy ({error})".splitlines()[0]
        ) from None
    model = IncrementalNet(backbone, len(state["class_names"])).to(device)
    if cfg.dataset.get("normalize") and None in (cfg.dataset.get("mean"), cfg.dataset.get("std")):
        # training fills a null mean and std in before its first checkpoint; a config without them is not a run's
        raise InferenceError(f"{path} holds no normalisation values (dataset.mean, dataset.std): train again")
    preprocess = Preprocess(cfg.dataset, max_value, device)
    stream = stream_outline(tasks, state["class_names"], input_shape, max_value, device)
    rng = torch.Generator(device=device).manual_seed(int(cfg.seed))

    def make_optimizer(parameters):
        return instantiate(cfg.optimizer, params=list(parameters))

    epochs = 1 if cfg.train.get("online") else cfg.epochs
    strategy.setup(Context(model, stream, preprocess, rng, device, make_optimizer, cfg.batch_size, epochs,
                           cfg.seed, cfg.dataset.get("scenario", "class_il")))  # fmt: skip
    strategy.restore_structure(state["strategy"])  # a grown network takes its saved shape first
    model.load_state_dict(state["model"])
    strategy.load_state_dict(state["strategy"])
    model.head.grow(n_seen)
    model.eval()
    return Loaded(path, cfg, model, strategy, preprocess, list(state["class_names"]), n_seen,
                  trained_tasks(state["position"]), max_value, device)  # fmt: skip


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
class Evaluation:
    """What the engine's `Run.evaluate` reads, for a loaded checkpoint and a test stream: the accuracies come
    from the very code that wrote the run's metrics.json."""

    def __init__(self, cfg: DictConfig, loaded: Loaded, stream, preprocess, hardware, seen_tasks: int):
        from incr_cli.engine import Position, Run

        self.cfg, self.model, self.strategy = cfg, loaded.model, loaded.strategy
        self.stream, self.preprocess, self.hardware = stream, preprocess, hardware
        self.position = Position(task=seen_tasks - 1)  # as while the engine evaluates the last task trained
        self._evaluate = Run.evaluate

    def evaluate(self, n_seen: int):
        return self._evaluate(self, n_seen)


_ABSENT = object()


def eval_config(loaded: Loaded, overrides: Sequence[str]) -> DictConfig:
    """The run's config with the test-data overrides of `incr eval` applied and checked. A data set chosen
    with dataset=image_folder takes the model's image size and channels unless they are given."""
    from incr_cli.config import ConfigError, check_stream
    from incr_cli.data.sources import check_available

    cfg = OmegaConf.create(OmegaConf.to_container(loaded.cfg))
    parsed = []
    for override in overrides:
        key, equals, value = override.partition("=")
        if not equals or not key:
            raise InferenceError(f"'{override}' is not an override; write KEY=VALUE, e.g. dataset.n_tasks=2")
        if key.split(".")[0] not in EVAL_KEYS:
            raise InferenceError(f"{key} would change the model, not the test data; incr eval accepts only "
                                 "dataset=NAME, dataset.KEY=..., data.KEY=..., eval_batch_size=..., evaluate_on=...")  # fmt: skip
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


def evaluate(loaded: Loaded, overrides: Sequence[str] = ()) -> dict:
    """Class-IL and task-IL accuracy of the checkpoint on every task of a data set's test stream (the run's
    own by default), with the trained tasks' precision, recall, F1 and confusion, as the engine measures them."""
    from incr_cli.config import ConfigError
    from incr_cli.data.sources import load_source
    from incr_cli.data.stream import build_stream
    from incr_cli.engine import Hardware

    cfg = eval_config(loaded, overrides)
    if list(cfg.dataset.input_shape) != list(loaded.input_shape):
        raise InferenceError(f"{cfg.dataset.name}'s images are {list(cfg.dataset.input_shape)}; the model takes "
                             f"{list(loaded.input_shape)}")  # fmt: skip
    try:
        stream = build_stream(load_source(cfg.dataset.name, cfg.data, cfg.dataset), cfg.dataset)
    except ConfigError as error:
        raise InferenceError(str(error)) from None
    if stream.class_names != loaded.class_names:
        raise InferenceError(f"{cfg.dataset.name}'s classes in label order {stream.class_names} are not the "
                             f"checkpoint's {loaded.class_names}; set dataset.class_order to match")  # fmt: skip
    # pixels at the model's levels, then the model's own scaling and normalisation
    split = "test_x" if cfg.evaluate_on == "test" else "train_x"
    setattr(stream, split, to_levels(getattr(stream, split), stream.max_value, loaded.max_value))
    stream = stream.to(loaded.device)
    if cfg.dataset.scenario == "domain_il":  # every task has every class: the first domains are the trained
        seen_tasks = min(loaded.trained_tasks, len(stream.tasks))
    else:
        seen_tasks = sum(1 for t in stream.tasks if t.classes[0] < loaded.n_seen)
    amp = getattr(torch, cfg.hardware.amp_dtype) if cfg.hardware.amp else None
    evaluation = Evaluation(cfg, loaded, stream, loaded.preprocess, Hardware(loaded.device, amp), seen_tasks)
    class_il, task_il, final = evaluation.evaluate(loaded.n_seen)

    def summary(row: list[float]) -> dict:
        return {"accuracy": row, "average_accuracy": sum(row[:seen_tasks]) / seen_tasks}

    return {
        "checkpoint": str(loaded.path),
        "dataset": cfg.dataset.name,
        "scenario": cfg.dataset.scenario,
        "evaluated_on": cfg.evaluate_on,
        "seen_classes": loaded.n_seen,
        "seen_tasks": seen_tasks,
        "class_il": summary(class_il),
        "task_il": summary(task_il),
        "final": final,
    }


def evaluation_table(result: dict) -> Table:
    n_tasks = len(result["class_il"]["accuracy"])
    title = f"{result['dataset']} ({result['evaluated_on']}), {result['seen_classes']} classes seen"
    table = Table(title=title, title_justify="left")
    table.add_column("accuracy")
    for j in range(n_tasks):
        table.add_column(f"T{j + 1}", justify="right")
    table.add_column("avg", justify="right", style="bold")
    for scenario, name in (("class_il", "class-IL"), ("task_il", "task-IL")):
        row = result[scenario]["accuracy"]
        # tasks the model has not trained on yet are dimmed, as in the training tables
        cells = [f"{v:.3f}" if j < result["seen_tasks"] else f"[dim]{v:.3f}[/]" for j, v in enumerate(row)]
        table.add_row(name, *cells, f"{result[scenario]['average_accuracy']:.3f}")
    return table


def evaluation_lines(result: dict) -> list[str]:
    lines = [f"checkpoint: {result['checkpoint']}"]
    final = result["final"]
    if final:
        lines.append(f"trained tasks: precision {final['precision']:.4f}, recall {final['recall']:.4f}, "
                     f"F1 {final['f1']:.4f} (macro over the {result['seen_classes']} classes seen)")  # fmt: skip
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


def read_image(path: Path, shape: Sequence[int]) -> Tensor:
    """An image file as uint8 [C, H, W] in 0..255, decoded as `dataset=image_folder` decodes its files (turned
    by its EXIF orientation, grayscale or RGB as the training data, resized to H x W with Pillow's bilinear
    filter, antialiased when shrinking), so that a file of a training folder gives the pixels it trained on."""
    from PIL import Image, ImageOps

    channels, height, width = shape
    modes = {1: "L", 3: "RGB"}
    if channels not in modes:
        raise InferenceError(
            f"the model takes {channels}-channel images; predict reads 1 (grayscale) or 3 (RGB)"
        )
    try:
        with Image.open(path) as stored:
            image = ImageOps.exif_transpose(stored).convert(modes[channels])
    except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError... for broken files
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise InferenceError(f"{path} cannot be read as an image ({reason})") from None
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return pixels.reshape(height, width, channels).permute(2, 0, 1).contiguous()


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
    return checkpoint.with_suffix(".torchscript" if fmt == "torchscript" else ".onnx")


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
    out.parent.mkdir(parents=True, exist_ok=True)
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
    classes = {
        "class_names": loaded.seen_names,
        "input": f"float32 [N, {', '.join(map(str, loaded.input_shape))}], pixel values 0..255 "
        f"({'grayscale' if loaded.input_shape[0] == 1 else 'RGB'})",
        "output": f"float32 [N, {loaded.n_seen}], scores of the classes in class_names' order; softmax: probabilities",
        "checkpoint": str(loaded.path),
    }
    out.with_name(out.name + ".classes.json").write_text(json.dumps(classes, indent=2) + "\n")
    return out


def check_onnx() -> None:
    # torch's ONNX exporter writes through onnxscript, which needs onnx
    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise InferenceError(f"--format onnx needs {' and '.join(missing)}: pip install onnx onnxscript "
                             "(and onnxruntime to run the file)")  # fmt: skip


def export_onnx(classifier: nn.Module, example: Tensor, out: Path) -> None:
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        torch.onnx.export(
            classifier, (example,), str(out), input_names=["images"], output_names=["scores"],
            dynamic_shapes={"images": {0: batch}}, dynamo=True, external_data=False, verbose=False,
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------- commands
class _Parser(argparse.ArgumentParser):
    """argparse that reports bad arguments as incr's one-line error."""

    def error(self, message: str):
        raise InferenceError(f"{self.prog}: {message}")


def _run(command, argv: list[str]) -> int:
    from incr_cli.console import fail

    try:
        return command(argv)
    except InferenceError as error:
        fail(str(error))
        return 2


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace | int:
    try:
        return parser.parse_args(argv)
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
    from incr_cli.checkpoint import write_json
    from incr_cli.console import console

    parser = _Parser(prog="incr eval", description="Accuracy of a checkpoint on every task of a data set's test "
                     "stream (the run's own by default), the tables of incr train.")  # fmt: skip
    parser.add_argument(
        "checkpoint", type=Path, help="a checkpoint file, or a run directory (its checkpoints/last.pt)"
    )
    parser.add_argument("overrides", nargs="*", metavar="OVERRIDE",
                        help="dataset=NAME, dataset.KEY=VALUE, data.KEY=VALUE, eval_batch_size=N, evaluate_on=test|val")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="also write the results here as JSON")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = _parse(parser, argv)
    if isinstance(args, int):
        return args
    loaded = load(args.checkpoint, _device(args.device))
    result = evaluate(loaded, args.overrides)
    console.print(evaluation_table(result))
    for line in evaluation_lines(result):
        console.print(line, highlight=False, soft_wrap=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.out, result)
    return 0


def predict_command(argv: list[str]) -> int:
    return _run(_predict, argv)


def _predict(argv: list[str]) -> int:
    from incr_cli.console import console

    parser = _Parser(prog="incr predict", description="Class names and probabilities of image files, from a "
                     "checkpoint alone (no training data needed).")  # fmt: skip
    parser.add_argument(
        "checkpoint", type=Path, help="a checkpoint file, or a run directory (its checkpoints/last.pt)"
    )
    parser.add_argument("images", nargs="+", type=Path, help="image files, or folders searched for them")
    parser.add_argument("--top-k", type=int, default=3, help="classes shown per image (default 3)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    args = _parse(parser, argv)
    if isinstance(args, int):
        return args
    if args.top_k < 1:
        raise InferenceError(f"--top-k {args.top_k} must be 1 or more")
    files = image_files(args.images)
    loaded = load(args.checkpoint, _device(args.device))
    images = torch.stack([read_image(path, loaded.input_shape) for path in files])
    predictions = predict(loaded, images, args.top_k)
    names = loaded.seen_names
    if args.json:
        rows = [{"image": str(path), "predictions": [{"class": names[label], "label": label, "probability": p}
                                                       for label, p in top]}
                for path, top in zip(files, predictions, strict=True)]  # fmt: skip
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
    else:
        console.print(prediction_table(files, predictions, names))
    return 0


def export_command(argv: list[str]) -> int:
    return _run(_export, argv)


def _export(argv: list[str]) -> int:
    from incr_cli.console import console

    parser = _Parser(prog="incr export", description="A model file that scores the classes seen so far, "
                     "preprocessing included; input: float [N, C, H, W] pixel values 0..255. The class names "
                     "are written beside it (FILE.classes.json).")  # fmt: skip
    parser.add_argument(
        "checkpoint", type=Path, help="a checkpoint file, or a run directory (its checkpoints/last.pt)"
    )
    parser.add_argument(
        "--format", default="torchscript", help=f"{' | '.join(FORMATS)} (default torchscript)"
    )
    parser.add_argument("--out", type=Path, default=None,
                        help="the model file (default: beside the checkpoint, .torchscript or .onnx)")  # fmt: skip
    args = _parse(parser, argv)
    if isinstance(args, int):
        return args
    if args.format not in FORMATS:
        raise InferenceError(f"unknown format '{args.format}'; valid: {', '.join(FORMATS)}")
    if args.format == "onnx":
        check_onnx()
    loaded = load(args.checkpoint, "cpu")
    out = args.out or default_export_path(loaded.path, args.format)
    export(loaded, args.format, out)
    console.print(f"{args.format} model: {out} ({loaded.n_seen} classes; names in {out.name}.classes.json)",
                  highlight=False, soft_wrap=True)  # fmt: skip
    return 0
