"""The default `incr train` as a whole process, next to its floor: what any PyTorch program doing the same work
must pay.

Floor = a Python process that imports torch and builds an SGD optimizer (whose first construction imports
torch._dynamo), timed as a whole process, plus the run's own training and evaluation seconds (from its
metrics.json: the sum over tasks of `train_seconds` and `eval_seconds`). The rest of incr's process is what it
adds: Hydra composing the config, the checks, data loading, writing results and figures.

incr freezes the garbage collector before the interpreter exits (cli.console_main), which spares it tracing
torch's objects at exit; the plain floor process pays that. A second floor process that exits the same way
(`gc.freeze()` last) is timed too, so that the table shows incr's overhead with and without that difference.

Both are run `--repeats` times, interleaved (floor, incr, floor, incr, ...) so that both see the machine in
the same state; the table gives medians. From the repository root:
    python benchmarks/startup.py --repeats 5
    python benchmarks/startup.py --repeats 5 --write    # replaces this benchmark's section of docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from docs_page import show_or_write  # noqa: E402  (benchmarks/ is a folder of scripts)

REPO = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- startup:begin -->", "<!-- startup:end -->"
FLOOR = "import torch; torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)"
FLOOR_FROZEN = FLOOR + "; import gc; gc.freeze()"
TRAIN = ["hardware=cpu", "progress=false"]


def timed(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, cwd=REPO)
    return time.perf_counter() - start


def work_seconds(run_dir: Path) -> float:
    per_task = json.loads((run_dir / "metrics.json").read_text())["per_task"]
    return sum(t["train_seconds"] + t["eval_seconds"] for t in per_task)


def measure(repeats: int) -> dict[str, list[float]]:
    seen: dict[str, list[float]] = {"python_torch_optimizer": [], "frozen_exit": [], "incr": [], "work": []}
    with tempfile.TemporaryDirectory() as scratch:
        for i in range(repeats):
            seen["python_torch_optimizer"].append(timed([sys.executable, "-c", FLOOR]))
            seen["frozen_exit"].append(timed([sys.executable, "-c", FLOOR_FROZEN]))
            run_dir = Path(scratch) / f"run{i}"
            command = [sys.executable, "-m", "incr_cli", "train", *TRAIN, f"hydra.run.dir={run_dir}"]
            seen["incr"].append(timed(command))
            seen["work"].append(work_seconds(run_dir))
            print(f"repeat {i + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in seen.items()), flush=True)
    return seen


def section(seen: dict[str, list[float]], repeats: int) -> str:
    base, frozen, whole, work = (
        statistics.median(seen[k]) for k in ("python_torch_optimizer", "frozen_exit", "incr", "work")
    )
    floor, floor_frozen = base + work, frozen + work
    load = os.getloadavg()[0]
    return f"""{BEGIN}
## Start-up: the default run against its floor

Produced by `python benchmarks/startup.py --repeats {repeats} --write` on {time.strftime("%Y-%m-%d")}; {platform.machine()},
{os.cpu_count()} CPU cores, torch {importlib.metadata.version("torch")}, Python {platform.python_version()}; 1-minute load average {load:.1f} at the end.
The default run is `incr train {" ".join(TRAIN)}` (digits, MLP, replay, 5 tasks of 10 epochs). Medians of
{repeats} interleaved repeats. incr freezes the garbage collector before it exits, which spares the interpreter
tracing torch's objects at exit; the second floor exits the same way, to show incr's own overhead alone:

| | seconds |
|---|---|
| python + `import torch` + the first SGD optimizer (a process of its own) | {base:.2f} |
| the same, exiting with the garbage collector frozen, as incr does | {frozen:.2f} |
| the run's training and evaluation (metrics.json) | {work:.2f} |
| **floor** (the first and third rows) | **{floor:.2f}** |
| floor exiting as incr does (the second and third rows) | {floor_frozen:.2f} |
| **`incr train`, the whole process** | **{whole:.2f}** |
| **ratio to the floor** | **{whole / floor:.2f}** |
| ratio to the floor exiting as incr does | {whole / floor_frozen:.2f} |
{END}"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--write", action="store_true", help="replace this section of docs/benchmarks.md")
    args = parser.parse_args()
    text = section(measure(args.repeats), args.repeats)
    show_or_write(BEGIN, END, text, args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
