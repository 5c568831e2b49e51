"""README.md's commands, as written. Every `incr` line of its code blocks is read (continuation lines joined,
comments dropped; `torchrun ... -m incr_cli train` counts as `incr train`). Each `incr train` composes, job by
job, and passes the checks that run before training; those on the built-in digits or synthetic data, on the
CPU with Hydra's own launcher and sweeper, also train with debug=quick (a sweep: its first job). eval, predict,
export, report and resume run on runs made here, which stand in for the README's RUN_DIR and outputs/...
placeholders. `~` is a home folder made here, holding the README's ~/photos, ~/domains and ~/my_digits. A
failure names the README line. Also here: `~` and `$HOME` in the arguments of any subcommand."""

from __future__ import annotations

import functools
import itertools
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from conftest import compose_config
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from incr_cli.cli import expand_home, main
from incr_cli.config import check_config, config_dir, register_schema
from incr_cli.precheck import INSPECTION_FLAGS, job_overrides, override_key, submitted_to_slurm

README = Path(__file__).resolve().parents[1] / "README.md"
BUILT_IN = ("digits", "synthetic")  # data sets that need no files: their commands train here


@dataclass(frozen=True)
class Command:
    line: int  # where the command starts in README.md
    text: str  # as written, continuation lines joined
    argv: tuple[str, ...]  # the words after `incr` (after `-m incr_cli` under torchrun)
    processes: int = 1  # torchrun's --nproc_per_node

    def __str__(self) -> str:
        return f"README.md line {self.line}: {self.text}"


def readme_commands(text: str) -> list[Command]:
    """The `incr` commands of the fenced code blocks of a README, in order."""
    commands, fenced, pending, start = [], False, "", 0
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced, pending = not fenced, ""
            continue
        if not fenced:
            continue
        start = start if pending else number
        pending += line
        if pending.endswith("\\"):  # a continuation line follows
            pending = pending[:-1] + " "
            continue
        commands += _commands_in(start, " ".join(pending.split()))
        pending = ""
    return commands


def _commands_in(line: int, text: str) -> list[Command]:
    words = shlex.split(text, comments=True)
    commands, segment = [], []
    for word in [*words, "&&"]:  # `pip install -e . && incr train` holds one
        if word not in ("&&", ";"):
            segment.append(word)
            continue
        written = text.split("#")[0].strip() if "#" in text else text
        if segment[:1] == ["incr"]:
            commands.append(Command(line, written, tuple(segment[1:])))
        elif "incr_cli" in segment and segment[segment.index("incr_cli") - 1] == "-m":
            processes = next((int(w.split("=")[1]) for w in segment if w.startswith("--nproc_per_node=")), 1)
            commands.append(
                Command(line, written, tuple(segment[segment.index("incr_cli") + 1 :]), processes)
            )
        segment = []
    return commands


COMMANDS = readme_commands(README.read_text())
TRAIN = [command for command in COMMANDS if command.argv[:1] == ("train",)]


def test_the_readme_commands_are_read_as_a_shell_reads_them():
    texts = [" ".join(command.argv) for command in COMMANDS]
    assert "train" in texts  # `pip install -e . && incr train`
    assert "train strategy=finetune" in texts  # its comment dropped
    report = next(c for c in COMMANDS if c.argv[0] == "report" and "--sort" in c.argv)
    assert report.argv[-2:] == ("--sort", "average_forgetting")  # the continuation line joined
    assert README.read_text().splitlines()[report.line - 1].startswith("incr report ")
    torchrun = [command for command in COMMANDS if command.processes > 1]
    assert torchrun and all(c.argv[:2] == ("train", "hardware=ddp") for c in torchrun)
    assert {c.argv[0] for c in COMMANDS} >= {"train", "resume", "report", "eval", "predict", "export"}
    assert not any("pytest" in command.argv or "pip" in command.argv for command in COMMANDS)


