"""The streamed data path (hardware.device_data_gb): the memory a run needs when its images do not stay on the
device, and its training speed against the resident path.

Two measurements, on folders generated in ILSVRC-2012's layout (train/<wnid>/, val/<wnid>/; JPEGs of several
sizes and aspect ratios) and read through `dataset=imagenet` (short side to 256, centre square; random-resized
crops and flips on the device):

1. Memory. A folder of at least --gigabytes of decoded pixels (at 256x256x3) is decoded once into the cache's
   .npy files (dataset.memory_map_gb=0), then trained on in a fresh process with every image streamed
   (hardware.device_data_gb=0): one epoch of replay (memory 100) with an MLP on 32x32 crops, so that reading
   the images, not the network, is the work. Its peak RSS (metrics.json `peak_memory_bytes`) is compared with
   the same run on a tiny folder in the same layout, and with the large folder trained resident, i.e. indexed
   through its memory map, whose pages count toward the process's resident memory once read.
2. Speed. ResNet-18 (ImageNet stem) at 224 on a generated folder of --speed-images training images: training
   images per second (metrics.json, the tasks' own samples per second of training), streamed from the cache's
   files against resident in memory, --repeats times interleaved (resident, streamed, resident, ...), medians.
   On a GPU add `--hardware amp` (hardware=amp, channels_last).

From the repository root (the generated folders go to --scratch, by default a temporary folder):
    python benchmarks/streaming.py                      # prints the section
    python benchmarks/streaming.py --write              # replaces this benchmark's section of docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from docs_page import show_or_write  # noqa: E402  (benchmarks/ is a folder of scripts)

REPO = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- streaming:begin -->", "<!-- streaming:end -->"
STORED_BYTES = 256 * 256 * 3  # one decoded image of dataset=imagenet
CLASSES = 10
VAL_PER_CLASS = 10
MEMORY_RUN = [
    "dataset=imagenet",
    f"dataset.num_classes={CLASSES}",
    "dataset.n_tasks=2",
    "dataset.crop_size=32",
    "dataset.memory_map_gb=0",
    "model=mlp",
    "epochs=1",
    "batch_size=64",
    "strategy=replay",
    "strategy.memory.size=100",
    "hardware=cpu",
    "progress=false",
]
SPEED_RUN = [
    "dataset=imagenet",
    f"dataset.num_classes={CLASSES}",
    "dataset.n_tasks=2",
    "model=resnet18_imagenet",
    "epochs=1",
    "batch_size=32",
    "strategy=finetune",
    "progress=false",
]


def write_imagenet_folder(root: Path, train_per_class: int, val_per_class: int, seed: int = 0) -> None:
    """ILSVRC-2012's layout: JPEGs between 256 and 400 pixels a side, smooth colour fields plus noise."""
    generator = np.random.default_rng(seed)
    for c in range(CLASSES):
        wnid = f"n{1440764 + c:08d}"
        for split, count in (("train", train_per_class), ("val", val_per_class)):
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                width, height = (int(v) for v in generator.integers(256, 400, 2))
                field = generator.integers(0, 256, (6, 6, 3), dtype=np.uint8)
                image = Image.fromarray(field).resize((width, height), Image.Resampling.BILINEAR)
                noise = generator.integers(-12, 13, (height, width, 3))
                pixels = np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{wnid}_{i}.JPEG", quality=90)


def decoded_gigabytes(root: Path) -> float:
    return sum(1 for _ in root.rglob("*.JPEG")) * STORED_BYTES / 1e9


