"""uint8 tensors -> a stream of tasks: class order, task splits, validation hold-out, labels renumbered.

Three scenarios (`dataset.scenario`, van de Ven et al. 2022, "Three types of incremental learning"):
- class_il: each task brings new classes; at test time the model picks among all classes seen so far;
- task_il: the same split by classes, but the task of a test sample is given and the prediction is restricted
  to that task's classes (training masks the other classes' scores: one head per task, in effect);
- domain_il: every task has all classes and a different input distribution (`dataset.domains`): a fixed
  pixel permutation per task (permuted MNIST, Goodfellow et al. 2013) or a fixed rotation per task
  (rotated MNIST). Each task's transformed copy of the data is built once, as uint8, on the device."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from incr_cli.data.source import Source


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
    # the .npy files that train_x and test_x map, when they are a memory-mapped cache's (streamed.py reads
    # rows from them directly)
    image_files: dict[str, Path] = field(default_factory=dict)

    @property
    def n_classes(self) -> int:
        return len(self.class_order)

    def to(self, device: torch.device, images: bool = True) -> Stream:
        """The stream on `device`; with images=False only its labels and indices (the images stay put)."""
        names = ("train_x", "train_y", "test_x", "test_y") if images else ("train_y", "test_y")
        move = {k: getattr(self, k) for k in ("train_x", "test_x")}
        move.update({k: getattr(self, k).to(device) for k in names})
        tasks = [
            Task(t.id, t.classes, t.train_index.to(device), t.val_index.to(device), t.test_index.to(device))
            for t in self.tasks
        ]
        return Stream(
            **move,
            tasks=tasks,
            class_order=self.class_order,
            class_names=self.class_names,
            max_value=self.max_value,
            image_files=self.image_files,
        )

    def task_ids(self, labels: torch.Tensor) -> torch.Tensor:
        """The task of each label, where tasks split the classes (class_il, task_il)."""
        task_of_label = torch.empty(self.n_classes, dtype=torch.long)
        for task in self.tasks:
            task_of_label[task.classes] = task.id
        return task_of_label.to(labels.device)[labels]

    def evaluation_split(self, split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """What is evaluated after every task: the images tensor, the rows of it to evaluate, their labels and
        their task ids. The rows are every task's test samples, or the training samples it held out
        (`dataset.val_fraction`), for choosing hyper-parameters without looking at the test set."""
        if split == "test":
            x, y, rows = self.test_x, self.test_y, [task.test_index for task in self.tasks]
        else:
            x, y, rows = self.train_x, self.train_y, [task.val_index for task in self.tasks]
        task_of_row = torch.cat(
            [torch.full_like(r, task.id) for r, task in zip(rows, self.tasks, strict=True)]
        )
        rows = torch.cat(rows)
        return x, rows, y[rows], task_of_row


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
    if dataset.scenario == "domain_il":
        return build_domain_stream(source, dataset)
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
        source.train_x,
        train_y,
        source.test_x,
        test_y,
        tasks,
        order,
        [source.class_names[c] for c in order],
        source.max_value,
        source.files,
    )


def build_domain_stream(source: Source, dataset: DictConfig) -> Stream:
    """Domain-IL: task k is the whole data set seen through transform k; labels are the original classes."""
    n_tasks, classes = dataset.n_tasks, list(range(dataset.num_classes))
    if dataset.domains in ("folders", "sessions"):
        return _folder_domain_stream(source, dataset, classes)
    transforms = domain_transforms(dataset, tuple(source.train_x.shape[1:]))
    train_x = torch.cat([transform(source.train_x) for transform in transforms])
    test_x = torch.cat([transform(source.test_x) for transform in transforms])
    n_train, n_test = len(source.train_y), len(source.test_y)
    val_generator = torch.Generator().manual_seed(0)
    tasks = []
    for task_id in range(n_tasks):
        train_index, val_index = [], []
        for label in classes:
            members = torch.nonzero(source.train_y == label).flatten()
            members = members[torch.randperm(len(members), generator=val_generator)] + task_id * n_train
            n_val = int(round(dataset.val_fraction * len(members)))
            val_index.append(members[:n_val].sort().values)
            train_index.append(members[n_val:].sort().values)
        test_index = torch.arange(task_id * n_test, (task_id + 1) * n_test)
        tasks.append(
            Task(task_id, classes, torch.cat(train_index).sort().values, torch.cat(val_index), test_index)
        )
    return Stream(
        train_x,
        source.train_y.repeat(n_tasks),
        test_x,
        source.test_y.repeat(n_tasks),
        tasks,
        classes,
        list(source.class_names),
        source.max_value,
    )


def _folder_domain_stream(source: Source, dataset: DictConfig, classes: list[int]) -> Stream:
    """Domain k's training images (its sub-folder of the image folder, or its CORe50 session) are task k; its
    test images too, or every task is tested on the whole test set when the test images have no domain
    (CORe50's NI: the test sessions are the same for every task)."""
    val_generator = torch.Generator().manual_seed(0)
    tasks = []
    for task_id in range(dataset.n_tasks):
        train_index, val_index = [], []
        for label in classes:
            members = torch.nonzero((source.train_y == label) & (source.train_domain == task_id)).flatten()
            members = members[torch.randperm(len(members), generator=val_generator)]
            n_val = int(round(dataset.val_fraction * len(members)))
            val_index.append(members[:n_val].sort().values)
            train_index.append(members[n_val:])
        if source.test_domain is None:
            test_index = torch.arange(len(source.test_y))
        else:
            test_index = torch.nonzero(source.test_domain == task_id).flatten()
        tasks.append(
            Task(task_id, classes, torch.cat(train_index).sort().values, torch.cat(val_index), test_index)
        )
    return Stream(
        source.train_x,
        source.train_y,
        source.test_x,
        source.test_y,
        tasks,
        classes,
        list(source.class_names),
        source.max_value,
        source.files,
    )


def domain_transforms(dataset: DictConfig, shape: tuple[int, ...]) -> list:
    """One uint8 -> uint8 image transform per task."""
    if dataset.domains == "permuted":
        # Every task, the first included, gets its own fixed permutation of the pixels (of all channels
        # alike), drawn from dataset.domain_seed, so the stream does not depend on the run's seed.
        generator = torch.Generator().manual_seed(int(dataset.domain_seed))
        n_pixels = shape[1] * shape[2]
        permutations = [torch.randperm(n_pixels, generator=generator) for _ in range(dataset.n_tasks)]
        return [lambda x, p=p: x.flatten(2)[:, :, p].reshape(x.shape) for p in permutations]
    angles = rotation_angles(dataset)
    return [lambda x, a=a: rotate_uint8(x, a) for a in angles]


def rotation_angles(dataset: DictConfig) -> list[float]:
    """dataset.rotation_degrees per task, or evenly spaced over [0, 180): 0, 36, 72, ... for 5 tasks."""
    if dataset.rotation_degrees is not None:
        return [float(a) for a in dataset.rotation_degrees]
    return [180.0 * k / dataset.n_tasks for k in range(dataset.n_tasks)]


def rotate_uint8(x: torch.Tensor, degrees: float, chunk: int = 4096) -> torch.Tensor:
    """Every image rotated by the same angle about its centre, bilinear, zeros outside; uint8 in and out."""
    if degrees % 360 == 0:
        return x.clone()
    angle = torch.tensor(degrees * torch.pi / 180)
    theta = torch.tensor([[angle.cos(), -angle.sin(), 0.0], [angle.sin(), angle.cos(), 0.0]])
    out = torch.empty_like(x)
    for i in range(0, len(x), chunk):
        part = x[i : i + chunk].float()
        grid = F.affine_grid(theta.expand(len(part), 2, 3), list(part.shape), align_corners=False)
        rotated = F.grid_sample(part, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        out[i : i + chunk] = rotated.round().clamp(0, 255).to(torch.uint8)
    return out
