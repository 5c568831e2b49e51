"""LUCIR: cosine scores, the margin ranking loss and the less-forget term against values computed by hand,
the exemplars in the task's training set, the frozen old rows, the ResNets' embedding before the last ReLU,
the class-balanced finetuning stage, what it achieves on digits, mixed precision, and exact resume."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_resumes_exactly, cpu_context, run_experiment
from omegaconf import OmegaConf
from test_podnet import run_recording_finetuning
from torch import nn

from incr_cli.data.batches import Batch
from incr_cli.data.stream import Stream, Task
from incr_cli.memory import Memory
from incr_cli.models.head import IncrementalNet
from incr_cli.models.resnet import ResNet18, ResNet32
from incr_cli.step import Hardware, StepRunner
from incr_cli.strategies.cosine import embed, embedding_distillation
from incr_cli.strategies.lucir import LUCIR, margin_ranking_loss


class Identity(nn.Module):
    """The two pixels of a 1x1x2 image are the features."""

    feature_dim = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)

    embedding_before_activation = forward  # no activation to leave out


TWO_PIXELS = {
    "input_shape": [2, 1, 1],
    "normalize": False,
    "mean": [0.0],
    "std": [1.0],
    "augment": {"crop_padding": 0, "horizontal_flip": False, "rotation_degrees": 0.0},
}


def two_tasks_of_two_pixels() -> Stream:
    """Classes 0 and 1 (task 1) and class 2 (task 2), four 1x1x2 images each, pixel values up to 10."""
    x = torch.tensor(
        [[9, 1], [8, 2], [9, 3], [7, 1], [1, 9], [2, 8], [3, 9], [1, 7], [6, 6], [5, 7], [7, 5], [6, 5]],
        dtype=torch.uint8,
    ).view(12, 2, 1, 1)
    y = torch.arange(3).repeat_interleave(4)
    empty = torch.zeros(0, dtype=torch.long)
    tasks = [Task(0, [0, 1], torch.arange(8), empty, empty), Task(1, [2], torch.arange(8, 12), empty, empty)]
    return Stream(x, y, x[:0], empty, tasks, [0, 1, 2], ["0", "1", "2"], max_value=10)


def lucir_after_first_task(**options) -> LUCIR:
    """LUCIR on the identity backbone over `two_tasks_of_two_pixels`, its first task ended (a herding memory
    of 4 filled) and its second begun."""
    stream = two_tasks_of_two_pixels()
    model = IncrementalNet(Identity(), 3)
    lucir = LUCIR(Memory(size=4, selection="herding"), **options)
    lucir.setup(
        cpu_context(
            model, stream, OmegaConf.create(TWO_PIXELS), max_value=10, batch_size=4, optimizer=torch.optim.SGD
        )
    )
    for task in stream.tasks:
        model.head.grow(task.classes[-1] + 1)
        lucir.before_task(task)
        if task.id == 0:
            lucir.after_task(task)
    return lucir


def sgd_step(strategy, optimizer: torch.optim.Optimizer, batch: Batch) -> None:
    """One engine training step, full precision on the CPU."""
    runner = StepRunner(
        optimizer,
        torch.amp.GradScaler("cpu", enabled=False),
        Hardware(torch.device("cpu"), None),
        "stop",
        lambda: "here",
    )
    strategy.training_step(batch, runner)


def test_exemplars_join_the_task_training_set():
    # The authors' code, PyCIL and Mammoth concatenate the exemplars with the task's data: with 4 exemplars
    # and 4 new samples, the task's rows are the 4 new ones and the memory's 4 (stream rows of classes 0
    # and 1), each once per epoch; a batch is not joined by more exemplars.
    lucir = lucir_after_first_task()
    task = lucir.stream.tasks[1]
    rows = lucir.training_indices(task)
    assert torch.equal(rows[:4], task.train_index)
    exemplar_rows = rows[4:]
    assert len(exemplar_rows) == 4
    assert torch.equal(lucir.stream.train_y[exemplar_rows], lucir.memory.y)
    assert torch.equal(lucir.stream.train_x[exemplar_rows], lucir.memory.x)
    assert sorted(lucir.memory.y.tolist()) == [0, 0, 1, 1]
    batch = Batch(lucir.stream.train_x[rows], lucir.stream.train_y[rows])
    assert lucir.with_replay(batch) is batch
    # exemplars=joined_batch: the task's own rows, each batch joined by as many exemplars
    joined = lucir_after_first_task(exemplars="joined_batch")
    assert torch.equal(joined.training_indices(task), task.train_index)
    assert len(joined.with_replay(Batch(batch.x[:3], batch.y[:3]))) == 6


def test_old_classes_rows_stay_frozen_while_new_rows_train():
    # The authors' code trains the old classes' rows (their fc1) at learning rate 0 and weight decay 0 from
    # the second task on; with momentum and weight decay, two steps move every trainable row.
    lucir = lucir_after_first_task()
    head, stream = lucir.model.head, lucir.stream
    before = head.weight.detach().clone()
    optimizer = torch.optim.SGD(lucir.model.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
    rows = lucir.training_indices(stream.tasks[1])
    batch = Batch(stream.train_x[rows], stream.train_y[rows])
    for _ in range(2):
        sgd_step(lucir, optimizer, batch)
    assert torch.equal(head.weight[:2], before[:2])
    assert not torch.allclose(head.weight[2], before[2])
    # freeze_old=false: the old rows train too
    free = lucir_after_first_task(freeze_old=False)
    before = free.model.head.weight.detach().clone()
    optimizer = torch.optim.SGD(free.model.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
    sgd_step(free, optimizer, batch)
    assert not torch.allclose(free.model.head.weight[:2], before[:2])


def block_by_hand(block, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A basic block's residual sum and its ReLU, from its layers."""
    total = block.bn2(block.conv2(F.relu(block.bn1(block.conv1(x))))) + block.shortcut(x)
    return total, F.relu(total)