def train(run_dir: Path, data_root: Path, settings: list[str]) -> dict:
    """One `incr train` process; returns its metrics.json."""
    incr = ["incr"] if shutil.which("incr") else [sys.executable, "-m", "incr_cli"]
    # through a small shell: a child started straight from this process would inherit its peak RSS
    command = ["sh", "-c", '"$@"; exit $?', "sh", *incr, "train", *settings]
    command += [f"data.root={data_root}", f"hydra.run.dir={run_dir}"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"incr failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads((run_dir / "metrics.json").read_text())


def images_per_second(metrics: dict) -> float:
    """The tasks' own training samples over their training seconds."""
    tasks = metrics["per_task"]
    samples = sum(t["samples_per_second"] * t["train_seconds"] for t in tasks)
    return samples / sum(t["train_seconds"] for t in tasks)


def memory(scratch: Path, gigabytes: float) -> dict:
    per_class = int(gigabytes * 1e9 / STORED_BYTES / CLASSES) + 1 - VAL_PER_CLASS
    large, tiny = scratch / "large", scratch / "tiny"
    print(f"writing {CLASSES} x ({per_class} + {VAL_PER_CLASS}) JPEGs ...", flush=True)
    write_imagenet_folder(large / "imagenet", per_class, VAL_PER_CLASS)
    write_imagenet_folder(tiny / "imagenet", 6, 2)
    size = decoded_gigabytes(large / "imagenet")
    # decode into the caches first (a separate process), so that the measured runs only read
    for root in (large, tiny):
        train(
            scratch / f"decode-{root.name}",
            root,
            [*MEMORY_RUN, "dataset.n_tasks=1", "dataset.num_classes=10"],
        )
    runs = {}
    for name, root, budget in (
        ("tiny, streamed", tiny, "0"),
        ("large, streamed", large, "0"),
        ("large, resident", large, "null"),
    ):
        print(f"memory: {name} ...", flush=True)
        metrics = train(
            scratch / f"memory-{name.replace(', ', '-')}",
            root,
            [*MEMORY_RUN, f"hardware.device_data_gb={budget}"],
        )
        runs[name] = {
            "peak_rss_gb": metrics["peak_memory_bytes"] / 1e9,
            "accuracy": metrics["class_il"]["final_average_accuracy"],
            "images": sum(1 for _ in (root / "imagenet" / "train").rglob("*.JPEG")),
        }
    return {"decoded_gb": size, "runs": runs}


def speed(scratch: Path, train_images: int, repeats: int, hardware: str) -> dict:
    root = scratch / "speed"
    write_imagenet_folder(root / "imagenet", train_images // CLASSES, 2, seed=1)
    settings = [*SPEED_RUN, f"hardware={hardware}", "dataset.memory_map_gb=0"]
    if hardware == "amp":
        settings.append("hardware.channels_last=true")
    paths = {"resident": "null", "streamed": "0"}
    seen: dict[str, list[float]] = {name: [] for name in paths}
    for i in range(repeats):
        for name, budget in paths.items():
            metrics = train(
                scratch / f"speed-{name}-{i}", root, [*settings, f"hardware.device_data_gb={budget}"]
            )
            seen[name].append(images_per_second(metrics))
            print(f"speed {name} #{i + 1}: {seen[name][-1]:.1f} images/s", flush=True)
    return {"images_per_second": seen, "settings": settings, "train_images": train_images}


def section(result: dict, command: str) -> str:
    mem, fast = result["memory"], result["speed"]
    runs = mem["runs"]
    tiny, large, resident = (
        runs[k]["peak_rss_gb"] for k in ("tiny, streamed", "large, streamed", "large, resident")
    )
    rates = {k: statistics.median(v) for k, v in fast["images_per_second"].items()}
    lines = [
        BEGIN,
        "## Streamed images: memory and speed",
        "",
        f"Produced by `{command}` on {datetime.date.today().isoformat()}; {os.cpu_count()} CPU cores "
        f"({platform.machine()}), Python {platform.python_version()}, no GPU; 1-minute load average "
        f"{os.getloadavg()[0]:.1f} at the end (above about 0.5: other work shared the cores).",
        "Generated folders in ILSVRC-2012's layout read through `dataset=imagenet` (short side to 256, centre square, "
        "random-resized crops on the device). `hardware.device_data_gb=0` streams every image from the cache's "
        ".npy files; resident keeps them as the run's tensors (in memory, or indexed through the memory map).",
        "",
        f"**Memory.** {mem['decoded_gb']:.2f} GB of decoded images, one epoch of replay (memory 100) with an MLP on 32x32 "
        "crops, so that reading the images is the work (`" + " ".join(MEMORY_RUN) + "`):",
        "",
        "| run | training images | peak RSS GB | final accuracy |",
        "|---|---|---|---|",
    ]
    for name, run in runs.items():
        lines.append(f"| {name} | {run['images']:,} | {run['peak_rss_gb']:.2f} | {run['accuracy']:.3f} |")
    lines += [
        "",
        f"Streamed, the large folder's peak RSS exceeds the tiny folder's by {large - tiny:.2f} GB, "
        f"{(large - tiny) / mem['decoded_gb']:.0%} of the decoded size (the bound: 25%). Resident, indexed "
        f"through the memory map, it exceeds it by {resident - tiny:.2f} GB: mapped pages count once read.",
        "",
        f"**Speed.** ResNet-18 (ImageNet stem) at 224, {fast['train_images']:,} training images, one epoch over two "
        f"tasks, batch 32 (`{' '.join(fast['settings'])}`), medians of {len(fast['images_per_second']['resident'])} "
        "interleaved repeats:",
        "",
        "| path | training images/s | each repeat |",
        "|---|---|---|",
    ]
    for name, values in fast["images_per_second"].items():
        lines.append(f"| {name} | {rates[name]:.1f} | {', '.join(f'{v:.1f}' for v in values)} |")
    lines += ["", f"Streamed reaches **{rates['streamed'] / rates['resident']:.0%}** of resident.", END]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gigabytes", type=float, default=1.05, help="decoded size of the large folder")
    parser.add_argument("--speed-images", type=int, default=320, help="training images of the speed folder")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hardware", default="cpu", choices=["cpu", "gpu", "amp"])
    parser.add_argument(
        "--scratch", type=Path, default=None, help="where the folders go (default: a temporary one)"
    )
    parser.add_argument("--write", action="store_true", help="replace this section of docs/benchmarks.md")
    args = parser.parse_args()
    command = "python benchmarks/streaming.py " + " ".join(sys.argv[1:])
    with tempfile.TemporaryDirectory(dir=args.scratch) as scratch:
        result = {
            "memory": memory(Path(scratch), args.gigabytes),
            "speed": speed(Path(scratch), args.speed_images, args.repeats, args.hardware),
        }
    print(json.dumps(result, indent=1))
    text = section(result, command.strip())
    show_or_write(BEGIN, END, text, args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
