"""`incr report DIR...`: every run directory under the given folders, grouped over seeds, as one table per
data set (rich on the terminal; report.md, report.csv, report.json) and figures (PNG and SVG).

Runs are grouped when their composed configs (`.hydra/config.yaml`) are equal once `seed` and the
result-neutral keys are set aside; a group's figure is the mean and the sample standard deviation (n - 1) over
its seeds. A run found twice (a folder given twice, a copy of a run directory: the same config and seed)
counts once, with a note. Runs that did not finish are listed on their own and never enter a mean. Each table
shows its scenario's own accuracy (task-IL for task-IL runs) unless `--scenario` chooses one matrix for all."""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table

from incr_cli import plots
from incr_cli.checkpoint import RESULT_NEUTRAL_KEYS, config_hash
from incr_cli.console import console
from incr_cli.metrics import matrix_label, scenario_matrix


@dataclass(frozen=True)
class Column:
    key: str
    title: str
    digits: int  # decimals shown; the files keep full precision
    higher_is_better: bool = True


# Every column `--columns` can choose; the values come from one run's metrics.json (`read_value`).
COLUMNS = {
    c.key: c
    for c in (
        Column("final_average_accuracy", "final avg acc", 4),
        Column("average_incremental_accuracy", "avg incremental acc", 4),
        Column("average_forgetting", "forgetting", 4, higher_is_better=False),
        Column("bwt", "BWT", 4),
        Column("fwt", "FWT", 4),
        Column("f1", "F1", 4),
        Column("wall_seconds", "wall s", 1, higher_is_better=False),
        Column("train_seconds", "train s", 1, higher_is_better=False),
        Column("memory_bytes", "memory bytes", 0, higher_is_better=False),
        Column("model_bytes", "model bytes", 0, higher_is_better=False),
        Column("parameters", "parameters", 0, higher_is_better=False),
    )
}
DEFAULT_COLUMNS = (
    "final_average_accuracy",
    "average_incremental_accuracy",
    "average_forgetting",
    "bwt",
    "fwt",
    "f1",
    "wall_seconds",
    "memory_bytes",
)
SCENARIOS = ("class_il", "task_il")


@dataclass
class RunDir:
    path: Path
    config: dict
    overrides: list[str]
    metrics: dict | None  # None: the run died before its first task ended

    @property
    def finished(self) -> bool:
        return self.metrics is not None and self.metrics["run"]["status"] == "finished"

    @property
    def scenario(self) -> str:
        return (self.metrics or {}).get("run", {}).get("scenario", "class_il")

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", 0))

    @property
    def dataset(self) -> str:
        """The data set, and its scenario unless class-IL: a domain-IL stream is another benchmark."""
        if self.metrics is None:
            return str(self.config["dataset"].get("name", "?"))
        scenario = self.metrics["run"].get("scenario", "class_il")
        name = self.metrics["run"]["dataset"]
        return name if scenario == "class_il" else f"{name}, {scenario.replace('_', '-')}"

    def value(self, key: str, scenario: str) -> float | None:
        m = self.metrics
        if key in m[scenario]:
            return m[scenario][key]
        if key == "f1":
            return m["final"].get("f1")
        if key == "train_seconds":
            return sum(t["train_seconds"] for t in m["per_task"])
        if key == "memory_bytes":
            return m["per_task"][-1]["memory_bytes"] if m["per_task"] else 0
        return m.get(key)


@dataclass
class Group:
    """Runs of one experiment that differ only in their seed."""

    dataset: str
    method: str
    overrides: list[str]  # the command-line overrides its runs share, seed aside
    runs: list[RunDir] = field(default_factory=list)

    def matrix(self, chosen: str | None) -> tuple[str, str]:
        """The metrics.json matrix its figures come from and its label: `chosen` (`--scenario`), or else
        the runs' own scenario's (task-IL for task-IL runs, class-IL for class-IL and domain-IL)."""
        scenario = self.runs[0].scenario
        matrix = chosen or scenario_matrix(scenario)
        return matrix, matrix_label(scenario, matrix)

    def figures(self, columns: list[str], scenario: str) -> dict[str, dict]:
        result = {}
        for key in columns:
            values = [run.value(key, scenario) for run in self.runs]
            present = [float(v) for v in values if v is not None]
            result[key] = {
                "mean": statistics.fmean(present) if present else None,
                "std": statistics.stdev(present) if len(present) > 1 else None,
                "values": values,
            }
        return result


