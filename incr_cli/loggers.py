"""Live logging of a run's scalars: `scalars.csv` always, plus the `logger` group's choice (tensorboard, mlflow,
wandb), each through its own library. A logger YAML names its class with `_target_`; the class takes a
`LoggedRun` as `run` and the YAML's other keys, and says in `package` what it needs installed.

What is logged, with the run's optimizer step as the x axis: per epoch the mean training loss, the learning
rate and samples/s (`epoch/...`); per task the class-IL and task-IL average accuracy, forgetting, BWT, FWT and
F1 (`task/...`), and the class-IL accuracy matrix as an image where the library takes images."""

from __future__ import annotations

import csv
import importlib
import importlib.util
import inspect
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig


@dataclass(frozen=True)
class LoggedRun:
    """What every logger may need of the run it logs."""

    run_dir: Path
    config: dict  # the composed config, resolved
    run_id: str  # stable across resumes of the run directory
    resume_step: int | None  # the optimizer step of the checkpoint a resumed run continues from


def logger_class(target: str) -> type:
    """The class a dotted `_target_` names (quietly: Hydra's own lookup logs each failure)."""
    module, _, name = target.rpartition(".")
    return getattr(importlib.import_module(module), name)


def check_logger(cfg: DictConfig) -> str | None:
    """The one-line error for a logger that cannot run here, or None."""
    target = cfg.get("_target_")
    try:
        logger = logger_class(target)
    except (ImportError, AttributeError, ValueError, TypeError):
        return (
            f"logger._target_={target!r} is not an importable logger class (e.g. incr_cli.loggers.CsvScalars)"
        )
    package = getattr(logger, "package", None)
    if package is not None and importlib.util.find_spec(package) is None:
        return f"logger={package} needs the {package} package, which is not installed: pip install {package}"
    settings = {key: value for key, value in cfg.items() if key != "_target_"}
    try:
        inspect.signature(logger).bind(None, **settings)  # None stands for the LoggedRun
    except TypeError as error:
        return f"logger: {target} does not take these settings ({error}); valid: {_parameters(logger)}"
    return None


def _parameters(logger: type) -> str:
    return ", ".join(list(inspect.signature(logger).parameters)[1:]) or "none"


class CsvScalars:
    """scalars.csv in the run directory: step, task, epoch, name, value; one row per scalar, flushed per call.

    On resume, rows logged after the checkpoint the run continues from are dropped first, so a replayed
    stretch of training is not logged twice."""

    FIELDS = ("step", "task", "epoch", "name", "value")
    package = None

    def __init__(self, run: LoggedRun):
        self.path, resume_step = run.run_dir / "scalars.csv", run.resume_step
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
            self.writer.writerow(
                {
                    "step": step,
                    "task": task + 1,
                    "epoch": "" if epoch is None else epoch + 1,
                    "name": name,
                    "value": value,
                }
            )
        self.handle.flush()

    def matrix(self, matrix: list[list[float]], step: int) -> None:
        """The matrix already lands in accuracy_matrix.csv and metrics.json."""

    def close(self) -> None:
        self.handle.close()


class TensorBoardScalars:
    package = "tensorboard"

    def __init__(self, run: LoggedRun, log_dir: str = "tensorboard"):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops the events written after the checkpoint this run resumes from
        purge = None if run.resume_step is None else run.resume_step + 1
        # relative to the run directory; an absolute or ~ path (from a config file) is taken as it is
        self.writer = SummaryWriter(str(run.run_dir / Path(log_dir).expanduser()), purge_step=purge)

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
    package = "mlflow"

    def __init__(self, run: LoggedRun, tracking_uri: str | None = None, experiment_name: str = "incr"):
        import mlflow

        self.mlflow = mlflow
        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_experiment(experiment_name)
        mlflow.start_run(run_name=run.run_dir.name)
        mlflow.log_params(_flatten(run.config))

    def scalars(self, values: dict[str, float], step: int, task: int, epoch: int | None) -> None:
        self.mlflow.log_metrics({name.replace("/", "."): v for name, v in values.items()}, step=step)

    def matrix(self, matrix: list[list[float]], step: int) -> None:
        figure = _matrix_figure(matrix)
        self.mlflow.log_figure(figure, f"accuracy_matrix_step{step}.png")
        _close(figure)

    def close(self) -> None:
        self.mlflow.end_run()


class WandbScalars:
    package = "wandb"

    def __init__(
        self, run: LoggedRun, project: str = "incr", entity: str | None = None, mode: str | None = None
    ):
        import wandb

        self.wandb = wandb
        # One wandb run per run directory: a resumed incr run continues the same wandb run.
        where = {"dir": str(run.run_dir), "name": run.run_dir.name, "id": run.run_id, "resume": "allow"}
        self.run = wandb.init(project=project, entity=entity, mode=mode, config=run.config, **where)

    def scalars(self, values: dict[str, float], step: int, task: int, epoch: int | None) -> None:
        self.run.log(values, step=step)

    def matrix(self, matrix: list[list[float]], step: int) -> None:
        figure = _matrix_figure(matrix)
        self.run.log({"task/accuracy_matrix": self.wandb.Image(figure)}, step=step)
        _close(figure)

    def close(self) -> None:
        self.run.finish()


class RunLoggers:
    """scalars.csv plus the chosen library; the engine calls these three methods and `close`."""

    def __init__(
        self,
        cfg: DictConfig | None,
        run_dir: Path,
        config: dict,
        run_id: str,
        resume_step: int | None,
        write: bool = True,
    ):
        self.sinks: list = []
        if not write:  # hardware=ddp: ranks other than 0
            return
        run = LoggedRun(run_dir, config, run_id, resume_step)
        self.sinks.append(CsvScalars(run))
        chosen = None if cfg is None else logger_class(cfg._target_)
        if chosen not in (None, CsvScalars):
            # called directly, not through hydra's instantiate, which would rebuild the run's config inside `run`
            settings = {key: value for key, value in cfg.items() if key != "_target_"}
            self.sinks.append(chosen(run, **settings))

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
    from incr_cli.plots import draw_matrix, plt  # matplotlib loads only for a library that takes images

    n = len(matrix[0])
    figure, axes = plt.subplots(figsize=(1.2 + 0.7 * n, 1.0 + 0.6 * len(matrix)))
    image = draw_matrix(axes, matrix, "class-IL accuracy matrix")
    figure.colorbar(image, ax=axes)
    figure.tight_layout()
    return figure


def _close(figure) -> None:
    from incr_cli.plots import plt

    plt.close(figure)


def _flatten(config: dict, prefix: str = "") -> dict[str, str]:
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:250]  # mlflow caps parameter values
    return flat
