"""Regularisation strategies (EWC, online EWC, SI, MAS): importances and penalties against values computed by
hand, what they protect on digits (task-IL), mixed precision, and exact resume."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import RawPixels, assert_resumes_exactly, run_experiment, tiny_context
from torch import Tensor

from incr_cli.data.batches import Batch
from incr_cli.models.head import IncrementalNet
from incr_cli.step import Hardware, StepRunner
from incr_cli.strategies.ewc import EWC
from incr_cli.strategies.mas import MemoryAwareSynapses
from incr_cli.strategies.si import SynapticIntelligence


# ----------------------------------------------------------------------------------------- a network to compute by hand
def setup(strategy, pixels: list[int], labels: list[int], tasks: list[list[int]], seen: int, batch_size: int):
    """`strategy` on a head over one raw pixel, every weight and bias 0, three classes in the stream."""
    model = IncrementalNet(RawPixels(1), 3)
    model.head.future_weight.zero_()
    model.head.future_bias.zero_()
    model.head.grow(seen)
    strategy.setup(tiny_context(model, pixels, labels, tasks, batch_size))
    return strategy


# ----------------------------------------------------------------------------------------- the maths, by hand
@pytest.mark.parametrize(
    ("fisher", "batch_size", "weight", "bias"),
    [
        ("per_sample", 1, 0.625, 0.25),
        ("per_sample", 2, 0.625, 0.25),
        ("batch", 1, 0.625, 0.25),
        ("batch", 2, 0.0625, 0.0),
    ],
)
def test_empirical_fisher_of_a_two_weight_model_on_two_samples_by_hand(fisher, batch_size, weight, bias):
    # Weights 0: p = (1/2, 1/2) and dCE/dlogits = p - onehot(y). Sample x=1, y=0: d/dw = (-1/2, 1/2) * 1,
    # d/db = (-1/2, 1/2). Sample x=2, y=1: d/dw = (1/2, -1/2) * 2 = (1, -1), d/db = (1/2, -1/2).
    # Per sample (either estimator with one sample per batch): F_w = (1/4 + 1) / 2 = 0.625, F_b = 1/4.
    # Avalanche's batch estimator with both in one batch squares the gradient of the mean:
    # d/dw = (1/4, -1/4), F_w = 1/16; d/db = 0. The per-sample estimator ignores the batch size.
    ewc = setup(EWC(ewc_lambda=1.0, fisher=fisher), [1, 2], [0, 1], [[0, 1]], seen=2, batch_size=batch_size)
    fisher = ewc.fisher(ewc.stream.train_x, ewc.stream.train_y)
    torch.testing.assert_close(fisher["head.weight"], torch.full((2, 1), weight))
    torch.testing.assert_close(fisher["head.bias"], torch.full((2,), bias))


# Bias (ln 3, 0), weights 0: p = (3/4, 1/4) for every x. d log p_0 / dlogits = (1/4, -1/4), d log p_1 /
# dlogits = (-3/4, 3/4); d/dw = that * x. Samples x=1, y=0 and x=2, y=1.
#   true:          F_w = (1/16 * 1 + 9/16 * 4) / 2 = 37/32,   F_b = (1/16 + 9/16) / 2 = 5/16
#   all:           per sample sum_c p_c g_c^2 = 3/4 * 1/16 + 1/4 * 9/16 = 3/16 (times x^2 for w):
#                  F_w = (3/16 + 3/4) / 2 = 15/32,   F_b = 3/16
#   empirical_weighted: p_y g_y^2: (3/4 * 1/16, 1/4 * 9/16 * 4) for w, F_w = (3/64 + 36/64) / 2 = 39/128;
#                  F_b = (3/64 + 9/64) / 2 = 3/32
#   batch (both in one batch, true labels): gradient of the mean, d/dw = (1/4 * 1 - 3/4 * 2) / 2 = -5/8
#                  on row 0, F_w = 25/64; d/db = (1/4 - 3/4) / 2, F_b = 1/16
@pytest.mark.parametrize(
    ("fisher", "labels", "weight", "bias"),
    [
        ("per_sample", "empirical", 37 / 32, 5 / 16),
        ("per_sample", "expected", 15 / 32, 3 / 16),
        ("per_sample", "empirical_weighted", 39 / 128, 3 / 32),
        ("batch", "empirical", 25 / 64, 1 / 16),
    ],
)
def test_fisher_estimators_and_labels_on_a_biased_linear_model_by_hand(fisher, labels, weight, bias):
    ewc = setup(EWC(1.0, fisher=fisher, fisher_labels=labels), [1, 2], [0, 1], [[0, 1]], seen=2, batch_size=2)
    with torch.no_grad():
        ewc.model.head.bias.copy_(torch.tensor([math.log(3.0), 0.0]))
    estimate = ewc.fisher(ewc.stream.train_x, ewc.stream.train_y)
    torch.testing.assert_close(estimate["head.weight"], torch.full((2, 1), weight))
    torch.testing.assert_close(estimate["head.bias"], torch.full((2,), bias))


@pytest.mark.parametrize(("fisher", "factor"), [("per_sample", 37 / 32), ("batch", 25 / 64)])
def test_ewc_penalty_with_each_estimator_by_hand(fisher, factor):
    # The default estimator is per-sample; batch is Avalanche's. Same model and data as above (batch 2),
    # then every weight moved by 1 from the anchor: penalty = sum F_w * 1 = 2 * F_w, loss term lambda / 2 times it.
    ewc = setup(EWC(ewc_lambda=4.0, fisher=fisher), [1, 2], [0, 1], [[0, 1]], seen=2, batch_size=2)
    with torch.no_grad():
        ewc.model.head.bias.copy_(torch.tensor([math.log(3.0), 0.0]))
    ewc.after_task(ewc.stream.tasks[0])
    with torch.no_grad():
        ewc.model.head.weight += 1.0
    assert ewc.penalty().item() == pytest.approx(2 * factor)
    assert EWC(1.0).estimator == "per_sample"


def test_task_il_fisher_uses_the_own_task_log_likelihood():
    # Task-IL trains on each sample's own task's classes: the Fisher must come from that likelihood.
    # Three classes, tasks [0] and [1, 2], weights 0, sample x=1 of class 1. Own task {1, 2}: p = (1/2, 1/2),
    # d log p_1 / dlogits = (0, 1/2, -1/2), F_b = (0, 1/4, 1/4). Over all three classes it would be
    # (-1/3, 2/3, -1/3), F_b = (1/9, 4/9, 1/9).
    for fisher in ("per_sample", "batch"):
        ewc = setup(EWC(1.0, fisher=fisher), [1], [1], [[0], [1, 2]], seen=3, batch_size=1)
        ewc.context.scenario = "task_il"
        estimate = ewc.fisher(ewc.stream.train_x, ewc.stream.train_y)
        torch.testing.assert_close(estimate["head.bias"], torch.tensor([0.0, 0.25, 0.25]))


def test_ewc_rejects_unknown_estimators_and_label_choices():
    with pytest.raises(ValueError, match="fisher"):
        EWC(1.0, fisher="exact")
    with pytest.raises(ValueError, match="fisher_labels"):
        EWC(1.0, fisher_labels="sampled")
    with pytest.raises(ValueError, match="true labels"):
        EWC(1.0, fisher="batch", fisher_labels="expected")


def test_ewc_loss_adds_half_lambda_times_the_fisher_weighted_distance_and_skips_new_head_rows():
    ewc = setup(EWC(ewc_lambda=10.0), [1, 2], [0, 1], [[0, 1], [2]], seen=2, batch_size=1)
    ewc.after_task(ewc.stream.tasks[0])  # F_w = 0.625, F_b = 0.25 per row (above); anchor: all zeros
    ewc.model.head.grow(3)
    with torch.no_grad():
        ewc.model.head.weight.copy_(torch.tensor([[1.0], [-2.0], [100.0]]))  # row 2 is new: not penalised
        ewc.model.head.bias.copy_(torch.tensor([0.0, 2.0, 100.0]))
    # 0.625 * (1 + 4) + 0.25 * (0 + 4) = 4.125
    assert ewc.penalty().item() == pytest.approx(4.125)
    # the batch x=2, y=2: logits (2, -2, 300) over three classes
    logits = torch.tensor([2.0, 0.0, 300.0])
    cross_entropy = torch.logsumexp(logits, 0).item() - 300.0
    batch = ewc.stream.train_x[1:], torch.tensor([2])
    loss = ewc.loss(Batch(*batch)).item()
    assert loss == pytest.approx(cross_entropy + 10.0 / 2 * 4.125, abs=1e-4)


def test_separate_ewc_keeps_one_penalty_per_task_and_online_ewc_one_decayed_sum():
    pixels, labels, tasks = [1, 2, 1], [0, 1, 2], [[0, 1], [2]]
    separate = setup(EWC(1.0, mode="separate"), pixels, labels, tasks, seen=2, batch_size=1)
    online = setup(EWC(1.0, mode="online", gamma=0.5), pixels, labels, tasks, seen=2, batch_size=1)
    for ewc in (separate, online):
        ewc.after_task(ewc.stream.tasks[0])
        ewc.model.head.grow(3)
        with torch.no_grad():
            ewc.model.head.weight.fill_(1.0)
        ewc.after_task(ewc.stream.tasks[1])
    assert len(separate.penalties) == 2 and len(online.penalties) == 1
    # task 2: the sample x=1, y=2 with logits (1, 1, 1) over three classes: p = 1/3 each,
    # d/dw = d/db = (1/3, 1/3, -2/3), squared (1/9, 1/9, 4/9)
    new = torch.tensor([1 / 9, 1 / 9, 4 / 9])
    torch.testing.assert_close(separate.penalties[1]["fisher"]["head.bias"], new)
    # online: 0.5 * (task 1's F, zero-padded for the new class) + task 2's F
    torch.testing.assert_close(
        online.penalties[0]["fisher"]["head.bias"], 0.5 * torch.tensor([0.25, 0.25, 0.0]) + new
    )
    torch.testing.assert_close(
        online.penalties[0]["fisher"]["head.weight"],
        0.5 * torch.tensor([[0.625], [0.625], [0.0]]) + new[:, None],
    )
    # one anchor, the parameters at the end of the last task
    torch.testing.assert_close(online.penalties[0]["anchor"]["head.weight"], torch.ones(3, 1))
    assert separate.penalties[0]["anchor"]["head.weight"].shape == (2, 1)
    assert math.isclose(online.penalty().item(), 0.0)


def test_ewc_state_round_trips_through_weights_only_loading(tmp_path):
    ewc = setup(EWC(1.0), [1, 2], [0, 1], [[0, 1]], seen=2, batch_size=1)
    ewc.after_task(ewc.stream.tasks[0])
    torch.save(ewc.state_dict(), tmp_path / "state.pt")
    fresh = setup(EWC(1.0), [1, 2], [0, 1], [[0, 1]], seen=2, batch_size=1)
    fresh.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    for key in ("fisher", "anchor"):
        for name, value in ewc.penalties[0][key].items():
            assert torch.equal(fresh.penalties[0][key][name], value)


def test_ewc_rejects_an_unknown_mode():
    with pytest.raises(ValueError, match="mode"):
        EWC(1.0, mode="sometimes")


def test_si_path_integral_over_a_two_step_trajectory_by_hand():
    # Plain SGD, lr 0.1, on the sample x=1, y=0 twice, from weights 0: each step moves theta by -0.1 g, so
    # the path integral -g * delta theta adds 0.1 g^2. Step 1: p = (1/2, 1/2), g_w = g_b = (-1/2, 1/2);
    # theta becomes w = b = (0.05, -0.05). Step 2: logits (0.1, -0.1), p_0 = sigmoid(0.2), g = (p_0 - 1, 1 - p_0).
    si = setup(SynapticIntelligence(c=0.5, xi=0.01), [1], [0], [[0, 1]], seen=2, batch_size=1)
    si.before_task(si.stream.tasks[0])
    optimizer = torch.optim.SGD(si.model.parameters(), lr=0.1)
    runner = StepRunner(
        optimizer,
        torch.amp.GradScaler("cpu", enabled=False),
        Hardware(torch.device("cpu"), None),
        "stop",
        str,
    )
    batch = Batch(si.stream.train_x, si.stream.train_y)
    for _ in range(2):
        si.training_step(batch, runner)
    g2 = 1 - 1 / (1 + math.exp(-0.2))
    omega = 0.1 * (0.25 + g2**2)
    torch.testing.assert_close(si.omega["head.weight"], torch.full((2, 1), omega))
    torch.testing.assert_close(si.omega["head.bias"], torch.full((2,), omega))
    # end of task: Omega = omega / (Delta^2 + xi), Delta = 0.05 + 0.1 g2 (row 0 up, row 1 down)
    si.after_task(si.stream.tasks[0])
    delta = 0.05 + 0.1 * g2
    torch.testing.assert_close(si.importance["head.bias"], torch.full((2,), omega / (delta**2 + 0.01)))
    torch.testing.assert_close(si.anchor["head.bias"], torch.tensor([delta, -delta]))
    # the penalty is zero at the anchor and c * Omega * d^2 away from it
    assert si.penalty().item() == 0.0
    with torch.no_grad():
        si.model.head.bias[0] += 0.5
    assert si.c * si.penalty().item() == pytest.approx(0.5 * omega / (delta**2 + 0.01) * 0.25, rel=1e-5)


def test_si_importance_is_clamped_at_zero_as_in_the_authors_code():
    # omega = (-0.02, 0.03) on the bias, nothing moved: Omega = omega / xi = (-0.2, 0.3), clamped to (0, 0.3).
    # Then a second task adds (0.5, -0.6) / xi = (5, -6): (0 + 5, 0.3 - 6) clamped to (5, 0).
    si = setup(SynapticIntelligence(c=1.0, xi=0.1), [1], [0], [[0, 1]], seen=2, batch_size=1)
    for omega, expected in (([-0.02, 0.03], [0.0, 0.3]), ([0.5, -0.6], [5.0, 0.0])):
        si.before_task(si.stream.tasks[0])
        si.omega["head.bias"] = torch.tensor(omega)
        si.after_task(si.stream.tasks[0])
        torch.testing.assert_close(si.importance["head.bias"], torch.tensor(expected))
    assert SynapticIntelligence().xi == 1e-3  # the paper's split-MNIST damping


def test_stiff_penalty_is_reported_before_it_diverges_without_the_limit(caplog):
    # SGD lr 0.1 (tiny_context), no momentum: stable while the curvature 2 * c * Omega stays below 2 / 0.1 = 20.
    si = setup(
        SynapticIntelligence(c=1.0, xi=0.1, curvature_limit="none"), [1], [0], [[0, 1]], seen=2, batch_size=1
    )
    si.before_task(si.stream.tasks[0])
    si.omega["head.bias"] = torch.tensor([0.9, 0.0])  # Omega 9: curvature 18, below
    with caplog.at_level("WARNING", logger="incr"):
        si.after_task(si.stream.tasks[0])
    assert not caplog.records
    si.before_task(si.stream.tasks[0])
    si.omega["head.bias"] = torch.tensor([0.2, 0.0])  # Omega 11: curvature 22, above
    with caplog.at_level("WARNING", logger="incr"):
        si.after_task(si.stream.tasks[0])
    assert "strategy.c" in caplog.text and "22" in caplog.text


def penalty_gradient(strategy, strength: float) -> Tensor:
    """d (strength * penalty) / d head.bias."""
    strategy.model.zero_grad()
    (strength * strategy.penalty()).backward()
    return strategy.model.head.bias.grad.clone()


@pytest.mark.parametrize("limit", ["sgd", "none"])
def test_curvature_limit_caps_a_huge_importance_at_what_sgd_follows(caplog, limit):
    # SGD lr 0.1, no momentum (tiny_context): the cap keeps the curvature 2 c Omega at (1 + 0) / 0.1 = 10.
    # Omega = (1e6, 2) on the bias, anchor 0, bias moved to (0.3, 0.3), c = 2: the gradient of
    # c * Omega * d^2 is 2 c Omega d = (1.2e6, 2.4) uncapped; capped, row 0's curvature is 10: 10 * 0.3 = 3.
    si = setup(SynapticIntelligence(c=2.0, curvature_limit=limit), [1], [0], [[0, 1]], seen=2, batch_size=1)
    si.before_task(si.stream.tasks[0])
    si.omega["head.bias"] = torch.tensor([1e6 * (0.0 + 1e-3), 2 * 1e-3])  # nothing moved: Omega = omega / xi
    with caplog.at_level("INFO", logger="incr"):
        si.after_task(si.stream.tasks[0])
    torch.testing.assert_close(si.importance["head.bias"], torch.tensor([1e6, 2.0]))
    with torch.no_grad():
        si.model.head.bias.fill_(0.3)
    expected = [3.0, 2.4] if limit == "sgd" else [1.2e6, 2.4]
    torch.testing.assert_close(penalty_gradient(si, si.c), torch.tensor(expected))
    assert ("1 of 4 parameters" in caplog.text) == (limit == "sgd")
    assert ("exceeds" in caplog.text) == (limit == "none")


def test_curvature_limit_follows_momentum_and_scales_every_task_of_separate_ewc_alike():
    # SGD lr 0.05, momentum 0.9: curvature cap (1 + 0.9) / 0.05 = 38 on (lambda / 2) sum_k F_k, lambda = 2.
    # Bias row 0: F_1 = 3e5, F_2 = 1e6 (sum 1.3e6), anchors 0 and 0.1, bias 0.3. Each F scaled by
    # 19 / 1.3e6 (so that (lambda / 2) * 2 * sum F = 38): gradient 2 * 19 * (3/13 * 0.3 + 10/13 * 0.2).
    # Row 1: F = 1 each, below the cap: gradient 2 * (1 * 0.3 + 1 * 0.2) = 1. Adam: no cap.
    ewc = setup(EWC(ewc_lambda=2.0), [1], [0], [[0, 1]], seen=2, batch_size=1)
    ewc.context.make_optimizer = lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)
    zero = {"head.weight": torch.zeros(2, 1)}
    ewc.penalties = [
        {
            "fisher": {"head.bias": torch.tensor([3e5, 1.0]), **zero},
            "anchor": {"head.bias": torch.zeros(2), **zero},
        },
        {
            "fisher": {"head.bias": torch.tensor([1e6, 1.0]), **zero},
            "anchor": {"head.bias": torch.full((2,), 0.1), **zero},
        },
    ]
    with torch.no_grad():
        ewc.model.head.bias.fill_(0.3)
    row0 = 2 * 19 * (3 / 13 * 0.3 + 10 / 13 * 0.2)
    torch.testing.assert_close(penalty_gradient(ewc, 1.0), torch.tensor([row0, 1.0]))
    adam = setup(EWC(ewc_lambda=2.0), [1], [0], [[0, 1]], seen=2, batch_size=1)
    adam.context.make_optimizer = lambda p: torch.optim.Adam(p, lr=0.05)
    adam.penalties = ewc.penalties
    with torch.no_grad():
        adam.model.head.bias.fill_(0.3)
    torch.testing.assert_close(penalty_gradient(adam, 1.0), torch.tensor([2 * (3e5 * 0.3 + 1e6 * 0.2), 1.0]))


def test_mas_importance_on_a_linear_model_by_hand():
    # f(x) = w x + b with w = (1, -1), b = (0.5, 0); d||f||^2/dw_c = 2 f_c x, d/db_c = 2 f_c.
    # x=1: f = (1.5, -1): dw = (3, -2), db = (3, -2). x=2: f = (2.5, -2): dw = (10, -8), db = (5, -4).
    # Mean of absolute values: dw = (6.5, 5), db = (4, 3).
    # (no curvature limit: these importances are larger than SGD at lr 0.1 follows with lambda 2)
    mas = setup(
        MemoryAwareSynapses(mas_lambda=2.0, curvature_limit="none"),
        [1, 2],
        [0, 1],
        [[0, 1], [2]],
        seen=2,
        batch_size=1,
    )
    with torch.no_grad():
        mas.model.head.weight.copy_(torch.tensor([[1.0], [-1.0]]))
        mas.model.head.bias.copy_(torch.tensor([0.5, 0.0]))
    mas.after_task(mas.stream.tasks[0])
    torch.testing.assert_close(mas.importance["head.weight"], torch.tensor([[6.5], [5.0]]))
    torch.testing.assert_close(mas.importance["head.bias"], torch.tensor([4.0, 3.0]))
    # accumulated over tasks; the grown head's new row starts with no importance
    mas.model.head.grow(3)
    mas.after_task(mas.stream.tasks[0])
    # (class 2's output is 0 here, so its rows get no importance from this task either)
    torch.testing.assert_close(mas.importance["head.bias"], torch.tensor([8.0, 6.0, 0.0]))
    torch.testing.assert_close(mas.importance["head.weight"], torch.tensor([[13.0], [10.0], [0.0]]))
    # loss = CE + lambda * sum Omega (theta - theta*)^2: move w_0 by 1
    with torch.no_grad():
        mas.model.head.weight[0] += 1.0
    assert mas.penalty().item() == pytest.approx(13.0)


# ----------------------------------------------------------------------------------------- what they protect on digits
# tests/test_regulariser_defaults.py: each with its YAML defaults against fine-tuning on the default stream.


# ----------------------------------------------------------------------------------------- mixed precision, resume
@pytest.mark.parametrize("strategy", ["online_ewc", "si", "mas"])
def test_regularisation_trains_under_mixed_precision(tmp_path, strategy):
    overrides = [f"strategy={strategy}", "hardware=amp", "epochs=1", "dataset.n_tasks=2", "optimizer.lr=0.01"]
    if (
        strategy == "online_ewc"
    ):  # the default 1e5 holds most weights in one epoch at lr 0.01: test the dtype path
        overrides.append("strategy.ewc_lambda=100")
    metrics = run_experiment(tmp_path / "run", overrides)
    assert metrics["run"]["status"] == "finished"
    assert min(row[i] for i, row in enumerate(metrics["class_il"]["accuracy_matrix"])) > 0.5


@pytest.mark.slow  # the expected Fisher makes three EWC runs take 15 s; SI's resume test stays in the quick suite
def test_ewc_resumes_exactly_after_sigterm(tmp_path):
    # step 35 of 90 is in task 2: the first task's Fisher and anchor are in the checkpoint. Split
    # Fashion-MNIST's learning rate, for which lambda 1000 is tuned (at 0.05 with momentum this run diverges
    # in task 5).
    assert_resumes_exactly(
        tmp_path, ["strategy=ewc", "epochs=2", "optimizer.lr=0.01"], fault="step:35:SIGTERM"
    )


def test_si_resumes_exactly_after_sigterm(tmp_path):
    # step 25 is in the middle of task 2: the running path integral omega is in the checkpoint
    assert_resumes_exactly(
        tmp_path, ["strategy=si", "epochs=2", "optimizer.lr=0.01"], fault="step:25:SIGTERM"
    )
