"""iCaRL: the sigmoid distillation loss and the nearest-mean-of-exemplars choice against values computed by hand,
exemplars joining the training rows, the nearest-mean classifier against iCaRL's own linear head on digits,
mixed precision, and exact resume."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import RawPixels, assert_resumes_exactly, run_experiment, tiny_context

from incr_cli.data.batches import Batch
from incr_cli.memory import Memory
from incr_cli.models.head import IncrementalNet
from incr_cli.strategies.icarl import ICaRL, ce_kd_loss, icarl_loss


def two_pixel_icarl(
    icarl: ICaRL, pixels: list[tuple[int, int]], labels: list[int], tasks: list[list[int]], flip: bool = False
):
    """`icarl` on a linear head over two raw pixels, three classes in the stream, the first task's active;
    `flip`: the data set trains with horizontal flips (which swap the two pixels)."""
    model = IncrementalNet(RawPixels(2), 3)
    model.head.grow(len(tasks[0]))
    icarl.setup(tiny_context(model, pixels, labels, tasks, batch_size=2, flip=flip))
    return icarl


# ----------------------------------------------------------------------------------------- the maths, by hand
def test_sigmoid_classification_and_distillation_loss_by_hand():
    # Three classes seen, the first two old. Binary cross-entropy -[t ln g + (1 - t) ln(1 - g)], g = sigmoid(z).
    # Sample 1, label 2 (new): logits (ln 3, 0, ln 3) -> g = (3/4, 1/2, 3/4); old logits (ln 3, 0) -> targets
    #   (3/4, 1/2) for the old classes, 1 for its own: terms -(3/4 ln 3/4 + 1/4 ln 1/4), ln 2, ln 4/3.
    # Sample 2, label 0 (an exemplar of an old class): logits (ln 3, 0, 0) -> g = (3/4, 1/2, 1/2); old logits
    #   (-ln 3, ln 3) -> targets (1/4, 3/4), not its label, and 0 for class 2: terms
    #   -(1/4 ln 3/4 + 3/4 ln 1/4), ln 2, ln 2.
    # The loss is the mean of the six terms.
    ln3 = math.log(3)
    logits = torch.tensor([[ln3, 0.0, ln3], [ln3, 0.0, 0.0]])
    old_logits = torch.tensor([[ln3, 0.0], [-ln3, ln3]])
    labels = torch.tensor([2, 0])
    terms = [
        -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)),
        math.log(2),
        math.log(4 / 3),
        -(0.25 * math.log(0.75) + 0.75 * math.log(0.25)),
        math.log(2),
        math.log(2),
    ]
    assert icarl_loss(logits, labels, old_logits).item() == pytest.approx(sum(terms) / 6, rel=1e-6)
    # Without a previous network every class takes its one-hot target: class 0 costs -ln(1/4) = ln 4 for
    # sample 1 and -ln(3/4) = ln 4/3 for sample 2; class 1's g = 1/2 costs ln 2 whatever the target.
    terms[0], terms[3] = math.log(4), math.log(4 / 3)
    assert icarl_loss(logits, labels).item() == pytest.approx(sum(terms) / 6, rel=1e-6)


def ce_kd_by_hand():
    # PyCIL's iCaRL loss. Sample 1, label 2: logits (ln 3, 0, ln 3) -> softmax (3, 1, 3) / 7, CE ln(7/3).
    # Sample 2, label 0: logits (0, 0, 0) -> CE ln 3. Mean CE (ln(7/3) + ln 3) / 2.
    # KD at T = 2 on the two old classes: sample 1's new (ln 3, 0) / 2 -> softmax (sqrt 3, 1) / (sqrt 3 + 1),
    # old (2 ln 3, 0) / 2 -> (3/4, 1/4): -[3/4 ln(sqrt 3 / (sqrt 3 + 1)) + 1/4 ln(1 / (sqrt 3 + 1))];
    # sample 2's new (0, 0) -> (1/2, 1/2), old (0, 0) -> (1/2, 1/2): ln 2. Summed over classes, batch mean.
    ln3, r3 = math.log(3), math.sqrt(3)
    logits = torch.tensor([[ln3, 0.0, ln3], [0.0, 0.0, 0.0]])
    old_logits = torch.tensor([[2 * ln3, 0.0], [0.0, 0.0]])
    ce = (math.log(7 / 3) + ln3) / 2
    kd = (-(0.75 * math.log(r3 / (r3 + 1)) + 0.25 * math.log(1 / (r3 + 1))) + math.log(2)) / 2
    return logits, torch.tensor([2, 0]), old_logits, ce, kd


def test_pycil_cross_entropy_and_distillation_loss_by_hand():
    logits, labels, old_logits, ce, kd = ce_kd_by_hand()
    assert ce_kd_loss(logits, labels, old_logits, temperature=2.0).item() == pytest.approx(ce + kd, rel=1e-6)
    assert ce_kd_loss(logits, labels).item() == pytest.approx(ce, rel=1e-6)  # the first task: no old network


def test_bce_reductions_by_hand():
    # Three classes in the stream, the first task's two being trained; the head scores (ln 3, 0, 0) for pixel
    # (1, 0) labelled 0 and (0, ln 3, 0) for (0, 1) labelled 1. Terms -[t ln g + (1 - t) ln(1 - g)]:
    # sample 1: ln 4/3, ln 2 (class 1, target 0), ln 2 (class 2, not seen yet, target 0); sample 2: ln 2,
    # ln 4/3, ln 2. mean_all (the authors' code, Mammoth, Avalanche): the mean of the six terms; mean_seen:
    # the four terms of classes 0 and 1, mean; sum_seen (the paper's sum per sample): those four / 2 samples.
    seen = [math.log(4 / 3), math.log(2), math.log(2), math.log(4 / 3)]
    expected = {
        "mean_all": (sum(seen) + 2 * math.log(2)) / 6,
        "mean_seen": sum(seen) / 4,
        "sum_seen": sum(seen) / 2,
    }
    batch = Batch(torch.tensor([[1, 0], [0, 1]], dtype=torch.uint8).reshape(2, 1, 1, 2), torch.tensor([0, 1]))
    for reduction, value in expected.items():
        icarl = ICaRL(Memory(10, "herding"), bce_reduction=reduction)
        icarl = two_pixel_icarl(icarl, [(1, 0), (0, 1), (1, 1)], [0, 1, 2], [[0, 1], [2]])
        icarl.before_task(icarl.stream.tasks[0])
        # mean_all: every class's row is in the head (a trained parameter) from the first task on
        assert icarl.model.head.n_classes == (3 if reduction == "mean_all" else 2)
        with torch.no_grad():
            rows = torch.tensor([[math.log(3), 0.0], [0.0, math.log(3)], [0.0, 0.0]])
            icarl.model.head.weight.copy_(rows[: icarl.model.head.n_classes])
            icarl.model.head.bias.zero_()
        assert icarl.loss(batch).item() == pytest.approx(value, rel=1e-6), reduction


def test_old_classes_and_pycil_loss_with_a_full_head():
    # tasks {0}, {1}, {2}: in the second task one class is old, though the mean_all head has all three rows
    icarl = two_pixel_icarl(
        ICaRL(Memory(10, "herding")), [(1, 0), (0, 1), (1, 1)], [0, 1, 2], [[0], [1], [2]]
    )
    icarl.before_task(icarl.stream.tasks[0])
    assert icarl.old_model is None
    icarl.before_task(icarl.stream.tasks[1])
    assert (icarl.old_classes, icarl.model.head.n_classes) == (1, 3)
    assert icarl.old_model is not None
    # loss=ce_kd (PyCIL): the head grows with the classes, softmax CE over them plus KD on the old ones
    logits, labels, old_logits, ce, kd = ce_kd_by_hand()
    icarl = two_pixel_icarl(
        ICaRL(Memory(10, "herding"), loss="ce_kd"), [(1, 0), (0, 1), (1, 1)], [0, 1, 2], [[0, 1], [2]]
    )
    icarl.before_task(icarl.stream.tasks[0])
    with torch.no_grad():  # the previous network: class 0 scores 2 ln 3 * pixel 1
        icarl.model.head.weight.copy_(torch.tensor([[2 * math.log(3), 0.0], [0.0, 0.0]]))
        icarl.model.head.bias.zero_()
    icarl.model.head.grow(3)
    icarl.before_task(icarl.stream.tasks[1])
    assert (icarl.old_classes, icarl.model.head.n_classes) == (2, 3)
    with torch.no_grad():  # the current one: classes 0 and 2 score ln 3 * pixel 1
        icarl.model.head.weight.copy_(torch.tensor([[math.log(3), 0.0], [0.0, 0.0], [math.log(3), 0.0]]))
        icarl.model.head.bias.zero_()
    batch = Batch(torch.tensor([[1, 0], [0, 0]], dtype=torch.uint8).reshape(2, 1, 1, 2), labels)
    assert icarl.loss(batch).item() == pytest.approx(ce + kd, rel=1e-6)


def test_nearest_mean_of_exemplars_choice_by_hand():
    # Features are the raw pixels. Class 0's exemplars (4, 0) and (0, 1) normalise to (1, 0) and (0, 1): their
    # mean (1/2, 1/2) renormalised is mu_0 = (1, 1) / sqrt 2 (the raw mean (2, 1/2) would point elsewhere).
    # Class 1's exemplar (3, 0) gives mu_1 = (1, 0). For unit vectors ||phi - mu||^2 = 2 - 2 phi . mu.
    # Test sample (1, 2): phi = (1, 2) / sqrt 5; phi . mu_0 = 3 / sqrt 10, phi . mu_1 = 1 / sqrt 5, so the
    # distances are 0.320364 (class 0) and 1.051462 (class 1): class 0. (2, 4) is the same point after phi.
    # Test sample (5, 1): phi . mu_0 = 6 / sqrt 52, phi . mu_1 = 5 / sqrt 26: class 1.
    icarl = two_pixel_icarl(ICaRL(Memory(10, "herding")), [(4, 0), (0, 1), (3, 0)], [0, 0, 1], [[0, 1], [2]])
    icarl.after_task(icarl.stream.tasks[0])
    torch.testing.assert_close(
        icarl.class_means, torch.tensor([[1.0, 1.0], [1.0, 0.0]]) / torch.tensor([[2**0.5], [1.0]])
    )
    with torch.no_grad():  # a linear head that prefers class 1 everywhere, and class 2 most of all
        icarl.model.head.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
        icarl.model.head.bias.zero_()
        icarl.model.head.future_weight[2] = torch.tensor([2.0, 2.0])
        icarl.model.head.future_bias.zero_()
    x = torch.tensor([[1.0, 2.0], [2.0, 4.0], [5.0, 1.0]]).reshape(-1, 1, 1, 2)
    scores = icarl.predict(x)

    def distance(dot: float) -> float:
        return math.sqrt(2 - 2 * dot)

    expected = [[distance(3 / 10**0.5), distance(1 / 5**0.5)]] * 2 + [
        [distance(6 / 52**0.5), distance(5 / 26**0.5)]
    ]
    torch.testing.assert_close(scores[:, :2], -torch.tensor(expected))
    assert scores[:, :2].argmax(1).tolist() == [0, 0, 1]
    # class 2 is not seen yet: it keeps the linear head's score (task-IL accuracy of future tasks)
    torch.testing.assert_close(scores[:, 2], torch.tensor([6.0, 12.0, 12.0]))
    # the same network with classifier=linear scores by the head
    icarl.classifier = "linear"
    assert icarl.predict(x)[:, :2].argmax(1).tolist() == [1, 1, 1]


def test_class_means_average_each_exemplar_with_its_mirror_image_when_the_data_set_flips():
    # Flipping a 1x2 image swaps its pixels. Class 0: (4, 0) and (0, 1) with mirrors (0, 4) and (1, 0): phi
    # (1, 0), (0, 1) each averaged with its mirror gives (1/2, 1/2) twice, mu_0 = (1, 1) / sqrt 2 as without
    # flips. Class 1: (3, 0) -> ((1, 0) + (0, 1)) / 2, mu_1 = (1, 1) / sqrt 2, where it was (1, 0).
    pixels, labels = [(4, 0), (0, 1), (3, 0)], [0, 0, 1]
    icarl = two_pixel_icarl(ICaRL(Memory(10, "herding")), pixels, labels, [[0, 1], [2]], flip=True)
    icarl.after_task(icarl.stream.tasks[0])
    torch.testing.assert_close(icarl.class_means, torch.full((2, 2), 2**-0.5))
    # flip_means: never (the paper, PyCIL) keeps plain features; always (Mammoth) flips without training flips
    never = ICaRL(Memory(10, "herding"), flip_means="never")
    never = two_pixel_icarl(never, pixels, labels, [[0, 1], [2]], flip=True)
    never.after_task(never.stream.tasks[0])
    torch.testing.assert_close(never.class_means[1], torch.tensor([1.0, 0.0]))
    always = ICaRL(Memory(10, "herding"), flip_means="always")
    always = two_pixel_icarl(always, pixels, labels, [[0, 1], [2]], flip=False)
    always.after_task(always.stream.tasks[0])
    torch.testing.assert_close(always.class_means, torch.full((2, 2), 2**-0.5))


def test_exemplars_join_the_next_tasks_training_rows():
    pixels, labels = [(1, 0), (2, 0), (0, 1), (0, 2), (3, 3), (4, 4)], [0, 0, 1, 1, 2, 2]
    icarl = two_pixel_icarl(ICaRL(Memory(2, "herding")), pixels, labels, [[0, 1], [2]])
    icarl.after_task(icarl.stream.tasks[0])  # one exemplar per class
    assert sorted(icarl.memory.y.tolist()) == [0, 1]
    rows = icarl.training_indices(icarl.stream.tasks[1])
    assert rows[:2].tolist() == [4, 5]  # the task's own rows, then the exemplars' rows in the stream
    assert torch.equal(icarl.stream.train_x[rows[2:]], icarl.memory.x)
    assert torch.equal(icarl.stream.train_y[rows[2:]], icarl.memory.y)


def test_icarl_rejects_bad_values():
    with pytest.raises(ValueError, match="classifier"):
        ICaRL(Memory(10, "herding"), classifier="knn")
    with pytest.raises(ValueError, match="memory.size"):
        ICaRL(Memory(0, "herding"))
    for option in ("loss", "bce_reduction", "flip_means"):
        with pytest.raises(ValueError, match=option):
            ICaRL(Memory(10, "herding"), **{option: "other"})


# ----------------------------------------------------------------------------------------- what it is for, on digits
def test_nearest_mean_classifier_beats_icarls_own_linear_head_on_old_classes_on_digits(tmp_path):
    # Digits default (5 tasks, 10 epochs), memory 200 herding, bce_reduction mean_all. Class-IL accuracy after
    # the last task on the four old tasks (mean) and on the last one, NME / linear head of the same network:
    # seed 0: old 0.865 / 0.667, last 0.704 / 0.437; seed 1: old 0.872 / 0.611, last 0.761 / 0.423. The head
    # learns old classes' scores from the old network's sigmoid outputs on new images, which stay high; the
    # class means do not depend on the head.
    settings = ["strategy=icarl", "hardware=cpu", "hardware.num_threads=1", "seed=0"]
    nme = run_experiment(tmp_path / "nme", [*settings, "strategy.classifier=nme"])
    linear = run_experiment(tmp_path / "linear", [*settings, "strategy.classifier=linear"])

    def old_classes_accuracy(metrics: dict) -> float:
        final = metrics["class_il"]["accuracy_matrix"][-1]
        return sum(final[:-1]) / len(final[:-1])

    assert old_classes_accuracy(nme) > old_classes_accuracy(linear) + 0.1
    # the classifier only changes evaluation: both runs trained the same network
    weights = [
        torch.load(tmp_path / run / "checkpoints" / "last.pt", weights_only=True)["model"]
        for run in ("nme", "linear")
    ]
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])


# ----------------------------------------------------------------------------------------- mixed precision, resume
def test_icarl_trains_under_mixed_precision(tmp_path):
    metrics = run_experiment(
        tmp_path / "run", ["strategy=icarl", "hardware=amp", "epochs=1", "dataset.n_tasks=2"]
    )
    assert metrics["run"]["status"] == "finished"
    assert min(row[i] for i, row in enumerate(metrics["class_il"]["accuracy_matrix"])) > 0.5


def test_icarl_resumes_exactly_after_sigterm(tmp_path):
    # step 25 is in task 2 (task 1: 2 epochs of 9 steps): the exemplars (the rows task 2 iterates over), the
    # frozen task-1 network and the class means must come back from the checkpoint
    assert_resumes_exactly(tmp_path, ["strategy=icarl", "epochs=2"], fault="step:25:SIGTERM")
