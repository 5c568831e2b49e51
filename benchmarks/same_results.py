"""Do two versions of incr give the same numbers? Runs every strategy on two streams and compares the accuracy
matrices bit for bit.

A change meant to leave results alone (a refactoring) is checked by running this on the code before it and on
the code after, and comparing. Streams, each run with `hardware=cpu hardware.num_threads=1 progress=false`:
- `digits`: the default run, `incr train strategy=S` (the embedded digits, the recipe's epochs);
- `fashion_mnist`: `incr train experiment=split_fashion_mnist strategy=S epochs=1` (the Split Fashion-MNIST MLP
  protocol, one epoch per task);
- `fashion_mnist_tenth`: the same on a tenth of the training images (`dataset.val_fraction=0.9`).

Record the current checkout's numbers, then another version's (from a `git worktree` of it), then compare:
    python benchmarks/same_results.py record --out outputs/same_results/after.json
    git worktree add /tmp/before COMMIT
    python benchmarks/same_results.py record --source /tmp/before --out outputs/same_results/before.json
    python benchmarks/same_results.py compare outputs/same_results/before.json outputs/same_results/after.json
`compare` lists every run whose class-IL or task-IL matrix, or final metrics, differ in any bit, and exits 1
if there is one (`--common`: only the runs recorded in both files, for a check of a few strategies).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STREAMS = {
    "digits": [],
    "fashion_mnist": ["experiment=split_fashion_mnist", "epochs=1"],
    # a tenth of the training images (the rest held out, never trained on), for the methods whose full run
    # takes hours on a CPU: EWC's and online EWC's expected Fisher, MER's per-sample meta-updates
    "fashion_mnist_tenth": ["experiment=split_fashion_mnist", "epochs=1", "dataset.val_fraction=0.9"],
}
COMMON = ["hardware=cpu", "hardware.num_threads=1", "progress=false"]


def strategies(source: Path) -> list[str]:
    return sorted(p.stem for p in (source / "configs" / "strategy").glob("*.yaml"))


def run_one(source: Path, strategy: str, stream: str, folder: Path) -> dict:
    """One `incr train` of the given source tree in a subprocess; its metrics, or the error's last lines."""
    argv = [f"strategy={strategy}", *STREAMS[stream], *COMMON, f"hydra.run.dir={folder}"]
    code = "import sys; from incr_cli.cli import main; sys.exit(main(['train', *sys.argv[1:]]))"
    env = {**os.environ, "PYTHONPATH": str(source)}
    done = subprocess.run(
        [sys.executable, "-c", code, *argv], cwd=source, env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-3:]}
    metrics = json.loads((folder / "metrics.json").read_text())
    return {
        "class_il": metrics["class_il"]["accuracy_matrix"],
        "task_il": metrics["task_il"]["accuracy_matrix"],
        "final": metrics["final"],
    }


def record(source: Path, out: Path, only: list[str] | None, streams: list[str]) -> None:
    results = json.loads(out.read_text()) if out.exists() else {}
    with tempfile.TemporaryDirectory() as scratch:
        for stream in streams:
            for strategy in only or strategies(source):
                key = f"{stream}/{strategy}"
                if key in results:
                    continue  # kept from an earlier, interrupted recording
                results[key] = run_one(source, strategy, stream, Path(scratch) / stream / strategy)
                print(key, "error" if "error" in results[key] else "ok", flush=True)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(results, indent=1))


def compare(before: Path, after: Path, common: bool) -> int:
    old, new = json.loads(before.read_text()), json.loads(after.read_text())
    differ = []
    for key in sorted(set(old) & set(new) if common else set(old) | set(new)):
        if key not in old or key not in new:
            differ.append(f"{key}: recorded in only one file")
        elif old[key] != new[key]:
            fields = [
                f for f in ("class_il", "task_il", "final", "error") if old[key].get(f) != new[key].get(f)
            ]
            differ.append(f"{key}: {', '.join(fields)} differ")
    same = len(set(old) & set(new)) - sum("differ" in d for d in differ)
    print(f"{same} runs identical bit for bit, {len(differ)} not")
    for line in differ:
        print("  " + line)
    return 1 if differ else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    rec = commands.add_parser("record", help="run every strategy on the streams and write their numbers")
    rec.add_argument(
        "--source", type=Path, default=REPO, help="the incr source tree to run (default: this one)"
    )
    rec.add_argument("--out", type=Path, required=True)
    rec.add_argument("--strategies", default=None, help="comma-separated; default: every configs/strategy")
    rec.add_argument("--streams", default=",".join(STREAMS), help=f"comma-separated, of {', '.join(STREAMS)}")
    cmp = commands.add_parser("compare", help="list the runs whose numbers differ")
    cmp.add_argument("before", type=Path)
    cmp.add_argument("after", type=Path)
    cmp.add_argument("--common", action="store_true", help="compare only the runs both files hold")
    args = parser.parse_args()
    if args.command == "compare":
        return compare(args.before, args.after, args.common)
    streams = args.streams.split(",")
    unknown = [s for s in streams if s not in STREAMS]
    if unknown:
        parser.error(f"unknown stream {unknown[0]!r}; valid: {', '.join(STREAMS)}")
    only = args.strategies.split(",") if args.strategies else None
    record(args.source.resolve(), args.out.resolve(), only, streams)
    return 0


if __name__ == "__main__":
    sys.exit(main())
