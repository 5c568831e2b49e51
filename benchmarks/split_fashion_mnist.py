"""Split Fashion-MNIST, MLP (class-incremental) with incr, next to the reference figures and a plain loop.

The protocol (docs/benchmarks.md): Fashion-MNIST, 5 tasks of 2 classes in class order 0..9, one head over the
classes seen so far; MLP 784-400-400-10; SGD lr 0.01 momentum 0.9, batch 128, 2 epochs per task; evaluation
(batch 1,000) on the whole test stream after every task; CPU, 2 threads; seeds 0,1,2. Methods here: every strategy
of incr but MER (METHODS below: memory methods at the protocol's 500 samples).

For each method this script runs ONE Hydra multirun of incr over the seeds, e.g.
    incr train -m experiment=split_fashion_mnist strategy=replay strategy.memory.size=500 seed=0,1,2 \
        hardware=cpu hardware.num_threads=2 progress=false hydra.sweep.dir=outputs/benchmarks/split_fashion_mnist/<time>/replay
(one multirun per method, because only replay takes the memory override), then runs the same seeds through
benchmarks/plain_loop.py (a hand-written PyTorch loop doing the same work: the speed limit), reads every incr
job's metrics.json, and prints a markdown section comparing both with the reference figures (REFERENCE below).

Run it on a quiet machine (other processes on the 2 cores ruin the timings), from the repository root:
    python benchmarks/split_fashion_mnist.py --write     # replaces this benchmark's section of docs/benchmarks.md
    python benchmarks/split_fashion_mnist.py --seeds 0   # a one-seed smoke run; prints, writes nothing
An interrupted run goes on where it stopped when given the same folder: `--out outputs/benchmarks/...` (each method
finished there is read back; the plain loop's results too).
"""

from __future__ import annotations

import argparse
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import plain_loop  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs" / "benchmarks.md"
BEGIN, END = (
    "<!-- split-fashion-mnist:begin -->",
    "<!-- split-fashion-mnist:end -->",
)  # this script owns only what lies between these

# Each method and the overrides it needs on top of the experiment; the memory size is the protocol's, not replay's
# default. incr's strategy name -> the overrides that give the protocol's settings for that method.
METHODS = {
    "finetune": [],
    "joint": [],
    "replay": ["strategy.memory.size=500"],
    "derpp": ["strategy.memory.size=500", "strategy.alpha=0.1", "strategy.beta=0.5"],
    "gem": ["strategy.patterns_per_task=100", "strategy.memory_strength=0.5"],
    "agem": ["strategy.patterns_per_task=100", "strategy.sample_size=256"],
    "gdumb": ["strategy.memory.size=500"],
    "der": ["strategy.memory.size=500"],
    "xder": ["strategy.memory.size=500"],
    "er_ace": ["strategy.memory.size=500"],
    "importance_replay": ["strategy.memory.size=500"],
    # The reference's lambda 1000 on Avalanche's penalty, lambda * sum F d^2 with its batch-mean Fisher, is incr's
    # (lambda / 2) * sum F d^2 at 2000 with fisher=batch (true labels, no curvature cap, as Avalanche)
    "ewc": [
        "strategy.ewc_lambda=2000",
        "strategy.fisher=batch",
        "strategy.fisher_labels=empirical",
        "strategy.curvature_limit=none",
    ],
    "online_ewc": [],
    "si": [],
    "mas": [],
    "lwf": ["strategy.alpha=1", "strategy.temperature=2"],
    "rwalk": [],
    "icarl": ["strategy.memory.size=500"],
    "lucir": ["strategy.memory.size=500"],
    "podnet": ["strategy.memory.size=500"],
    "bic": ["strategy.memory.size=500"],
    "wa": ["strategy.memory.size=500"],
    "der_expandable": ["strategy.memory.size=500"],
    "foster": ["strategy.memory.size=500"],
    # mer is left out of the default list: s*k = 100 times fine-tuning's work (about 400 s a run here).
}
PLAIN_LOOP_METHODS = ("finetune", "joint", "replay")
PROCESS_SECONDS = "process_seconds.json"  # a finished multirun's wall time, written beside its runs
PLAIN_LOOP_RESULTS = "plain_loop.json"  # the plain loop's results for the method, one per seed
COMMON = ["experiment=split_fashion_mnist", "hardware=cpu", "hardware.num_threads=2", "progress=false"]


