"""The task loop: strategy hooks, epochs of device-resident batches, evaluation after each task.

`Run` reads top to bottom: it is built (build.py: the network and the method; run_setup.py: the data, the
loggers, the checkpoint to resume from), then `run` trains task after task: `train_task` grows the head and
calls the method's hooks, `_train_epoch` takes the optimizer steps, `_end_task` evaluates (evaluation.py),
records the results (results.py) and writes the checkpoint (run_checkpoints.py)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from incr_cli import build, checkpoint, distributed, estimate, evaluation, faults, results, run_setup
from incr_cli.config import to_container
from incr_cli.console import TrainingProgress, console, summary_table, training_warnings
from incr_cli.data.batches import DeviceBatches, Preprocess
from incr_cli.data.stream import Task
from incr_cli.run_checkpoints import Checkpointer, StopSignals, after_step
from incr_cli.run_setup import RESUME_MAY_CHANGE, resume_hash
from incr_cli.step import StepRunner, setup_hardware
from incr_cli.task_checks import EpochLoss, TaskLoss, learned_nothing

__all__ = ["RESUME_MAY_CHANGE", "Interrupted", "Position", "Run", "resume_hash"]

log = logging.getLogger("incr")


class Interrupted(RuntimeError):
    """SIGINT or SIGTERM arrived; a checkpoint was written first."""

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.signal_number = signal_number


@dataclass
class Position:
    """Where the run is: `task` is the next task to train or the one being trained; `started` says whether
    its head growth and before_task already happened; epoch and batch count what is done of it."""

    task: int = 0
    started: bool = False
    epoch: int = 0
    batch: int = 0
    step: int = 0  # optimizer steps of the whole run
    epoch_loss: float = 0.0  # sum of this epoch's batch losses so far, for the logged epoch mean
    # for the check that the task's loss fell (see `training_warnings`): the first epoch's mean loss and the
    # lowest mean of a later epoch; in a one-epoch task the loss sums at the end of its first tenth of batches
    # and at the start of its last tenth
    first_epoch_loss: float | None = None
    lowest_epoch_loss: float | None = None
    head_loss: float | None = None
    tail_start_loss: float | None = None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class Run:
    """One continual-learning experiment in one run directory."""

    def __init__(self, cfg: DictConfig, run_dir: Path, names: dict[str, str]):
        self.cfg, self.run_dir, self.names = cfg, run_dir, names
        self.config_hash = checkpoint.config_hash(to_container(cfg))  # of the config as given
        self.hardware = setup_hardware(cfg.hardware)
        device = self.hardware.device
        run_setup.seed_everything(cfg.seed)
        self.stream, self.config = run_setup.load_stream(cfg, device)
        self.model = build.build_model(
            cfg, self.stream.n_classes, device, cfg.hardware.channels_last, cfg.hardware.compile
        )
        self.preprocess = Preprocess(cfg.dataset, self.stream.max_value, device, cfg.hardware.channels_last)
        self.rng = torch.Generator(device=device).manual_seed(cfg.seed)
        self.epochs = build.training_epochs(cfg)
        self.make_optimizer = build.optimizer_factory(cfg)
        self.strategy = build.build_strategy(
            cfg,
            self.model,
            self.stream,
            self.preprocess,
            self.rng,
            device,
            self.make_optimizer,
            self._stage_runner,
        )
        self.writes = distributed.is_main()  # hardware=ddp: rank 0 alone writes files and prints
        self.checkpointer = Checkpointer(run_dir / "checkpoints", cfg.checkpoint, self.writes)
        self.signals = StopSignals()
        self.progress = TrainingProgress(cfg.progress)
        self.position = Position()
        self.metrics = results.new_metrics(cfg, names, self.config_hash, device, self.stream)
        # the task under way: its optimizer, scheduler and gradient scaler, and its epoch's loss
        self.optimizer = self.scheduler = self.scaler = self.losses = None
        self._resume_state: dict | None = None  # their states, from a mid-task checkpoint
        if cfg.resume:
            self.restore()
        self.loggers = run_setup.open_loggers(cfg, run_dir, self.config, self.position, self.writes)

    def restore(self) -> None:
        """Continue from the newest checkpoint that loads: the weights, the method's state, the random
        generator, the metrics and the position; mid-task also the task's optimizer."""
        found = run_setup.newest_checkpoint(self.run_dir, self.hardware.device)
        if found is None:
            return
        path, state = found
        run_setup.check_same_experiment(path, state, self.config_hash, self.config)
        build.load_trained(self.model, self.strategy, state)
        checkpoint.restore_rng(state["rng"], self.rng)
        self.preprocess.restore_rank_generators(state.get("augment_rng"))
        self.position = p = Position(**state["position"])
        self.metrics = run_setup.resumed_metrics(state, self.run_dir, p.task == len(self.stream.tasks))
        if p.started:
            self._resume_state = {k: state[k] for k in ("optimizer", "scheduler", "scaler")}
        log.info("resumed from %s: task %d, epoch %d, batch %d", path, p.task + 1, p.epoch + 1, p.batch)

    # ----------------------------------------------------------------- the loop
    def run(self) -> dict:
        started = time.perf_counter()
        log.info("run directory: %s", self.run_dir)
        if self.metrics["run"]["status"] == "finished":
            log.info("this run already finished; nothing to do")
            self.loggers.close()
            return self.metrics
        estimate.warn_if_long_on_cpu(
            self.model,
            self.stream,
            self.preprocess,
            self.make_optimizer,
            batch_size=self.cfg.batch_size,
            epochs=self.epochs,
            next_task=self.position.task,
            done_steps=self.position.step,
            autocast=self.hardware.autocast,
            compiled=self.cfg.hardware.compile,
        )
        if not self.metrics["class_il"]["initial_accuracy"]:
            class_il, task_il, _ = self.evaluate(n_seen=0)
            self.metrics["class_il"]["initial_accuracy"] = class_il
            self.metrics["task_il"]["initial_accuracy"] = task_il
        tasks = self.stream.tasks
        with self.progress.running(len(tasks)), self.signals.caught(), closing(self.loggers):
            while self.position.task < len(tasks):
                self.train_task(tasks[self.position.task])
                faults.reach("task_end")
                self._stop_if_signalled()
        self.metrics["run"]["status"] = "finished"
        self.metrics["wall_seconds"] += time.perf_counter() - started
        self.write_results(figures_too=True)
        if self.writes:
            console.print(summary_table(self.metrics))
            for line in training_warnings(self.metrics):
                console.print(line, highlight=False, soft_wrap=True)
        log.info("finished; results in %s", self.run_dir)
        return self.metrics

    def train_task(self, task: Task) -> None:
        """One task, from where the run is (mid-epoch after a resume): its epochs, then `_end_task`."""
        cfg, position = self.cfg, self.position
        if not position.started:
            self.model.head.grow(task.classes[-1] + 1)
            self.strategy.before_task(task)
            position.started = True
        self._start_optimizer()
        indices = self.strategy.training_indices(task)
        batches = DeviceBatches(
            self.stream.train_x, self.stream.train_y, indices, cfg.batch_size, cfg.seed, task.id
        )
        timing = results.task_timing(self.metrics, task.id)
        self.progress.start_task(task.id, self.epochs, task.id)
        names = [self.stream.class_names[c] for c in task.classes]
        log.info(
            "task %d/%d: classes %s, %d training samples",
            task.id + 1,
            len(self.stream.tasks),
            names,
            len(indices),
        )
        runner = StepRunner(self.optimizer, self.scaler, self.hardware, cfg.train.on_nonfinite, self._where)
        task_loss = None
        self.model.train()
        while position.epoch < self.epochs:
            task_loss = self._train_epoch(task, batches, runner, timing)
        self._end_task(task, timing, task_loss if len(batches) else None)

    def _start_optimizer(self) -> None:
        """The task's optimizer, scheduler and gradient scaler: new, or as a mid-task checkpoint left them."""
        cfg = self.cfg
        self.optimizer = self.make_optimizer(self.model.parameters())
        self.scheduler = (
            instantiate(cfg.scheduler, optimizer=self.optimizer) if cfg.scheduler is not None else None
        )
        self.scaler = self.hardware.grad_scaler()
        if self._resume_state is not None:
            self.optimizer.load_state_dict(self._resume_state["optimizer"])
            if self.scheduler is not None:
                self.scheduler.load_state_dict(self._resume_state["scheduler"])
            self.scaler.load_state_dict(self._resume_state["scaler"])
            self._resume_state = None

    def _train_epoch(
        self, task: Task, batches: DeviceBatches, runner: StepRunner, timing: dict
    ) -> TaskLoss | None:
        """One epoch (the rest of it after a resume): a step per batch, a checkpoint when one is due, a stop
        when a signal came; then `_end_epoch`. Returns the task's loss figures so far (see `EpochLoss.end`)."""
        position, n_batches = self.position, len(batches)
        self.progress.start_epoch(position.epoch, n_batches, position.batch)
        self.losses = EpochLoss(
            position, self.hardware.device, n_batches, tenths=self.epochs == 1 and task.id == 0
        )
        epoch_seconds, epoch_samples = 0.0, 0
        tick = time.perf_counter()
        for batch in batches.epoch(position.epoch, start=position.batch):
            runner.weight = batch.weight
            loss = self.strategy.training_step(batch, runner)
            position.batch += 1
            position.step += 1
            self.losses.add(loss, position.batch)
            elapsed = time.perf_counter() - tick
            timing["samples"] += len(batch)
            timing["steps"] += 1
            timing["train_seconds"] += elapsed
            self.progress.advance_batch(len(batch) / max(elapsed, 1e-9))
            epoch_seconds += elapsed
            epoch_samples += len(batch)
            faults.reach("step")
            save, stop = after_step(self.checkpointer, self.signals, position.step)
            if save:
                self.save_checkpoint()
            if stop:
                self._stop(checkpoint_first=not save)
            tick = time.perf_counter()
        return self._end_epoch(task, epoch_samples / max(epoch_seconds, 1e-9))

    def _end_epoch(self, task: Task, samples_per_second: float) -> TaskLoss | None:
        """The epoch's mean loss logged, the scheduler stepped, the position at the next epoch's start."""
        position = self.position
        epoch_mean, task_loss = self.losses.end(position, self.epochs)
        lr = self.optimizer.param_groups[0]["lr"]
        values = {"loss": epoch_mean, "lr": lr, "samples_per_second": samples_per_second}
        self.loggers.epoch(values, position.step, task.id, position.epoch)
        if self.scheduler is not None:
            self.scheduler.step()
        position.epoch += 1
        self.progress.end_epoch(position.epoch)
        position.batch = 0
        position.epoch_loss = 0.0
        position.head_loss = position.tail_start_loss = None
        return task_loss

    def _end_task(self, task: Task, timing: dict, task_loss: TaskLoss | None) -> None:
        """The method's after_task, evaluation on every task, the new rows of the matrices with the task's
        warnings, the task's checkpoint and the result files."""
        tick = time.perf_counter()
        self.strategy.after_task(task)  # counted as training: GDumb trains here, memories are filled here
        timing["train_seconds"] += time.perf_counter() - tick
        tick = time.perf_counter()
        rows = self.evaluate(n_seen=task.classes[-1] + 1)
        timing["eval_seconds"] = time.perf_counter() - tick
        results.close_task(timing, self.strategy, self.model)
        timing["warnings"] = self.training_warnings(task, rows[1], task_loss)
        results.record(self.metrics, rows, self.model, self.hardware.device)
        results.show_task(self.metrics, on_console=self.writes)
        self.progress.end_task(task.id + 1)
        for warning in timing["warnings"]:
            log.warning(warning)
        matrix = self.metrics["class_il"]["accuracy_matrix"]
        self.loggers.task(results.logged_values(self.metrics), matrix, self.position.step, task.id)
        self.position = Position(task=task.id + 1, step=self.position.step)
        self.save_checkpoint(task_end=task.id)
        self.write_results()
        self.model.train()

    def _stage_runner(self, optimizer: torch.optim.Optimizer, where: Callable[[], str]) -> StepRunner:
        """The step runner of a method's own training stage (Context.make_step_runner): the run's precision,
        with a fresh loss scaler, and its non-finite policy, also in a run resumed after its task's last step."""
        return StepRunner(
            optimizer, self.hardware.grad_scaler(), self.hardware, self.cfg.train.on_nonfinite, where
        )

    def _where(self) -> str:
        p = self.position
        return f"task {p.task + 1}, epoch {p.epoch + 1}, step {p.batch + 1}"

    def evaluate(self, n_seen: int) -> tuple[list[float], list[float], dict]:
        """The accuracy rows after the task under way (incr_cli/evaluation.py), `n_seen` classes seen."""
        return evaluation.evaluate(
            self.model,
            self.strategy,
            self.stream,
            self.preprocess,
            self.hardware,
            split=self.cfg.evaluate_on,
            batch_size=self.cfg.eval_batch_size,
            n_seen=n_seen,
            trained_tasks=self.position.task + 1,
        )

    def training_warnings(self, task: Task, task_il: list[float], task_loss: TaskLoss | None) -> list[str]:
        """What says that the task just trained learned nothing (task_checks.learned_nothing)."""
        return learned_nothing(
            task, task_il[task.id], task_loss, self.cfg, self.epochs, self.stream.class_names
        )

    # ----------------------------------------------------------------- files, checkpoints and signals
    def write_results(self, figures_too: bool = False) -> None:
        if self.writes:
            results.write(self.run_dir, self.metrics, figures_too)

    def save_checkpoint(self, task_end: int | None = None) -> None:
        """Everything the run needs to continue exactly: at the end of task `task_end`, or mid-task (None)
        with the task's optimizer, scheduler and scaler, and the epoch's loss so far."""
        mid_task = task_end is None
        if mid_task:
            self.losses.keep_in(self.position)
        state = {
            "config_hash": self.config_hash,
            "position": self.position.as_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict() if mid_task else None,
            "scheduler": self.scheduler.state_dict() if mid_task and self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if mid_task else None,
            "strategy": self.strategy.state_dict(),
            "rng": checkpoint.rng_state(self.rng),
            "augment_rng": self.preprocess.rank_generator_states(),  # hardware=ddp: one per rank
            "metrics": self.metrics,
            # what `incr predict` and `incr export` need without the training data
            "config": self.config,
            "class_names": self.stream.class_names,
            "max_value": self.stream.max_value,
        }
        self.checkpointer.save(state, self.position.step, task_end)

    def _stop_if_signalled(self) -> None:
        """Between tasks, after SIGINT or SIGTERM: `_stop` (the task's checkpoint is the latest already)."""
        if self.signals.stop_now():
            self._stop(checkpoint_first=False)

    def _stop(self, checkpoint_first: bool) -> NoReturn:
        """After SIGINT or SIGTERM: a checkpoint where the latest is not of this position, the run marked
        interrupted, and `Interrupted` raised."""
        if checkpoint_first:
            self.save_checkpoint()
        self.metrics["run"]["status"] = "interrupted"
        self.write_results()
        p = self.position
        # the command that continues is the caller's to add: one run's, or its whole sweep's
        raise Interrupted(
            f"{self.signals.name} received: checkpoint saved at task {p.task + 1}, epoch "
            f"{p.epoch + 1}, batch {p.batch}",
            self.signals.received,
        )
