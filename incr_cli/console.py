"""Everything rich draws: progress bars, the accuracy matrix so far, the end-of-run summary."""

from __future__ import annotations

import sys
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

console = Console(stderr=False)
errors = Console(stderr=True)


def fail(message: str) -> None:
    """The one-line error of bad input: no traceback."""
    errors.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)


class TrainingProgress:
    """Task, epoch and batch bars with samples/s; silent when off or not on a terminal."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and sys.stdout.isatty()
        self._progress: Progress | None = None

    @contextmanager
    def running(self, n_tasks: int):
        if not self.enabled:
            yield self
            return
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[speed]}"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        with self._progress:
            self._tasks = self._progress.add_task("tasks", total=n_tasks, speed="")
            self._epochs = self._progress.add_task("epochs", total=1, speed="")
            self._batches = self._progress.add_task("batches", total=1, speed="")
            yield self
        self._progress = None

    def start_task(self, task_id: int, n_epochs: int, completed_tasks: int) -> None:
        if self._progress:
            self._progress.update(self._tasks, completed=completed_tasks, description=f"task {task_id + 1}")
            self._progress.reset(self._epochs, total=n_epochs)

    def start_epoch(self, epoch: int, n_batches: int, done: int) -> None:
        if self._progress:
            self._progress.update(self._epochs, completed=epoch, description=f"epoch {epoch + 1}")
            self._progress.reset(self._batches, total=n_batches, completed=done)

    def advance_batch(self, samples_per_second: float) -> None:
        if self._progress:
            self._progress.update(self._batches, advance=1, speed=f"{samples_per_second:,.0f} samples/s")

    # A bar counts what is finished: without these, the last epoch and the last task would show N-1/N while
    # the task is evaluated and when the run ends.
    def end_epoch(self, epochs_done: int) -> None:
        if self._progress:
            self._progress.update(self._epochs, completed=epochs_done)

    def end_task(self, tasks_done: int) -> None:
        if self._progress:
            self._progress.update(self._tasks, completed=tasks_done)


def accuracy_table(matrix: list[list[float]], title: str) -> Table:
    n_tasks = len(matrix[0]) if matrix else 0
    table = Table(title=title, title_justify="left")
    table.add_column("after task", justify="right")
    for j in range(n_tasks):
        table.add_column(f"T{j + 1}", justify="right")
    table.add_column("avg", justify="right", style="bold")
    for i, row in enumerate(matrix):
        seen = row[: i + 1]
        cells = [f"{v:.3f}" if j <= i else f"[dim]{v:.3f}[/]" for j, v in enumerate(row)]
        table.add_row(str(i + 1), *cells, f"{sum(seen) / len(seen):.3f}")
    return table


def summary_table(metrics: dict) -> Table:
    """The end-of-run figures of the run's own scenario (task-IL for a task-IL run), named in the title."""
    from incr_cli.metrics import shown_accuracy  # metrics imports torch, which `incr --help` need not load

    matrix, label = shown_accuracy(metrics)
    shown, final = metrics[matrix], metrics["final"]
    run = metrics["run"]
    table = Table(title=f"{run['strategy']} on {run['dataset']}: {label}", title_justify="left")
    if matrix == "task_il":
        table.caption = "F1: of the class-IL predictions (there is no task-IL F1)"
        table.caption_justify = "left"
    for column in ("final avg acc", "avg incr acc", "forgetting", "BWT", "FWT (task-IL)", "F1", "seconds"):
        table.add_column(column, justify="right")

    def show(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    table.add_row(
        show(shown["final_average_accuracy"]),
        show(shown["average_incremental_accuracy"]),
        show(shown["average_forgetting"]),
        show(shown["bwt"]),
        show(metrics["task_il"]["fwt"]),
        show(final.get("f1")),
        f"{metrics['wall_seconds']:.1f}",
    )
    return table


def training_warnings(metrics: dict) -> list[str]:
    """The end-of-run recap of the tasks that may have learned nothing (each was also logged as it ended)."""
    return [f"[bold yellow]warning:[/] {w}" for task in metrics["per_task"] for w in task.get("warnings", ())]