@dataclass
class Reference:
    """One reference row for this benchmark (Avalanche 0.6.0, torch 2.14.1, 2 threads, seeds 0,1,2, 2026-11-22)."""

    accuracy: float
    accuracy_std: float
    forgetting: float  # Avalanche's: accuracy right after learning a task minus final, first four tasks
    train_seconds: float
    total_seconds: float


REFERENCE = {
    "finetune": Reference(0.1994, 0.0001, 0.987, 16.1, 21.8),  # Avalanche Naive
    "joint": Reference(0.8552, 0.0046, 0.000, 16.1, 17.8),  # Avalanche JointTraining, once on all data
    "replay": Reference(0.7881, 0.0020, 0.205, 27.2, 33.0),  # Avalanche, replay with memory 500
    "derpp": Reference(0.7963, 0.0108, 0.193, 34.6, 40.7),  # Avalanche DER with DER++'s weights
    "gem": Reference(0.7506, 0.0118, 0.273, 55.0, 61.0),
    "agem": Reference(0.2183, 0.0251, 0.964, 30.7, 36.7),
    "gdumb": Reference(0.5151, 0.0319, 0.277, 0.9, 7.4),
    "ewc": Reference(0.2003, 0.0008, 0.986, 27.0, 32.7),  # lambda 1000
    "lwf": Reference(0.1992, 0.0001, 0.987, 16.9, 22.8),  # alpha 1, temperature 2
    "icarl": Reference(0.6428, 0.0072, 0.134, 27.0, 33.5),  # memory 500, herding
    "plain loop, finetune": Reference(0.1994, 0.0001, 0.987, 2.2, 2.8),
    "plain loop, joint": Reference(0.8589, 0.0032, 0.000, 2.0, 3.4),  # once on all data
}


@dataclass
class Row:
    """One method's runs over the seeds, reduced to the table's figures."""

    name: str  # "replay", or "plain loop, replay"
    seeds: list[int]
    accuracies: list[float]
    # incr's own forgetting (Chaudhry et al. 2018, max-based); None for the plain loop, which does not report it.
    forgetting_max: float | None
    forgetting_avalanche: float
    train_seconds: float  # medians over seeds from here on
    total_seconds: float
    process_seconds: float | None  # incr only: the multirun's wall time / number of seeds
    samples_per_second: float
    peak_memory_mib: float


# ----------------------------------------------------------------------------------------------- the runs
def incr_command(method: str, seeds: list[int], sweep_dir: Path) -> list[str]:
    incr = ["incr"] if shutil.which("incr") else [sys.executable, "-m", "incr_cli"]
    return [
        *incr,
        "train",
        "-m",
        COMMON[0],
        f"strategy={method}",
        *METHODS[method],
        f"seed={','.join(map(str, seeds))}",
        *COMMON[1:],
        f"hydra.sweep.dir={sweep_dir}",
    ]


def finished_runs(method: str, seeds: list[int], sweep_dir: Path) -> tuple[list[dict], float] | None:
    """A method's multirun that an earlier invocation with the same --out completed (every seed's metrics.json and
    the recorded wall time), or None."""
    timing = sweep_dir / PROCESS_SECONDS
    runs = [json.loads(path.read_text()) for path in sorted(sweep_dir.glob("*/metrics.json"))]
    found = sorted((run["run"]["strategy"], run["run"]["seed"]) for run in runs)
    if not timing.exists() or found != sorted((method, seed) for seed in seeds):
        return None
    return runs, json.loads(timing.read_text())["seconds"]


