"""FOSTER: the class-balanced weights, the logit-adjusted cross-entropy and the (balanced) distillation by hand,
the compression's own optimizer and schedule, which model ends the task (teacher or student), weight aligning,
what it achieves on digits, mixed precision, and exact resume mid-boosting and with a student held."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_resumes_exactly, cpu_context, run_experiment
from omegaconf import OmegaConf
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from incr_cli.data.batches import Batch
from incr_cli.data.stream import Stream, Task
from incr_cli.memory import Memory
from incr_cli.models.head import IncrementalNet
from incr_cli.strategies.foster import (
    FeatureBoostingAndCompression,
    class_balanced_weights,
    distillation,
    foster_weight_align,
    logit_adjusted_cross_entropy,
)


# ----------------------------------------------------------------------------------------- the maths, by hand
def test_class_balanced_weights_by_hand():
    # counts (1, 3), beta 1/2: (1 - beta) / (1 - beta^n) = (1/2) / (1/2) = 1 and (1/2) / (7/8) = 4/7;
    # their sum 11/7 scaled to the number of classes, 2: (14/11, 8/11). The rarer class weighs more.
    weights = class_balanced_weights(torch.tensor([1, 3]), beta=0.5)
    assert weights.tolist() == pytest.approx([14 / 11, 8 / 11], rel=1e-6)
    # a class without samples counts as one sample instead of dividing by zero
    assert class_balanced_weights(torch.tensor([0, 3]), beta=0.5).tolist() == pytest.approx([14 / 11, 8 / 11])


def test_logit_adjusted_cross_entropy_by_hand():
    # logits (2, 1), label 0, weights (2, 1/2): the logits divided by the weights are (1, 2), so
    # CE = -log(e^1 / (e^1 + e^2)) = log(1 + e) = 1.313262, against log(1 + e^-1) = 0.313262 unadjusted:
    # the under-represented class 0 (the larger weight) must reach a larger raw logit to be as confident.
    logits, y = torch.tensor([[2.0, 1.0]]), torch.tensor([0])
    loss = logit_adjusted_cross_entropy(logits, y, torch.tensor([2.0, 0.5]))
    assert math.log(1 + math.e) == pytest.approx(1.313262, abs=1e-6)
    assert loss.item() == pytest.approx(math.log(1 + math.e), rel=1e-6)
    assert logit_adjusted_cross_entropy(logits, y, torch.ones(2)).item() == pytest.approx(
        math.log(1 + math.exp(-1))
    )


def test_distillation_and_balanced_distillation_by_hand():
    # T = 2. Sample 1: teacher logits (0, 0) -> q = (1/2, 1/2); student (2 ln 3, 0) -> softmax((ln 3, 0)) = (3/4, 1/4).
    #   KL(q || p) = 1/2 ln((1/2) / (3/4)) + 1/2 ln((1/2) / (1/4)) = 1/2 ln(4/3) = 0.143841.
    #   Balanced with weights (3, 1): q_w = (3/2, 1/2) / 2 = (3/4, 1/4) = p, so KL = 0.
    # Sample 2: teacher and student both (1, 3): KL = 0 either way. Batch mean: 0.143841 / 2 = 0.071921.
    student = torch.tensor([[2 * math.log(3), 0.0], [1.0, 3.0]])
    teacher = torch.tensor([[0.0, 0.0], [1.0, 3.0]])
    expected = 0.5 * math.log(4 / 3) / 2
    assert expected == pytest.approx(0.071921, abs=1e-6)
    assert distillation(student, teacher, temperature=2.0).item() == pytest.approx(expected, rel=1e-6)
    balanced = distillation(student, teacher, temperature=2.0, class_weights=torch.tensor([3.0, 1.0]))
    # sample 2 under weights (3, 1): q = softmax((1/2, 3/2)) re-weighted is no longer p, so compute it:
    # q = (1, e) / (1 + e) -> (3, e) / (3 + e); p = (1, e) / (1 + e).
    e = math.e
    q, p = (3 / (3 + e), e / (3 + e)), (1 / (1 + e), e / (1 + e))
    second = sum(qi * math.log(qi / pi) for qi, pi in zip(q, p, strict=True))
    assert balanced.item() == pytest.approx((0.0 + second) / 2, rel=1e-5)


def test_foster_weight_align_by_hand():
    # old row (3, 4): norm 5; new rows (1, 0), (0, 2): mean norm 3/2; WA's gamma = 5 / (3/2) = 10/3. PyCIL's
    # FOSTER multiplies it by wa_value^(n_old / n_new) = 0.25^(1/2) = 1/2: the new rows become x 5/3.
    weight = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])
    foster_weight_align(weight, n_old=1, value=0.25)
    assert weight.tolist() == [[3.0, 4.0], [pytest.approx(5 / 3), 0.0], [0.0, pytest.approx(10 / 3)]]
    weight = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])
    foster_weight_align(weight, n_old=1, value=1.0)  # plain WA: the new rows' mean norm becomes 5
    assert weight[1:].norm(dim=1).mean().item() == pytest.approx(5.0)


# ----------------------------------------------------------------------------------------- one task, by hand
class TinyExtractor(nn.Module):
    """Features of a 1x1x2 image: a linear map with batch norm, so train/eval modes matter."""

    feature_dim = 2

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 2)
        self.norm = nn.BatchNorm1d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.linear(x.flatten(1)))


def tiny_foster(**options) -> FeatureBoostingAndCompression:
    """FOSTER on a TinyExtractor, classes [0, 1], [2], [3] (8 training samples each), no memory, one batch
    per epoch; the run's optimizer (SGD lr 0.05, weight decay 5e-4) is not the compression's."""
    torch.manual_seed(0)
    model = IncrementalNet(TinyExtractor(), 4)
    dataset = OmegaConf.create(
        {
            "input_shape": [1, 1, 2],
            "normalize": False,
            "mean": [0.0],
            "std": [1.0],
            "augment": {"crop_padding": 0, "horizontal_flip": False, "rotation_degrees": 0.0},
        }
    )
    train_y = torch.arange(4).repeat_interleave(8)
    train_x = torch.randint(0, 2, (32, 1, 1, 2), dtype=torch.uint8)
    empty = torch.zeros(0, dtype=torch.long)
    rows = [torch.nonzero(torch.isin(train_y, torch.tensor(c))).flatten() for c in ([0, 1], [2], [3])]
    tasks = [
        Task(i, c, r, empty, empty) for i, (c, r) in enumerate(zip([[0, 1], [2], [3]], rows, strict=True))
    ]
    stream = Stream(
        train_x, train_y, train_x, train_y, tasks, [0, 1, 2, 3], ["0", "1", "2", "3"], max_value=1
    )
    run_optimizer = lambda p: torch.optim.SGD(p, lr=0.05, weight_decay=5e-4)  # noqa: E731
    context = cpu_context(model, stream, dataset, batch_size=64, optimizer=run_optimizer)
    strategy = FeatureBoostingAndCompression(Memory(size=0, selection="herding"), **options)
    strategy.setup(context)
    model.head.grow(2)
    strategy.before_task(tasks[0])
    strategy.after_task(tasks[0])
    model.head.grow(3)  # the engine grows the head before before_task
    strategy.before_task(tasks[1])
    return strategy


def recorded_steps(strategy: FeatureBoostingAndCompression, task: Task) -> list[dict]:
    """The hyper-parameters of every optimizer step that `after_task` takes (the compression's)."""
    steps = []

    def record(optimizer, args, kwargs):
        group = optimizer.param_groups[0]
        steps.append({k: group[k] for k in ("lr", "momentum", "weight_decay")})

    handle = register_optimizer_step_pre_hook(record)
    try:
        strategy.after_task(task)
    finally:
        handle.remove()
    return steps


def test_compression_uses_sgd_without_weight_decay_on_a_cosine_schedule():
    # PyCIL's _feature_compression: SGD(lr 0.1, momentum 0.9), no weight decay, CosineAnnealingLR over the
    # compression epochs, stepped per epoch: lr_e = 0.1 (1 + cos(pi e / 4)) / 2 for e = 0..3, one step each.
    strategy = tiny_foster(compression_epochs=4)
    steps = recorded_steps(strategy, strategy.stream.tasks[1])
    expected = [0.1 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)]
    assert expected == pytest.approx([0.1, 0.0853553, 0.05, 0.0146447], abs=1e-7)
    assert [s["lr"] for s in steps] == pytest.approx(expected, rel=1e-9)
    assert all(s["weight_decay"] == 0 and s["momentum"] == 0.9 for s in steps)