# ------------------------------------------------------------------------------------ the home folder
def write_image_folder(folder: Path, classes: list[str], per_class: int = 2) -> None:
    for label, name in enumerate(classes):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.new("L", (8, 8), 20 * label + i).save(folder / name / f"{i}.png")


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """The README's ~/photos (6 classes: 2 or 3 tasks), ~/domains (4 domains) and ~/my_digits (the classes of
    digits, for `incr eval`)."""
    home = tmp_path_factory.mktemp("home")
    write_image_folder(home / "photos", [f"class_{i}" for i in range(6)])
    for domain in ("day", "dusk", "night", "snow"):
        write_image_folder(home / "domains" / domain, ["car", "tree"])
    write_image_folder(home / "my_digits", [str(digit) for digit in range(10)])
    return home


@pytest.fixture
def at_home(home, tmp_path, monkeypatch) -> Path:
    """HOME is the folder above; the working directory a fresh one, where the README's outputs/ land."""
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("INCR_DATA", raising=False)  # data.root is its default, ~/.cache/incr/data
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ----------------------------------------------------------------------------- composing incr train
def inspects(argv: list[str]) -> bool:
    return bool(INSPECTION_FLAGS & set(argv))


def hydra_settings(argv: list[str]) -> list[str]:
    """The overrides of Hydra's own config (launcher, sweeper, output folders), which precheck leaves to Hydra."""
    return [a for a in argv if "=" in a and not a.startswith("-") and override_key(a).startswith("hydra")]


