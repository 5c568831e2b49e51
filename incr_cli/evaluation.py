"""Evaluation after a task: a model's class-IL and task-IL accuracy on every task of a stream, and the trained
tasks' confusion, precision, recall and F1. `incr train` writes its accuracy matrices from here and `incr eval`
scores a checkpoint with the same code, so the two agree to the bit."""

from __future__ import annotations

import torch
from torch import Tensor

from incr_cli import faults, metrics
from incr_cli.data.batches import eval_batches
from incr_cli.data.stream import Stream, Task


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    strategy,
    stream: Stream,
    preprocess,
    hardware,
    *,
    split: str,
    batch_size: int,
    n_seen: int,
    trained_tasks: int,
) -> tuple[list[float], list[float], dict]:
    """Class-IL accuracy (argmax over the `n_seen` classes seen so far) and task-IL accuracy (argmax within the
    task's own classes) on every task's test set (or held-out part, `split="val"`), seen and future; and the
    confusion over the first `trained_tasks` tasks. In domain-IL every task has every class, so the two are
    equal: the class-IL row is the domain-IL accuracy. The scores are the strategy's own `predict`."""
    model.eval()
    faults.reach("evaluate")
    images, rows, labels, task_of_sample = stream.evaluation_split(split)
    with hardware.autocast():
        scores = torch.cat(
            [strategy.predict(preprocess(x)).float() for x in eval_batches(images, rows, batch_size)]
        )
    class_prediction, task_prediction = predictions(scores, n_seen, stream.tasks, task_of_sample)
    n_tasks = len(stream.tasks)
    class_il = per_task_accuracy(class_prediction == labels, task_of_sample, n_tasks)
    task_il = per_task_accuracy(task_prediction == labels, task_of_sample, n_tasks)
    trained = task_of_sample < trained_tasks
    return class_il, task_il, final_metrics(labels[trained], class_prediction[trained], n_seen)


def predictions(
    scores: Tensor, n_seen: int, tasks: list[Task], task_of_sample: Tensor
) -> tuple[Tensor, Tensor]:
    """Each sample's class-IL prediction (-1 before any class is learned) and task-IL prediction."""
    if n_seen:
        class_prediction = scores[:, :n_seen].argmax(1)
    else:  # nothing learned yet: no class can be predicted
        class_prediction = torch.full_like(task_of_sample, -1)
    task_prediction = torch.empty_like(task_of_sample)
    for task in tasks:
        rows = task_of_sample == task.id
        first, last = task.classes[0], task.classes[-1] + 1
        task_prediction[rows] = scores[rows, first:last].argmax(1) + first
    return class_prediction, task_prediction


def per_task_accuracy(correct: Tensor, task_of_sample: Tensor, n_tasks: int) -> list[float]:
    """The fraction of each task's samples that are `correct` (NaN for a task without samples)."""
    counts = torch.bincount(task_of_sample, minlength=n_tasks).double()
    hits = torch.bincount(task_of_sample, weights=correct.double(), minlength=n_tasks)
    return (hits / counts).tolist()


def final_metrics(labels: Tensor, class_prediction: Tensor, n_seen: int) -> dict:
    """Macro precision, recall and F1 with the confusion matrix over the `n_seen` classes; {} before any."""
    if not n_seen:
        return {}
    confusion = metrics.confusion_matrix(labels, class_prediction, n_seen)
    return {**metrics.precision_recall_f1(confusion), "confusion_matrix": confusion.tolist()}