def test_compression_lr_is_an_option():
    strategy = tiny_foster(compression_epochs=1, compression_lr=0.02)
    assert [s["lr"] for s in recorded_steps(strategy, strategy.stream.tasks[1])] == [0.02]


def test_beta1_may_be_given_per_task():
    # the authors' CIFAR-100 B0 configs list one beta1 per task after the first; task 2 takes the first
    strategy = tiny_foster(beta1=[0.5, 0.9], compression_epochs=1)
    counts = torch.tensor([0, 0, 8])  # task 2's training set: class 2 only (no memory)
    assert torch.equal(strategy.boosting_weights, class_balanced_weights(counts, 0.5))
    assert strategy.beta1(strategy.stream.tasks[2]) == 0.9


def test_teacher_ends_the_task_and_the_student_takes_over_at_the_next_one():
    # PyCIL and the authors' code evaluate and pick exemplars with the boosted model (self._network), and
    # only set self._network = self._snet when the next task begins.
    strategy = tiny_foster(compression_epochs=2)
    model, tasks = strategy.model, strategy.stream.tasks
    x = strategy.context.preprocess(strategy.stream.train_x)
    model.eval()
    with torch.no_grad():
        boosted = model(x)
    teacher_backbone = model.backbone
    strategy.after_task(tasks[1])
    model.eval()
    assert model.backbone is teacher_backbone and len(model.backbone) == 2
    with torch.no_grad():
        assert torch.equal(model(x), boosted)  # compression leaves the teacher as it was
    student = strategy.student
    assert student is not None and len(student["backbone"]) == 1
    student_extractor = {k: v.clone() for k, v in student["backbone"].extractors[0].state_dict().items()}
    student_rows = student["head"].weight.detach().clone()
    assert not torch.equal(student_extractor["linear.weight"], teacher_backbone.extractors[0].linear.weight)
    # the next task boosts from the student: its extractor is F_old, the student's head the old model's
    model.head.grow(4)
    strategy.before_task(tasks[2])
    assert strategy.student is None and len(model.backbone) == 2
    for key, value in model.backbone.extractors[0].state_dict().items():
        assert torch.equal(value, student_extractor[key])
    assert torch.equal(strategy.old_head.weight, student_rows)
    assert model.head.n_classes == 4


