"""uint8 tensors -> a stream of tasks: class order, task sizes, the validation hold-out, renumbered labels."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_config

from incr_cli.data.source import Source
from incr_cli.data.stream import build_stream

N_CLASSES, TRAIN_PER_CLASS, TEST_PER_CLASS = 10, 20, 6


def fake_source() -> Source:
    """10 classes, interleaved (sample i has class i % 10); every image carries its own id in its first two
    pixels (id // 256, id % 256): train ids 0..199, test ids 200..259, so a split can be traced back to the
    samples it holds."""
    n_train, n_test = N_CLASSES * TRAIN_PER_CLASS, N_CLASSES * TEST_PER_CLASS
    ids = torch.arange(n_train + n_test)
    x = torch.zeros(len(ids), 1, 8, 8, dtype=torch.uint8)
    x[:, 0, 0, 0], x[:, 0, 0, 1] = (ids // 256).to(torch.uint8), (ids % 256).to(torch.uint8)
    y = ids % N_CLASSES
    names = [f"class{c}" for c in range(N_CLASSES)]
    return Source(x[:n_train], y[:n_train], x[n_train:], y[n_train:], names, max_value=255)


def stream_for(*overrides: str):
    source = fake_source()
    return source, build_stream(source, compose_config(overrides).dataset)


def ids(x: torch.Tensor) -> set[int]:
    return set((x[:, 0, 0, 0].long() * 256 + x[:, 0, 0, 1].long()).tolist())


def test_default_stream_is_five_tasks_of_two_classes_in_label_order():
    source, stream = stream_for()
    assert [t.classes for t in stream.tasks] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert stream.class_order == list(range(10))
    for task in stream.tasks:
        assert sorted(stream.train_y[task.train_index].unique().tolist()) == task.classes
        assert len(task.train_index) == 2 * TRAIN_PER_CLASS
        assert len(task.test_index) == 2 * TEST_PER_CLASS
        assert len(task.val_index) == 0
    # the tasks' training samples partition the training set
    assert sorted(torch.cat([t.train_index for t in stream.tasks]).tolist()) == list(
        range(len(source.train_y))
    )


def test_class_order_renumbers_labels_so_the_ith_class_becomes_label_i():
    order = [3, 7, 0, 9, 1, 5, 2, 8, 4, 6]
    source, stream = stream_for(f"dataset.class_order=[{','.join(map(str, order))}]")
    assert stream.class_order == order
    # class order[i] -> label i, for every train and test sample
    assert torch.equal(stream.train_y, torch.tensor([order.index(c) for c in source.train_y.tolist()]))
    assert torch.equal(stream.test_y, torch.tensor([order.index(c) for c in source.test_y.tolist()]))
    assert stream.class_names == [f"class{c}" for c in order]
    # the first task holds the original classes 3 and 7, the last 4 and 6
    first, last = stream.tasks[0], stream.tasks[-1]
    assert first.classes == [0, 1]
    assert set(source.train_y[first.train_index].tolist()) == {3, 7}
    assert set(source.test_y[first.test_index].tolist()) == {3, 7}
    assert set(source.train_y[last.train_index].tolist()) == {4, 6}
    # the images themselves are not moved: indices still point at the source's samples
    assert torch.equal(stream.train_x, source.train_x)


def test_n_tasks_splits_the_classes_evenly():
    _, stream = stream_for("dataset.n_tasks=2")
    assert [t.classes for t in stream.tasks] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert [len(t.train_index) for t in stream.tasks] == [5 * TRAIN_PER_CLASS] * 2
    _, single = stream_for("dataset.n_tasks=1")
    assert [t.classes for t in single.tasks] == [list(range(10))]


def test_initial_classes_makes_a_larger_first_task_then_equal_steps():
    # B4 with 3 more steps: 4 classes, then (10 - 4) / 3 = 2 per task
    _, stream = stream_for("dataset.initial_classes=4", "dataset.n_tasks=4")
    assert [t.classes for t in stream.tasks] == [[0, 1, 2, 3], [4, 5], [6, 7], [8, 9]]
    assert [len(t.test_index) for t in stream.tasks] == [4 * TEST_PER_CLASS] + [2 * TEST_PER_CLASS] * 3


def test_the_evaluation_split_names_the_task_of_each_test_sample():
    _, stream = stream_for("dataset.initial_classes=4", "dataset.n_tasks=4")
    x, rows, y, task_ids = stream.evaluation_split("test")
    assert torch.equal(y, stream.test_y[rows]) and x is stream.test_x
    # labels 0-3 -> task 0, 4-5 -> 1, 6-7 -> 2, 8-9 -> 3; every test sample once
    assert torch.equal(task_ids, torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 3, 3])[y])
    assert torch.equal(stream.task_ids(y), task_ids)
    assert len(y) == len(stream.test_y) and torch.equal(y.sort().values, stream.test_y.sort().values)


def test_class_order_seed_shuffles_deterministically():
    _, first = stream_for("dataset.class_order_seed=1993")
    _, again = stream_for("dataset.class_order_seed=1993")
    _, other = stream_for("dataset.class_order_seed=7")
    assert first.class_order == again.class_order
    assert sorted(first.class_order) == list(range(10))  # a permutation of the classes
    assert first.class_order != list(range(10))
    assert first.class_order != other.class_order
    assert torch.equal(first.train_y, again.train_y)


def test_an_explicit_class_order_wins_over_the_seed():
    order = [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    _, stream = stream_for("dataset.class_order=[9,8,7,6,5,4,3,2,1,0]", "dataset.class_order_seed=1993")
    assert stream.class_order == order


def test_val_fraction_holds_out_a_class_stratified_part_of_the_training_data():
    source, stream = stream_for("dataset.val_fraction=0.25")
    _, without = stream_for()
    train_ids, test_ids = ids(source.train_x), ids(source.test_x)
    for task, plain in zip(stream.tasks, without.tasks, strict=True):
        # 0.25 * 20 = 5 validation samples of each class, 15 left for training
        val_labels = stream.train_y[task.val_index]
        assert [int((val_labels == c).sum()) for c in task.classes] == [5, 5]
        train_labels = stream.train_y[task.train_index]
        assert [int((train_labels == c).sum()) for c in task.classes] == [15, 15]
        # disjoint from training, together exactly the task's training data without a hold-out
        assert not set(task.val_index.tolist()) & set(task.train_index.tolist())
        assert sorted(task.val_index.tolist() + task.train_index.tolist()) == sorted(
            plain.train_index.tolist()
        )
        # drawn from the training images, never from the test images; the test split is untouched
        held_out = ids(stream.train_x[task.val_index])
        assert held_out <= train_ids and not held_out & test_ids
        assert torch.equal(task.test_index, plain.test_index)


def test_val_hold_out_does_not_depend_on_the_run_seed():
    _, first = stream_for("dataset.val_fraction=0.25", "seed=0")
    _, second = stream_for("dataset.val_fraction=0.25", "seed=5")
    for a, b in zip(first.tasks, second.tasks, strict=True):
        assert torch.equal(a.val_index, b.val_index)


@pytest.mark.parametrize("device", ["cpu"])
def test_stream_to_device_keeps_every_split(device):
    _, stream = stream_for("dataset.val_fraction=0.25")
    moved = stream.to(torch.device(device))
    assert torch.equal(moved.train_y, stream.train_y) and torch.equal(moved.test_x, stream.test_x)
    for a, b in zip(moved.tasks, stream.tasks, strict=True):
        assert a.classes == b.classes
        assert torch.equal(a.train_index, b.train_index) and torch.equal(a.val_index, b.val_index)
    assert moved.class_order == stream.class_order and moved.max_value == stream.max_value
