"""The progress bars count what is finished: the epoch bar is full while a task is evaluated, the task bar
is full when the run ends."""

from __future__ import annotations

import sys

import pytest
from rich.progress import Progress

from incr_cli import console as console_module
from incr_cli import engine
from incr_cli.cli import main


def test_finished_bars_show_their_total(tmp_path, monkeypatch):
    seen_at_evaluation, seen_at_end = [], []

    class RecordingProgress(Progress):
        def __exit__(self, *exc):
            seen_at_end.extend((t.description, t.completed, t.total) for t in self.tasks)
            return super().__exit__(*exc)

    evaluate = engine.Run.evaluate

    def evaluate_and_record(self, n_seen):
        if n_seen and self.progress._progress is not None:  # after a task's training, before the next
            seen_at_evaluation.append([(t.completed, t.total) for t in self.progress._progress.tasks])
        return evaluate(self, n_seen)

    monkeypatch.setattr(console_module, "Progress", RecordingProgress)
    monkeypatch.setattr(engine.Run, "evaluate", evaluate_and_record)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)  # bars are drawn on a terminal only
    status = main(
        [
            "train",
            "strategy=finetune",
            "dataset.n_tasks=2",
            "epochs=2",
            "hardware=cpu",
            "hardware.num_threads=1",
            "progress=true",
            f"hydra.run.dir={tmp_path / 'run'}",
        ]
    )
    assert status == 0
    assert len(seen_at_evaluation) == 2
    for task, (tasks_bar, epochs_bar, batches_bar) in enumerate(seen_at_evaluation):
        assert tasks_bar == (task, 2)  # the task being evaluated is not done yet
        assert epochs_bar == (2, 2) and batches_bar[0] == batches_bar[1] > 0
    assert [(completed, total) for _, completed, total in seen_at_end][:2] == [(2, 2), (2, 2)]
    assert all(completed == total for _, completed, total in seen_at_end)


@pytest.mark.parametrize("done", [0, 3])
def test_a_resumed_epoch_starts_its_bar_where_it_stopped(monkeypatch, done):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    progress = console_module.TrainingProgress(enabled=True)
    with progress.running(n_tasks=3):
        progress.start_task(1, n_epochs=2, completed_tasks=1)
        progress.start_epoch(1, n_batches=5, done=done)
        for _ in range(5 - done):
            progress.advance_batch(100.0)
        progress.end_epoch(2)
        progress.end_task(2)
        bars = [(t.completed, t.total) for t in progress._progress.tasks]
    assert bars == [(2, 3), (2, 2), (5, 5)]
