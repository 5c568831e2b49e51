"""Split Fashion-MNIST, MLP (docs/benchmarks.md) as a hand-written PyTorch loop: the speed limit incr is measured against.

The same work as `incr train experiment=split_fashion_mnist strategy=finetune|joint|replay`:
- Fashion-MNIST 60,000/10,000 read from the IDX .gz files, held in memory as float tensors, Normalize(0.2860, 0.3530);
- 5 tasks of 2 classes in class order 0..9, class-incremental: one head over the classes seen so far (the logits of
  unseen classes are cut off in training and evaluation);
- MLP 784-400-400-10 (ReLU, PyTorch's default initialisation); SGD lr 0.01, momentum 0.9, batch 128, 2 epochs per
  task, a fresh optimizer per task (as incr and Avalanche do);
- finetune: the task's own data; joint: at task k all data of tasks 1..k (cumulative, as incr's `joint`);
  replay: every batch joined by 128 samples drawn from a 500-sample reservoir memory, filled after each task;
- evaluation with batch 1,000 on the whole test stream after every task; CPU, torch.set_num_threads(2).

"train s" is the time inside the epochs; "total s" adds the memory update and the evaluation after each task
(data loading excluded). samples/s counts the task's own samples, not the replayed ones, as incr does.

Run it alone (prints one line per run and the medians):
    python benchmarks/plain_loop.py --methods finetune,joint,replay --seeds 0,1,2
benchmarks/split_fashion_mnist.py imports it and adds its rows to the Split Fashion-MNIST table.
"""

from __future__ import annotations

import argparse
import random
import resource
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from incr_cli.data.mnist import read_idx

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
MEAN, STD = 0.2860, 0.3530
N_TASKS, CLASSES_PER_TASK = 5, 2
EPOCHS, BATCH_SIZE, EVAL_BATCH_SIZE = 2, 128, 1000
LR, MOMENTUM = 0.01, 0.9
MEMORY_SIZE, REPLAY_BATCH_SIZE = 500, 128
METHODS = ("finetune", "joint", "replay")


@dataclass
class FashionMNIST:
    """Normalised, flattened images [N, 784] (float32) and labels [N] (int64)."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor


def load_fashion_mnist(folder: Path = FASHION_MNIST) -> FashionMNIST:
    def images(name: str) -> Tensor:
        pixels = torch.from_numpy(read_idx(folder / f"{name}-images-idx3-ubyte.gz")).reshape(-1, 28 * 28)
        return (
            pixels.float().div_(255).sub_(MEAN).div_(STD)
        )  # ToTensor, then Normalize (in place: half the peak memory)

    def labels(name: str) -> Tensor:
        return torch.from_numpy(read_idx(folder / f"{name}-labels-idx1-ubyte.gz")).long()

    return FashionMNIST(images("train"), labels("train"), images("t10k"), labels("t10k"))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 400), nn.ReLU(), nn.Linear(400, 400), nn.ReLU(), nn.Linear(400, 10))


class ReservoirMemory:
    """Reservoir sampling (Vitter 1985): after n samples have been offered, each is kept with probability size/n."""

    def __init__(self, size: int, seed: int):
        self.size, self.n_seen, self.random = size, 0, random.Random(seed)
        self.x: Tensor | None = None
        self.y: Tensor | None = None

    def add(self, x: Tensor, y: Tensor) -> None:
        free = self.size - (0 if self.y is None else len(self.y))
        if free > 0:  # the first `size` samples fill the memory
            self.x = x[:free].clone() if self.x is None else torch.cat([self.x, x[:free]])
            self.y = y[:free].clone() if self.y is None else torch.cat([self.y, y[:free]])
            self.n_seen += len(y[:free])
            x, y = x[free:], y[free:]
        for i in range(len(y)):
            slot = self.random.randint(0, self.n_seen)  # inclusive: sample number n_seen draws from 0..n_seen
            if slot < self.size:
                self.x[slot], self.y[slot] = x[i], y[i]
            self.n_seen += 1

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        rows = torch.randperm(len(self.y), generator=generator)[:n]
        return self.x[rows], self.y[rows]


@torch.no_grad()
def evaluate(model: nn.Module, data: FashionMNIST, n_seen: int) -> list[float]:
    """Accuracy on each task's test samples, predicting among the classes seen so far."""
    model.eval()
    predictions = torch.cat(
        [
            model(data.test_x[first : first + EVAL_BATCH_SIZE])[:, :n_seen].argmax(1)
            for first in range(0, len(data.test_y), EVAL_BATCH_SIZE)
        ]
    )
    correct = (predictions == data.test_y).float()
    task_of_sample = data.test_y // CLASSES_PER_TASK
    model.train()
    return [correct[task_of_sample == task].mean().item() for task in range(N_TASKS)]


