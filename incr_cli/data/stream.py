"""uint8 tensors -> a stream of tasks: class order, task splits, validation hold-out, labels renumbered."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from incr_cli.data.sources import Source


@dataclass
class Task:
    """One step of the stream. Indices point into the stream's shared device tensors."""

    id: int
    classes: list[int]  # labels after renumbering: a contiguous range
    train_index: torch.Tensor
    val_index: torch.Tensor
    test_index: torch.Tensor

    @property
    def n_classes(self) -> int:
        return len(self.classes)


@dataclass
class Stream:
    """All splits as one tensor each (on the training device once built), and the tasks that slice them.

    Labels are renumbered so that the i-th class of `class_order` is label i (as PyCIL and Avalanche's
    `class_ids_from_zero` do): task k's classes are then a contiguous block, and the head grows at its end."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    tasks: list[Task]
    class_order: list[int]  # original class id of each label
    class_names: list[str]  # by label
    max_value: int

    @property
    def n_classes(self) -> int:
        return len(self.class_order)

    def to(self, device: torch.device) -> Stream:
        move = {k: getattr(self, k).to(device) for k in ("train_x", "train_y", "test_x", "test_y")}
        tasks = [
            Task(t.id, t.classes, t.train_index.to(device), t.val_index.to(device), t.test_index.to(device))
            for t in self.tasks
        ]
        return Stream(**move, tasks=tasks, class_order=self.class_order, class_names=self.class_names,
                      max_value=self.max_value)  # fmt: skip

    def test_task_ids(self) -> torch.Tensor:
        """The task each test sample belongs to."""
        return self.task_ids(self.test_y)

    def task_ids(self, labels: torch.Tensor) -> torch.Tensor:
        task_of_label = torch.empty(self.n_classes, dtype=torch.long)
        for task in self.tasks:
            task_of_label[task.classes] = task.id
        return task_of_label.to(labels.device)[labels]

    def evaluation_split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Images and labels evaluated after every task: the test set, or the training samples every task
        held out (`dataset.val_fraction`), for choosing hyper-parameters without looking at the test set."""
        if split == "test":
            return self.test_x, self.test_y
        rows = torch.cat([task.val_index for task in self.tasks])
        return self.train_x[rows], self.train_y[rows]


def resolve_class_order(dataset: DictConfig) -> list[int]:
    if dataset.class_order is not None:
        return [int(c) for c in dataset.class_order]
    if dataset.class_order_seed is None:
        return list(range(dataset.num_classes))
    generator = torch.Generator().manual_seed(int(dataset.class_order_seed))
    return torch.randperm(dataset.num_classes, generator=generator).tolist()


def task_sizes(dataset: DictConfig) -> list[int]:
    if dataset.initial_classes is None:
        return [dataset.num_classes // dataset.n_tasks] * dataset.n_tasks
    rest = dataset.num_classes - dataset.initial_classes
    later = [rest // (dataset.n_tasks - 1)] * (dataset.n_tasks - 1) if dataset.n_tasks > 1 else []
    return [dataset.initial_classes, *later]


def build_stream(source: Source, dataset: DictConfig) -> Stream:
    order = resolve_class_order(dataset)
    label_of_class = torch.empty(len(order), dtype=torch.long)
    label_of_class[torch.tensor(order)] = torch.arange(len(order))
    train_y, test_y = label_of_class[source.train_y], label_of_class[source.test_y]
    # The hold-out is drawn with its own seed so that it never depends on the run's seed.
    val_generator = torch.Generator().manual_seed(0)
    tasks, first = [], 0
    for task_id, size in enumerate(task_sizes(dataset)):
        classes = list(range(first, first + size))
        first += size
        train_index, val_index = [], []
        for label in classes:
            members = torch.nonzero(train_y == label).flatten()
            members = members[torch.randperm(len(members), generator=val_generator)]
            n_val = int(round(dataset.val_fraction * len(members)))
            val_index.append(members[:n_val].sort().values)
            train_index.append(members[n_val:].sort().values)
        test_index = torch.nonzero((test_y >= classes[0]) & (test_y <= classes[-1])).flatten()
        tasks.append(Task(task_id, classes, torch.cat(train_index), torch.cat(val_index), test_index))
    return Stream(
        source.train_x, train_y, source.test_x, test_y, tasks, order,
        [source.class_names[c] for c in order], source.max_value,
    )  # fmt: skip
