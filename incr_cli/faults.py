"""Fault injection for the resume tests: a real SIGKILL of the training process at a chosen point.

`INCR_FAULT=<point>:<n>[:<signal>]` makes the process send itself SIGKILL (or the named signal, e.g.
SIGTERM) the n-th time it reaches <point>; the points are
`step` (after an optimizer step), `evaluate` (inside evaluation), `checkpoint_write` (half-way through
writing a checkpoint file) and `task_end` (after a task's checkpoint, before the next task). Unset, this
costs one dictionary lookup per call."""

from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def reach(point: str) -> None:
    fault = os.environ.get("INCR_FAULT")
    if not fault or not fault.startswith(point + ":"):
        return
    _, count, *name = fault.split(":")
    _counts[point] = _counts.get(point, 0) + 1
    if _counts[point] == int(count):
        os.kill(os.getpid(), getattr(signal, name[0]) if name else signal.SIGKILL)
