"""`incr train` without -m composes its config once and runs it as `hydra.main` would: the same .hydra/
files, log and results; a fault in the code still exits 1 with its traceback."""

from __future__ import annotations

import json

import pytest
import yaml
from hydra._internal.config_loader_impl import ConfigLoaderImpl

from incr_cli.cli import main
from incr_cli.engine import Run
from incr_cli.precheck import check_command
from incr_cli.train import run_hydra

SETTINGS = ["strategy=replay", "epochs=1", "hardware=cpu", "hardware.num_threads=1", "progress=false"]


def test_a_single_run_composes_its_config_once(tmp_path, monkeypatch):
    composed = []
    original = ConfigLoaderImpl.load_configuration

    def counted(self, *args, **kwargs):
        composed.append(kwargs.get("run_mode"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ConfigLoaderImpl, "load_configuration", counted)
    assert main(["train", *SETTINGS, f"hydra.run.dir={tmp_path / 'run'}"]) == 0
    assert len(composed) == 1  # hydra.main composes twice more: to read hydra.mode, then to run


def without_folders(hydra_yaml: dict) -> dict:
    """hydra.yaml without what names the run's folder and the working directory."""
    hydra = hydra_yaml["hydra"]
    hydra["run"].pop("dir")
    hydra["runtime"].pop("output_dir")
    hydra["runtime"].pop("cwd")
    hydra["overrides"]["hydra"] = [
        o for o in hydra["overrides"]["hydra"] if not o.startswith("hydra.run.dir")
    ]
    return hydra_yaml


def test_a_single_run_writes_what_hydra_main_writes(tmp_path):
    one = tmp_path / "composed_once"
    assert main(["train", *SETTINGS, f"hydra.run.dir={one}"]) == 0
    through_hydra = tmp_path / "hydra_main"
    argv = [*SETTINGS, f"hydra.run.dir={through_hydra}"]
    check_command(argv)
    assert run_hydra(argv) == 0
    for name in ("config.yaml", "overrides.yaml"):
        assert (one / ".hydra" / name).read_text() == (through_hydra / ".hydra" / name).read_text().replace(
            str(through_hydra), str(one)
        )
    saved = [
        without_folders(yaml.safe_load((d / ".hydra" / "hydra.yaml").read_text()))
        for d in (one, through_hydra)
    ]
    assert saved[0] == saved[1]
    assert saved[0]["hydra"]["job"]["name"] == "train" and (one / "train.log").is_file()
    results = [json.loads((d / "metrics.json").read_text()) for d in (one, through_hydra)]
    assert results[0]["class_il"]["accuracy_matrix"] == results[1]["class_il"]["accuracy_matrix"]


def test_a_fault_in_the_code_exits_1_with_its_traceback(tmp_path, monkeypatch, capsys):
    def broken(self):
        raise RuntimeError("a fault in the code")

    monkeypatch.setattr(Run, "run", broken)
    with pytest.raises(SystemExit) as stopped:
        main(["train", *SETTINGS, f"hydra.run.dir={tmp_path / 'run'}"])
    assert stopped.value.code == 1
    err = capsys.readouterr().err
    assert "Error executing job with overrides" in err
    assert "Traceback" in err and "RuntimeError: a fault in the code" in err
