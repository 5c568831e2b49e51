"""incr next to Avalanche 0.6: every method both implement, run side by side on Split Fashion-MNIST.

Two protocols, both class-incremental (5 tasks of 2 classes in class order 0..9, one head over the classes seen so
far), Fashion-MNIST 60,000/10,000 read from the IDX .gz files, ToTensor then Normalize(0.2860, 0.3530), SGD lr
0.01 momentum 0.9 (a fresh optimizer per task in both tools), batch 128, evaluation batch 1,000 on the whole test
stream after every task, CPU, 2 threads:
- "Split Fashion-MNIST, MLP": MLP 784-400-400-10 (ReLU), 2 epochs per task, no augmentation
  (incr: `experiment=split_fashion_mnist`);
- "Split Fashion-MNIST, ConvNet": incr's `model=convnet` (conv 3x3 32, max-pool, conv 3x3 64, max-pool, FC 256,
  head; built layer for layer for Avalanche below), random crop with 4 pixels of zero padding and a random
  horizontal flip (incr's batched `random_crop` then `random_flip`, before normalisation; Avalanche: torchvision's
  RandomCrop(28, padding=4) and RandomHorizontalFlip before ToTensor and Normalize), 5 epochs per task.

METHODS below holds, for each method, incr's overrides and the Avalanche class with its constructor arguments, set
for set (and the differences that no setting removes). Runs are interleaved, incr seed 0, Avalanche seed 0, incr
seed 1, ..., each in a subprocess of its own, so that both tools pay the same start-up and see the machine in the
same state: incr as `incr train ...` (its metrics.json), Avalanche as this script with `--worker`.

Per run (a JSON file under --out, kept: a rerun with the same --out skips finished runs): the accuracy matrix, the
final average accuracy, forgetting as Avalanche defines it (accuracy right after learning a task minus the final
one, averaged over the tasks before the last), train seconds (inside each tool's training calls, memory updates
included), run seconds (each tool's own timing of its run) and total seconds (the subprocess's wall time, measured
here the same way for both); an incr run stopped by a non-finite loss is recorded with where it stopped, and its
row in the table says so instead of giving a mean. The table: method, incr and Avalanche final average accuracy (mean ± std over seeds),
their difference in points, the time ratio Avalanche total s / incr total s (above 1: incr is faster) and the
number of seeds.

`--jobs 2 --threads 1` makes two runs at a time, one thread each, in the same interleaved order (both tools'
runs then share the cores alike, and the time ratios are those of one thread). The records behind
docs/benchmarks.md's ConvNet table (and the MLP table's cumulative and BiC rows) are kept under
benchmarks/results/parity/ (their runs' folders are not): with
`--out benchmarks/results/parity` a run makes only what is missing there, and `--finished-only` renders the
table of what is there without running anything.

Install Avalanche next to incr (it leaves torch as it is): `pip install -e '.[parity]'`. From the repository root:
    python benchmarks/parity.py --protocol both --write --table docs/parity.md          # the full table, new file
    python benchmarks/parity.py --protocol convnet --out benchmarks/results/parity --finished-only --write
        # the kept records' table, into docs/benchmarks.md between its parity-convnet markers
    python benchmarks/parity.py --protocol mlp --methods finetune,replay --seeds 0 --epochs 1   # a smoke run
Run it on a quiet machine: other processes on the cores ruin the timings.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from docs_page import DOCS, replace_section  # noqa: E402  (benchmarks/ is a folder of scripts)

REPO = Path(__file__).resolve().parent.parent
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
MEAN, STD = 0.2860, 0.3530
N_TASKS = 5
BATCH_SIZE, EVAL_BATCH_SIZE, LR, MOMENTUM, THREADS = 128, 1000, 0.01, 0.9, 2  # THREADS: per run, by default
CROP_PADDING = 4


@dataclass
class Protocol:
    title: str
    model: str  # mlp | convnet
    epochs: int
    augment: bool
    incr: list[str]  # overrides on top of every incr run's


PROTOCOLS = {
    "mlp": Protocol("Split Fashion-MNIST, MLP", "mlp", 2, False, []),
    "convnet": Protocol(
        "Split Fashion-MNIST, ConvNet",
        "convnet",
        5,
        True,
        # the experiment's MLP widths do not belong to the ConvNet's config
        [
            "model=convnet",
            "~model.hidden_sizes",
            f"dataset.augment.crop_padding={CROP_PADDING}",
            "dataset.augment.horizontal_flip=true",
            "epochs=5",
        ],
    ),
}
INCR_COMMON = [
    "experiment=split_fashion_mnist",
    "hardware=cpu",
    "progress=false",
]


@dataclass
class Method:
    """One method in both tools. `avalanche` names a class of avalanche.training.supervised, or
    "Naive+<Plugin>" for a method Avalanche ships only as a plugin of avalanche.training.plugins."""

    incr: str  # incr's strategy name (configs/strategy/<incr>.yaml)
    overrides: list[str]
    avalanche: str
    kwargs: dict
    head: str = (
        "growing"  # Avalanche's head: growing (IncrementalClassifier, masked) | full (Linear over 10 classes)
    )
    notes: str = ""  # what still differs with these settings
    avalanche_training_set: str = (
        "own"  # own | joined: BiC's exemplars joined to the task's set (the paper's)
    )
    avalanche_memory_views: str = (
        "own"  # own | fresh: GEM's memory read through the training transform at every step (Mammoth's)
    )
    avalanche_der_memory: str = (
        "own"  # own | reservoir: DER's memory offered every step, with that step's logits (the paper's)
    )
    # a row that changes one side only: the other tool's runs are this method's, read (or run) under its name
    incr_runs_of: str = ""
    avalanche_runs_of: str = ""

    def runs_of(self, tool: str) -> str:
        return self.incr_runs_of if tool == "incr" else self.avalanche_runs_of


MEMORY = 500
# Avalanche's EWC estimates the Fisher from each mini-batch's mean loss at the true labels, and no Avalanche
# regulariser caps its penalty's curvature.
BATCH_FISHER = ["strategy.fisher=batch", "strategy.fisher_labels=empirical"]
UNCAPPED = "strategy.curvature_limit=none"
DERPP_OVERRIDES = [
    f"strategy.memory.size={MEMORY}",
    "strategy.alpha=0.1",
    "strategy.beta=0.5",
    "strategy.head=full",
]
DERPP_KWARGS = {"mem_size": MEMORY, "alpha": 0.1, "beta": 0.5, "batch_size_mem": BATCH_SIZE}
GEM_OVERRIDES = ["strategy.patterns_per_task=100", "strategy.memory_strength=0.5"]
GEM_KWARGS = {"patterns_per_exp": 100, "memory_strength": 0.5}
BIC_OVERRIDES = [
    f"strategy.memory.size={MEMORY}",
    "strategy.val_fraction=0.1",
    "strategy.temperature=2",
    "strategy.bias_epochs=200",
]
BIC_KWARGS = {"mem_size": MEMORY, "val_percentage": 0.1, "T": 2, "stage_2_epochs": 200, "lamb": -1, "lr": 0.1}
SI_CLAMP = (
    "Avalanche 0.6 clamps every parameter's Omega at 0.001 (a constant in SynapticIntelligencePlugin's "
    "after_training_exp); the paper, Mammoth and van de Ven et al. have no such bound, nor has incr: "
    "Avalanche's penalty stays tiny at this lambda."
)
DER_MEMORY = (
    "memory: incr reservoir, offered every batch (the paper); Avalanche class-balanced, filled and its logits "
    "recorded at each task's end"
)
MAS_AVERAGE = (
    "importance across tasks: incr sums the tasks' Omega (the paper); Avalanche keeps "
    "alpha * old + (1 - alpha) * new, alpha 0.5 (its default), which no incr setting reproduces."
)
METHODS = {
    "finetune": Method("finetune", [], "Naive", {}),
    "joint": Method(
        "joint",
        [],
        "JointTraining",
        {},
        notes="Avalanche's JointTraining trains once on all five tasks' data (one accuracy row, forgetting 0); "
        "incr's joint is cumulative: at task k all data of tasks 1..k, three times the samples. Compare the final "
        "accuracy, not the time; the `cumulative` row is the like-for-like pair.",
    ),
    "cumulative": Method(
        "joint", [], "Cumulative", {}, notes="incr's joint and Avalanche's Cumulative: the same work."
    ),
    "replay": Method(
        "replay",
        [f"strategy.memory.size={MEMORY}"],
        "Replay",
        {"mem_size": MEMORY},
        notes="memory: incr reservoir over all samples seen; Avalanche an equal share per task (random within "
        "a task). Both replay a batch as large as the training batch.",
    ),
    "ewc": Method(
        # Avalanche's penalty is lambda * sum F (theta - theta*)^2, incr's (lambda / 2) * ...: incr's 2000 is
        # Avalanche's 1000 (the protocol's value, in Avalanche's convention).
        "ewc",
        ["strategy.ewc_lambda=2000", *BATCH_FISHER, UNCAPPED],
        "EWC",
        {"ewc_lambda": 1000, "mode": "separate"},
        notes="incr fisher=batch: Avalanche's batch-mean Fisher (squared gradient of each mini-batch's mean loss).",
    ),
    "online_ewc": Method(
        "online_ewc",
        ["strategy.ewc_lambda=2000", "strategy.gamma=0.9", *BATCH_FISHER, UNCAPPED],
        "EWC",
        {"ewc_lambda": 1000, "mode": "online", "decay_factor": 0.9},
        notes="F <- 0.9 F + F_new in both; lambda as EWC's.",
    ),
    "si": Method(
        # Avalanche's SI penalty carries lambda / 2, incr's c does not: si_lambda 2 is incr's c = 1.
        "si",
        ["strategy.c=1.0", "strategy.xi=0.001", UNCAPPED],
        "SynapticIntelligence",
        {"si_lambda": 2.0, "eps": 0.001},
        notes=SI_CLAMP,
    ),
    # incr's own default cap on the penalty's curvature (`curvature_limit: sgd`), where the uncapped one
    # leaves SGD's stable range; Avalanche as in the row above
    "si_curvature_limit": Method(
        "si",
        ["strategy.c=1.0", "strategy.xi=0.001", "strategy.curvature_limit=sgd"],
        "SynapticIntelligence",
        {"si_lambda": 2.0, "eps": 0.001},
        avalanche_runs_of="si",
        notes=f"incr with its default curvature_limit=sgd. {SI_CLAMP}",
    ),
    "mas": Method(
        "mas",
        ["strategy.mas_lambda=1.0", UNCAPPED],
        "MAS",
        {"lambda_reg": 1.0, "alpha": 0.5},
        notes=MAS_AVERAGE,
    ),
    "mas_curvature_limit": Method(
        "mas",
        ["strategy.mas_lambda=1.0", "strategy.curvature_limit=sgd"],
        "MAS",
        {"lambda_reg": 1.0, "alpha": 0.5},
        avalanche_runs_of="mas",
        notes=f"incr with its default curvature_limit=sgd. {MAS_AVERAGE}",
    ),
    "rwalk": Method(
        "rwalk",
        ["strategy.rwalk_lambda=10", "strategy.alpha=0.9", "strategy.update_every=10", UNCAPPED],
        "Naive+RWalkPlugin",
        {"ewc_lambda": 10, "ewc_alpha": 0.9, "delta_t": 10},
        notes="the score's damping: incr epsilon 1e-3 (the authors'); Avalanche float32's machine epsilon, fixed.",
    ),
    "lwf": Method(
        "lwf", ["strategy.alpha=1", "strategy.temperature=2"], "LwF", {"alpha": 1.0, "temperature": 2.0}
    ),
    "icarl": Method(
        "icarl",
        [f"strategy.memory.size={MEMORY}", "strategy.memory.selection=herding"],
        "ICaRL",
        {"memory_size": MEMORY, "fixed_memory": True},
        head="full",
        notes="Avalanche's iCaRL needs a fixed classifier over all 10 classes (its sigmoid targets span them); "
        "incr's head grows with the classes.",
    ),
    # incr's iCaRL with Avalanche's class means over mirror images too: measures what that choice is worth
    "icarl_flip_means": Method(
        "icarl",
        [f"strategy.memory.size={MEMORY}", "strategy.memory.selection=herding", "strategy.flip_means=always"],
        "ICaRL",
        {"memory_size": MEMORY, "fixed_memory": True},
        head="full",
        notes="incr with flip_means=always, Avalanche's class means (which average each exemplar with its mirror image).",
    ),
    "gem": Method("gem", GEM_OVERRIDES, "GEM", GEM_KWARGS),
    "gem_fresh_views": Method(
        "gem",
        GEM_OVERRIDES,
        "GEM",
        GEM_KWARGS,
        avalanche_memory_views="fresh",
        incr_runs_of="gem",
        notes="Avalanche's GEM with its memory samples augmented anew at every step (Mammoth's GEM, Avalanche's "
        "A-GEM and incr), where its own keeps the one augmented view it took at the task's end.",
    ),
    "agem": Method(
        "agem",
        ["strategy.patterns_per_task=100", "strategy.sample_size=256"],
        "AGEM",
        {"patterns_per_exp": 100, "sample_size": 256},
    ),
    "der": Method(
        "der",
        [f"strategy.memory.size={MEMORY}", "strategy.alpha=0.3", "strategy.beta=0", "strategy.head=full"],
        "DER",
        {"mem_size": MEMORY, "alpha": 0.3, "beta": 0.0, "batch_size_mem": BATCH_SIZE},
        head="full",
        notes=DER_MEMORY + ".",
    ),
    "derpp": Method(
        "derpp",
        DERPP_OVERRIDES,
        "DER",
        DERPP_KWARGS,
        head="full",
        notes=DER_MEMORY
        + "; and Avalanche's MSE and CE terms share one memory batch, incr draws two (the paper).",
    ),
    # Avalanche's DER with the paper's memory, nothing else changed: measures what its memory is worth
    "derpp_reservoir": Method(
        "derpp",
        DERPP_OVERRIDES,
        "DER",
        DERPP_KWARGS,
        head="full",
        avalanche_der_memory="reservoir",
        incr_runs_of="derpp",
        notes="Avalanche's DER with the paper's memory (incr's): reservoir over every training sample, offered "
        "after each step with that step's logits (train mode, augmented input), kept unaugmented and augmented "
        "anew at each draw; its one memory batch for both terms is kept.",
    ),
    "gdumb": Method("gdumb", [f"strategy.memory.size={MEMORY}"], "GDumb", {"mem_size": MEMORY}),
    # incr's GDumb restarting each retraining from the run's first weights, as Avalanche's GDumbPlugin does
    "gdumb_first_weights": Method(
        "gdumb",
        [f"strategy.memory.size={MEMORY}", "strategy.initial_weights=first"],
        "GDumb",
        {"mem_size": MEMORY},
        notes="incr with initial_weights=first: every retraining starts from the run's first weights, as "
        "Avalanche's (incr's default draws new weights each time).",
    ),
    "bic": Method(
        "bic",
        BIC_OVERRIDES,
        "BiC",
        BIC_KWARGS,
        notes="training set: Avalanche joins every batch of 128 new samples with 128 memory samples, incr (the "
        "paper) puts the exemplars into the task's set once per epoch (bic_joined_set measures it). Bias layer: both fit "
        "it on samples set aside when their class arrives (the authors'); incr with full-batch Adam at 0.01, Avalanche "
        "with SGD at 0.1. Exemplars: incr herding, Avalanche random per class. Avalanche's distillation takes the "
        "softmax of the old logits over the batch (dim 0), not over the classes.",
    ),
    "bic_joined_set": Method(
        "bic",
        BIC_OVERRIDES,
        "BiC",
        BIC_KWARGS,
        avalanche_training_set="joined",
        incr_runs_of="bic",
        notes="Avalanche's BiC with its exemplars joined to the task's training set, each sample once per epoch (the "
        "paper's and incr's), instead of its ReplayDataLoader's batches of 128 new plus 128 memory samples.",
    ),
    "er_ace": Method(
        "er_ace",
        # Avalanche's ER-ACE scores with the model's own linear head over the classes seen so far
        [
            f"strategy.memory.size={MEMORY}",
            "strategy.memory.selection=class_balanced",
            "strategy.classifier=linear",
            "strategy.head=growing",
        ],
        "ER_ACE",
        {"mem_size": MEMORY, "batch_size_mem": BATCH_SIZE},
        notes="memory: Avalanche's class-balanced buffer is refreshed at each task's start (the new task's "
        "samples included); incr's fills batch by batch.",
    ),
}
# Left out: mer (incr: s x k Reptile steps per batch, Riemer et al.'s Algorithm 1; Avalanche's MER has other knobs,
# n_inner_steps and one gamma/beta pair, so no setting-for-setting match) and the methods Avalanche lacks (xder,
# lucir, podnet, wa, der_expandable, foster, importance_replay).


# ----------------------------------------------------------------------------------------------- Avalanche side
def convnet_features() -> nn.Module:
    """incr's ConvNet (incr_cli/models/convnet.py) without its head, layer for layer."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 256),
        nn.ReLU(inplace=True),
    )


