"""Importance-weighted replay (incr's method, docs/methods.md): the weights, the grad-norm closed form and the
eviction by hand; what it achieves on digits next to fine-tuning and plain replay; mixed precision; resume."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_resumes_exactly, final_accuracy, run_experiment
from torch import nn

from incr_cli.data.batches import Batch
from incr_cli.memory import Memory
from incr_cli.models.head import IncrementalNet
from incr_cli.strategies.base import Context
from incr_cli.strategies.importance_replay import (
    ImportanceReplay,
    gradient_norm,
    importance_weights,
    most_important_per_class,
)


# ----------------------------------------------------------------------------------------- the maths by hand
def test_weights_of_a_batch_of_scores_by_hand():
    scores = torch.tensor([1.0, 4.0, 0.0, 9.0])
    # T = 2: square roots 1, 2, 0, 3 (sum 6); w = 4 * (1, 2, 0, 3) / 6, and the zero is lifted to the floor.
    weights = importance_weights(scores, temperature=2.0, floor=0.1)
    assert weights.tolist() == pytest.approx([2 / 3, 4 / 3, 0.1, 2.0])
    # T = 1: proportional to the scores (sum 14): 4 * (1, 4, 0, 9) / 14.
    weights = importance_weights(scores, temperature=1.0, floor=0.1)
    assert weights.tolist() == pytest.approx([4 / 14, 16 / 14, 0.1, 36 / 14])


def test_infinite_temperature_is_plain_replay_and_equal_scores_weigh_one():
    assert importance_weights(torch.tensor([0.5, 3.0, 7.0]), 1e12, 0.1).tolist() == pytest.approx([1, 1, 1])
    assert importance_weights(torch.tensor([2.0, 2.0]), 1.0, 0.1).tolist() == pytest.approx([1, 1])
    assert importance_weights(torch.zeros(3), 2.0, 0.1).tolist() == pytest.approx([1, 1, 1])


def test_gradient_norm_closed_form_by_hand_and_against_autograd():
    # z = (0, 0), y = 0: softmax (1/2, 1/2), gradient (-1/2, 1/2), norm sqrt(1/2).
    assert gradient_norm(torch.zeros(1, 2), torch.tensor([0])).item() == pytest.approx(math.sqrt(0.5))
    logits = torch.randn(6, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.tensor([0, 4, 2, 2, 1, 3])
    z = logits.clone().requires_grad_()
    (gradient,) = torch.autograd.grad(F.cross_entropy(z, y, reduction="sum"), z)  # row i: d CE_i / d z_i
    assert torch.allclose(gradient_norm(logits, y).double(), gradient.norm(dim=1), atol=1e-6)


def test_eviction_keeps_the_most_important_samples_of_each_class_by_hand():
    y = torch.tensor([0, 0, 0, 1, 1, 1, 2])
    scores = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.2, 0.8, 0.0])
    # 5 slots over 3 classes: 2, 2, 1. Class 0 keeps rows 1, 2; class 1 rows 5, 3; class 2 its only row.
    assert most_important_per_class(y, scores, 5).tolist() == [1, 2, 3, 5, 6]
    # 3 slots: one each, the highest score of each class.
    assert most_important_per_class(y, scores, 3).tolist() == [1, 5, 6]


class Pixels(nn.Module):
    """A backbone that flattens 2-pixel images: the net is a linear classifier on them."""

    feature_dim = 2

    def forward(self, x):
        return x.float().flatten(1)


def tiny_importance_replay(
    size: int, replay_batch_size: int | None = None, admission: str = "importance"
) -> ImportanceReplay:
    model = IncrementalNet(Pixels(), 4)
    rng = torch.Generator().manual_seed(0)
    strategy = ImportanceReplay(
        Memory(size, "class_balanced"), replay_batch_size=replay_batch_size, admission=admission
    )
    strategy.setup(
        Context(model, None, lambda x, generator=None: x.float(), rng, torch.device("cpu"), None, 2, 1, 0)
    )
    return strategy


def test_a_shrinking_class_drops_its_least_important_sample():
    strategy = tiny_importance_replay(size=4)
    strategy.model.head.grow(2)
    x = torch.arange(8).reshape(4, 1, 2)
    strategy._keep_most_important(x, torch.tensor([0, 0, 1, 1]), torch.tensor([0.3, 0.7, 0.9, 0.1]))
    assert strategy.memory.y.tolist() == [0, 0, 1, 1]
    # Two new classes arrive: every class keeps one slot, its most important sample.
    new_x = torch.arange(8, 16).reshape(4, 1, 2)
    strategy._keep_most_important(new_x, torch.tensor([2, 2, 3, 3]), torch.tensor([0.2, 0.6, 0.5, 0.4]))
    memory = strategy.memory
    assert memory.y.tolist() == [0, 1, 2, 3]
    assert memory.x[:, 0, 0].tolist() == [2, 4, 10, 12]
    assert memory.extras["score"].tolist() == pytest.approx([0.7, 0.9, 0.6, 0.5])
    assert memory.n_seen == 8


def test_random_admission_lets_a_new_class_in_at_random_and_evicts_old_ones_by_importance():
    strategy = tiny_importance_replay(size=4, admission="random")
    strategy.model.head.grow(2)
    x = torch.arange(8).reshape(4, 1, 2)
    strategy._keep_most_important(x, torch.tensor([0, 0, 1, 1]), torch.tensor([0.3, 0.7, 0.9, 0.1]))
    new_x = torch.arange(8, 16).reshape(4, 1, 2)
    new_scores = torch.tensor([0.2, 0.6, 0.5, 0.4])
    admitted = []
    for seed in range(40):
        strategy.rng.manual_seed(seed)
        memory = strategy.memory
        saved = memory.state_dict()
        strategy._keep_most_important(new_x, torch.tensor([2, 2, 3, 3]), new_scores)
        assert memory.y.tolist() == [0, 1, 2, 3]
        assert memory.x[:2, 0, 0].tolist() == [2, 4]  # the old classes keep their most important sample
        # a new sample keeps its real score, whichever entered
        assert memory.extras["score"][2:].tolist() == [
            new_scores[(memory.x[i, 0, 0] - 8) // 2].item() for i in (2, 3)
        ]
        admitted.append(tuple(memory.x[2:, 0, 0].tolist()))
        memory.load_state_dict(saved)
    assert len(set(admitted)) == 4  # each of the 2 x 2 choices for classes 2 and 3 happens: not by score


def test_replayed_samples_get_their_current_score_and_the_loss_is_weighted():
    strategy = tiny_importance_replay(size=2, replay_batch_size=2)
    strategy.model.head.grow(2)
    memory_x, memory_y = torch.tensor([[[1, 0]], [[0, 3]]]), torch.tensor([0, 1])
    strategy._keep_most_important(memory_x, memory_y, torch.tensor([5.0, 5.0]))  # stale scores
    batch = Batch(torch.tensor([[[2, 1]], [[1, 1]]]), torch.tensor([1, 0]))
    loss = strategy.loss(batch)
    with torch.no_grad():
        logits = strategy.model(torch.cat([batch.x, memory_x]).float().flatten(1))
    losses = F.cross_entropy(logits, torch.cat([batch.y, memory_y]), reduction="none")
    assert strategy.memory.extras["score"].tolist() == pytest.approx(losses[2:].tolist())  # both rows drawn
    weights = importance_weights(losses, strategy.temperature, strategy.floor)
    assert loss.item() == pytest.approx((weights * losses).mean().item())


def test_importance_replay_needs_a_class_balanced_memory_and_a_known_scoring():
    with pytest.raises(ValueError, match="class_balanced"):
        ImportanceReplay(Memory(10, "reservoir"))
    with pytest.raises(ValueError, match="grad_norm"):
        ImportanceReplay(Memory(10, "class_balanced"), scoring="margin")


# ----------------------------------------------------------------------------------------- on real data
@pytest.fixture(scope="module")
def digits_runs(tmp_path_factory) -> dict[str, dict]:
    """The default digits stream (memory 200, seed 0) for fine-tuning, plain replay and importance replay."""
    runs = {}
    for name, overrides in {
        "finetune": ["strategy=finetune"],
        "replay": ["strategy=replay"],
        "importance_replay": ["strategy=importance_replay"],
    }.items():
        runs[name] = run_experiment(
            tmp_path_factory.mktemp("p1") / name, [*overrides, "dataset=digits", "seed=0"]
        )
    return runs


def test_importance_replay_remembers_what_finetune_forgets_on_digits(digits_runs):
    assert final_accuracy(digits_runs["importance_replay"]) > final_accuracy(digits_runs["finetune"]) + 0.3


def test_importance_replay_is_level_with_plain_replay_at_equal_memory_on_digits(digits_runs):
    # On digits the two are level: seed 0 gives 0.947 against 0.950 with torch 2.14.1, and one test sample
    # of 360 is 0.003. On Split Fashion-MNIST it falls behind: keeping each
    # class's highest-loss samples fills the memory with atypical ones (0.40 against 0.80); docs/methods.md.
    assert digits_runs["importance_replay"]["per_task"][-1]["memory_samples"] == 200
    assert digits_runs["replay"]["per_task"][-1]["memory_samples"] == 200
    assert final_accuracy(digits_runs["importance_replay"]) >= final_accuracy(digits_runs["replay"]) - 0.01


@pytest.mark.parametrize("scoring", ["loss", "grad_norm"])
def test_importance_replay_trains_under_mixed_precision(tmp_path, scoring):
    overrides = ["strategy=importance_replay", f"strategy.scoring={scoring}", "hardware=amp", "debug=quick"]
    metrics = run_experiment(tmp_path / "amp", overrides)
    assert metrics["run"]["status"] == "finished"
    assert all(math.isfinite(a) for a in metrics["class_il"]["average_accuracy"])
    assert metrics["per_task"][-1]["memory_samples"] == 200


def test_importance_replay_resumes_exactly(tmp_path):
    assert_resumes_exactly(tmp_path, ["strategy=importance_replay", "epochs=2"])