# ------------------------------------------------------------------------------------------ reading runs
def find_runs(folders: list[Path]) -> list[RunDir]:
    """Every incr run directory (one holding .hydra/config.yaml) at or under the folders."""
    found: dict[Path, RunDir] = {}
    for folder in folders:
        for config_file in sorted(folder.glob("**/.hydra/config.yaml")):
            run_dir = config_file.parent.parent.resolve()
            if run_dir in found:
                continue
            overrides_file = run_dir / ".hydra" / "overrides.yaml"
            metrics_file = run_dir / "metrics.json"
            found[run_dir] = RunDir(
                path=run_dir,
                config=OmegaConf.to_container(OmegaConf.load(config_file)),
                overrides=list(OmegaConf.load(overrides_file)) if overrides_file.is_file() else [],
                metrics=json.loads(metrics_file.read_text()) if metrics_file.is_file() else None,
            )
    return list(found.values())


def drop_duplicates(runs: list[RunDir]) -> tuple[list[RunDir], list[tuple[RunDir, RunDir]]]:
    """One run per resolved config and seed (the config hash of checkpoints: result-neutral keys aside); a
    finished copy is kept before an unfinished one. Returns the runs kept and (left out, kept) pairs."""
    keys = [config_hash(run.config) for run in runs]
    kept: dict[str, RunDir] = {}
    for key, run in sorted(zip(keys, runs, strict=True), key=lambda kr: not kr[1].finished):  # stable sort
        kept.setdefault(key, run)
    unique = [run for key, run in zip(keys, runs, strict=True) if kept[key] is run]
    return unique, [(run, kept[key]) for key, run in zip(keys, runs, strict=True) if kept[key] is not run]


def repeated_folders(folders: list[Path]) -> list[str]:
    """Notes on given folders that are the same as, or inside, an earlier one: their runs count once."""
    notes, seen = [], []
    for folder in folders:
        resolved = folder.resolve()
        earlier = next((f for f, r in seen if resolved == r or r in resolved.parents), None)
        if earlier is not None:
            notes.append(
                f"{folder} is {'the same folder as' if resolved == earlier.resolve() else 'inside'} "
                f"{earlier}: its runs are counted once"
            )
        seen.append((folder, resolved))
    return notes


def experiment_key(run: RunDir) -> str:
    config = dict(run.config)
    config.pop("seed", None)
    return config_hash(config)


def _shared_overrides(runs: list[RunDir]) -> list[str]:
    ignored = {"seed", *RESULT_NEUTRAL_KEYS}
    lists = [[o for o in run.overrides if o.split("=", 1)[0].lstrip("+~") not in ignored] for run in runs]
    return [o for o in lists[0] if all(o in other for other in lists[1:])]


def group_runs(runs: list[RunDir]) -> list[Group]:
    by_key: dict[str, list[RunDir]] = {}
    for run in runs:
        by_key.setdefault(experiment_key(run), []).append(run)
    groups = []
    for members in by_key.values():
        members.sort(key=lambda r: r.seed)
        first = members[0]
        strategy = first.metrics["run"]["strategy"]
        groups.append(Group(first.dataset, strategy, _shared_overrides(members), members))
    by_name: dict[tuple[str, str], list[Group]] = {}
    for group in groups:
        by_name.setdefault((group.dataset, group.method), []).append(group)
    for twins in by_name.values():
        if len(twins) > 1:
            _tell_apart(twins)
    return groups


def _tell_apart(twins: list[Group]) -> None:
    """Experiments of one strategy on one data set are named by the overrides they do not all share, each
    once; twins whose overrides are the same (configs that differ in their files) by their config hash."""
    own = [
        list(dict.fromkeys(o for o in twin.overrides if not o.startswith(("strategy=", "dataset="))))
        for twin in twins
    ]
    common = set.intersection(*map(set, own))
    for twin, overrides in zip(twins, own, strict=True):
        extra = [o for o in overrides if o not in common]
        twin.method = f"{twin.method} ({' '.join(extra)})" if extra else twin.method
    names = [twin.method for twin in twins]
    for twin in twins:
        if names.count(twin.method) > 1:
            twin.method = f"{twin.method} [config {experiment_key(twin.runs[0])[:8]}]"


# ---------------------------------------------------------------------------------------------- output
def _cell(figure: dict, digits: int) -> str:
    mean, std = figure["mean"], figure["std"]
    if mean is None:
        return "–"
    text = f"{mean:,.{digits}f}"
    return text if std is None else f"{text} ± {std:,.{digits}f}"


def rich_table(dataset: str, rows: list[tuple[Group, dict]], columns: list[str], label: str) -> Table:
    table = Table(title=f"{dataset}: {label} (mean ± sample std over seeds)")
    table.add_column("method")
    table.add_column("seeds", justify="right")
    for key in columns:
        table.add_column(COLUMNS[key].title, justify="right")
    for group, figures in rows:
        cells = [_cell(figures[k], COLUMNS[k].digits) for k in columns]
        table.add_row(group.method, str(len(group.runs)), *cells)
    return table


