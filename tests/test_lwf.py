"""Learning without Forgetting: the distillation term and its weight against values computed by hand, what
it achieves on digits, mixed precision, and exact resume."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import RawPixels, assert_resumes_exactly, run_experiment, tiny_context

from incr_cli.data.batches import Batch
from incr_cli.models.head import IncrementalNet
from incr_cli.strategies.common.distillation import distillation_loss
from incr_cli.strategies.lwf import LearningWithoutForgetting


def test_distillation_loss_by_hand():
    # Two samples, two old classes, T = 2.
    # Sample 1: new logits (0, 0) -> softmax((0, 0) / 2) = (1/2, 1/2);
    #           old logits (2 ln 3, 0) -> softmax((ln 3, 0)) = (3/4, 1/4);
    #           KL(old || new) = 3/4 ln(3/4 / 1/2) + 1/4 ln(1/4 / 1/2) = 3/4 ln(3/2) - 1/4 ln 2 = 0.130812.
    # Sample 2: the same logits (1, 3) in both models: KL = 0.
    # Batch mean (0.130812 + 0) / 2 = 0.065406; with temperature_scaling, times T^2 = 4: 0.261624.
    new = torch.tensor([[0.0, 0.0], [1.0, 3.0]])
    old = torch.tensor([[2 * math.log(3), 0.0], [1.0, 3.0]])
    kl = (0.75 * math.log(1.5) - 0.25 * math.log(2)) / 2
    assert kl == pytest.approx(0.065406, abs=1e-6)
    assert distillation_loss(new, old, temperature=2.0).item() == pytest.approx(kl, rel=1e-6)
    scaled = distillation_loss(new, old, temperature=2.0, temperature_scaling=True).item()
    assert scaled == pytest.approx(4 * kl, rel=1e-6)
    assert distillation_loss(old, old, temperature=2.0).item() == pytest.approx(0.0, abs=1e-6)


def two_pixel_lwf(lwf: LearningWithoutForgetting) -> LearningWithoutForgetting:
    """`lwf` in its second task (class 2) on a linear head over two raw pixels: the previous network scores
    class 0 by 2 ln 3 * pixel 1 (class 1: 0), the current one scores 0 everywhere."""
    model = IncrementalNet(RawPixels(2), 3)
    model.head.grow(2)
    lwf.setup(tiny_context(model, [(1, 0), (0, 1), (1, 1)], [0, 1, 2], [[0, 1], [2]], batch_size=2))
    lwf.before_task(lwf.stream.tasks[0])
    with torch.no_grad():
        model.head.weight.copy_(torch.tensor([[2 * math.log(3), 0.0], [0.0, 0.0]]))
        model.head.bias.zero_()
    model.head.grow(3)
    lwf.before_task(lwf.stream.tasks[1])
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
    return lwf


def test_lwf_loss_weighs_the_distillation_by_alpha_alone_by_default():
    # Batch: (1, 0) labelled 2 and (0, 1) labelled 0. The current logits are 0: cross-entropy ln 3 each.
    # Old classes 0 and 1: sample 1's old logits (2 ln 3, 0) against (0, 0), KL 3/4 ln(3/2) - 1/4 ln 2 at T = 2
    # (see above); sample 2's (0, 0) against (0, 0), KL 0. Li and Hoiem's loss, as Avalanche's and
    # Mammoth's: ln 3 + alpha * KL batch mean, no T^2 (which would make it ln 3 + 4 * alpha * KL).
    kl = (0.75 * math.log(1.5) - 0.25 * math.log(2)) / 2
    batch = Batch(torch.tensor([[1, 0], [0, 1]], dtype=torch.uint8).reshape(2, 1, 1, 2), torch.tensor([2, 0]))
    lwf = two_pixel_lwf(LearningWithoutForgetting(alpha=0.5))
    assert lwf.old_classes == 2
    assert lwf.loss(batch).item() == pytest.approx(math.log(3) + 0.5 * kl, rel=1e-6)
    lwf = two_pixel_lwf(LearningWithoutForgetting(alpha=0.5, temperature_scaling=True))
    assert lwf.loss(batch).item() == pytest.approx(math.log(3) + 0.5 * 4 * kl, rel=1e-6)


def test_lwf_alpha_list_gives_each_task_its_weight():
    # Avalanche's LwF: alpha[i] weighs the distillation while training task i (alpha[0]: nothing to distil)
    lwf = two_pixel_lwf(LearningWithoutForgetting(alpha=[7.0, 0.25]))
    assert lwf.alpha == 0.25
    assert LearningWithoutForgetting(alpha=3).alpha == 3.0
    restored = LearningWithoutForgetting(alpha=[7.0, 0.25])
    restored.setup(lwf.context)
    restored.load_state_dict(lwf.state_dict())
    assert restored.alpha == 0.25
    lwf = LearningWithoutForgetting(alpha=[1.0])
    lwf.setup(two_pixel_lwf(LearningWithoutForgetting()).context)
    with pytest.raises(ValueError, match="no.*task 2|none for task 2"):
        lwf.before_task(lwf.stream.tasks[1])
    with pytest.raises(ValueError, match="alpha"):
        LearningWithoutForgetting(alpha=[1.0, -1.0])


def test_lwf_forgets_less_than_finetune_in_task_il_on_digits(tmp_path):
    # Digits default (5 tasks, 10 epochs), alpha 1, T 2, no T^2. Task-IL final average accuracy / forgetting:
    # seed 0: LwF 0.672 / 0.406, finetune 0.611 / 0.486; seed 1: LwF 0.647 / 0.438, finetune 0.608 / 0.486.
    # In class-IL both stay near 0.2.
    settings = ["hardware=cpu", "hardware.num_threads=1", "seed=0"]
    finetune = run_experiment(tmp_path / "finetune", ["strategy=finetune", *settings])["task_il"]
    lwf = run_experiment(tmp_path / "lwf", ["strategy=lwf", *settings])["task_il"]
    assert lwf["final_average_accuracy"] > finetune["final_average_accuracy"] + 0.02
    assert lwf["average_forgetting"] < finetune["average_forgetting"] - 0.03


def test_lwf_trains_under_mixed_precision(tmp_path):
    metrics = run_experiment(
        tmp_path / "run", ["strategy=lwf", "hardware=amp", "epochs=1", "dataset.n_tasks=2"]
    )
    assert metrics["run"]["status"] == "finished"
    assert min(row[i] for i, row in enumerate(metrics["class_il"]["accuracy_matrix"])) > 0.5


def test_lwf_resumes_exactly_after_sigterm(tmp_path):
    # step 35 of 90 is in task 2: the frozen copy of the task-1 network must come back from the checkpoint
    assert_resumes_exactly(tmp_path, ["strategy=lwf", "epochs=2"], fault="step:35:SIGTERM")
