"""Live logging of a run's scalars: `scalars.csv` always, plus the `logger` group's choice (tensorboard, mlflow,
wandb), each through its own library.

What is logged, with the run's optimizer step as the x axis: per epoch the mean training loss, the learning
rate and samples/s (`epoch/...`); per task the class-IL and task-IL average accuracy, forgetting, BWT, FWT and
F1 (`task/...`), and the class-IL accuracy matrix as an image where the library takes images."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

from omegaconf import DictConfig

from incr_cli.plots import draw_matrix, plt

# logger name -> the package it needs (None: nothing beyond incr's own dependencies)
LOGGERS = {"csv": None, "tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


def check_logger(cfg: DictConfig) -> str | None:
    """The one-line error for a logger that cannot run here, or None."""
    name = cfg.get("name")
    if name not in LOGGERS:
        return f"logger.name={name!r} is not a logger; valid: {', '.join(LOGGERS)}"
    package = LOGGERS[name]
    if package is not None and importlib.util.find_spec(package) is None:
        return f"logger={name} needs the {package} package, which is not installed: pip install {package}"
    return None


class CsvScalars:
    """scalars.csv in the run directory: step, task, epoch, name, value; one row per scalar, flushed per call.

    On resume, rows logged after the checkpoint the run continues from are dropped first, so a replayed
    stretch of training is not logged twice."""

    FIELDS = ("step", "task", "epoch", "name", "value")

    def __init__(self, run_dir: Path, resume_step: int | None):
        self.path = run_dir / "scalars.csv"
        kept = []
        if resume_step is not None and self.path.is_file():
            with self.path.open(newline="") as handle:
                kept = [row for row in csv.DictReader(handle) if int(row["step"]) <= resume_step]
        self.handle = self.path.open("w", newline="")
        self.writer = csv.DictWriter(self.handle, fieldnames=self.FIELDS)
        self.writer.writeheader()
        self.writer.writerows(kept)
        self.handle.flush()

    def scalars(self, values: dict[str, float], step: int, task: int, epoch: int | None) -> None:
        for name, value in values.items():
            self.writer.writerow({"step": step, "task": task + 1, "epoch": "" if epoch is None else epoch + 1,
                                  "name": name, "value": value})  # fmt: skip
        self.handle.flush()

    def matrix(self, matrix: list[list[float]], step: int) -> None:
        """The matrix already lands in accuracy_matrix.csv and metrics.json."""

    def close(self) -> None:
        self.handle.close()


class TensorBoardScalars:
    def __init__(self, cfg: DictConfig, run_dir: Path, resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops the events written after the checkpoint this run resumes from
        purge = None if resume_step is None else resume_step + 1
        # relative to the run directory; an absolute or ~ path (from a config file) is taken as it is
        log_dir = run_dir / Path(cfg.get("log_dir", "tensorboard")).expanduser()
        self.writer = SummaryWriter(str(log_dir), purge_step=purge)

    def scalars(self, values: dict[str, float], step: int, task: int, epoch: int | None) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def matrix(self, matrix: list[list[float]], step: int) -> None:
        self.writer.add_figure("task/accuracy_matrix", _matrix_figure(matrix), step)  # closes the figure
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MlflowScalars:
    def __init__(self, cfg: DictConfig, run_dir: Path, config: dict):
        import mlflow

        self.mlflow = mlflow
        if cfg.get("tracking_uri"):
            mlflow.set_tracking_uri(cfg.tracking_uri)
        mlflow.set_experiment(cfg.get("experiment_name", "incr"))
        mlflow.start_run(run_name=run_dir.name)
        mlflow.log_params(_flatten(config))

    def scalars(self, values: dict[str, float], step: int, task: int, epoch: int | None) -> None:
        self.mlflow.log_metrics({name.replace("/", "."): v for name, v in values.items()}, step=step)

    def matrix(self, matrix: list[list[float]], step: int) -> None:
        figure = _matrix_figure(matrix)
        self.mlflow.log_figure(figure, f"accuracy_matrix_step{step}.png")
        plt.close(figure)

    def close(self) -> None:
        self.mlflow.end_run()


class WandbScalars:
    def __init__(self, cfg: DictConfig, run_dir: Path, config: dict, run_id: str):
        import wandb

        self.wandb = wandb
        # One wandb run per run directory: a resumed incr run continues the same wandb run.
        self.run = wandb.init(project=cfg.get("project", "incr"), entity=cfg.get("entity"), mode=cfg.get("mode"),
                              dir=str(run_dir), config=config, name=run_dir.name, id=run_id, resume="allow")  # fmt: skip

    def scalars(self, values: dict[str, float], step: int, task: int, epoch: int | None) -> None:
        self.run.log(values, step=step)

    def matrix(self, matrix: list[list[float]], step: int) -> None:
        figure = _matrix_figure(matrix)
        self.run.log({"task/accuracy_matrix": self.wandb.Image(figure)}, step=step)
        plt.close(figure)

    def close(self) -> None:
        self.run.finish()


class RunLoggers:
    """scalars.csv plus the chosen library; the engine calls these three methods and `close`."""

    def __init__(self, cfg: DictConfig | None, run_dir: Path, config: dict, run_id: str, resume_step: int | None,
                 write: bool = True):  # fmt: skip
        self.sinks: list = []
        if not write:  # hardware=ddp: ranks other than 0
            return
        self.sinks.append(CsvScalars(run_dir, resume_step))
        name = "csv" if cfg is None else cfg.get("name", "csv")
        if name == "tensorboard":
            self.sinks.append(TensorBoardScalars(cfg, run_dir, resume_step))
        elif name == "mlflow":
            self.sinks.append(MlflowScalars(cfg, run_dir, config))
        elif name == "wandb":
            self.sinks.append(WandbScalars(cfg, run_dir, config, run_id))

    def epoch(self, values: dict[str, float], step: int, task: int, epoch: int) -> None:
        for sink in self.sinks:
            sink.scalars({f"epoch/{k}": v for k, v in values.items()}, step, task, epoch)

    def task(self, values: dict[str, float | None], matrix: list[list[float]], step: int, task: int) -> None:
        present = {f"task/{k}": v for k, v in values.items() if v is not None}
        for sink in self.sinks:
            sink.scalars(present, step, task, None)
            sink.matrix(matrix, step)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def _matrix_figure(matrix: list[list[float]]):

    n = len(matrix[0])
    figure, axes = plt.subplots(figsize=(1.2 + 0.7 * n, 1.0 + 0.6 * len(matrix)))
    image = draw_matrix(axes, matrix, "class-IL accuracy matrix")
    figure.colorbar(image, ax=axes)
    figure.tight_layout()
    return figure


def _flatten(config: dict, prefix: str = "") -> dict[str, str]:
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:250]  # mlflow caps parameter values
    return flat
