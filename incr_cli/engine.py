"""The task loop: strategy hooks, epochs of device-resident batches, evaluation, metrics and checkpoints."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import resource
import signal
import threading
import time
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from incr_cli import build, checkpoint, distributed, estimate, evaluation, faults, files, metrics, plots
from incr_cli.config import to_container
from incr_cli.console import TrainingProgress, accuracy_table, console, summary_table, training_warnings
from incr_cli.data.batches import DeviceBatches, Preprocess
from incr_cli.data.sources import load_source
from incr_cli.data.stream import Stream, build_stream
from incr_cli.errors import ConfigError
from incr_cli.loggers import RunLoggers
from incr_cli.step import StepRunner, setup_hardware

log = logging.getLogger("incr")

# A trained task is reported when its accuracy is at most this far above chance (see `training_warnings`) ...
CHANCE_MARGIN = 0.05
# ... or when its mean training loss fell by less than this fraction of its first value.
LOSS_DROP = 0.01


# What a resume may change: the result-neutral keys, and the non-finite policy, which changes nothing before
# the non-finite loss it is changed to get past (`incr resume RUN_DIR train.on_nonfinite=skip_batch`).
RESUME_MAY_CHANGE = (*checkpoint.RESULT_NEUTRAL_KEYS, "train.on_nonfinite")


def resume_hash(config: dict) -> str:
    """The config hash less `train.on_nonfinite` as well: the same for a run and any resumption of it."""
    train = {key: value for key, value in config.get("train", {}).items() if key != "on_nonfinite"}
    return checkpoint.config_hash({**config, "train": train})


class Interrupted(RuntimeError):
    """SIGINT or SIGTERM arrived; a checkpoint was written first."""

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.signal_number = signal_number


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def model_size(model: torch.nn.Module) -> tuple[int, int]:
    """Parameter count and bytes of parameters plus buffers (frozen extractors of grown networks included)."""
    parameters = sum(p.numel() for p in model.parameters())
    tensors = [*model.parameters(), *model.buffers()]
    return parameters, sum(t.numel() * t.element_size() for t in tensors)


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
        self.config_hash = checkpoint.config_hash(to_container(cfg))
        self.hardware = setup_hardware(cfg.hardware)
        seed_everything(cfg.seed)
        device = self.hardware.device
        source = load_source(cfg.dataset.name, cfg.data, cfg.dataset)
        # the config as trained, with what loading filled in (dataset=image_folder's computed mean and std):
        # checkpoints carry it to `incr eval` and `incr predict`; the hash above is of the config as given
        self.config = to_container(cfg)
        self.stream: Stream = build_stream(source, cfg.dataset).to(device)
        self.model = build.build_model(
            cfg, self.stream.n_classes, device, cfg.hardware.channels_last, cfg.hardware.compile
        )
        self.preprocess = Preprocess(cfg.dataset, self.stream.max_value, device, cfg.hardware.channels_last)
        self.rng = torch.Generator(device=device).manual_seed(cfg.seed)
        self.epochs = build.training_epochs(cfg)
        self.make_optimizer = build.optimizer_factory(cfg)
        self.strategy = build.build_strategy(
            cfg, self.model, self.stream, self.preprocess, self.rng, device, self.make_optimizer
        )
        self.checkpoints = run_dir / "checkpoints"
        self.position = Position()
        self.metrics = self._new_metrics()
        self.progress = TrainingProgress(cfg.progress)
        self._last_save = time.monotonic()
        self._resume_state: dict | None = None
        self._signal: int | None = None
        if cfg.resume:
            self.restore()
        # Rows logged after the checkpoint resumed from are dropped: that stretch is trained again. A mid-task
        # checkpoint at step S precedes anything logged at S (an epoch that ended at S is logged after it).
        resumed = self.position.step - (1 if self.position.started else 0) if cfg.resume else None
        run_id = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]
        self.writes = distributed.is_main()  # hardware=ddp: rank 0 alone writes files and prints
        self.loggers = RunLoggers(cfg.logger, run_dir, self.config, run_id, resumed, write=self.writes)

    def restore(self) -> None:
        """Continue from the newest checkpoint that loads; an unusable one is named and skipped."""
        if not self.checkpoints.is_dir():
            log.info("resume=true but %s holds no checkpoint yet: starting from the beginning", self.run_dir)
            return
        checkpoint.remove_stale_temporaries(self.checkpoints)
        state = None
        for path in checkpoint.candidates(self.checkpoints):
            try:
                state = checkpoint.load(path, map_location=self.hardware.device)
            except checkpoint.CheckpointError as error:
                log.warning("%s; falling back to an earlier checkpoint", error)
                continue
            break
        if state is None:
            log.warning("no usable checkpoint in %s: starting from the beginning", self.checkpoints)
            return
        if state["config_hash"] != self.config_hash and (
            "config" not in state or resume_hash(state["config"]) != resume_hash(self.config)
        ):
            raise ConfigError(
                f"{path} was written by a different experiment (config hash {state['config_hash']}, now "
                f"{self.config_hash}); resume may only change {', '.join(RESUME_MAY_CHANGE)}"
            )
        build.load_trained(self.model, self.strategy, state)
        checkpoint.restore_rng(state["rng"], self.rng)
        self.metrics = state["metrics"]
        self.position = Position(**state["position"])
        written = self.run_dir / "metrics.json"
        if self.position.task == len(self.stream.tasks) and written.is_file():
            # The last checkpoint precedes the final bookkeeping; metrics.json says whether that happened.
            self.metrics["run"]["status"] = json.loads(written.read_text())["run"]["status"]
        if self.position.started:
            self._resume_state = {k: state[k] for k in ("optimizer", "scheduler", "scaler")}
        p = self.position
        log.info("resumed from %s: task %d, epoch %d, batch %d", path, p.task + 1, p.epoch + 1, p.batch)

    # ----------------------------------------------------------------- the loop
    def run(self) -> dict:
        stream = self.stream
        started = time.perf_counter()
        log.info("run directory: %s", self.run_dir)
        if self.metrics["run"]["status"] == "finished":
            log.info("this run already finished; nothing to do")
            self.loggers.close()
            return self.metrics
        estimate.warn_if_long_on_cpu(
            self.model, stream, self.preprocess, self.make_optimizer, batch_size=self.cfg.batch_size,
            epochs=self.epochs, next_task=self.position.task, done_steps=self.position.step,
            autocast=self.hardware.autocast, compiled=self.cfg.hardware.compile,
        )  # fmt: skip
        if not self.metrics["class_il"]["initial_accuracy"]:
            class_il, task_il, _ = self.evaluate(n_seen=0)
            self.metrics["class_il"]["initial_accuracy"] = class_il
            self.metrics["task_il"]["initial_accuracy"] = task_il
        with self.progress.running(len(stream.tasks)), self._signals_checkpointed(), closing(self.loggers):
            while self.position.task < len(stream.tasks):
                self.train_task(stream.tasks[self.position.task])
                faults.reach("task_end")
                self._stop_if_signalled(None, None, None)
        self.metrics["run"]["status"] = "finished"
        self.metrics["wall_seconds"] += time.perf_counter() - started
        self.write_results(plots_too=True)
        if self.writes:
            console.print(summary_table(self.metrics))
            for line in training_warnings(self.metrics):
                console.print(line, highlight=False, soft_wrap=True)
        log.info("finished; results in %s", self.run_dir)
        return self.metrics

    def train_task(self, task) -> None:
        cfg, position = self.cfg, self.position
        seen = task.classes[-1] + 1
        if not position.started:
            self.model.head.grow(seen)
            self.strategy.before_task(task)
            position.started = True
        optimizer = self.make_optimizer(self.model.parameters())
        scheduler = instantiate(cfg.scheduler, optimizer=optimizer) if cfg.scheduler is not None else None
        scaler = self.hardware.grad_scaler()
        if self._resume_state is not None:
            optimizer.load_state_dict(self._resume_state["optimizer"])
            if scheduler is not None:
                scheduler.load_state_dict(self._resume_state["scheduler"])
            scaler.load_state_dict(self._resume_state["scaler"])
            self._resume_state = None
        indices = self.strategy.training_indices(task)
        batches = DeviceBatches(
            self.stream.train_x, self.stream.train_y, indices, cfg.batch_size, cfg.seed, task.id
        )
        timing = self.metrics["per_task"][task.id] if task.id < len(self.metrics["per_task"]) else None
        if timing is None:
            timing = {"task": task.id, "train_seconds": 0.0, "samples": 0, "steps": 0}
            self.metrics["per_task"].append(timing)
        self.progress.start_task(task.id, self.epochs, task.id)
        log.info("task %d/%d: classes %s, %d training samples",
                 task.id + 1, len(self.stream.tasks), [self.stream.class_names[c] for c in task.classes], len(indices))  # fmt: skip
        runner = StepRunner(optimizer, scaler, self.hardware, cfg.train.on_nonfinite, self._where)
        n_batches = len(batches)
        # a one-epoch task's loss check compares its first tenth of batches with its last tenth
        window = max(1, n_batches // 10)
        task_loss = (
            None  # (first epoch's mean, lowest later epoch mean) or (first tenth's mean, last tenth's)
        )
        self.model.train()
        while position.epoch < self.epochs:
            self.progress.start_epoch(position.epoch, n_batches, position.batch)
            # summed on the device, read once per epoch (and at checkpoints): no per-batch synchronisation
            self._epoch_loss = torch.tensor(position.epoch_loss, device=self.hardware.device)
            self._head_loss, self._tail_start_loss = (
                None if value is None else torch.tensor(value, device=self.hardware.device)
                for value in (position.head_loss, position.tail_start_loss)
            )
            epoch_seconds, epoch_samples = 0.0, 0
            tick = time.perf_counter()
            for batch in batches.epoch(position.epoch, start=position.batch):
                runner.weight = batch.weight
                self._epoch_loss += self.strategy.training_step(batch, runner).float()
                position.batch += 1
                position.step += 1
                # one-epoch first task: copies of the running sum on the device, read at the epoch's end
                if self.epochs == 1 and task.id == 0:
                    if position.batch == window:
                        self._head_loss = self._epoch_loss.clone()
                    if position.batch == n_batches - window:
                        self._tail_start_loss = self._epoch_loss.clone()
                timing["samples"] += len(batch)
                timing["steps"] += 1
                elapsed = time.perf_counter() - tick
                self.progress.advance_batch(len(batch) / max(elapsed, 1e-9))
                timing["train_seconds"] += elapsed
                epoch_seconds += elapsed
                epoch_samples += len(batch)
                faults.reach("step")
                if self._checkpoint_due():
                    self.save_checkpoint(optimizer, scheduler, scaler)
                self._stop_if_signalled(optimizer, scheduler, scaler)
                tick = time.perf_counter()
            sums = [self._epoch_loss]
            if self._head_loss is not None and self._tail_start_loss is not None:
                sums += [self._head_loss, self._tail_start_loss]
            sums = torch.stack(sums).tolist()  # the epoch's one read of the device
            epoch_mean = sums[0] / max(n_batches, 1)
            lowest = position.lowest_epoch_loss
            if position.epoch == 0:
                position.first_epoch_loss = epoch_mean
            elif lowest is None or not math.isfinite(lowest) or epoch_mean < lowest:
                position.lowest_epoch_loss = epoch_mean
            if self.epochs > 1:
                task_loss = (position.first_epoch_loss, position.lowest_epoch_loss)
            elif len(sums) == 3 and task.id == 0:
                task_loss = (sums[1] / window, (sums[0] - sums[2]) / window)
            self.loggers.epoch({
                "loss": epoch_mean,
                "lr": optimizer.param_groups[0]["lr"],
                "samples_per_second": epoch_samples / max(epoch_seconds, 1e-9),
            }, position.step, task.id, position.epoch)  # fmt: skip
            if scheduler is not None:
                scheduler.step()
            position.epoch += 1
            self.progress.end_epoch(position.epoch)
            position.batch = 0
            position.epoch_loss = 0.0
            position.head_loss = position.tail_start_loss = None
        tick = time.perf_counter()
        self.strategy.after_task(task)  # counted as training: GDumb trains here, memories are filled here
        timing["train_seconds"] += time.perf_counter() - tick
        tick = time.perf_counter()
        class_il, task_il, final = self.evaluate(n_seen=seen)
        timing["eval_seconds"] = time.perf_counter() - tick
        timing["samples_per_second"] = timing["samples"] / max(timing["train_seconds"], 1e-9)
        timing["memory_samples"] = self.strategy.memory_samples
        timing["memory_bytes"] = self.strategy.memory_bytes
        # growing-network methods (DER, FOSTER) pay for forgetting in model size: report it per task
        timing["parameters"], timing["model_bytes"] = model_size(self.model)
        timing["warnings"] = self.training_warnings(task, task_il, task_loss if n_batches else None)
        self.record(class_il, task_il, final)
        self.progress.end_task(task.id + 1)
        for warning in timing["warnings"]:
            log.warning(warning)
        self.log_task(task.id, position.step)
        self.position = Position(task=task.id + 1, step=position.step)
        self.save_checkpoint(None, None, None, task_end=task.id)
        self.write_results()
        self.model.train()

    def _where(self) -> str:
        p = self.position
        return f"task {p.task + 1}, epoch {p.epoch + 1}, step {p.batch + 1}"

    # ----------------------------------------------------------------- evaluation
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

    # ----------------------------------------------------------------- training checks
    def training_warnings(
        self, task, task_il: list[float], task_loss: tuple[float | None, float] | None
    ) -> list[str]:
        """What says that the task just trained learned nothing, as one message naming the likely causes.

        - accuracy: the fraction of the task's own evaluation samples predicted correctly among the task's own
          classes (the task-IL figure; in domain-IL every class) is at most CHANCE_MARGIN above chance, 1 / the
          task's classes (a task of one class is not checked). In class-IL the argmax over every class seen is
          not used: a method's bias towards old classes lowers it on a task that was learned;
        - loss: the mean training loss did not fall by LOSS_DROP of its first value: no epoch after the first
          has a mean that much below the first epoch's. The loss the engine sees is the method's whole
          objective, and distillation or penalty terms grow as the model leaves the previous one: over a
          short epoch they can outweigh the new task's falling loss. So a one-epoch task is checked only when
          it is the first one (no earlier model to hold on to): its last tenth of batches against its first
          tenth (a task of one batch is not checked). A non-finite mean counts as not falling."""
        findings = []
        n_classes = len(task.classes)
        accuracy = task_il[task.id]
        chance = 1 / n_classes
        if n_classes > 1 and accuracy <= chance + CHANCE_MARGIN:
            findings.append(f"its {self.cfg.evaluate_on} accuracy among its own classes is {accuracy:.3f}, no more than "
                            f"{CHANCE_MARGIN * 100:.0f} points above chance ({chance:.3f} with {n_classes} classes)")  # fmt: skip
        if task_loss is not None and None not in task_loss:
            first, later = task_loss
            if not later < first - LOSS_DROP * abs(first):
                findings.append(
                    f"its training loss did not fall (mean {first:.4g} in the first epoch, {later:.4g} at best "
                    "in a later one)"
                    if self.epochs > 1
                    else f"its training loss did not fall (mean {first:.4g} over the first tenth of its batches, "
                    f"{later:.4g} over the last)"
                )
        if not findings:
            return []
        names = ", ".join(self.stream.class_names[c] for c in task.classes)
        causes = []
        lr = self.cfg.optimizer.get("lr") if self.cfg.optimizer is not None else None
        if isinstance(lr, (int, float)) and lr > 0:
            causes.append(f"a learning rate too high for this model (try optimizer.lr={lr / 10:g})")
        elif lr is not None:
            causes.append(f"a learning rate of {lr} (set a positive optimizer.lr)")
        if not self.cfg.dataset.normalize:
            causes.append(
                "unnormalised inputs (try dataset.normalize=true, with dataset.mean and dataset.std of the data)"
            )
        if self.cfg.train.online:
            causes.append("a single pass over the data (train.online=true)")
        else:
            causes.append(f"too few epochs (try epochs={self.epochs * 2})")
        return [f"task {task.id + 1} (classes {names}) may have learned nothing: {'; '.join(findings)}. "
                f"Likely causes: {', '.join(causes)}"]  # fmt: skip

    # ----------------------------------------------------------------- metrics and files
    def _new_metrics(self) -> dict:
        stream = self.stream
        return {
            "run": {
                "strategy": self.names["strategy"], "dataset": self.names["dataset"], "model": self.names["model"],
                "seed": self.cfg.seed, "config_hash": self.config_hash, "device": str(self.hardware.device),
                "status": "running", "n_tasks": len(stream.tasks), "evaluated_on": self.cfg.evaluate_on,
                "scenario": self.cfg.dataset.scenario, "online": self.cfg.train.online,
            },
            "tasks": [{"task": t.id, "classes": t.classes, "class_names": [stream.class_names[c] for c in t.classes],
                       "original_classes": [stream.class_order[c] for c in t.classes],
                       "train_samples": len(t.train_index), "val_samples": len(t.val_index),
                       "test_samples": len(t.test_index)} for t in stream.tasks],
            "class_il": {"accuracy_matrix": [], "initial_accuracy": []},
            "task_il": {"accuracy_matrix": [], "initial_accuracy": []},
            "per_task": [],
            "final": {},
            "parameters": 0,
            "model_bytes": 0,
            "peak_memory_bytes": 0,
            "wall_seconds": 0.0,
        }  # fmt: skip

    def record(self, class_il: list[float], task_il: list[float], final: dict) -> None:
        m = self.metrics
        for key, row in (("class_il", class_il), ("task_il", task_il)):
            m[key]["accuracy_matrix"].append(row)
            m[key].update(metrics.summarize(m[key]["accuracy_matrix"], m[key]["initial_accuracy"]))
        m["final"] = final
        m["per_task"][-1]["f1"] = final.get("f1")
        m["parameters"], m["model_bytes"] = model_size(self.model)
        m["peak_memory_bytes"] = self._peak_memory()
        step = len(m["class_il"]["accuracy_matrix"])
        if self.writes:
            shown, label = metrics.shown_accuracy(m)
            console.print(accuracy_table(m[shown]["accuracy_matrix"], f"{label} after task {step}"))
        log.info("task %d: average accuracy %.4f (class-IL), %.4f (task-IL); %.1f s training, %.0f samples/s",
                 step, m["class_il"]["average_accuracy"][-1], m["task_il"]["average_accuracy"][-1],
                 m["per_task"][-1]["train_seconds"], m["per_task"][-1]["samples_per_second"])  # fmt: skip

    def _peak_memory(self) -> int:
        if self.hardware.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.hardware.device)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB

    def write_results(self, plots_too: bool = False) -> None:
        """metrics.json and accuracy_matrix.csv after every task; the plots at the end (matplotlib is slow).
        The CSV and the plots hold the scenario's own matrix (task-IL for a task-IL run); metrics.json both."""
        if not self.writes:
            return
        m = self.metrics
        files.write_json(self.run_dir / "metrics.json", m)
        shown, label = metrics.shown_accuracy(m)
        matrix = m[shown]["accuracy_matrix"]
        if not matrix:
            return
        header = "after_task," + ",".join(f"task_{j + 1}" for j in range(len(matrix[0])))
        lines = [header] + [f"{i + 1}," + ",".join(f"{v:.6f}" for v in row) for i, row in enumerate(matrix)]
        files.atomic_write(
            self.run_dir / "accuracy_matrix.csv", lambda h: h.write(("\n".join(lines) + "\n").encode())
        )
        if not plots_too:
            return
        title = f"{m['run']['strategy']} on {m['run']['dataset']}, seed {m['run']['seed']}"
        plots.plot_accuracy_matrix(matrix, self.run_dir / "accuracy_matrix.png", f"{label}: {title}")
        plots.plot_average_accuracy(plots.run_curves(m), self.run_dir / "average_accuracy.png", title)

    # ----------------------------------------------------------------- checkpoints and signals
    @contextmanager
    def _signals_checkpointed(self):
        """SIGINT and SIGTERM only set a flag; the loop writes a checkpoint at the next step and stops."""

        def note(signal_number, frame):
            self._signal = signal_number

        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.signal(s, note) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _stop_if_signalled(self, optimizer, scheduler, scaler) -> None:
        stop = self._signal is not None
        if distributed.active():  # ranks stop at the same step, or the others would wait forever
            (stop,) = distributed.agree(stop)
            self._signal = self._signal or (signal.SIGTERM if stop else None)
        if not stop:
            return
        if optimizer is not None:  # between tasks, the task-end checkpoint is already the latest
            self.save_checkpoint(optimizer, scheduler, scaler)
        self.metrics["run"]["status"] = "interrupted"
        self.write_results()
        name = signal.Signals(self._signal).name
        # the command that continues is the caller's to add: one run's, or its whole sweep's
        raise Interrupted(f"{name} received: checkpoint saved at task {self.position.task + 1}, epoch "
                          f"{self.position.epoch + 1}, batch {self.position.batch}", self._signal)  # fmt: skip

    def _checkpoint_due(self) -> bool:
        every_steps, every_seconds = self.cfg.checkpoint.every_steps, self.cfg.checkpoint.every_seconds
        if every_steps and self.position.step % every_steps == 0:
            return True
        return bool(every_seconds) and time.monotonic() - self._last_save >= every_seconds

    def log_task(self, task_id: int, step: int) -> None:
        m = self.metrics
        values = {"f1": m["final"].get("f1")}
        for scenario in ("class_il", "task_il"):
            summary = m[scenario]
            values[f"{scenario}/average_accuracy"] = summary["average_accuracy"][-1]
            for key in ("average_forgetting", "bwt", "fwt"):
                values[f"{scenario}/{key}"] = summary[key]
        self.loggers.task(values, m["class_il"]["accuracy_matrix"], step, task_id)

    def save_checkpoint(self, optimizer, scheduler, scaler, task_end: int | None = None) -> None:
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        if optimizer is not None:  # mid-task: the epoch's loss so far
            self.position.epoch_loss = self._epoch_loss.item()
            if self._head_loss is not None:
                self.position.head_loss = self._head_loss.item()
            if self._tail_start_loss is not None:
                self.position.tail_start_loss = self._tail_start_loss.item()
        state = {
            "config_hash": self.config_hash,
            "position": self.position.as_dict(),
            "model": self.model.state_dict(),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "strategy": self.strategy.state_dict(),
            "rng": checkpoint.rng_state(self.rng),
            "metrics": self.metrics,
            # what `incr predict` and `incr export` need without the training data
            "config": self.config,
            "class_names": self.stream.class_names,
            "max_value": self.stream.max_value,
        }
        if task_end is not None:
            path = self.checkpoints / f"task_{task_end + 1}.pt"
        else:
            path = self.checkpoints / f"step_{self.position.step:08d}.pt"
        if not self.writes:
            self._last_save = time.monotonic()
            return
        checkpoint.save(path, state)
        checkpoint.link(path, self.checkpoints / "last.pt")
        if task_end is None:
            for old in sorted(self.checkpoints.glob("step_*.pt"))[: -self.cfg.checkpoint.keep_last]:
                old.unlink(missing_ok=True)
        self._last_save = time.monotonic()