@pytest.mark.parametrize("resnet", [ResNet32, ResNet18])
def test_resnet_embedding_is_taken_before_the_last_relu(resnet):
    # LUCIR's modified ResNet drops the last block's ReLU (PODNet's code takes its `raw_features`): the
    # embedding is the average-pooled residual sum, which has negative entries; `forward` is unchanged.
    torch.manual_seed(0)
    backbone = resnet((3, 8, 8), width=4).eval()
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        h = backbone.stem(x)
        for block in backbone.stages[:-1]:
            h = block_by_hand(block, h)[1]
        total, activated = block_by_hand(backbone.stages[-1], h)
        before = embed(backbone, x)[1]
        after = backbone(x)
    torch.testing.assert_close(before, total.mean((2, 3)))
    assert (before < 0).any()
    torch.testing.assert_close(after, activated.mean((2, 3)))
    assert (after >= 0).all()
    assert backbone.stages[-1].activate  # the ReLU is back for the next forward pass


def lucir_on_two_pixels(sigma: float, total_classes: int = 3) -> LUCIR:
    """LUCIR set up on an identity backbone over two pixels, two of `total_classes` classes seen."""
    model = IncrementalNet(Identity(), total_classes)
    model.head.grow(2)
    dataset = OmegaConf.create(
        {
            "input_shape": [2, 1, 1],
            "normalize": False,
            "mean": [0.0],
            "std": [1.0],
            "augment": {"crop_padding": 0, "horizontal_flip": False, "rotation_degrees": 0.0},
        }
    )
    empty = torch.zeros(0, dtype=torch.long)
    labels = list(range(total_classes))
    stream = Stream(empty, empty, empty, empty, [], labels, [str(c) for c in labels], max_value=1)
    lucir = LUCIR(Memory(size=0), sigma=sigma)
    lucir.setup(cpu_context(model, stream, dataset, optimizer=torch.optim.SGD, rng=torch.Generator()))
    return lucir


def test_cosine_scores_by_hand_cover_seen_and_future_classes():
    # Feature (3, 4) -> normalised (0.6, 0.8). Rows: seen (1, 0) and (0, 2) -> cosines 0.6 and 0.8; the
    # future class's pre-drawn row (-1, -1) -> (-0.6 - 0.8) / sqrt(2) = -0.989949. Times sigma = 2:
    # (1.2, 1.6, -1.979899). Row lengths do not matter: (0, 2) scores as (0, 1) would.
    lucir = lucir_on_two_pixels(sigma=2.0)
    head = lucir.model.head
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        head.future_weight[2] = torch.tensor([-1.0, -1.0])
    assert isinstance(head.sigma, nn.Parameter)  # the engine's optimizer trains it, the checkpoint keeps it
    assert "head.sigma" in lucir.model.state_dict()
    scores = lucir.predict(torch.tensor([[[[3.0]], [[4.0]]]]))
    torch.testing.assert_close(scores, torch.tensor([[1.2, 1.6, -1.4 * math.sqrt(2)]]))


