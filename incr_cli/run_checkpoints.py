"""When and where a run writes its checkpoints, and how SIGINT and SIGTERM become a checkpoint and a stop."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig

from incr_cli import checkpoint, distributed


class Checkpointer:
    """checkpoints/task_N.pt at the end of task N, step_########.pt every `checkpoint.every_steps` steps or
    `checkpoint.every_seconds` seconds (the newest `checkpoint.keep_last` kept), last.pt naming the newest.
    Under hardware=ddp only rank 0 (`writes`) writes; every rank keeps the same schedule."""

    def __init__(self, folder: Path, cfg: DictConfig, writes: bool):
        self.folder, self.cfg, self.writes = folder, cfg, writes
        self.last_save = time.monotonic()

    def due(self, step: int) -> bool:
        """Whether this process's schedule asks for a checkpoint after `step`. Under hardware=ddp the ranks'
        clocks differ: `after_step` makes them agree."""
        every_steps, every_seconds = self.cfg.every_steps, self.cfg.every_seconds
        if every_steps and step % every_steps == 0:
            return True
        return bool(every_seconds) and time.monotonic() - self.last_save >= every_seconds

    def save(self, state: dict, step: int, task_end: int | None = None) -> None:
        """Write `state` atomically, as task `task_end`'s checkpoint or, mid-task, as step `step`'s."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if task_end is not None:
            path = self.folder / f"task_{task_end + 1}.pt"
        else:
            path = self.folder / f"step_{step:08d}.pt"
        if self.writes:
            checkpoint.save(path, state)
            checkpoint.link(path, self.folder / "last.pt")
            if task_end is None:
                for old in sorted(self.folder.glob("step_*.pt"))[: -self.cfg.keep_last]:
                    old.unlink(missing_ok=True)
        self.last_save = time.monotonic()


class StopSignals:
    """SIGINT and SIGTERM only set a flag while the loop runs; the loop asks `stop_now` after every step and
    between tasks, writes a checkpoint and stops."""

    def __init__(self) -> None:
        self.received: int | None = None

    @contextmanager
    def caught(self) -> Iterator[None]:
        """The two signals noted instead of acted on, inside the block (Python lets only the main thread set
        handlers: elsewhere they keep their own)."""

        def note(signal_number, frame):
            self.received = signal_number

        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.signal(s, note) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def stop_now(self) -> bool:
        stop = self.received is not None
        if distributed.active():  # ranks stop at the same step, or the others would wait forever
            (stop,) = distributed.agree(stop)
            self.note_agreed(stop)
        return stop

    def note_agreed(self, stop: bool) -> None:
        """Under hardware=ddp: another rank's signal stops this one too (named SIGTERM where none came here)."""
        self.received = self.received or (signal.SIGTERM if stop else None)

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name


def after_step(checkpointer: Checkpointer, signals: StopSignals, step: int) -> tuple[bool, bool]:
    """(save a checkpoint, stop) after training step `step`. Under hardware=ddp every rank must answer the
    same (a checkpoint gathers every rank's augmentation state; a rank that stopped alone would leave the
    others waiting), so both answers are agreed in one collective a step."""
    save, stop = checkpointer.due(step), signals.received is not None
    if distributed.active():
        save, stop = distributed.agree(save, stop)
        signals.note_agreed(stop)
    return save, stop
