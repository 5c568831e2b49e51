"""GPU throughput, ResNet-18 on CIFAR-shaped data (docs/benchmarks.md): incr next to a plain PyTorch loop.

Set-up: generated CIFAR-shaped images (`dataset=synthetic`: 5 tasks x 10,000 training images of 3x32x32 uint8, 10
classes per task), ResNet-18 (CIFAR variant), batch 128, random crop (padding 4) + flip on the device. Reported:
training images/s of finetune, replay (memory 500) and DER++ (memory 500) under `hardware=gpu` and
`hardware=amp`, and of a hand-written loop training the same model on the same tensors (the speed limit).

incr's figure is each run's samples/s (its own training samples over its training seconds, tasks 2..5, so that
start-up compilation and cuDNN autotuning in task 1 are left out); the plain loop's is timed with CUDA events.
One epoch per task: throughput, not accuracy, is measured.

    python benchmarks/gpu_throughput.py --write          # on a GPU machine: replaces the GPU throughput section of docs/benchmarks.md
    python benchmarks/gpu_throughput.py --device cpu --train-per-class 4 --test-per-class 1 --methods finetune
                                                         # a smoke run of the script on a CPU (a minute or two)
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from docs_page import replace_section  # noqa: E402  (benchmarks/ is a folder of scripts)

REPO = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- p3:begin -->", "<!-- p3:end -->"
METHODS = {
    "finetune": [],
    "replay": ["strategy.memory.size=500"],
    "derpp": ["strategy.memory.size=500", "strategy.alpha=0.1", "strategy.beta=0.5"],
}
HARDWARE = ("gpu", "amp")
BATCH = 128


def incr_images_per_second(method: str, hardware: str, args, out: Path) -> float:
    incr = ["incr"] if shutil.which("incr") else [sys.executable, "-m", "incr_cli"]
    command = [
        *incr,
        "train",
        f"strategy={method}",
        *METHODS[method],
        "dataset=synthetic",
        "model=resnet18",
        f"dataset.train_per_class={args.train_per_class}",
        f"dataset.test_per_class={args.test_per_class}",
        f"hardware={hardware}",
        "epochs=1",
        f"batch_size={BATCH}",
        "progress=false",
        f"hydra.run.dir={out}",
    ]
    if args.device == "cpu":
        command.append("hardware.device=cpu")
    subprocess.run(command, check=True, capture_output=True)
    per_task = json.loads((out / "metrics.json").read_text())["per_task"]
    later = per_task[1:] or per_task
    return sum(t["samples"] for t in later) / sum(t["train_seconds"] for t in later)


def plain_loop_images_per_second(amp: bool, args) -> float:
    """ResNet-18 trained on the synthetic tensors with nothing but PyTorch: batches are index slices of the
    device-resident uint8 data, crop and flip are batched tensor ops, one fresh SGD per task."""
    from incr_cli.data.batches import random_crop, random_flip
    from incr_cli.data.synthetic import load_synthetic
    from incr_cli.models.resnet import ResNet18

    device = torch.device(args.device)
    dataset = OmegaConf.load(REPO / "configs" / "dataset" / "synthetic.yaml")
    dataset.train_per_class = args.train_per_class
    source = load_synthetic(dataset)
    x, y = source.train_x.to(device), source.train_y.to(device)
    mean = torch.tensor(dataset.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(dataset.std, device=device).view(1, 3, 1, 1)
    backbone = ResNet18(tuple(dataset.input_shape)).to(device)
    head = torch.nn.Linear(backbone.feature_dim, dataset.num_classes).to(device)
    generator = torch.Generator(device=device).manual_seed(0)
    per_task = dataset.num_classes // dataset.n_tasks
    images, seconds = 0, 0.0
    for task in range(dataset.n_tasks):
        seen = (task + 1) * per_task
        rows = torch.nonzero((y >= task * per_task) & (y < seen)).flatten()
        optimizer = torch.optim.SGD([*backbone.parameters(), *head.parameters()], lr=0.1, momentum=0.9)
        order = rows[torch.randperm(len(rows), device=device)]
        started = _clock(device)
        for first in range(0, len(order), BATCH):
            batch = order[first : first + BATCH]
            inputs = random_flip(random_crop(x[batch].float() / 255, 4, generator), generator)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = head(backbone((inputs - mean) / std))[:, :seen]
                loss = F.cross_entropy(logits, y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if task > 0:  # as for incr: the first task carries the warm-up
            images += len(order)
            seconds += _elapsed(started, device)
    return images / seconds


def _clock(device: torch.device):
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def _elapsed(started, device: torch.device) -> float:
    if device.type == "cuda":
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        end.synchronize()
        return started.elapsed_time(end) / 1000
    return time.perf_counter() - started


def render(rows: list[tuple[str, str, float]], command: str, device_name: str) -> str:
    lines = [
        BEGIN,
        "## GPU throughput, ResNet-18 on CIFAR-shaped data",
        "",
        f"Produced by `{command}` on {datetime.date.today()}; device: {device_name}, torch {torch.__version__}.",
        "Images/s of training over tasks 2-5 (task 1 carries the warm-up), one epoch per task, batch 128,",
        "ResNet-18 on `dataset=synthetic` (generated CIFAR-shaped data), crop + flip on the device.",
        "",
        "| method | hardware | images/s |",
        "|---|---|---|",
    ]
    lines += [f"| {method} | {hardware} | {speed:,.0f} |" for method, hardware, speed in rows]
    return "\n".join([*lines, "", END])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--methods", default=",".join(METHODS), help=f"comma-separated, from: {','.join(METHODS)}"
    )
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a smoke run only")
    parser.add_argument("--train-per-class", type=int, default=1000, help="default 1000: 10,000 per task")
    parser.add_argument(
        "--test-per-class", type=int, default=100, help="evaluated after each task (not timed)"
    )
    parser.add_argument("--write", action="store_true", help="replace its section of docs/benchmarks.md")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("the GPU throughput benchmark needs a CUDA GPU (--device cpu runs a smoke test)")
    out = REPO / "outputs" / "benchmarks" / "p3" / datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    rows = []
    for hardware in HARDWARE:
        for method in args.methods.split(","):
            speed = incr_images_per_second(method, hardware, args, out / f"{method}_{hardware}")
            rows.append((method, hardware, speed))
            print(f"{method:10s} {hardware:4s} {speed:10,.0f} images/s", flush=True)
        speed = plain_loop_images_per_second(hardware == "amp", args)
        rows.append(("plain loop", hardware, speed))
        print(f"{'plain loop':10s} {hardware:4s} {speed:10,.0f} images/s", flush=True)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    section = render(rows, "python benchmarks/gpu_throughput.py --write", name)
    print(section)
    if args.write:
        replace_section(BEGIN, END, section)


if __name__ == "__main__":
    main()