def markdown(
    tables: dict[str, list[tuple[Group, dict]]], unfinished: list[RunDir], columns, labels, notes: list[str]
) -> str:
    lines = [
        "# Report",
        "",
        "Mean ± sample standard deviation over seeds; each table names the accuracy it shows.",
        "",
    ]
    for dataset, rows in tables.items():
        lines += [
            f"## {dataset}: {labels[dataset]}",
            "",
            "| method | seeds | " + " | ".join(COLUMNS[k].title for k in columns) + " |",
        ]
        lines.append("|---|---|" + "---|" * len(columns))
        for group, figures in rows:
            cells = " | ".join(_cell(figures[k], COLUMNS[k].digits) for k in columns)
            lines.append(f"| {group.method} | {len(group.runs)} | {cells} |")
        lines.append("")
    if unfinished:
        lines += [
            "## Not finished (left out of the tables above)",
            "",
            "| run | status | tasks done |",
            "|---|---|---|",
        ]
        lines += [f"| {run.path} | {_status(run)} | {_tasks_done(run)} |" for run in unfinished]
        lines.append("")
    if notes:
        lines += ["## Counted once", ""] + [f"- {note}" for note in notes] + [""]
    return "\n".join(lines)


def _status(run: RunDir) -> str:
    return (
        run.metrics["run"]["status"]
        if run.metrics
        else "no metrics.json (stopped before the first task ended)"
    )


def _tasks_done(run: RunDir) -> str:
    if run.metrics is None:
        return "0"
    return f"{len(run.metrics['class_il']['accuracy_matrix'])}/{run.metrics['run']['n_tasks']}"


def write_csv(path: Path, tables: dict[str, list[tuple[Group, dict]]], columns: list[str], labels) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        stats = [f"{k}_{s}" for k in columns for s in ("mean", "std")]
        writer.writerow(["dataset", "accuracy", "method", "seeds", *stats])
        for dataset, rows in tables.items():
            for group, figures in rows:
                stats = [figures[k][s] for k in columns for s in ("mean", "std")]
                writer.writerow(
                    [
                        dataset,
                        labels[dataset],
                        group.method,
                        len(group.runs),
                        *["" if v is None else v for v in stats],
                    ]
                )


def write_figures(
    out: Path, dataset: str, rows: list[tuple[Group, dict]], scenario: str, accuracy: str
) -> list[Path]:
    """`scenario`: the metrics.json matrix drawn ("class_il" or "task_il"), `accuracy`: what it measures."""
    curves, matrices, forgetting = {}, {}, {}
    for group, _ in rows:
        label = f"{group.method} (n={len(group.runs)})"
        per_seed = [run.metrics[scenario]["average_accuracy"] for run in group.runs]
        curves[label] = _mean_std_columns(per_seed)
        matrices[label] = _mean_matrix([run.metrics[scenario]["accuracy_matrix"] for run in group.runs])
        forgetting[label] = _mean_std_columns([run.metrics[scenario]["forgetting"] for run in group.runs])
    stem = out / f"report_{re.sub(r'[^A-Za-z0-9]+', '_', dataset)}_{scenario}"
    written = []
    for suffix in ("png", "svg"):
        for name, draw, data in (
            ("average_accuracy", plots.plot_average_accuracy_bands, curves),
            ("accuracy_matrices", plots.plot_accuracy_matrices, matrices),
            ("forgetting", plots.plot_forgetting_bars, forgetting),
        ):
            path = Path(f"{stem}_{name}.{suffix}")
            draw(data, path, f"{dataset}, {accuracy}")
            written.append(path)
    return written


def _mean_std_columns(rows: list[list[float]]) -> tuple[list[float], list[float]]:
    columns = list(zip(*rows, strict=True)) if rows and rows[0] else []
    means = [statistics.fmean(c) for c in columns]
    stds = [statistics.stdev(c) if len(c) > 1 else 0.0 for c in columns]
    return means, stds


def _mean_matrix(matrices: list[list[list[float]]]) -> list[list[float]]:
    return [
        [statistics.fmean(cells) for cells in zip(*rows, strict=True)] for rows in zip(*matrices, strict=True)
    ]


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ---------------------------------------------------------------------------------------------- command
def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="incr report",
        description="Tables and figures over the run directories under DIR...: runs that differ only in "
        "their seed are one row (mean ± sample std); unfinished runs are listed apart.",
    )
    parser.add_argument(
        "dirs", nargs="+", type=Path, metavar="DIR", help="run directories or folders of them"
    )
    parser.add_argument("--out", type=Path, default=None, help="where report.* go (default: the first DIR)")
    parser.add_argument(
        "--columns", default=",".join(DEFAULT_COLUMNS), help=f"comma-separated, from: {','.join(COLUMNS)}"
    )
    parser.add_argument("--sort", default="final_average_accuracy", help="column to sort by (best first)")
    parser.add_argument(
        "--scenario",
        default=None,
        choices=SCENARIOS,
        help="which accuracy matrix (default: each run's own scenario's: task_il for task-IL "
        "runs, class_il for class-IL and domain-IL runs)",
    )
    parser.add_argument("--no-figures", action="store_true", help="tables only")
    return parser.parse_args(argv)