def test_student_option_ends_the_task_with_the_compressed_model():
    strategy = tiny_foster(compression_epochs=2, evaluated_model="student")
    strategy.after_task(strategy.stream.tasks[1])
    assert strategy.student is None and len(strategy.model.backbone) == 1
    assert strategy.model.head.n_classes == 3 and strategy.model.head.in_features == 2


def test_compression_steps_run_through_the_engine_step_runner_under_mixed_precision(monkeypatch):
    # The compression copies the runner of the task's steps (precision, loss scaler, non-finite policy):
    # its loss is computed under the run's bf16 autocast, as the boosting's is.
    from incr_cli import step
    from incr_cli.strategies import foster

    strategy = tiny_foster(compression_epochs=1)
    hardware = step.Hardware(torch.device("cpu"), torch.bfloat16)
    optimizer = strategy.context.make_optimizer(strategy.model.parameters())
    runner = step.StepRunner(optimizer, hardware.grad_scaler(), hardware, "stop", lambda: "test")
    strategy.training_step(Batch(strategy.stream.train_x[:4], strategy.stream.train_y[:4] + 2), runner)
    autocast = []

    def recording(student, teacher, temperature, class_weights=None):
        autocast.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return distillation(student, teacher, temperature, class_weights)

    monkeypatch.setattr(foster, "distillation", recording)
    strategy.after_task(strategy.stream.tasks[1])
    assert autocast == [(True, torch.bfloat16)]


