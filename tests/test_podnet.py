"""PODNet: POD-spatial and POD-flat distances, the local similarity classifier and the NCA loss against values
computed by hand, the frozen old proxies, the class-balanced finetuning stage, what the POD terms achieve on
digits, mixed precision, and exact resume."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_resumes_exactly, cpu_context, run_experiment
from omegaconf import OmegaConf

from incr_cli.data.batches import Batch
from incr_cli.data.stream import Stream, Task
from incr_cli.memory import Memory
from incr_cli.models.head import IncrementalNet
from incr_cli.models.mlp import MLP
from incr_cli.models.resnet import ResNet32
from incr_cli.step import Hardware, StepRunner
from incr_cli.strategies.cosine import embed, embedding_distillation
from incr_cli.strategies.podnet import PODNet, local_similarity, nca_loss, pod_spatial


def test_pod_spatial_distance_by_hand():
    # Stage 1, 1x2x2 maps. Sample A: current h = [[1, 1], [0, 0]]: squared, summed over the width (per row):
    # (2, 0), over the height (per column): (1, 1) -> (2, 0, 1, 1) / sqrt(6). Previous h* = [[1, 0], [1, 0]]:
    # rows (1, 1), columns (2, 0) -> (1, 1, 2, 0) / sqrt(6). Difference (1, -1, -1, 1) / sqrt(6): norm
    # sqrt(2/3). Sample B: the same map before and after: 0. Batch mean sqrt(2/3) / 2.
    # Stage 2, vectors (an MLP layer, nothing to pool). Sample A: (1, 0) squared and normalised (1, 0);
    # (0, -2) -> (0, 4) -> (0, 1): norm sqrt(2). Sample B: (1, 0) against (2, 0), both (1, 0): 0. Batch mean
    # sqrt(2) / 2. The authors' code and PyCIL: the mean over the two stages, (sqrt(2/3) + sqrt(2)) / 4.
    a, b = [[1.0, 1.0], [0.0, 0.0]], [[1.0, 0.0], [1.0, 0.0]]
    maps = [torch.tensor([[a], [b]]), torch.tensor([[1.0, 0.0], [1.0, 0.0]])]
    old_maps = [torch.tensor([[b], [b]]), torch.tensor([[0.0, -2.0], [2.0, 0.0]])]
    expected = (math.sqrt(2 / 3) + math.sqrt(2)) / 4
    assert pod_spatial(maps, old_maps).item() == pytest.approx(expected, rel=1e-6)
    # pod_distance=squared: (2/3 / 2 + 2 / 2) / 2 = 2/3
    assert pod_spatial(maps, old_maps, "squared").item() == pytest.approx(2 / 3, rel=1e-6)
    # squared activations: the sign of a unit does not count, and normalised: nor does the maps' scale
    assert pod_spatial([-m for m in maps], maps).item() == pytest.approx(0.0, abs=1e-6)
    assert pod_spatial([3 * m for m in maps], maps).item() == pytest.approx(0.0, abs=1e-6)
    # where the two networks agree exactly, the gradient is 0, not 0 / 0
    current = [m.clone().requires_grad_() for m in maps]
    pod_spatial(current, maps).backward()
    assert all(torch.equal(m.grad, torch.zeros_like(m)) for m in current)


def test_pod_flat_distance_by_hand():
    # 1 - cos: (3, 4) against (4, 3): 1 - 24 / 25 = 0.04; (1, 0) against (0, 5): 1. Batch mean: 0.52.
    new, old = torch.tensor([[3.0, 4.0], [1.0, 0.0]]), torch.tensor([[4.0, 3.0], [0.0, 5.0]])
    assert embedding_distillation(new, old).item() == pytest.approx(0.52)


def test_local_similarity_classifier_by_hand():
    # h = (1, 0), two proxies per class. Class 0: (1, 0) and (0, 1) -> cosines (1, 0), weights softmax(1, 0)
    # = (e, 1) / (e + 1): s_0 = e / (e + 1) = 0.731059. Class 1: (-1, 0) and (0, -3) -> cosines (-1, 0),
    # weights (1, e) / (1 + e): s_1 = -1 / (1 + e) = -0.268941.
    proxies = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -3.0]])
    scores = local_similarity(torch.tensor([[1.0, 0.0]]), proxies, per_class=2)
    torch.testing.assert_close(scores, torch.tensor([[math.e / (math.e + 1), -1 / (1 + math.e)]]))


def test_nca_loss_by_hand():
    # eta = 2, delta = 0.6. Sample 1, class 0, similarities (0.5, 0.2, -0.1):
    # -log(exp(2 (0.5 - 0.6)) / (exp(0.4) + exp(-0.2))) = log(1.491825 + 0.818731) + 0.2 = 1.037488.
    # Sample 2, class 0, (0.9, -1, -1): log(2 exp(-2)) - 2 * 0.3 = ln 2 - 2.6 < 0: the hinge gives 0.
    # Batch mean: 1.037488 / 2.
    similarities = torch.tensor([[0.5, 0.2, -0.1], [0.9, -1.0, -1.0]])
    first = math.log(math.exp(0.4) + math.exp(-0.2)) + 0.2
    assert first == pytest.approx(1.037488, abs=1e-6)
    loss = nca_loss(similarities, torch.tensor([0, 0]), scale=2.0, margin=0.6)
    assert loss.item() == pytest.approx(first / 2, rel=1e-6)


def test_pod_spatial_distils_the_end_of_every_resnet_stage():
    # ResNet-32: three stages of five blocks; their last blocks are 4, 9 and 14
    backbone = ResNet32((3, 32, 32))
    assert backbone.stage_modules() == [backbone.stages[4], backbone.stages[9], backbone.stages[14]]


def test_pod_spatial_takes_the_last_resnet_stage_before_its_relu():
    # The authors' ResNet ends without a ReLU: its last attention map, as the embedding, is the residual sum
    torch.manual_seed(0)
    backbone = ResNet32((3, 8, 8), width=4).eval()
    with torch.no_grad():
        stages, features = embed(backbone, torch.randn(2, 3, 8, 8), backbone.stage_modules())
    assert len(stages) == 3
    assert (stages[0] >= 0).all() and (stages[1] >= 0).all()
    assert (stages[2] < 0).any() and (features < 0).any()
    torch.testing.assert_close(features, stages[2].mean((2, 3)))


def podnet_after_first_task(**options) -> PODNet:
    """PODNet on a 2-4 MLP over 1x1x2 images: classes 0 and 1, then class 2, four images each; its first task
    ended (a herding memory of 4 filled) and its second begun."""
    x = torch.tensor(
        [[9, 1], [8, 2], [9, 3], [7, 1], [1, 9], [2, 8], [3, 9], [1, 7], [6, 6], [5, 7], [7, 5], [6, 5]],
        dtype=torch.uint8,
    ).view(12, 2, 1, 1)
    y = torch.arange(3).repeat_interleave(4)
    empty = torch.zeros(0, dtype=torch.long)
    tasks = [Task(0, [0, 1], torch.arange(8), empty, empty), Task(1, [2], torch.arange(8, 12), empty, empty)]
    stream = Stream(x, y, x[:0], empty, tasks, [0, 1, 2], ["0", "1", "2"], max_value=10)
    dataset = OmegaConf.create(
        {
            "input_shape": [2, 1, 1],
            "normalize": False,
            "mean": [0.0],
            "std": [1.0],
            "augment": {"crop_padding": 0, "horizontal_flip": False, "rotation_degrees": 0.0},
        }
    )
    torch.manual_seed(0)
    model = IncrementalNet(MLP((2, 1, 1), [4, 4]), 3)
    podnet = PODNet(Memory(size=4, selection="herding"), proxies_per_class=2, **options)
    podnet.setup(cpu_context(model, stream, dataset, max_value=10, batch_size=4, optimizer=torch.optim.SGD))
    for task in stream.tasks:
        model.head.grow(task.classes[-1] + 1)
        podnet.before_task(task)
        if task.id == 0:
            podnet.after_task(task)
    return podnet


def test_old_proxies_stay_frozen_while_new_proxies_train():
    # The authors' code (old_weights: 0) and PyCIL (fc1 at learning rate 0): the 2 proxies of each old class
    # (rows 0-3) keep their values; the new class's (rows 4-5) and the backbone train.
    podnet = podnet_after_first_task()
    stream, proxies = podnet.stream, podnet.model.head.proxies
    before = proxies.detach().clone()
    backbone = [p.detach().clone() for p in podnet.model.backbone.parameters()]
    optimizer = torch.optim.SGD(podnet.model.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
    runner = StepRunner(
        optimizer,
        torch.amp.GradScaler("cpu", enabled=False),
        Hardware(torch.device("cpu"), None),
        "stop",
        lambda: "here",
    )
    rows = podnet.training_indices(stream.tasks[1])
    for _ in range(2):
        podnet.training_step(Batch(stream.train_x[rows], stream.train_y[rows]), runner)
    assert torch.equal(proxies[:4], before[:4])
    assert not torch.allclose(proxies[4:6], before[4:6])
    assert any(
        not torch.equal(p, q) for p, q in zip(podnet.model.backbone.parameters(), backbone, strict=True)
    )


def run_recording_finetuning(
    tmp_path, monkeypatch, overrides: list[str], strategy=PODNet, name: str = "podnet", epochs: int = 2
) -> tuple[list[dict], torch.Tensor]:
    """A digits run of `strategy` (PODNet, or LUCIR which shares the stage), 2 tasks of 5 classes, memory 50,
    one epoch a task, `epochs` of finetuning: each call of the finetuning stage (the classes seen, the model
    before and after) and the labels of the batches it trained on."""
    seen, calls = [], []
    loss, finetuning = strategy.loss, strategy.balanced_finetuning

    def recording_loss(self, batch):
        if calls and calls[-1]["running"]:
            seen.append(batch.y.clone())
        return loss(self, batch)

    def recording_finetuning(self):
        state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        calls.append({"running": True, "classes": self.model.head.n_classes})
        finetuning(self)
        calls[-1].update(running=False, before=state, after=self.model.state_dict())

    monkeypatch.setattr(strategy, "loss", recording_loss)
    monkeypatch.setattr(strategy, "balanced_finetuning", recording_finetuning)
    run_experiment(
        tmp_path,
        [
            f"strategy={name}",
            "strategy.memory.size=50",
            f"strategy.finetune_epochs={epochs}",
            "dataset.n_tasks=2",
            "epochs=1",
            "hardware=cpu",
            *overrides,
        ],
    )
    return calls, torch.cat(seen)


def test_class_balanced_finetuning_trains_the_proxies_on_the_balanced_memory(tmp_path, monkeypatch):
    # The authors' finetuning_config: after the second task only, over the memory alone (5 exemplars of each
    # of the 10 classes, 2 epochs), the proxies alone train, old ones included; eta and the backbone do not.
    calls, labels = run_recording_finetuning(tmp_path, monkeypatch, [])
    assert [call["classes"] for call in calls] == [10]
    assert torch.equal(torch.bincount(labels, minlength=10), torch.full((10,), 2 * 5))
    before, after = calls[0]["before"], calls[0]["after"]
    assert {k for k in before if not torch.equal(before[k], after[k])} == {"head.proxies"}
    assert not torch.equal(before["head.proxies"][:50], after["head.proxies"][:50])


def test_class_balanced_finetuning_of_the_network_keeps_old_proxies(tmp_path, monkeypatch):
    # PyCIL's variant: every parameter but the old classes' proxies (the first 5 classes' 50 rows)
    calls, _ = run_recording_finetuning(tmp_path, monkeypatch, ["strategy.finetune_params=network"])
    before, after = calls[0]["before"], calls[0]["after"]
    assert torch.equal(before["head.proxies"][:50], after["head.proxies"][:50])
    assert not torch.equal(before["head.proxies"][50:100], after["head.proxies"][50:100])
    assert not torch.equal(before["backbone.layers.1.weight"], after["backbone.layers.1.weight"])


def test_podnet_forgets_less_than_finetune_in_class_il_on_digits(tmp_path):
    # Digits stream (5 tasks, 10 epochs, memory 200), seed 0: PODNet 0.969 final class-IL accuracy,
    # finetune 0.200.
    settings = ["hardware=cpu", "hardware.num_threads=1", "seed=0"]
    finetune = run_experiment(tmp_path / "finetune", ["strategy=finetune", *settings])["class_il"]
    podnet = run_experiment(tmp_path / "podnet", ["strategy=podnet", *settings])["class_il"]
    assert podnet["final_average_accuracy"] > finetune["final_average_accuracy"] + 0.5


def test_pod_terms_keep_old_tasks_on_digits(tmp_path):
    # The POD terms alone, without a memory, so that nothing else guards the old classes: task-IL final
    # average accuracy / forgetting with the defaults (lambda_c 3, lambda_f 1) and with both at 0:
    # seed 0: 0.961 / 0.010 against 0.897 / 0.118; seed 1: 0.955 / 0.024 against 0.764 / 0.292;
    # seed 2: 0.964 / 0.021 against 0.797 / 0.250.
    settings = [
        "strategy=podnet",
        "strategy.memory.size=0",
        "hardware=cpu",
        "hardware.num_threads=1",
        "seed=0",
    ]
    with_pod = run_experiment(tmp_path / "on", settings)["task_il"]
    without = run_experiment(
        tmp_path / "off", [*settings, "strategy.lambda_spatial=0", "strategy.lambda_flat=0"]
    )["task_il"]
    assert with_pod["final_average_accuracy"] > without["final_average_accuracy"] + 0.05
    assert with_pod["average_forgetting"] < without["average_forgetting"] - 0.05


@pytest.mark.slow  # a convnet on the CPU, 25 s
def test_podnet_trains_a_convnet_under_mixed_precision(tmp_path):
    # A ConvNet's stages are 2-d maps, pooled over their widths and heights. 4 epochs: from eta = 1 the NCA
    # loss learns slowly, and with 1 epoch the second task was not learned (fp32 too: 0.35 accuracy).
    metrics = run_experiment(
        tmp_path / "run",
        [
            "strategy=podnet",
            "hardware=amp",
            "epochs=4",
            "dataset.n_tasks=2",
            "model=convnet",
            "model.input_size=8",
        ],
    )
    assert metrics["run"]["status"] == "finished"
    assert min(row[i] for i, row in enumerate(metrics["class_il"]["accuracy_matrix"])) > 0.8


@pytest.mark.slow  # two runs and a resume, 14 s; LUCIR's resume test shares its stage-finetuning path
def test_podnet_resumes_exactly_after_sigterm(tmp_path):
    # step 35 of 90 is in task 2: the frozen task-1 network, the memory and the proxies must come back
    assert_resumes_exactly(tmp_path, ["strategy=podnet", "epochs=2"], fault="step:35:SIGTERM")