class ReportError(ValueError):
    """Bad input to `incr report`: one line, exit status 2."""


def check_args(args: argparse.Namespace) -> list[str]:
    columns = [c.strip() for c in args.columns.split(",") if c.strip()]
    for key in [*columns, args.sort]:
        if key not in COLUMNS:
            raise ReportError(f"unknown column '{key}'; valid: {', '.join(COLUMNS)}")
    for folder in args.dirs:
        if not folder.is_dir():
            raise ReportError(f"{folder} is not a folder; give run directories or folders that hold them")
    return columns


def report(args: argparse.Namespace) -> dict:
    columns = check_args(args)
    runs = find_runs(args.dirs)
    if not runs:
        raise ReportError(
            f"no incr run directory (with .hydra/config.yaml) under {', '.join(map(str, args.dirs))}"
        )
    runs, duplicates = drop_duplicates(runs)
    notes = repeated_folders(args.dirs) + [
        f"{run.path} has the same config and seed as {kept.path}: counted once" for run, kept in duplicates
    ]
    finished = [r for r in runs if r.finished]
    unfinished = sorted((r for r in runs if not r.finished), key=lambda r: str(r.path))
    sort = COLUMNS[args.sort]
    tables: dict[str, list[tuple[Group, dict]]] = {}
    matrices: dict[str, tuple[str, str]] = {}  # per table: the matrix key and its label
    for group in group_runs(finished):
        # a table holds one scenario (RunDir.dataset names it), so its groups share the matrix
        matrix, _ = matrices.setdefault(group.dataset, group.matrix(args.scenario))
        tables.setdefault(group.dataset, []).append((group, group.figures(list(COLUMNS), matrix)))
    labels = {dataset: label for dataset, (_, label) in matrices.items()}
    for rows in tables.values():
        missing = -math.inf if sort.higher_is_better else math.inf
        rows.sort(
            key=lambda row: row[1][sort.key]["mean"] if row[1][sort.key]["mean"] is not None else missing,
            reverse=sort.higher_is_better,
        )

    out = args.out or args.dirs[0]
    out.mkdir(parents=True, exist_ok=True)
    # Off a terminal (a log, a pipe) rich would wrap at 80 columns and cut every cell: give it the room.
    screen = console if console.is_terminal else Console(width=max(console.width, 30 + 20 * len(columns)))
    for dataset, rows in tables.items():
        screen.print(rich_table(dataset, rows, columns, labels[dataset]))
    if unfinished:
        console.print(f"[yellow]{len(unfinished)} run(s) not finished, left out of the means:[/]")
        for run in unfinished:
            console.print(f"  {run.path}: {_status(run)}, tasks done {_tasks_done(run)}", highlight=False)
    for note in notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)
    (out / "report.md").write_text(markdown(tables, unfinished, columns, labels, notes))
    write_csv(out / "report.csv", tables, columns, labels)
    figures = []
    if not args.no_figures:
        for dataset, rows in tables.items():
            figures += write_figures(out, dataset, rows, *matrices[dataset])
    result = {
        "scenario": args.scenario,
        "groups": [
            {
                "dataset": dataset,
                "method": group.method,
                "overrides": group.overrides,
                "matrix": matrices[dataset][0],
                "accuracy": labels[dataset],
                "seeds": [run.seed for run in group.runs],
                "runs": [str(run.path) for run in group.runs],
                "figures": {k: {s: _jsonable(v) for s, v in f.items()} for k, f in figures_.items()},
            }
            for dataset, rows in tables.items()
            for group, figures_ in rows
        ],
        "unfinished": [
            {"run": str(r.path), "status": _status(r), "tasks_done": _tasks_done(r)} for r in unfinished
        ],
        "duplicates": [{"run": str(run.path), "same_as": str(kept.path)} for run, kept in duplicates],
        "notes": notes,
        "figures": [str(p) for p in figures],
    }
    (out / "report.json").write_text(json.dumps(result, indent=2))
    console.print(
        f"report written to {out}/report.{{md,csv,json}}"
        + (f" and {len(figures)} figures" if figures else "")
    )
    return result