def test_margin_ranking_loss_by_hand():
    # Two old classes (0, 1), two new (2, 3), margin 0.5; the cosines of three samples:
    # A, class 0: (0.9, 0.1, 0.5, 0.2): the two hardest new classes score 0.5 and 0.2:
    #    max(0, 0.5 - 0.9 + 0.5) = 0.1 and max(0, 0.5 - 0.9 + 0.2) = 0.
    # B, class 1: (0.3, 0.4, 0.6, 0.7): 0.5 - 0.4 + 0.7 = 0.8 and 0.5 - 0.4 + 0.6 = 0.7.
    # C, class 3, is new: no anchor. K = 2: (0.1 + 0 + 0.8 + 0.7) / 4 pairs = 0.4. K = 1: (0.1 + 0.8) / 2.
    cosines = torch.tensor([[0.9, 0.1, 0.5, 0.2], [0.3, 0.4, 0.6, 0.7], [0.0, 0.9, 0.1, 0.2]])
    labels = torch.tensor([0, 1, 3])
    assert margin_ranking_loss(cosines, labels, 2, hard_negatives=2, margin=0.5).item() == pytest.approx(0.4)
    assert margin_ranking_loss(cosines, labels, 2, hard_negatives=1, margin=0.5).item() == pytest.approx(0.45)
    # only new-class samples: nothing to rank
    assert margin_ranking_loss(cosines[2:], labels[2:], 2, hard_negatives=2, margin=0.5).item() == 0.0


def test_less_forget_term_and_its_adaptive_weight_by_hand():
    # 1 - cos: (1, 0) against (0, 1): 1; (1, 1) against (2, 2): 0 (a longer embedding is not penalised).
    # Batch mean: 0.5.
    new, old = torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[0.0, 1.0], [2.0, 2.0]])
    assert embedding_distillation(new, old).item() == pytest.approx(0.5)
    # lambda = lambda_base * sqrt(old classes / new classes): 8 old, 2 new -> 5 * sqrt(4) = 10.
    lucir = lucir_on_two_pixels(sigma=1.0, total_classes=10)
    lucir.model.head.grow(10)
    lucir.old_classes = 8
    assert lucir.less_forget_weight == pytest.approx(10.0)


def test_lucir_forgets_less_than_finetune_in_class_il_on_digits(tmp_path):
    # Digits stream (5 tasks, 10 epochs, memory 200), seed 0: LUCIR 0.986 final class-IL accuracy,
    # finetune 0.200.
    settings = ["hardware=cpu", "hardware.num_threads=1", "seed=0"]
    finetune = run_experiment(tmp_path / "finetune", ["strategy=finetune", *settings])["class_il"]
    lucir = run_experiment(tmp_path / "lucir", ["strategy=lucir", *settings])["class_il"]
    assert lucir["final_average_accuracy"] > finetune["final_average_accuracy"] + 0.5


def test_less_forget_constraint_keeps_old_classes_on_digits(tmp_path):
    # Memory 50, class-IL final average accuracy / forgetting with lambda_base 5 and 0:
    # seed 0: 0.972 / 0.014 against 0.928 / 0.087; seed 1: 0.983 / -0.003 against 0.892 / 0.122;
    # seed 2: 0.958 / 0.024 against 0.903 / 0.118.
    settings = [
        "strategy=lucir",
        "strategy.memory.size=50",
        "hardware=cpu",
        "hardware.num_threads=1",
        "seed=0",
    ]
    with_term = run_experiment(tmp_path / "on", settings)["class_il"]
    without = run_experiment(tmp_path / "off", [*settings, "strategy.lambda_base=0"])["class_il"]
    assert with_term["final_average_accuracy"] > without["final_average_accuracy"] + 0.02
    assert with_term["average_forgetting"] < without["average_forgetting"] - 0.03


def test_lucir_trains_under_mixed_precision(tmp_path):
    metrics = run_experiment(
        tmp_path / "run", ["strategy=lucir", "hardware=amp", "epochs=1", "dataset.n_tasks=2"]
    )
    assert metrics["run"]["status"] == "finished"
    assert min(row[i] for i, row in enumerate(metrics["class_il"]["accuracy_matrix"])) > 0.5


def test_class_balanced_finetuning_trains_the_rows_on_the_balanced_memory(tmp_path, monkeypatch):
    # digits, 2 tasks of 5 classes, memory 50: after the second task (not the first) one finetuning epoch
    # runs over the memory alone, 5 exemplars of each of the 10 classes, and changes only the classifier's
    # rows (old ones included), not the backbone nor sigma (the authors' ft_flag 2).
    calls, labels = run_recording_finetuning(tmp_path, monkeypatch, [], LUCIR, "lucir", epochs=1)
    assert [call["classes"] for call in calls] == [10]
    assert torch.equal(torch.bincount(labels, minlength=10), torch.full((10,), 5))
    before, after = calls[0]["before"], calls[0]["after"]
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"head.weight"}
    assert not torch.equal(before["head.weight"][:5], after["head.weight"][:5])


def test_lucir_resumes_exactly_after_sigterm(tmp_path):
    # step 35 of 90 is in task 2: the frozen task-1 network and the memory must come back from the checkpoint
    assert_resumes_exactly(tmp_path, ["strategy=lucir", "epochs=2"], fault="step:35:SIGTERM")
