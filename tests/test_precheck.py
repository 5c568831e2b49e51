"""The jobs `incr train -m` checks before anything trains are the jobs Hydra's basic sweeper runs."""

from __future__ import annotations

import pytest
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper  # the reference, in the test only
from hydra.core.override_parser.overrides_parser import OverridesParser

from incr_cli.errors import ConfigError
from incr_cli.precheck import job_overrides


@pytest.mark.parametrize(
    "overrides",
    [
        ["strategy=finetune,replay", "seed=0,1,2"],
        ["seed=range(0,3)", "+strategy.alpha=0.1,0.3", "~logger", "epochs=2"],
        ["optimizer.lr=choice(0.1,0.01)", "dataset.class_order=[1,0,2,3,4,5,6,7,8,9]"],
        ["strategy=replay"],
    ],
)
def test_a_sweep_expands_to_the_basic_sweepers_jobs(overrides):
    parsed = OverridesParser.create().parse_overrides(overrides)
    expected = BasicSweeper.split_arguments(parsed, max_batch_size=None)[0]
    assert job_overrides(["-m", *overrides, "hydra.sweep.dir=x"]) == expected


def test_one_run_keeps_its_overrides_as_typed():
    assert job_overrides(["strategy=replay", "seed=3", "hydra.run.dir=x"]) == [["strategy=replay", "seed=3"]]


def test_a_list_of_values_without_multirun_is_refused():
    with pytest.raises(ConfigError, match=r"seed=0,1 lists several values; add -m"):
        job_overrides(["seed=0,1"])


def test_an_interval_sweep_needs_a_sweeper():
    with pytest.raises(ConfigError, match=r"interval sweep needs a sweeper plugin"):
        job_overrides(["-m", "optimizer.lr=interval(0.001,0.1)"])


def test_hydras_run_and_config_flags_are_not_taken_for_overrides():
    argv = ["--run", "--config-name", "train", "-cd", "configs", "seed=4"]
    assert job_overrides(argv) == [["seed=4"]]