def test_teacher_weight_align_scales_the_boosted_heads_new_rows_before_compression():
    strategy = tiny_foster(compression_epochs=1, teacher_weight_align=True)
    weight = strategy.model.head.weight
    with torch.no_grad():
        weight.copy_(torch.tensor([[3.0, 4.0, 0, 0], [0, 0, 3, 4], [1.0, 0, 0, 0]]))
    strategy.after_task(strategy.stream.tasks[1])
    assert strategy.model.head.weight[2].tolist() == pytest.approx([5.0, 0, 0, 0])  # gamma = 5 / 1


# ----------------------------------------------------------------------------------------- digits
def test_foster_beats_finetune_in_class_il_on_digits(tmp_path):
    # Digits, 5 tasks, 3 epochs of boosting and 3 of compression, memory 200 (herding).
    settings = ["hardware=cpu", "hardware.num_threads=1", "seed=0", "epochs=3"]
    finetune = run_experiment(tmp_path / "finetune", ["strategy=finetune", *settings])
    foster = run_experiment(tmp_path / "foster", ["strategy=foster", *settings])
    assert foster["class_il"]["final_average_accuracy"] > finetune["class_il"]["final_average_accuracy"] + 0.5
    # evaluated_model=teacher: from task 2 on, each task ends with the boosted model of two MLP extractors
    # (64*256 + 256 + 256*256 + 256 = 82,432 parameters each) and a head of 2k classes over 512 features
    extractor = 64 * 256 + 256 + 256 * 256 + 256
    expected = [extractor + 2 * 256 + 2] + [2 * extractor + 2 * k * 512 + 2 * k for k in range(2, 6)]
    assert [row["parameters"] for row in foster["per_task"]] == expected


def test_foster_student_option_keeps_one_extractor_on_digits(tmp_path):
    # evaluated_model=student: compressed back to one extractor after every task, finetune's network
    settings = ["hardware=cpu", "hardware.num_threads=1", "seed=0", "epochs=2", "dataset.n_tasks=2"]
    finetune = run_experiment(tmp_path / "finetune", ["strategy=finetune", *settings])
    foster = run_experiment(
        tmp_path / "foster", ["strategy=foster", "strategy.evaluated_model=student", *settings]
    )
    assert foster["class_il"]["final_average_accuracy"] > finetune["class_il"]["final_average_accuracy"] + 0.3
    for key in ("parameters", "model_bytes"):
        assert [row[key] for row in foster["per_task"]] == [row[key] for row in finetune["per_task"]]


def test_foster_trains_under_mixed_precision(tmp_path):
    metrics = run_experiment(
        tmp_path / "run", ["strategy=foster", "hardware=amp", "epochs=2", "dataset.n_tasks=2"]
    )
    assert metrics["run"]["status"] == "finished"
    assert metrics["class_il"]["final_average_accuracy"] > 0.7  # measured 0.872 (bf16 autocast on CPU)


def test_foster_resumes_exactly_after_sigterm_while_boosting_task_2(tmp_path):
    # 9 steps per epoch in task 1, 16 in task 2 (288 samples + 200 in memory): step 30 is in task 2's
    # boosting. The second extractor, widened head, new extractor's classifier, the old head and the class
    # weights must come back, and the compression that follows must then match the uninterrupted run.
    assert_resumes_exactly(tmp_path, ["strategy=foster", "epochs=2"], fault="step:30:SIGTERM")


def test_foster_resumes_exactly_between_tasks_with_the_student_held(tmp_path):
    # Stopped after task 2's checkpoint: the model is task 2's teacher (two extractors) and the student waits
    # in the strategy's state; it must come back to take over at task 3.
    assert_resumes_exactly(
        tmp_path,
        ["strategy=foster", "epochs=2", "dataset.n_tasks=3", "dataset.initial_classes=4"],
        fault="task_end:2:SIGTERM",
    )
