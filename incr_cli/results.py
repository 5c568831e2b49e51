"""A run's results: the metrics it keeps (metrics.json: the accuracy matrices and their summaries, per-task
timing and sizes), what it shows after each task, and the files it writes (metrics.json, accuracy_matrix.csv,
the two figures)."""

from __future__ import annotations

import logging
import resource
from pathlib import Path

import torch
from omegaconf import DictConfig

from incr_cli import files, metrics, run_figures
from incr_cli.console import accuracy_table, console
from incr_cli.data.stream import Stream

log = logging.getLogger("incr")


def new_metrics(
    cfg: DictConfig, names: dict[str, str], config_hash: str, device: torch.device, stream: Stream
) -> dict:
    """metrics.json of a run that has not trained yet: what it runs, its tasks, and empty matrices."""
    return {
        "run": {
            "strategy": names["strategy"],
            "dataset": names["dataset"],
            "model": names["model"],
            "seed": cfg.seed,
            "config_hash": config_hash,
            "device": str(device),
            "status": "running",
            "n_tasks": len(stream.tasks),
            "evaluated_on": cfg.evaluate_on,
            "scenario": cfg.dataset.scenario,
            "online": cfg.train.online,
        },
        "tasks": [
            {
                "task": t.id,
                "classes": t.classes,
                "class_names": [stream.class_names[c] for c in t.classes],
                "original_classes": [stream.class_order[c] for c in t.classes],
                "train_samples": len(t.train_index),
                "val_samples": len(t.val_index),
                "test_samples": len(t.test_index),
            }
            for t in stream.tasks
        ],
        "class_il": {"accuracy_matrix": [], "initial_accuracy": []},
        "task_il": {"accuracy_matrix": [], "initial_accuracy": []},
        "per_task": [],
        "final": {},
        "parameters": 0,
        "model_bytes": 0,
        "peak_memory_bytes": 0,
        "wall_seconds": 0.0,
    }


def task_timing(run_metrics: dict, task_id: int) -> dict:
    """The task's entry of `per_task` (timing, sizes, warnings): the one a resumed task started, or a new one."""
    if task_id < len(run_metrics["per_task"]):
        return run_metrics["per_task"][task_id]
    timing = {"task": task_id, "train_seconds": 0.0, "samples": 0, "steps": 0}
    run_metrics["per_task"].append(timing)
    return timing


def model_size(model: torch.nn.Module) -> tuple[int, int]:
    """Parameter count and bytes of parameters plus buffers (frozen extractors of grown networks included)."""
    parameters = sum(p.numel() for p in model.parameters())
    tensors = [*model.parameters(), *model.buffers()]
    return parameters, sum(t.numel() * t.element_size() for t in tensors)


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def close_task(timing: dict, strategy, model: torch.nn.Module) -> None:
    """The task's speed, and what the method keeps once it is trained: its memory, and the model's size
    (growing-network methods, DER and FOSTER, pay for forgetting in model size: it is reported per task)."""
    timing["samples_per_second"] = timing["samples"] / max(timing["train_seconds"], 1e-9)
    timing["memory_samples"] = strategy.memory_samples
    timing["memory_bytes"] = strategy.memory_bytes
    timing["parameters"], timing["model_bytes"] = model_size(model)


def record(
    run_metrics: dict, rows: tuple[list[float], list[float], dict], model: torch.nn.Module, device
) -> None:
    """The rows evaluated after a task (class-IL, task-IL, final metrics) into the matrices, with the summaries recomputed (average accuracy,
    forgetting, BWT, FWT), the final metrics and the sizes."""
    m, (class_il, task_il, final) = run_metrics, rows
    for key, row in (("class_il", class_il), ("task_il", task_il)):
        m[key]["accuracy_matrix"].append(row)
        m[key].update(metrics.summarize(m[key]["accuracy_matrix"], m[key]["initial_accuracy"]))
    m["final"] = final
    m["per_task"][-1]["f1"] = final.get("f1")
    m["parameters"], m["model_bytes"] = model_size(model)
    m["peak_memory_bytes"] = peak_memory(device)


def show_task(run_metrics: dict, on_console: bool) -> None:
    """The matrix so far on the console (`on_console`: the process that prints), the task's summary in the log."""
    m = run_metrics
    step = len(m["class_il"]["accuracy_matrix"])
    if on_console:
        shown, label = metrics.shown_accuracy(m)
        console.print(accuracy_table(m[shown]["accuracy_matrix"], f"{label} after task {step}"))
    if m["run"].get("scenario") == "domain_il":  # every task has every class: the two matrices are one
        accuracy = f"{m['class_il']['average_accuracy'][-1]:.4f} (domain-IL)"
    else:
        accuracy = (
            f"{m['class_il']['average_accuracy'][-1]:.4f} (class-IL), "
            f"{m['task_il']['average_accuracy'][-1]:.4f} (task-IL)"
        )
    log.info(
        "task %d: average accuracy %s; %.1f s training, %.0f samples/s",
        step,
        accuracy,
        m["per_task"][-1]["train_seconds"],
        m["per_task"][-1]["samples_per_second"],
    )


def logged_values(run_metrics: dict) -> dict:
    """The figures the loggers (CSV, TensorBoard, MLflow, W&B) receive after a task."""
    values = {"f1": run_metrics["final"].get("f1")}
    for scenario in ("class_il", "task_il"):
        summary = run_metrics[scenario]
        values[f"{scenario}/average_accuracy"] = summary["average_accuracy"][-1]
        for key in ("average_forgetting", "bwt", "fwt"):
            values[f"{scenario}/{key}"] = summary[key]
    return values


def write(run_dir: Path, run_metrics: dict, figures_too: bool = False) -> None:
    """metrics.json and accuracy_matrix.csv after every task; the figures at the end.
    The CSV and the plots hold the scenario's own matrix (task-IL for a task-IL run); metrics.json both."""
    m = run_metrics
    files.write_json(run_dir / "metrics.json", m)
    shown, label = metrics.shown_accuracy(m)
    matrix = m[shown]["accuracy_matrix"]
    if not matrix:
        return
    header = "after_task," + ",".join(f"task_{j + 1}" for j in range(len(matrix[0])))
    lines = [header] + [f"{i + 1}," + ",".join(f"{v:.6f}" for v in row) for i, row in enumerate(matrix)]
    files.atomic_write(run_dir / "accuracy_matrix.csv", lambda h: h.write(("\n".join(lines) + "\n").encode()))
    if not figures_too:
        return
    title = f"{m['run']['strategy']} on {m['run']['dataset']}, seed {m['run']['seed']}"
    figures = {
        "accuracy_matrix.svg": run_figures.accuracy_matrix_svg(matrix, f"{label}: {title}"),
        "average_accuracy.svg": run_figures.average_accuracy_svg(run_figures.run_curves(m), title),
    }
    for name, text in figures.items():
        files.atomic_write(run_dir / name, lambda h, text=text: h.write(text.encode()))