def run(method: str, seed: int, data: FashionMNIST) -> dict:
    """One Split Fashion-MNIST run of `method`; returns the accuracy matrix, the final average accuracy and the timings."""
    torch.set_num_threads(2)
    torch.manual_seed(seed)
    model = mlp()
    generator = torch.Generator().manual_seed(seed)
    memory = ReservoirMemory(MEMORY_SIZE, seed) if method == "replay" else None
    accuracy_matrix, train_seconds, samples = [], 0.0, 0
    started = time.perf_counter()
    for task in range(N_TASKS):
        n_seen = (task + 1) * CLASSES_PER_TASK
        first_class = 0 if method == "joint" else task * CLASSES_PER_TASK
        index = torch.nonzero((data.train_y >= first_class) & (data.train_y < n_seen)).flatten()
        optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
        tick = time.perf_counter()
        for _ in range(EPOCHS):
            order = index[torch.randperm(len(index), generator=generator)]
            for first in range(0, len(order), BATCH_SIZE):
                rows = order[first : first + BATCH_SIZE]
                x, y = data.train_x[rows], data.train_y[rows]
                if memory is not None and memory.x is not None:
                    memory_x, memory_y = memory.sample(REPLAY_BATCH_SIZE, generator)
                    x, y = torch.cat([x, memory_x]), torch.cat([y, memory_y])
                loss = F.cross_entropy(model(x)[:, :n_seen], y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                samples += len(rows)
        train_seconds += time.perf_counter() - tick
        if memory is not None:
            memory.add(data.train_x[index], data.train_y[index])
        accuracy_matrix.append(evaluate(model, data, n_seen))
    total_seconds = time.perf_counter() - started
    return {
        "method": method,
        "seed": seed,
        "accuracy_matrix": accuracy_matrix,
        "final_average_accuracy": sum(accuracy_matrix[-1]) / N_TASKS,
        "train_seconds": train_seconds,
        "total_seconds": total_seconds,
        "samples_per_second": samples / train_seconds,
        # The peak of this process so far (Linux reports KiB), as incr reports its own.
        "peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated: finetune,joint,replay")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--data", type=Path, default=FASHION_MNIST, help="folder of the four IDX .gz files")
    args = parser.parse_args()
    data = load_fashion_mnist(args.data)
    for method in args.methods.split(","):
        results = [run(method, int(seed), data) for seed in args.seeds.split(",")]
        for r in results:
            print(
                f"{method:8s} seed {r['seed']}: final average accuracy {r['final_average_accuracy']:.4f}, "
                f"train {r['train_seconds']:.2f} s, total {r['total_seconds']:.2f} s, "
                f"{r['samples_per_second']:.0f} samples/s"
            )
        median = {k: statistics.median(r[k] for r in results) for k in ("train_seconds", "total_seconds")}
        print(
            f"{method:8s} median: train {median['train_seconds']:.2f} s, total {median['total_seconds']:.2f} s"
        )


if __name__ == "__main__":
    main()
