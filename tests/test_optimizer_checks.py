"""Optimizer and scheduler values are checked before training like the rest of the config: one line naming the
key, the value and what is valid, exit status 2, no run directory; torch's own validation decides where it can,
so an optimizer or scheduler without a YAML of its own is covered too."""

from __future__ import annotations

import pytest
from conftest import compose_config

from incr_cli.cli import main
from incr_cli.config import check_recipe, config_dir
from incr_cli.errors import ConfigError


def one_line_error(capsys, tmp_path, overrides: list[str]) -> str:
    run = tmp_path / "run"
    status = main(["train", f"hydra.run.dir={run}", *overrides])
    err = capsys.readouterr().err
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Error in call to target" not in err and "Traceback" not in err
    assert not run.exists()
    return lines[0]


# overrides -> the start of the error line, and what it says is valid
BAD_RECIPES = {
    "negative lr": (["optimizer.lr=-0.1"], "optimizer.lr=-0.1 ", "a number >= 0"),
    "infinite lr": (["optimizer.lr=inf"], "optimizer.lr=inf ", "a number >= 0"),
    "lr not a number": (["optimizer.lr=abc"], "optimizer.lr=abc ", "a number >= 0"),
    "negative momentum": (["optimizer.momentum=-0.5"], "optimizer.momentum=-0.5 ", "[0, 1)"),
    "momentum 1 never decays": (["optimizer.momentum=1.0"], "optimizer.momentum=1.0 ", "[0, 1)"),
    "dampening above 1": (["+optimizer.dampening=2"], "optimizer.dampening=2 ", "[0, 1]"),
    "negative weight decay": (["optimizer.weight_decay=-1e-4"], "optimizer.weight_decay=-0.0001 ", ">= 0"),
    "nesterov without momentum": (
        ["+optimizer.nesterov=true", "optimizer.momentum=0"],
        "optimizer.nesterov=true ",
        "momentum > 0",
    ),
    "adam beta of 1.5": (
        ["optimizer=adam", "optimizer.betas=[1.5,0.999]"],
        "optimizer.betas=[1.5,0.999] ",
        "[0, 1)",
    ),
    "adam three betas": (
        ["optimizer=adam", "optimizer.betas=[0.9,0.9,0.9]"],
        "optimizer.betas=",
        "two numbers",
    ),
    "adam negative eps": (["optimizer=adam", "+optimizer.eps=-1e-8"], "optimizer.eps=-1e-08 ", ">= 0"),
    "negative gamma": (["scheduler=multistep", "scheduler.gamma=-0.2"], "scheduler.gamma=-0.2 ", "> 0"),
    "milestone 0": (
        ["scheduler=multistep", "scheduler.milestones=[0,5]"],
        "scheduler.milestones=[0,5] ",
        ">= 1",
    ),
    "milestones not a list": (
        ["scheduler=multistep", "scheduler.milestones=5"],
        "scheduler.milestones=5 ",
        "list",
    ),
    "T_max 0": (["scheduler=cosine", "scheduler.T_max=0"], "scheduler.T_max=0 ", ">= 1"),
    "T_max not whole": (["scheduler=cosine", "scheduler.T_max=2.5"], "scheduler.T_max=2.5 ", "whole number"),
    "negative eta_min": (
        ["scheduler=cosine", "+scheduler.eta_min=-0.01"],
        "scheduler.eta_min=-0.01 ",
        ">= 0",
    ),
}


@pytest.mark.parametrize("overrides, start, valid", BAD_RECIPES.values(), ids=BAD_RECIPES.keys())
def test_a_bad_recipe_value_exits_2_with_one_line_naming_it(capsys, tmp_path, overrides, start, valid):
    line = one_line_error(capsys, tmp_path, overrides)
    assert line.startswith(f"error: {start}")
    assert valid in line.split("; valid: ", 1)[1]


def test_torch_refusals_name_the_key_of_an_optimizer_without_a_yaml(capsys, tmp_path):
    line = one_line_error(capsys, tmp_path, ["optimizer._target_=torch.optim.RMSprop", "+optimizer.alpha=-1"])
    assert line.startswith("error: optimizer.alpha=-1 is refused by RMSprop (")
    assert "alpha" in line and "valid: what torch.optim.RMSprop accepts" in line


def test_a_scheduler_without_a_yaml_is_checked_by_torch_and_by_stepping_it(capsys, tmp_path):
    line = one_line_error(
        capsys,
        tmp_path,
        ["+scheduler._target_=torch.optim.lr_scheduler.LinearLR", "+scheduler.start_factor=2"],
    )
    assert line.startswith("error: scheduler.start_factor=2 is refused by LinearLR (")
    # nothing in torch refuses a negative base learning rate: stepping the schedule finds it
    line = one_line_error(
        capsys,
        tmp_path,
        [
            "+scheduler._target_=torch.optim.lr_scheduler.CyclicLR",
            "+scheduler.base_lr=-1",
            "+scheduler.max_lr=0.1",
        ],
    )
    assert "scheduler.base_lr=-1" in line and "the learning rate becomes -" in line
    # the engine steps a scheduler once per epoch with no argument
    line = one_line_error(
        capsys, tmp_path, ["+scheduler._target_=torch.optim.lr_scheduler.ReduceLROnPlateau"]
    )
    assert "ReduceLROnPlateau" in line and "metrics" in line


OPTIMIZERS = sorted(p.stem for p in (config_dir() / "optimizer").glob("*.yaml"))
SCHEDULERS = [
    None,
    *sorted(p.stem for p in (config_dir() / "scheduler").glob("*.yaml")),
]  # None: the default, none


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_every_shipped_recipe_passes(optimizer, scheduler):
    check_recipe(
        compose_config([f"optimizer={optimizer}", *([f"scheduler={scheduler}"] if scheduler else [])])
    )


def test_a_learning_rate_of_zero_is_allowed():
    # torch accepts it, and it is the way to train nothing on purpose
    check_recipe(compose_config(["optimizer.lr=0"]))
    with pytest.raises(ConfigError):
        check_recipe(compose_config(["optimizer.lr=-0.0001"]))
