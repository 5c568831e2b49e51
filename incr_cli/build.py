"""The network and the method of a run, built from its config: fresh for `incr train`, and for a checkpoint to
load into (`incr train resume=true`, `incr eval`, `incr predict`, `incr export`), so both build the same."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from incr_cli.config import network_input_shape
from incr_cli.data.batches import Preprocess
from incr_cli.data.stream import Stream
from incr_cli.models.head import IncrementalNet
from incr_cli.step import StepRunner
from incr_cli.strategies.base import Context, Strategy

OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]


def build_model(
    cfg: DictConfig, n_classes: int, device: torch.device, channels_last: bool = False, compile: bool = False
) -> IncrementalNet:
    """The `model` group's backbone with a head over the stream's `n_classes` classes, none of them active
    yet: the engine grows it task by task, and a checkpoint's weights give it their saved size as they load."""
    backbone = instantiate(cfg.model, input_shape=network_input_shape(cfg.dataset))
    model = IncrementalNet(backbone, n_classes).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile:
        model.backbone.compile()
    return model


def optimizer_factory(cfg: DictConfig) -> OptimizerFactory:
    """Builds the run's optimizer (its `optimizer` group) over the parameters given: once per task."""

    def make_optimizer(parameters: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
        return instantiate(cfg.optimizer, params=list(parameters))

    return make_optimizer


def training_epochs(cfg: DictConfig) -> int:
    return 1 if cfg.train.get("online") else cfg.epochs  # online: one pass over the stream


def build_strategy(
    cfg: DictConfig,
    model: IncrementalNet,
    stream: Stream,
    preprocess: Preprocess,
    rng: torch.Generator,
    device: torch.device,
    make_optimizer: OptimizerFactory,
    make_step_runner: Callable[[torch.optim.Optimizer, Callable[[], str]], StepRunner] | None = None,
) -> Strategy:
    """The `strategy` group's method, set up on the model and the stream (a stream's outline will do for a
    checkpoint: `setup` reads the tasks and classes, not the images). The engine gives `make_step_runner`,
    the runner of a method's own training stages; a checkpoint loaded to predict trains nothing."""
    strategy: Strategy = instantiate(cfg.strategy)
    epochs, scenario = training_epochs(cfg), cfg.dataset.get("scenario", "class_il")
    strategy.setup(
        Context(
            model,
            stream,
            preprocess,
            rng,
            device,
            make_optimizer,
            cfg.batch_size,
            epochs,
            cfg.seed,
            scenario,
            make_step_runner,
        )
    )
    return strategy


def load_trained(model: IncrementalNet, strategy: Strategy, state: dict) -> None:
    """A checkpoint's model and method state into a freshly built pair: a grown network (DER's and FOSTER's
    extractors) takes its saved shape first, the head its saved classes as the weights load."""
    strategy.restore_structure(state["strategy"])
    model.load_state_dict(state["model"])
    strategy.load_state_dict(state["strategy"])