def run_incr(method: str, seeds: list[int], sweep_dir: Path) -> tuple[list[dict], float]:
    """One multirun over the seeds; returns every job's metrics.json and the process's wall time."""
    if sweep_dir.exists():  # an interrupted multirun: start the method again from nothing
        shutil.rmtree(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    log = sweep_dir / "incr.log"
    started = time.perf_counter()
    # Through `sh -c '...; exit $?'`, which forks incr from a small shell: on Linux a child started straight from
    # this process (vfork + exec) inherits this process's peak RSS as its own ru_maxrss, and incr's
    # peak_memory_bytes would then report the plain loop's data instead of its own.
    command = ["sh", "-c", '"$@"; exit $?', "sh", *incr_command(method, seeds, sweep_dir)]
    with open(log, "w") as handle:
        done = subprocess.run(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"incr failed for {method} (exit {done.returncode}); last lines of {log}:\n{tail}")
    runs = [json.loads(path.read_text()) for path in sorted(sweep_dir.glob("*/metrics.json"))]
    found = sorted((run["run"]["strategy"], run["run"]["seed"]) for run in runs)
    if found != sorted((method, seed) for seed in seeds):
        raise SystemExit(f"{sweep_dir} does not hold one {method} run per seed {seeds}; see {log}")
    (sweep_dir / PROCESS_SECONDS).write_text(json.dumps({"seconds": wall}))
    return runs, wall


# ----------------------------------------------------------------------------------------------- the figures
def avalanche_forgetting(matrix: list[list[float]]) -> float:
    """R[j][j] - R[T-1][j] averaged over the tasks before the last: the accuracy right after learning a task minus
    the final one, as Avalanche's forgetting metric (and so the reference column) defines it."""
    last = len(matrix) - 1
    return statistics.mean(matrix[j][j] - matrix[last][j] for j in range(last))


def incr_row(method: str, runs: list[dict], process_seconds: float) -> Row:
    def train_seconds(run: dict) -> float:
        return sum(task["train_seconds"] for task in run["per_task"])

    def samples_per_second(run: dict) -> float:  # over the whole run, so long tasks weigh more
        samples = sum(task["samples_per_second"] * task["train_seconds"] for task in run["per_task"])
        return samples / train_seconds(run) if train_seconds(run) else float("nan")

    return Row(
        name=method,
        seeds=[run["run"]["seed"] for run in runs],
        accuracies=[run["class_il"]["final_average_accuracy"] for run in runs],
        forgetting_max=statistics.mean(run["class_il"]["average_forgetting"] for run in runs),
        forgetting_avalanche=statistics.mean(
            avalanche_forgetting(run["class_il"]["accuracy_matrix"]) for run in runs
        ),
        train_seconds=statistics.median(train_seconds(run) for run in runs),
        total_seconds=statistics.median(run["wall_seconds"] for run in runs),
        process_seconds=process_seconds / len(runs),
        samples_per_second=statistics.median(samples_per_second(run) for run in runs),
        peak_memory_mib=statistics.median(run["peak_memory_bytes"] for run in runs) / 2**20,
    )


def plain_loop_row(method: str, results: list[dict]) -> Row:
    return Row(
        name=f"plain loop, {method}",
        seeds=[r["seed"] for r in results],
        accuracies=[r["final_average_accuracy"] for r in results],
        forgetting_max=None,
        forgetting_avalanche=statistics.mean(avalanche_forgetting(r["accuracy_matrix"]) for r in results),
        train_seconds=statistics.median(r["train_seconds"] for r in results),
        total_seconds=statistics.median(r["total_seconds"] for r in results),
        process_seconds=None,
        samples_per_second=statistics.median(r["samples_per_second"] for r in results),
        peak_memory_mib=statistics.median(r["peak_memory_bytes"] for r in results) / 2**20,
    )


# ----------------------------------------------------------------------------------------------- the page
def number(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else None  # sample std (n - 1)
    return f"{statistics.mean(values):.4f} ± {number(std, 4)}"


def versus(here: str, reference: str | None) -> str:
    return f"{here} / {reference or '–'}"


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown CPU",
    )
    return (
        f"{len(os.sched_getaffinity(0))} CPU cores ({cpu}), torch {torch.__version__}, "
        f"Python {platform.python_version()}, {platform.system()} {platform.release()}; 1-minute load average "
        f"{os.getloadavg()[0]:.1f} at the end (above about 0.5: other work shared the cores)"
    )


def git_revision() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    revision = git("rev-parse", "--short", "HEAD") or "unknown"
    return revision + (
        " with uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else ""
    )


def render(rows: list[Row], command: str, incr_commands: list[str], seeds: list[int], revision: str) -> str:
    plain = {row.name.removeprefix("plain loop, "): row for row in rows if row.name.startswith("plain loop")}
    plain_finetune = plain["finetune"].train_seconds if "finetune" in plain else float("nan")
    slowdown = plain_finetune / REFERENCE["plain loop, finetune"].train_seconds
    lines = [
        "## Split Fashion-MNIST, MLP, class-incremental",
        "",
        f"Produced by `{command}` on {datetime.date.today().isoformat()}, seeds {','.join(map(str, seeds))}, "
        f"incr at git {revision}.",
        f"Machine: {machine()}.",
        "Timings are medians over the seeds on a shared, noisy machine: compare the ratios of runs made at the same "
        "time, not seconds across pages. Protocol: Fashion-MNIST, 5 tasks of 2 classes, MLP 784-400-400-10, SGD "
        "lr 0.01 momentum 0.9, batch 128, 2 epochs per task, 2 threads. Each incr method is one Hydra multirun:",
        "",
        "```bash",
        *incr_commands,
        "```",
        "",
        "| method | final average accuracy (mean ± std) | forgetting, incr (max-based) | forgetting, Avalanche's "
        "| train s | total s | process s per seed | samples/s | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.name} | {mean_std(row.accuracies)} | {number(row.forgetting_max, 3)} "
            f"| {number(row.forgetting_avalanche, 3)} | {row.train_seconds:.1f} | {row.total_seconds:.1f} "
            f"| {number(row.process_seconds, 1)} | {row.samples_per_second:,.0f} | {row.peak_memory_mib:,.0f} |"
        )
    lines += [
        "",
        "Next to the reference (Avalanche 0.6.0, torch 2.14.1, measured 2026-11-22). Speed ratio: "
        "reference total s ÷ this total s (above 1: faster than the reference). Machine-normalised: the same ratio "
        f"after scaling the reference by how much slower this machine ran the plain-loop finetune than the reference "
        f"machine did (here {slowdown:.2f}x: {plain_finetune:.1f} s against 2.2 s), since only ratios of runs made "
        "at the same time compare. Plain-loop speed reached: plain loop train s ÷ incr train s, both measured "
        "here, back to back.",
        "",
        "| method | accuracy: here / reference | forgetting (Avalanche's): here / reference "
        "| train s: here / reference | total s: here / reference | speed ratio | machine-normalised speed ratio "
        "| plain-loop speed reached |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ref = REFERENCE.get(row.name)
        accuracy = versus(mean_std(row.accuracies), ref and f"{ref.accuracy:.4f} ± {ref.accuracy_std:.4f}")
        forgetting = versus(f"{row.forgetting_avalanche:.3f}", ref and f"{ref.forgetting:.3f}")
        train = versus(f"{row.train_seconds:.1f}", ref and f"{ref.train_seconds:.1f}")
        total = versus(f"{row.total_seconds:.1f}", ref and f"{ref.total_seconds:.1f}")
        ratio = "–" if ref is None else f"{ref.total_seconds / row.total_seconds:.2f}"
        normalised = "–" if ref is None else f"{ref.total_seconds * slowdown / row.total_seconds:.2f}"
        if ref is not None and row.name.endswith("joint"):
            ratio += " (†)"
            normalised += " (†)"
        reached = f"{plain[row.name].train_seconds / row.train_seconds:.0%}" if row.name in plain else "–"
        lines.append(
            f"| {row.name} | {accuracy} | {forgetting} | {train} | {total} | {ratio} | {normalised} | {reached} |"
        )
    lines += [
        "",
        "- train s: the sum of the per-task training times. total s: the time inside the run; for incr its "
        "`wall_seconds` (evaluation before and after every task, checkpoints, metrics files and plots included), for "
        "the plain loop training, memory update and evaluation. process s per seed: the multirun's wall time ÷ "
        "seeds (Python and torch start-up, config composition and data loading included).",
        "- Forgetting, incr (max-based): incr's `average_forgetting`, Chaudhry et al. 2018 (best earlier accuracy "
        "on a task minus the final one). Forgetting, Avalanche's: accuracy right after learning a task minus the "
        "final one, averaged over the first four tasks, computed here from the accuracy matrix; the reference "
        "column uses this one. Both are means over seeds.",
        "- (†) joint: incr's `joint` (and the plain loop here) is cumulative: at task k it trains on all data of "
        "tasks 1..k, 360,000 samples over the run; the reference's JointTraining trains once on all data, 120,000 "
        "samples. Compare its accuracy, not its seconds, with the reference. The reference rows are Avalanche's Naive "
        "(finetune), JointTraining (joint) and replay with memory 500.",
        "- samples/s: the tasks' own training samples per second of training; replayed samples are not counted. "
        "peak RSS: the process's maximum resident set (incr: the multirun process, over its seeds; plain loop: the "
        "benchmark process).",
    ]
    return "\n".join(lines) + "\n"


def write_section(path: Path, section: str) -> None:
    """Replace the text between BEGIN and END (or append it), leaving the rest of the page as it is."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{BEGIN}\n{section.rstrip()}\n{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".md.partial")
    partial.write_text(text)
    partial.replace(path)


# ----------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (the protocol's: 0,1,2)")
    parser.add_argument(
        "--methods", default=",".join(METHODS), help=f"comma-separated, from: {','.join(METHODS)}"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where the incr sweeps go (default: outputs/benchmarks/split_fashion_mnist/<date_time>/); a method "
        "this folder already holds finished, from an earlier invocation, is read back instead of run again",
    )
    parser.add_argument(
        "--write",
        nargs="?",
        type=Path,
        const=DOCS,
        default=None,
        metavar="PAGE",
        help=f"replace this benchmark's section of PAGE (default {DOCS.relative_to(REPO)}) instead of printing",
    )
    args = parser.parse_args()
    seeds = [int(seed) for seed in args.seeds.split(",")]
    methods = args.methods.split(",")
    if unknown := set(methods) - set(METHODS):
        parser.error(f"unknown method(s) {', '.join(sorted(unknown))}; valid: {', '.join(METHODS)}")
    out = (
        args.out
        or REPO
        / "outputs"
        / "benchmarks"
        / "split_fashion_mnist"
        / datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    ).resolve()
    command = shlex.join(["python", "benchmarks/split_fashion_mnist.py", *sys.argv[1:]])

    revision = git_revision()  # at the start: the code the runs use, whatever is edited while they go
    data = plain_loop.load_fashion_mnist()
    incr_rows, plain_rows, incr_commands = [], [], []
    for method in methods:
        # incr and the plain loop back to back, so that both see the machine in the same state.
        finished = finished_runs(method, seeds, out / method)
        print(f"{method}: incr, seeds {seeds}{' (finished earlier)' if finished else ''} ...", flush=True)
        runs, process_seconds = finished or run_incr(method, seeds, out / method)
        shown_dir = (out / method).relative_to(REPO) if out.is_relative_to(REPO) else out / method
        incr_commands.append(shlex.join(incr_command(method, seeds, shown_dir)))
        incr_rows.append(incr_row(method, runs, process_seconds))
        if method in PLAIN_LOOP_METHODS:
            results_file = out / method / PLAIN_LOOP_RESULTS
            results = json.loads(results_file.read_text()) if results_file.exists() else []
            if sorted(result["seed"] for result in results) != sorted(seeds):
                print(f"{method}: plain loop, seeds {seeds} ...", flush=True)
                results = [plain_loop.run(method, seed, data) for seed in seeds]
                results_file.write_text(json.dumps(results))
            plain_rows.append(plain_loop_row(method, results))

    section = render(incr_rows + plain_rows, command, incr_commands, seeds, revision)
    if args.write is None:
        print(section)
    else:
        write_section(args.write, section)
        print(f"wrote the Split Fashion-MNIST section of {args.write}")


if __name__ == "__main__":
    main()