def mlp_features() -> nn.Module:
    """incr's MLP backbone for the protocol: 784-400-400, ReLU."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 400), nn.ReLU(inplace=True), nn.Linear(400, 400), nn.ReLU(inplace=True)
    )


class Net(nn.Module):
    def __init__(self, features: nn.Module, classifier: nn.Module):
        super().__init__()
        self.features, self.classifier = features, classifier

    def forward(self, x):
        return self.classifier(self.features(x))


def joined_training_set(plugin, strategy, **kwargs) -> None:
    """BiCPlugin.before_training_exp with the paper's training set: the exemplars join the task's data and an
    epoch sees each sample once (Avalanche's own draws a memory batch as large as every training batch)."""
    from avalanche.benchmarks.utils import concat_datasets

    if plugin.bias_layer is not None:  # as Avalanche's: the last bias layer stays fixed in stage 1
        for parameter in plugin.bias_layer.parameters():
            parameter.requires_grad = False
    if len(plugin.storage_policy.buffer):
        joined = concat_datasets([strategy.adapted_dataset, plugin.storage_policy.buffer])
        strategy.dataloader = torch.utils.data.DataLoader(
            joined, batch_size=strategy.train_mb_size, shuffle=True
        )


def fresh_memory_views() -> None:
    """Avalanche's GEMPlugin with its memory kept as samples of the task's dataset, read again through the
    training transform before every step: a new augmented view each time, as Mammoth's GEM (its buffer holds
    the unaugmented images and augments them at each use) and Avalanche's own A-GEM (its memory is a dataset).
    Avalanche's GEM stores the tensors its DataLoader gave at the task's end: one augmented view, fixed.
    It patches the class, so it holds for the rest of the process: each worker runs one Avalanche run."""
    from avalanche.training.plugins import gem

    constraints = gem.GEMPlugin.before_training_iteration

    def update_memory(self, dataset, t, batch_size):
        picked = torch.randperm(len(dataset))[: self.patterns_per_experience].tolist()
        items = [dataset[i] for i in picked]
        self.memory_x[t] = torch.stack([item[0] for item in items])
        self.memory_y[t] = torch.tensor([int(item[1]) for item in items])
        self.memory_tid[t] = torch.tensor([int(item[-1]) for item in items])
        self.memory_sources = {**getattr(self, "memory_sources", {}), t: (dataset, picked)}

    def before_training_iteration(self, strategy, **kwargs):
        for t, (dataset, picked) in getattr(self, "memory_sources", {}).items():
            self.memory_x[t] = torch.stack([dataset[i][0] for i in picked])
        constraints(self, strategy, **kwargs)

    gem.GEMPlugin.update_memory = update_memory
    gem.GEMPlugin.before_training_iteration = before_training_iteration


def augment_batch(x: torch.Tensor, padding: int) -> torch.Tensor:
    """torchvision's RandomCrop(padding, zero fill) then RandomHorizontalFlip, per sample, on a batch already
    normalised: the zero fill becomes the value zero takes after Normalize."""
    n, size = len(x), x.shape[-1]
    padded = nn.functional.pad(x, [padding] * 4, value=-MEAN / STD)
    offsets = torch.randint(0, 2 * padding + 1, (n, 2)).tolist()
    out = torch.stack([padded[i, :, r : r + size, c : c + size] for i, (r, c) in enumerate(offsets)])
    flip = torch.rand(n) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def reservoir_der(der_class: type, augment: bool) -> type:
    """Avalanche's DER with the paper's (and Mammoth's, and incr's) memory, its loss and one memory batch for
    both terms unchanged. Avalanche's own fills a class-balanced memory at each task's end with the finished
    network's eval-mode logits on the unaugmented images, and replays from the second task. Here: reservoir
    sampling over every training sample, offered after each step with the logits that step computed (train
    mode, augmented input), from the first step on; the memory keeps the unaugmented images and each draw is
    augmented anew. The training set must then come unaugmented: augmentation moves into the step."""

    class ReservoirDER(der_class):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.seen, self.stored = (
                0,
                {},
            )  # stored: x, y, logits of mem_size rows, the first min(seen, size) kept

        def _before_training_exp(self, **kwargs):
            super(der_class, self)._before_training_exp(**kwargs)  # no class-balanced replay loader

        def _after_training_exp(self, **kwargs):
            super(der_class, self)._after_training_exp(**kwargs)  # no end-of-task memory update

        def _before_forward(self, **kwargs):
            super(der_class, self)._before_forward(**kwargs)
            self.unaugmented = (self.mbatch[0], self.mbatch[1])
            if augment:
                self.mbatch[0] = augment_batch(self.mbatch[0], CROP_PADDING)
            # training_epoch replays when replay_loader is set and slices off batch_size_mem rows
            self.replay_loader = None
            if (kept := min(self.seen, self.mem_size)) >= self.batch_size_mem:
                rows = torch.randperm(kept)[: self.batch_size_mem]
                x = self.stored["x"][rows]
                self.mbatch[0] = torch.cat((augment_batch(x, CROP_PADDING) if augment else x, self.mbatch[0]))
                self.mbatch[1] = torch.cat((self.stored["y"][rows], self.mbatch[1]))
                self.mbatch[2] = torch.cat((torch.zeros_like(rows), self.mbatch[2]))
                self.batch_logits, self.replay_loader = self.stored["logits"][rows], "memory"

        def _after_training_iteration(self, **kwargs):
            x, y = self.unaugmented
            logits = self.mb_output[len(self.mb_output) - len(y) :].detach()
            if not self.stored:
                self.stored = {
                    key: value.new_zeros(self.mem_size, *value.shape[1:])
                    for key, value in (("x", x), ("y", y), ("logits", logits))
                }
            for i in range(len(y)):  # reservoir sampling (Vitter's algorithm R), as Mammoth's buffer
                slot = self.seen if self.seen < self.mem_size else int(torch.randint(0, self.seen + 1, ()))
                self.seen += 1
                if slot < self.mem_size:
                    for key, value in (("x", x), ("y", y), ("logits", logits)):
                        self.stored[key][slot] = value[i]
            super()._after_training_iteration(**kwargs)

    return ReservoirDER


def avalanche_run(
    method_name: str,
    protocol_name: str,
    seed: int,
    epochs: int,
    data: Path,
    limit: int | None,
    threads: int = THREADS,
) -> dict:
    """One Avalanche run in this process; returns the accuracy matrix and the timings."""
    import numpy as np
    from avalanche.benchmarks import nc_benchmark
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.models import IncrementalClassifier
    from avalanche.training import plugins as avalanche_plugins
    from avalanche.training import supervised
    from avalanche.training.determinism.rng_manager import RNGManager
    from avalanche.training.plugins import EvaluationPlugin, SupervisedPlugin
    from PIL import Image
    from torchvision import transforms

    from incr_cli.data.mnist import read_idx

    method, protocol = METHODS[method_name], PROTOCOLS[protocol_name]
    torch.set_num_threads(threads)
    RNGManager.set_random_seeds(seed)

    class Images(torch.utils.data.Dataset):
        """torchvision's FashionMNIST item contract (a PIL image and an int label), from the IDX files."""

        def __init__(self, split: str):
            self.data = read_idx(data / f"{split}-images-idx3-ubyte.gz")
            self.targets = torch.from_numpy(read_idx(data / f"{split}-labels-idx1-ubyte.gz").astype(np.int64))
            if limit:  # --limit: every k-th sample, all classes kept (a check that the strategy runs)
                n = limit if split == "train" else max(limit // 6, 10)
                self.data, self.targets = (
                    self.data[:: len(self.data) // n],
                    self.targets[:: len(self.targets) // n],
                )

        def __len__(self):
            return len(self.targets)

        def __getitem__(self, i):
            return Image.fromarray(self.data[i], mode="L"), int(self.targets[i])

    normalise = [transforms.ToTensor(), transforms.Normalize((MEAN,), (STD,))]
    augment = [transforms.RandomCrop(28, padding=CROP_PADDING), transforms.RandomHorizontalFlip()]
    # the reservoir DER augments inside its step, its memory's draws too (reservoir_der)
    augment_in_step = method.avalanche_der_memory == "reservoir" and protocol.augment
    train_transform = transforms.Compose(
        (augment if protocol.augment and not augment_in_step else []) + normalise
    )
    started = time.perf_counter()
    benchmark = nc_benchmark(
        Images("train"),
        Images("t10k"),
        n_experiences=N_TASKS,
        task_labels=False,
        seed=seed,
        fixed_class_order=list(range(10)),
        train_transform=train_transform,
        eval_transform=transforms.Compose(normalise),
    )

    features = mlp_features() if protocol.model == "mlp" else convnet_features()
    width = 400 if protocol.model == "mlp" else 256
    # growing: a head over the classes seen so far, the others masked out (-1000) in training and evaluation
    classifier = (
        IncrementalClassifier(width, initial_out_features=2)
        if method.head == "growing"
        else nn.Linear(width, 10)
    )
    model = Net(features, classifier)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)

    class FreshOptimizer(SupervisedPlugin):
        """A fresh optimizer state (momentum) for every task, as incr builds a new optimizer per task."""

        def before_training_exp(self, strategy, **kwargs):
            strategy.optimizer.state.clear()

    common = dict(
        optimizer=optimizer,
        train_mb_size=BATCH_SIZE,
        train_epochs=epochs,
        eval_mb_size=EVAL_BATCH_SIZE,
        device="cpu",
        evaluator=EvaluationPlugin(accuracy_metrics(experience=True), loggers=[]),
    )
    plugins = [FreshOptimizer()]
    kwargs = dict(method.kwargs)
    name = method.avalanche
    if name.startswith("Naive+"):
        plugins.append(getattr(avalanche_plugins, name.removeprefix("Naive+"))(**kwargs))
        name, kwargs = "Naive", {}
    if name == "BiC":
        # Avalanche 0.6's BiC passes MultiStepLR a `verbose` argument that torch has since removed; it only printed.
        from avalanche.training.plugins import bic as bic_plugin

        scheduler = bic_plugin.MultiStepLR
        bic_plugin.MultiStepLR = lambda *a, verbose=None, **k: scheduler(*a, **k)
        if method.avalanche_training_set == "joined":
            bic_plugin.BiCPlugin.before_training_exp = joined_training_set
    if method.avalanche_memory_views == "fresh":
        fresh_memory_views()
    if name == "ICaRL":
        buffer_transform = transforms.Compose(augment) if protocol.augment else None
        strategy = supervised.ICaRL(
            feature_extractor=features,
            classifier=classifier,
            buffer_transform=buffer_transform,
            plugins=plugins,
            **common,
            **kwargs,
        )
    else:
        strategy_class = getattr(supervised, name)
        if method.avalanche_der_memory == "reservoir":
            strategy_class = reservoir_der(strategy_class, augment_in_step)
        strategy = strategy_class(
            model=model, criterion=nn.CrossEntropyLoss(), plugins=plugins, **common, **kwargs
        )

    def evaluate() -> list[float]:
        results = strategy.eval(benchmark.test_stream)
        return [results[f"Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp{k:03d}"] for k in range(N_TASKS)]

    loaded = time.perf_counter()
    matrix, train_seconds = [], 0.0
    if name == "JointTraining":  # once, on every task's data
        tick = time.perf_counter()
        strategy.train(benchmark.train_stream)
        train_seconds += time.perf_counter() - tick
        matrix.append(evaluate())
    else:
        for experience in benchmark.train_stream:
            tick = time.perf_counter()
            strategy.train(experience)
            train_seconds += time.perf_counter() - tick
            matrix.append(evaluate())
    return {
        "accuracy_matrix": matrix,
        "train_seconds": train_seconds,
        "run_seconds": time.perf_counter() - loaded,
        "setup_seconds": loaded - started,
    }


# ----------------------------------------------------------------------------------------------- incr side
def incr_command(
    method: Method, protocol: Protocol, seed: int, epochs: int | None, run_dir: Path, threads: int
) -> list[str]:
    incr = ["incr"] if shutil.which("incr") else [sys.executable, "-m", "incr_cli"]
    epochs_override = [] if epochs is None else [f"epochs={epochs}"]
    return [
        *incr,
        "train",
        INCR_COMMON[0],
        f"strategy={method.incr}",
        *method.overrides,
        *protocol.incr,
        *epochs_override,
        f"seed={seed}",
        *INCR_COMMON[1:],
        f"hardware.num_threads={threads}",
        f"hydra.run.dir={run_dir}",
    ]


# ----------------------------------------------------------------------------------------------- the runs
def forgetting(matrix: list[list[float]]) -> float:
    """Avalanche's: accuracy right after learning a task minus the final one, averaged over the tasks before the
    last; 0 for a single evaluation (JointTraining)."""
    last = len(matrix) - 1
    return statistics.mean(matrix[j][j] - matrix[last][j] for j in range(last)) if last else 0.0


def run_source(tool: str, method_name: str) -> str:
    """The method whose run `tool` makes for this row (itself, or the row it shares that tool's runs with)."""
    return METHODS[method_name].runs_of(tool) or method_name


def record_file(out: Path, tool: str, method_name: str, protocol_name: str, seed: int) -> Path:
    return out / "runs" / protocol_name / method_name / f"{tool}_seed{seed}.json"


def finished_records(rows: list[tuple[str, str, str, int]], out: Path) -> list[dict]:
    """The records under `out` of the rows (tool, method, protocol, seed) whose seed both tools have finished;
    a row that shares a tool's runs reads the shared record."""
    found = {}
    for tool, name, protocol, seed in rows:
        path = record_file(out, tool, run_source(tool, name), protocol, seed)
        found[tool, name, protocol, seed] = (
            dict(json.loads(path.read_text()), method=name) if path.exists() else None
        )
    return [
        record
        for (_, name, protocol, seed), record in found.items()
        if all(found.get((tool, name, protocol, seed)) for tool in ("incr", "avalanche"))
    ]


def run_one(
    tool: str,
    method_name: str,
    protocol_name: str,
    seed: int,
    epochs: int | None,
    out: Path,
    data: Path,
    threads: int = THREADS,
) -> dict:
    """One run in a subprocess of its own; writes and returns its JSON record (or reads it back if it exists)."""
    if (source := run_source(tool, method_name)) != method_name:
        shared = run_one(tool, source, protocol_name, seed, epochs, out, data, threads)
        return dict(shared, method=method_name)
    record_path = record_file(out, tool, method_name, protocol_name, seed)
    if record_path.exists():
        return json.loads(record_path.read_text())
    method, protocol = METHODS[method_name], PROTOCOLS[protocol_name]
    record_path.parent.mkdir(parents=True, exist_ok=True)
    run_epochs = protocol.epochs if epochs is None else epochs
    run_dir = record_path.with_suffix("")
    if tool == "incr":
        command = incr_command(method, protocol, seed, epochs, run_dir, threads)
    else:
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--worker",
            "--methods",
            method_name,
            "--protocol",
            protocol_name,
            "--seeds",
            str(seed),
            "--epochs",
            str(run_epochs),
            "--data",
            str(data),
            "--out",
            str(run_dir),
            "--threads",
            str(threads),
        ]
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "log.txt"
    environment = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    started = time.perf_counter()
    with open(log, "w") as handle:
        done = subprocess.run(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, env=environment)
    total = time.perf_counter() - started
    diverged = nonfinite_stop(log) if tool == "incr" and done.returncode != 0 else None
    if done.returncode != 0 and not diverged:
        tail = "".join(log.read_text().splitlines(keepends=True)[-25:])
        raise SystemExit(
            f"{tool} {method_name} seed {seed} failed (exit {done.returncode}); end of {log}:\n{tail}"
        )
    record = {
        "tool": tool,
        "method": method_name,
        "protocol": protocol_name,
        "seed": seed,
        "epochs": run_epochs,
        "incr_strategy": method.incr,
        "avalanche_strategy": method.avalanche,
        "threads": threads,
        "total_seconds": total,
        # relative to the repository root, where it runs
        "command": shlex.join(command).replace(f"{REPO}/", "").replace(sys.executable, "python"),
    }
    if diverged:
        # a result of the method under these settings, not of the benchmark: recorded, and the table says so
        metrics = json.loads((run_dir / "metrics.json").read_text())
        record.update(diverged=diverged, accuracy_matrix=metrics["class_il"]["accuracy_matrix"])
    elif tool == "incr":
        metrics = json.loads((run_dir / "metrics.json").read_text())
        record.update(
            accuracy_matrix=metrics["class_il"]["accuracy_matrix"],
            train_seconds=sum(task["train_seconds"] for task in metrics["per_task"]),
            run_seconds=metrics["wall_seconds"],
        )
    else:
        record.update(json.loads((run_dir / "result.json").read_text()))
    if not diverged:
        matrix = record["accuracy_matrix"]
        record.update(final_average_accuracy=statistics.mean(matrix[-1]), forgetting=forgetting(matrix))
    record_path.write_text(json.dumps(record, indent=1))
    return record


def nonfinite_stop(log: Path) -> str | None:
    """incr's one-line error when a run stopped on a non-finite loss ("non-finite loss (nan) at task 5, ..."),
    or None."""
    for line in reversed(log.read_text().splitlines()):
        if line.startswith("error: non-finite loss"):
            return line.removeprefix("error: ").split(";")[0]
    return None


# ----------------------------------------------------------------------------------------------- the table
def mean_std(values: list[float], scale: float = 100.0) -> str:
    std = f"{statistics.stdev(values) * scale:.2f}" if len(values) > 1 else "–"  # one seed: no spread
    return f"{statistics.mean(values) * scale:.2f} ± {std}"


def table_block(records: list[dict], protocol_name: str, methods: list[str]) -> str:
    """One protocol's table, its legend and the notes of its rows: the text between the protocol's markers in
    docs/benchmarks.md (`block_markers`)."""
    lines = [
        "| method | incr (Avalanche's) | accuracy, incr | accuracy, Avalanche | difference (points) "
        "| forgetting, incr / Avalanche | time ratio (total) | time ratio (train) | seeds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    shown = []
    for method_name in methods:
        runs = {
            tool: [
                r
                for r in records
                if (r["tool"], r["protocol"], r["method"]) == (tool, protocol_name, method_name)
            ]
            for tool in ("incr", "avalanche")
        }
        if not runs["incr"] or not runs["avalanche"]:
            continue
        shown.append(method_name)
        method = METHODS[method_name]
        if stopped := [r for rs in runs.values() for r in rs if r.get("diverged")]:
            # no mean to compare: the row says which runs stopped, and where
            where = "; ".join(f"{r['tool']} seed {r['seed']}: {r['diverged']}" for r in stopped)
            finished = {
                tool: [r["final_average_accuracy"] for r in rs if not r.get("diverged")]
                for tool, rs in runs.items()
            }
            cells = [mean_std(v) if v else "–" for v in (finished["incr"], finished["avalanche"])]
            lines.append(
                f"| {method_name} | {method.incr} ({method.avalanche}) | {cells[0]} | {cells[1]} "
                f"| – | – | – | – | {len(runs['incr'])} |"
            )
            lines.append(f"|  | stopped: {where} |  |  |  |  |  |  |  |")
            continue
        accuracy = {tool: [r["final_average_accuracy"] for r in rs] for tool, rs in runs.items()}
        median = {
            (tool, key): statistics.median(r[key] for r in rs)
            for tool, rs in runs.items()
            for key in ("total_seconds", "train_seconds")
        }
        difference = (statistics.mean(accuracy["incr"]) - statistics.mean(accuracy["avalanche"])) * 100
        forget = " / ".join(
            f"{statistics.mean(r['forgetting'] for r in runs[t]):.3f}" for t in ("incr", "avalanche")
        )
        lines.append(
            f"| {method_name} | {method.incr} ({method.avalanche}) | {mean_std(accuracy['incr'])} "
            f"| {mean_std(accuracy['avalanche'])} | {difference:+.2f} | {forget} "
            f"| {median['avalanche', 'total_seconds'] / median['incr', 'total_seconds']:.2f} "
            f"| {median['avalanche', 'train_seconds'] / median['incr', 'train_seconds']:.2f} "
            f"| {len(runs['incr'])} |"
        )
    lines += [
        "",
        "Final average accuracy in percent, mean ± sample std over the seeds. Forgetting: Avalanche's (accuracy right "
        "after learning a task minus the final one, tasks before the last), mean over the seeds. Time ratios: "
        "Avalanche's median over incr's median; total: each run's process from start to exit (start-up and data "
        "loading included, one subprocess per run for both tools); train: inside the training calls.",
        "",
        "Differences that the settings do not remove:",
        "",
        *(f"- {name}: {METHODS[name].notes}" for name in shown if METHODS[name].notes),
        "- every method: incr's head is one row per class seen so far; Avalanche's is its IncrementalClassifier "
        "(unseen classes masked out) except where noted.",
    ]
    return "\n".join(lines) + "\n"


def block_markers(protocol_name: str) -> tuple[str, str]:
    return f"<!-- parity-{protocol_name}:begin -->", f"<!-- parity-{protocol_name}:end -->"


def render(
    records: list[dict], protocols: list[str], methods: list[str], command: str, threads: int, jobs: int
) -> str:
    """The whole table, as printed (or written to a new file): the command and machine, then each protocol's."""
    lines = [f"Produced by `{command}` on {datetime.date.today().isoformat()}; {machine(threads, jobs)}.", ""]
    for protocol_name in protocols:
        lines += [f"### {PROTOCOLS[protocol_name].title}", "", table_block(records, protocol_name, methods)]
    return "\n".join(lines)


def missing_block(page: Path, protocols: list[str]) -> str | None:
    """What keeps --write from putting the tables into an existing page (a protocol without its markers)."""
    text = page.read_text() if page.exists() else None
    for protocol_name in protocols:
        begin, end = block_markers(protocol_name)
        if text is not None and (begin not in text or end not in text):
            return f"{page} has no {begin} ... {end} block for the {protocol_name} table"
    return None


def write_table(
    page: Path, records: list[dict], protocols: list[str], methods: list[str], whole: str
) -> None:
    """A new page gets the whole rendering. In a page that exists each protocol's block replaces the text
    between its markers, the page's prose (what produced it, what it says) staying as it is; a page without
    a protocol's markers is an error, not overwritten."""
    if not page.exists():
        page.parent.mkdir(parents=True, exist_ok=True)
        page.write_text(whole)
        return
    if problem := missing_block(page, protocols):
        raise SystemExit(problem)
    for protocol_name in protocols:
        begin, end = block_markers(protocol_name)
        section = f"{begin}\n{table_block(records, protocol_name, methods)}{end}"
        replace_section(begin, end, section, page)


def machine(threads: int, jobs: int) -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown CPU",
    )
    try:
        from importlib.metadata import version

        avalanche = version("avalanche-lib")
    except Exception:  # noqa: BLE001 (not installed: the table still says so)
        avalanche = "not installed"
    revision = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    )
    return (
        f"{len(os.sched_getaffinity(0))} CPU cores ({cpu}), torch {torch.__version__}, Avalanche {avalanche}, "
        f"incr at git {revision.stdout.strip() or 'unknown'}, {threads} threads per run, {jobs} run(s) at a "
        "time; 1-minute load average "
        f"{os.getloadavg()[0]:.1f} at the end"
    )


# ----------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--protocol", choices=["mlp", "convnet", "both"], default="both")
    parser.add_argument(
        "--methods", default=",".join(METHODS), help=f"comma-separated, from: {','.join(METHODS)}"
    )
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="epochs per task for both tools (smoke runs); default: the protocol's",
    )
    parser.add_argument("--data", type=Path, default=FASHION_MNIST, help="folder of the four IDX .gz files")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder of the run records (default: "
        "outputs/benchmarks/parity/<date_time>/); finished runs found there are not run again",
    )
    parser.add_argument(
        "--write", action="store_true", help="write the table into --table instead of printing it"
    )
    parser.add_argument(
        "--table",
        type=Path,
        default=DOCS,
        help="the markdown file --write writes: a new file gets the whole table; in one that exists (by "
        "default docs/benchmarks.md) each protocol's table replaces the text between its "
        "<!-- parity-PROTOCOL:begin/end --> markers",
    )
    parser.add_argument(
        "--limit",
        type=int,
        default=None,
        help="check the Avalanche side only: every method "
        "on about LIMIT training samples, no incr runs, no table",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs at a time (each its own subprocess, in the interleaved order); with 2, give each --threads 1",
    )
    parser.add_argument("--threads", type=int, default=THREADS, help="torch threads of each run")
    parser.add_argument(
        "--finished-only",
        action="store_true",
        help="run nothing: the table of the runs finished under --out (a row counts the seeds both tools have)",
    )
    parser.add_argument(
        "--worker", action="store_true", help=argparse.SUPPRESS
    )  # one Avalanche run, into --out
    args = parser.parse_args()
    methods = args.methods.split(",")
    if unknown := set(methods) - set(METHODS):
        parser.error(f"unknown method(s) {', '.join(sorted(unknown))}; valid: {', '.join(METHODS)}")
    seeds = [int(seed) for seed in args.seeds.split(",")]
    if args.worker:
        result = avalanche_run(
            methods[0], args.protocol, seeds[0], args.epochs, args.data, args.limit, args.threads
        )
        (args.out / "result.json").write_text(json.dumps(result))
        return
    if args.limit:  # the Avalanche side only, in this process
        for protocol_name in ["mlp", "convnet"] if args.protocol == "both" else [args.protocol]:
            for method_name in methods:
                epochs = args.epochs or PROTOCOLS[protocol_name].epochs
                result = avalanche_run(method_name, protocol_name, seeds[0], epochs, args.data, args.limit)
                print(
                    f"{protocol_name} {method_name}: accuracy {statistics.mean(result['accuracy_matrix'][-1]):.4f}"
                )
        return
    protocols = ["mlp", "convnet"] if args.protocol == "both" else [args.protocol]
    if args.write and (problem := missing_block(args.table, protocols)):
        parser.error(problem)  # before any run, not after hours of them
    try:
        import avalanche  # noqa: F401
    except ImportError:
        raise SystemExit("Avalanche is not installed: pip install -e '.[parity]'") from None
    out = (
        args.out
        or REPO / "outputs" / "benchmarks" / "parity" / datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    ).resolve()
    command = shlex.join(["python", "benchmarks/parity.py", *sys.argv[1:]])
    # interleaved: incr seed s, then Avalanche seed s; a run that rows share is made once, for its own row
    rows = [
        (tool, method_name, protocol_name, seed)
        for protocol_name in protocols
        for method_name in methods
        for seed in seeds
        for tool in ("incr", "avalanche")
    ]
    runs = list(
        dict.fromkeys((tool, run_source(tool, name), protocol, seed) for tool, name, protocol, seed in rows)
    )

    def run(key: tuple[str, str, str, int]) -> dict:
        tool, method_name, protocol_name, seed = key
        record = run_one(tool, method_name, protocol_name, seed, args.epochs, out, args.data, args.threads)
        outcome = (
            f"stopped: {record['diverged']}"
            if record.get("diverged")
            else f"accuracy {record['final_average_accuracy']:.4f}, train {record['train_seconds']:.1f} s"
        )
        print(
            f"{protocol_name} {method_name} {tool} seed {seed}: {outcome}, total {record['total_seconds']:.1f} s",
            flush=True,
        )
        return record

    if not args.finished_only:
        # threads suffice: each run is a subprocess
        with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(run, runs))  # raises the first failure
    records = finished_records(rows, out)
    (out / "results.json").write_text(json.dumps(records, indent=1))
    table = render(records, protocols, methods, command, args.threads, args.jobs)
    if args.write:
        write_table(args.table, records, protocols, methods, table)
        print(f"wrote {args.table}; run records in {out}")
    else:
        print(table)
        print(f"run records in {out}")


if __name__ == "__main__":
    main()
