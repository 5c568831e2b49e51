"""Meta-experience replay (Riemer et al. 2019): the Reptile updates by hand, what MER achieves on digits,
mixed precision, and exact resume."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_resumes_exactly, final_accuracy, run_experiment
from torch import nn

from incr_cli.data.batches import Batch
from incr_cli.data.stream import Task
from incr_cli.memory import Memory
from incr_cli.models.head import IncrementalNet
from incr_cli.step import Hardware, StepRunner
from incr_cli.strategies.base import Context
from incr_cli.strategies.mer import MER, reptile


class OneFeature(nn.Module):
    """A backbone that passes one input number through: the net is then logits = W x + b, 2 x 1 and 2."""

    feature_dim = 1

    def forward(self, x):
        return x.float().reshape(len(x), 1)


def tiny_mer(beta: float, gamma: float, batches_per_example: int = 1) -> MER:
    """MER on a zero-initialised linear net with one remembered sample (x=1, y=0), alpha = ln(3)/2."""
    model = IncrementalNet(OneFeature(), 2)
    model.head.grow(2)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    rng = torch.Generator().manual_seed(0)
    memory = Memory(size=1)
    memory.add(torch.ones(1, 1), torch.zeros(1, dtype=torch.long), rng)
    mer = MER(
        memory,
        lr=math.log(3) / 2,
        beta=beta,
        gamma=gamma,
        batches_per_example=batches_per_example,
        replay_batches=1,
        replay_batch_size=1,
    )
    mer.setup(
        Context(model, None, lambda x, generator=None: x.float(), rng, torch.device("cpu"), None, 1, 1, 0)
    )
    mer.before_task(Task(0, [0, 1], torch.arange(1), torch.arange(0), torch.arange(0)))
    return mer


def train_one_batch(mer: MER, x: float = 1.0, on_nonfinite: str = "stop") -> dict[str, torch.Tensor]:
    optimizer = torch.optim.SGD(mer.model.parameters(), lr=0.0)  # the engine's; MER steps by itself
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    hardware = Hardware(torch.device("cpu"), None)
    runner = StepRunner(optimizer, scaler, hardware, on_nonfinite, lambda: "test")
    mer.training_step(Batch(torch.full((1, 1), x), torch.zeros(1, dtype=torch.long)), runner)
    return {"weight": mer.model.head.weight.detach().flatten(), "bias": mer.model.head.bias.detach()}


def test_reptile_interpolation_by_hand():
    theta = [nn.Parameter(torch.tensor([1.0, -2.0])), nn.Parameter(torch.tensor([4.0]))]
    start = [torch.tensor([3.0, 0.0]), torch.tensor([0.0])]
    reptile(theta, start, 0.25)  # start + 0.25 (theta - start)
    assert theta[0].tolist() == [2.5, -0.5] and theta[1].tolist() == [1.0]


# By hand, with x = 1 and y = 0 for both elements of the meta-batch (the incoming batch, then the memory
# sample), W = b = 0 and alpha = ln(3)/2. d CE / d z = softmax(z) - onehot(y), and d/dW = d/db for x = 1.
#   step 1: z = (0, 0), softmax (1/2, 1/2), gradient (-1/2, 1/2):  W = b = alpha * (1/2, -1/2),
#           so z = (alpha, -alpha) = (ln 3 / 2, -ln 3 / 2) and softmax(z) = (3/4, 1/4)
#   step 2: gradient (-1/4, 1/4):  W = b = alpha * (3/4, -3/4)
# The Reptile steps then scale this displacement from the start (0): by beta within the batch, by gamma
# across batches (one batch here), so W = b = beta * gamma * alpha * (3/4, -3/4).
@pytest.mark.parametrize("beta, gamma", [(0.5, 1.0), (1.0, 0.5), (0.5, 0.5), (1.0, 1.0)])
def test_meta_update_on_a_linear_model_by_hand(beta, gamma):
    params = train_one_batch(tiny_mer(beta, gamma))
    expected = beta * gamma * math.log(3) / 2 * 0.75
    for name in ("weight", "bias"):
        assert params[name].tolist() == pytest.approx([expected, -expected], abs=1e-6), name


def test_across_batch_update_starts_from_where_the_example_began():
    # With theta_0 = 0, theta_0 + gamma * (theta - theta_0) = gamma * theta, however many batches ran.
    full = train_one_batch(tiny_mer(beta=0.5, gamma=1.0, batches_per_example=3))
    half = train_one_batch(tiny_mer(beta=0.5, gamma=0.5, batches_per_example=3))
    one = train_one_batch(tiny_mer(beta=0.5, gamma=1.0, batches_per_example=1))
    for name in ("weight", "bias"):
        assert torch.allclose(half[name], 0.5 * full[name], atol=1e-7), name
        assert full[name][0] > one[name][0] > 0  # each meta-batch moves on from where the last one ended


def test_memory_is_a_reservoir_fed_once_per_example():
    mer = tiny_mer(beta=1.0, gamma=1.0)
    train_one_batch(mer)
    assert mer.memory.n_seen == 2 and mer.offered == 1
    train_one_batch(mer)  # a second epoch over the task's one example: replayed, not offered again
    assert mer.memory.n_seen == 2


def test_a_non_finite_batch_is_skipped_whole_and_not_remembered():
    mer = tiny_mer(beta=1.0, gamma=1.0)
    params = train_one_batch(mer, x=float("nan"), on_nonfinite="skip_batch")
    assert params["weight"].tolist() == [0.0, 0.0] and params["bias"].tolist() == [0.0, 0.0]
    assert mer.memory.n_seen == 1 and mer.offered == 0


def test_mer_needs_a_reservoir_memory():
    with pytest.raises(ValueError, match="reservoir"):
        MER(Memory(10, "class_balanced"))


@pytest.mark.slow
def test_mer_remembers_what_finetune_forgets_on_digits(tmp_path):
    # 3 epochs per task keep the test short: MER reaches 0.830 (seed 0), finetune 0.200
    settings = ["dataset=digits", "seed=0", "epochs=3", "hardware=cpu", "hardware.num_threads=1"]
    finetune = run_experiment(tmp_path / "ft", ["strategy=finetune", *settings])
    mer = run_experiment(tmp_path / "mer", ["strategy=mer", *settings])
    assert final_accuracy(mer) > final_accuracy(finetune) + 0.4


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])  # float16 adds the GradScaler: unscale, then step
def test_mer_trains_under_mixed_precision(tmp_path, dtype):
    overrides = [
        "strategy=mer",
        "hardware=amp",
        f"hardware.amp_dtype={dtype}",
        "debug=quick",
        "strategy.batches_per_example=2",
        "strategy.replay_batches=2",
        "strategy.beta=1.0",
    ]
    metrics = run_experiment(tmp_path / "amp", overrides)
    accuracy = metrics["class_il"]["average_accuracy"]
    assert metrics["run"]["status"] == "finished"
    assert accuracy[0] > 0.9 and accuracy[-1] > 0.3  # it learns (chance: 0.5, then 0.1)
    assert metrics["per_task"][-1]["memory_samples"] == 200


@pytest.mark.slow
def test_mer_resumes_exactly(tmp_path):
    # fewer meta-batches than the default (s = 2, k - 1 = 2) keep the test short; the state to restore is the same
    assert_resumes_exactly(
        tmp_path, ["strategy=mer", "epochs=2", "strategy.batches_per_example=2", "strategy.replay_batches=2"]
    )