@functools.cache
def composed(overrides: tuple[str, ...]) -> DictConfig:
    """A job's config with Hydra's own (launcher, sweeper) under `hydra`; composed once per test session."""
    register_schema()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(config_dir()), version_base="1.3"):
            return compose("train", overrides=list(overrides), return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()


def check_every_job(command: Command, argv: list[str]) -> DictConfig:
    """Compose each job of an `incr train` command (one per seed of a sweep: the seed changes no check) and
    run incr's checks on it, as if a GPU or torchrun were there when the command asks for them; data on disk
    is not looked for. Returns the first job's config, Hydra's own under `hydra`."""
    with pytest.MonkeyPatch.context() as patch:
        if command.processes > 1:
            patch.setenv("RANK", "0")
            patch.setenv("WORLD_SIZE", str(command.processes))
        jobs = job_overrides(argv)
        assert jobs, f"{command}: no job"
        distinct = {tuple(o for o in job if override_key(o) != "seed"): job for job in reversed(jobs)}
        for job in distinct.values():
            cfg = job_config(composed((*job, *hydra_settings(argv))))
            if cfg.hardware.device == "cuda":
                patch.setattr(torch.cuda, "is_available", lambda: True)
            # an image folder is listed all the same; a sweep sent to SLURM starts its ranks there
            check_config(cfg, check_data=False, ranks_start_later=submitted_to_slurm(argv))
    return composed((*jobs[0], *hydra_settings(argv)))


def job_config(cfg: DictConfig) -> DictConfig:
    """A copy of a composed config without Hydra's own part: the config a job runs with."""
    return OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"])


def trains_here(cfg: DictConfig) -> bool:
    """Built-in data on the CPU, one process, Hydra's own launcher and sweeper. Not a domain-IL stream: each of
    its tasks is the whole data set with every class, n_tasks times a class-IL run's samples (and EWC's Fisher
    sums over every class of each: minutes on a CPU)."""
    hydra = cfg.hydra
    own_plugins = "BasicLauncher" in hydra.launcher._target_ and "BasicSweeper" in hydra.sweeper._target_
    cpu = cfg.hardware.device != "cuda" and not cfg.hardware.distributed
    return cfg.dataset.name in BUILT_IN and own_plugins and cpu and cfg.dataset.scenario != "domain_il"


@pytest.mark.parametrize("command", TRAIN, ids=[f"line{c.line}" for c in TRAIN])
def test_every_incr_train_command_composes_and_passes_the_checks(command, at_home, capsys):
    argv = expand_home(list(command.argv[1:]))
    try:
        if inspects(argv):  # --help, --cfg: Hydra prints and nothing trains
            try:
                status = main(["train", *argv])
            except SystemExit as stop:  # Hydra's --help exits
                status = stop.code or 0
            printed = capsys.readouterr()
            assert status == 0 and printed.out.strip(), printed.err
        else:
            check_every_job(command, argv)
    except Exception as error:
        pytest.fail(f"{command}: {type(error).__name__}: {error}")


# ---------------------------------------------------------------------------------------- running them
class Workspace:
    """Trains README commands in the working directory, each distinct one once (`incr train` is
    `incr train strategy=replay`), and keeps the folders that stand in for the README's placeholders
    (RUN_DIR, outputs/..., outputs/sweeps/a): the first run and the latest sweep."""

    def __init__(self):
        self.statuses: dict[tuple, int] = {}
        self.run: Path | None = None
        self.sweep: Path | None = None

    def train(self, argv: list[str], first_job: DictConfig) -> int:
        """`incr train ARGV debug=quick`; a sweep runs its first job."""
        argv = self.stand_ins(argv)
        if not any(override_key(a) == "debug" for a in argv):
            argv.append("debug=quick")
        multirun = "-m" in argv or "--multirun" in argv
        key = (multirun, tuple(hydra_settings(argv)), OmegaConf.to_yaml(job_config(first_job)))
        if key in self.statuses:
            return self.statuses[key]
        if multirun:
            argv = ["-m", *job_overrides(argv)[0], *hydra_settings(argv)]
        elif not any(a.startswith("hydra.run.dir=") for a in argv):
            argv.append(f"hydra.run.dir=runs/{len(self.statuses)}")
        self.statuses[key] = main(["train", *argv])
        torch.set_num_threads(1)  # hardware.num_threads=N sets it for the whole process
        if multirun:
            given = [a.split("=", 1)[1] for a in argv if a.startswith("hydra.sweep.dir=")]
            self.sweep = Path(given[0]) if given else max(Path("outputs/multirun").glob("*/*"))
        elif self.run is None:
            self.run = Path(next(a.split("=", 1)[1] for a in argv if a.startswith("hydra.run.dir=")))
        return self.statuses[key]

    def stand_ins(self, argv: list[str]) -> list[str]:
        """The arguments with each placeholder replaced; an option's value (`--out outputs/report`) is none."""
        return [a if i and argv[i - 1].startswith("--") else self.stand_in(a) for i, a in enumerate(argv)]

    def stand_in(self, argument: str) -> str:
        """A placeholder (RUN_DIR, a path with `...`, a positional outputs/ path that does not exist) as the
        first run's folder, or the latest sweep's for a sweep folder."""
        key, equals, value = argument.rpartition("=")
        if argument.startswith("-") or (equals and not key.startswith("hydra.")):
            return argument
        positional = not equals and value.startswith("outputs/") and not Path(value).exists()
        if value != "RUN_DIR" and "..." not in value and not positional:
            return argument
        sweep = "sweep" in key or value.startswith(("outputs/multirun", "outputs/sweeps"))
        folder = self.sweep if sweep else self.run
        return argument if folder is None else f"{key}{equals}{folder}"


def help_lists_flags(name: str, argv: list[str], capsys) -> None:
    """For a command no run here can stand in for: its --help names every flag the README uses."""
    try:
        main([name, "--help"])
    except SystemExit:
        pass
    printed = capsys.readouterr().out
    for flag in (a.split("=")[0] for a in argv if a.startswith("--")):
        assert flag in printed, f"{flag} is not in `incr {name} --help`"


@pytest.mark.slow
def test_the_readme_commands_run(at_home, capsys):
    """In README order, so that the trainings make the runs and sweeps the later commands read."""
    # `incr predict RUN_DIR photo.png more_photos/`
    write_image_folder(at_home / "more_photos", ["a"])
    (at_home / "more_photos" / "a" / "0.png").rename(at_home / "photo.png")
    workspace, failures = Workspace(), []
    replay = Command(0, "incr train strategy=replay", ("train", "strategy=replay"))
    assert workspace.train(["strategy=replay"], check_every_job(replay, ["strategy=replay"])) == 0
    for command in COMMANDS:  # RUN_DIR, outputs/<date>/<time>_digits_replay: the run above
        name, argv = command.argv[0], expand_home(list(command.argv[1:]))
        try:
            if name == "train":
                if inspects(argv):
                    continue  # --help, --cfg: printed by the test above
                first_job = check_every_job(command, argv)
                if not trains_here(first_job):
                    continue
                status = workspace.train(argv, first_job)
            else:
                argv = workspace.stand_ins(argv)
                folders = list(itertools.takewhile(lambda a: not a.startswith("-"), argv))
                folders = folders if name == "report" else folders[:1]
                if not all(Path(folder).exists() for folder in folders):
                    help_lists_flags(name, argv, capsys)
                    continue
                status = main([name, *argv])
                torch.set_num_threads(1)
            printed = capsys.readouterr()
            if status != 0:
                failures.append(f"{command}: exit status {status}: {printed.err.strip()[-500:]}")
            outs = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--out"]
            failures += [f"{command}: wrote no {out}" for out in outs if not Path(out).exists()]
        except (Exception, SystemExit) as error:
            failures.append(f"{command}: {type(error).__name__}: {error}")
    assert not failures, "\n".join(failures)


# ------------------------------------------------------------------------------------ ~ and $HOME
@pytest.mark.parametrize(
    "written", ["data.root=~/data", "data.root=$HOME/data", "data.root=${HOME}/data", 'data.root="~/data"']
)
def test_a_home_path_reaches_the_config_expanded(written, at_home, home, capsys):
    assert main(["train", "dataset=cifar10", written, "data.download=true", "--cfg", "job"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["data"]["root"] == f"{home}/data"


def test_home_is_expanded_only_where_it_is_a_path(monkeypatch):
    monkeypatch.setenv("HOME", "/home/ada lovelace")
    assert expand_home(
        [
            "dataset.folder=~/photos",
            "~strategy.memory",
            "~hydra/launcher",
            "--out=~/r.json",
            "~/runs/x",
            "data.root=${oc.env:HOME}/d",
            "data.root=$HOMEDIR",
            "seed=0,1",
        ]
    ) == [
        "dataset.folder=/home/ada lovelace/photos",
        "~strategy.memory",
        "~hydra/launcher",
        "--out=/home/ada lovelace/r.json",
        "/home/ada lovelace/runs/x",
        "data.root=${oc.env:HOME}/d",
        "data.root=$HOMEDIR",
        "seed=0,1",
    ]
    # each value of a sweep; a path Hydra's grammar would refuse is quoted, and reads back as the path
    parser = OverridesParser.create()
    sweep = parser.parse_override(expand_home(["data.root=~/a,$HOME/b"])[0])
    assert sweep.is_sweep_override() and sweep.value().list == [
        "/home/ada lovelace/a",
        "/home/ada lovelace/b",
    ]
    for path in ("~/a[1]", "~/x=y", "~/it's", "~/(b)"):
        override = expand_home([f"dataset.folder={path}"])[0]
        expected = "/home/ada lovelace" + path[1:]
        assert parser.parse_override(override).value() == expected
        assert OmegaConf.from_dotlist([override]).dataset.folder == expected  # as incr eval reads it


def test_incr_eval_reads_a_home_folder(at_home, home):
    """`incr eval RUN dataset=image_folder dataset.folder=~/my_digits` finds the folder (its classes are the
    digits'): expanded on the command line, and also when a `~` reaches the data code (a config file's)."""
    from incr_cli.inference import eval_config

    class Run:  # what eval_config reads of a loaded digits checkpoint
        cfg = compose_config(["dataset=digits"])
        input_shape = [1, 8, 8]

    overrides = ["dataset=image_folder", "dataset.folder=~/my_digits"]
    cfg = eval_config(Run, expand_home(overrides))
    assert (cfg.dataset.folder, cfg.dataset.num_classes) == (f"{home}/my_digits", 10)
    assert (
        eval_config(Run, ["dataset=image_folder", 'dataset.folder="~/my_digits"']).dataset.num_classes == 10
    )
