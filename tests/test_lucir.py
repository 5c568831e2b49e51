"""LUCIR: cosine scores, the margin ranking loss and the less-forget term against values computed by hand,
what it achieves on digits, mixed precision, and exact resume."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_resumes_exactly, run_experiment
from omegaconf import OmegaConf
from torch import nn

from incr_cli.data.batches import Preprocess
from incr_cli.data.stream import Stream
from incr_cli.memory import Memory
from incr_cli.models.head import IncrementalNet
from incr_cli.strategies.base import Context
from incr_cli.strategies.cosine import embedding_distillation
from incr_cli.strategies.lucir import LUCIR, margin_ranking_loss


class Identity(nn.Module):
    """The two pixels of a 1x1x2 image are the features."""

    feature_dim = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def lucir_on_two_pixels(sigma: float, total_classes: int = 3) -> LUCIR:
    """LUCIR set up on an identity backbone over two pixels, two of `total_classes` classes seen."""
    model = IncrementalNet(Identity(), total_classes)
    model.head.grow(2)
    dataset = OmegaConf.create({"input_shape": [2, 1, 1], "normalize": False, "mean": [0.0], "std": [1.0],
                                "augment": {"crop_padding": 0, "horizontal_flip": False, "rotation_degrees": 0.0}})  # fmt: skip
    empty = torch.zeros(0, dtype=torch.long)
    labels = list(range(total_classes))
    stream = Stream(empty, empty, empty, empty, [], labels, [str(c) for c in labels], max_value=1)
    lucir = LUCIR(Memory(size=0), sigma=sigma)
    lucir.setup(Context(model, stream, Preprocess(dataset, 1, torch.device("cpu")), torch.Generator(),
                        torch.device("cpu"), torch.optim.SGD, batch_size=1, epochs=1, seed=0))  # fmt: skip
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
    # P1 (digits, 5 tasks, 10 epochs, memory 200), seed 0: LUCIR 0.978 final class-IL accuracy, finetune 0.200.
    settings = ["hardware=cpu", "hardware.num_threads=1", "seed=0"]
    finetune = run_experiment(tmp_path / "finetune", ["strategy=finetune", *settings])["class_il"]
    lucir = run_experiment(tmp_path / "lucir", ["strategy=lucir", *settings])["class_il"]
    assert lucir["final_average_accuracy"] > finetune["final_average_accuracy"] + 0.5


def test_less_forget_constraint_keeps_old_classes_on_digits(tmp_path):
    # Memory 50, class-IL final average accuracy / forgetting with lambda_base 5 and 0:
    # seed 0: 0.978 / 0.014 against 0.936 / 0.073; seed 1: 0.975 / 0.021 against 0.944 / 0.059;
    # seed 2: 0.956 / 0.045 against 0.919 / 0.094.
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


def test_lucir_resumes_exactly_after_sigterm(tmp_path):
    # step 35 of 90 is in task 2: the frozen task-1 network and the memory must come back from the checkpoint
    assert_resumes_exactly(tmp_path, ["strategy=lucir", "epochs=2"], fault="step:35:SIGTERM")
