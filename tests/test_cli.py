"""The `incr` command: help, one-line errors with exit status 2 before anything trains, multirun sweeps,
printing the config, and Hydra's add/remove override syntax."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import incr

from incr_cli import __version__
from incr_cli.cli import main
from incr_cli.config import config_dir


def in_process(capsys, *args: str) -> tuple[int, str, str]:
    """`incr ARGS` in this process: (exit status, stdout, stderr)."""
    status = main(list(args))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_one_line_error(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    assert lines[0].startswith("error: ")
    return lines[0]


# ----------------------------------------------------------------------------------------- help
def test_incr_help_lists_the_train_command():
    result = incr("--help")
    assert result.returncode == 0
    assert "usage: incr <command>" in result.stdout
    assert any(line.split()[:1] == ["train"] for line in result.stdout.splitlines())


def test_incr_train_help_prints_the_config_groups_with_their_choices():
    result = incr("train", "--help")
    assert result.returncode == 0, result.stderr
    # one line per config group folder (nested ones too, e.g. experiment/der_seq_cifar10), its choices being
    # the YAML files in it; hydra/ holds Hydra's own groups (launchers), which its help leaves out
    root = config_dir()
    groups = sorted({p.parent for p in root.rglob("*.yaml")} - {root})
    groups = [g for g in groups if g.relative_to(root).parts[0] != "hydra"]
    assert {g.name for g in groups} >= {"dataset", "model", "strategy", "hardware", "optimizer", "logger"}
    for group in groups:
        choices = ", ".join(sorted(p.stem for p in group.glob("*.yaml")))
        assert f"{group.relative_to(root).as_posix()}: {choices}" in result.stdout
    strategies = next(line for line in result.stdout.splitlines() if line.startswith("strategy: "))
    assert {"finetune", "joint", "replay"} <= set(strategies.removeprefix("strategy: ").split(", "))


def test_incr_version_and_unknown_commands(capsys):
    status, out, _ = in_process(capsys, "--version")
    assert status == 0 and out.strip() == f"incr {__version__}"
    status, _, err = in_process(capsys, "fit")
    assert status == 2
    assert "fit" in assert_one_line_error(err) and "train" in err


def test_incr_without_a_command_prints_usage_and_fails(capsys):
    status, out, _ = in_process(capsys)
    assert status == 2 and "usage: incr <command>" in out


# ----------------------------------------------------------------------------------------- bad input
def test_an_unknown_strategy_exits_2_naming_it_and_the_valid_choices(tmp_path):
    result = incr("train", "strategy=nope", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2
    line = assert_one_line_error(result.stderr)
    assert "nope" in line
    for choice in ("finetune", "joint", "replay"):
        assert choice in line
    assert not (tmp_path / "run").exists()


def test_n_tasks_that_does_not_divide_the_classes_exits_2_before_training(tmp_path):
    result = incr("train", "dataset.n_tasks=3", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2
    line = assert_one_line_error(result.stderr)
    assert "dataset.n_tasks=3" in line and "valid: 1, 2, 5, 10" in line
    assert not (tmp_path / "run").exists()


def test_a_value_of_the_wrong_type_exits_2_naming_the_key(tmp_path):
    result = incr("train", "epochs=abc", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2
    line = assert_one_line_error(result.stderr)
    assert "epochs" in line and "abc" in line
    assert not (tmp_path / "run").exists()


BAD_INPUT = {
    "negative memory": (["strategy.memory.size=-5"], ["strategy.memory.size=-5", "0 or more"]),
    "convnet on digits": (["model=convnet"], ["model.input_size=28", "8x8"]),
    "sweep without -m": (["seed=0,1"], ["seed=0,1", "-m"]),
    "unknown key": (["learning_rate=0.1"], ["learning_rate"]),
    "unknown parameter": (["+model.dropout=0.5"], ["model.dropout", "MLP"]),
    "bad class order": (
        ["dataset.class_order=[0,0,1,2,3,4,5,6,7,8]"],
        ["dataset.class_order", "permutation"],
    ),
    "bad selection": (
        ["strategy.memory.selection=newest"],
        ["strategy.memory.selection=newest", "reservoir"],
    ),
}


@pytest.mark.parametrize("overrides, words", BAD_INPUT.values(), ids=BAD_INPUT.keys())
def test_bad_input_exits_2_with_one_line_before_training(capsys, tmp_path, overrides, words):
    status, _, err = in_process(capsys, "train", f"hydra.run.dir={tmp_path / 'run'}", *overrides)
    assert status == 2
    line = assert_one_line_error(err)
    for word in words:
        assert word in line
    assert not (tmp_path / "run").exists()


def test_mnist_without_its_files_exits_2_suggesting_download(capsys, tmp_path):
    empty = tmp_path / "data"
    empty.mkdir()
    status, _, err = in_process(
        capsys,
        "train",
        "dataset=mnist",
        "model=convnet",
        f"data.root={empty}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert status == 2
    line = assert_one_line_error(err)
    assert "mnist" in line and "data.download=true" in line and str(empty) in line
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_hardware_gpu_without_cuda_exits_2(capsys, tmp_path):
    status, _, err = in_process(capsys, "train", "hardware=gpu", f"hydra.run.dir={tmp_path / 'run'}")
    assert status == 2
    assert "CUDA" in assert_one_line_error(err)
    assert not (tmp_path / "run").exists()


def test_a_bad_value_in_any_job_of_a_sweep_stops_the_sweep_before_it_starts(capsys, tmp_path):
    status, _, err = in_process(
        capsys, "train", "-m", "dataset.n_tasks=5,3", f"hydra.sweep.dir={tmp_path / 'sweep'}"
    )
    assert status == 2
    assert "dataset.n_tasks=3" in assert_one_line_error(err)
    assert not (tmp_path / "sweep").exists()  # not even the valid first job ran


# ----------------------------------------------------------------------------------------- multirun
@pytest.mark.slow
def test_a_multirun_sweep_writes_one_complete_run_directory_per_job(capsys, tmp_path):
    sweep = tmp_path / "sweep"
    status, _, _ = in_process(
        capsys,
        "train",
        "-m",
        "strategy=finetune,replay",
        "seed=0,1",
        "epochs=1",
        "progress=false",
        f"hydra.sweep.dir={sweep}",
    )
    assert status == 0
    runs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in runs] == [
        "0_finetune_seed0",
        "1_finetune_seed1",
        "2_replay_seed0",
        "3_replay_seed1",
    ]
    jobs = set()
    for run in runs:
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["run"]["status"] == "finished"
        assert len(metrics["class_il"]["accuracy_matrix"]) == 5
        for name in (
            "accuracy_matrix.csv",
            "accuracy_matrix.svg",
            "average_accuracy.svg",
            "checkpoints/last.pt",
            ".hydra/config.yaml",
        ):
            assert (run / name).is_file(), f"{run.name}/{name}"
        config = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
        assert config["seed"] == metrics["run"]["seed"] and config["epochs"] == 1
        jobs.add((metrics["run"]["strategy"], metrics["run"]["seed"]))
    assert jobs == {("finetune", 0), ("finetune", 1), ("replay", 0), ("replay", 1)}
    # the two seeds of one strategy are different runs
    finetune = [json.loads((runs[i] / "metrics.json").read_text()) for i in (0, 1)]
    assert finetune[0]["class_il"]["accuracy_matrix"] != finetune[1]["class_il"]["accuracy_matrix"]


# ----------------------------------------------------------------------------------------- the config
def test_cfg_job_prints_the_composed_config_without_training(capsys, tmp_path):
    status, out, _ = in_process(
        capsys, "train", "strategy=finetune", "epochs=3", f"hydra.run.dir={tmp_path / 'run'}", "--cfg", "job"
    )
    assert status == 0
    config = yaml.safe_load(out)
    assert config["strategy"]["_target_"] == "incr_cli.strategies.finetune.Finetune"
    assert config["epochs"] == 3 and config["dataset"]["name"] == "digits"
    assert not (tmp_path / "run").exists()


def test_adding_replay_batch_size_with_a_plus_is_accepted(capsys, tmp_path):
    status, out, _ = in_process(capsys, "train", "+strategy.replay_batch_size=16", "--cfg", "job")
    assert status == 0
    assert yaml.safe_load(out)["strategy"]["replay_batch_size"] == 16


def test_removing_a_key_with_a_tilde_falls_back_to_the_class_default(capsys, tmp_path):
    # (Hydra 1.3 treats a null value as an absent key, so the tilde is shown on a key with a value.)
    run = tmp_path / "run"
    status, _, err = in_process(
        capsys,
        "train",
        "~strategy.memory.selection",
        "dataset.n_tasks=1",
        "epochs=1",
        "progress=false",
        f"hydra.run.dir={run}",
    )
    assert status == 0, err
    assert (
        "selection" not in yaml.safe_load((run / ".hydra" / "config.yaml").read_text())["strategy"]["memory"]
    )


def test_a_key_can_be_removed_then_added_back(capsys, tmp_path):
    status, out, err = in_process(
        capsys,
        "train",
        "~strategy.memory.selection",
        "+strategy.memory.selection=class_balanced",
        "--cfg",
        "job",
    )
    assert status == 0, err
    assert yaml.safe_load(out)["strategy"]["memory"]["selection"] == "class_balanced"


def test_a_strategy_knob_its_class_refuses_is_a_one_line_error_before_training(capsys, tmp_path):
    run = tmp_path / "run"
    status, _, err = in_process(
        capsys, "train", "strategy=gem", "strategy.patterns_per_task=0", f"hydra.run.dir={run}"
    )
    assert status == 2
    assert err.strip() == "error: strategy: patterns_per_task must be at least 1, got 0"
    assert not run.exists()
