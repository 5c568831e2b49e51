"""The wheel ships every config group inside the package and declares the `incr` command."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPOSITORY = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """`pip wheel --no-deps --no-build-isolation` of a copy of the repository's sources: building in place
    would write build/ and *.egg-info into the working tree."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPOSITORY / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("incr_cli", "configs"):
        shutil.copytree(REPOSITORY / folder, source / folder, ignore=ignore)
    out = tmp_path_factory.mktemp("wheelhouse")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    (built,) = out.glob("incr-*.whl")
    return built


def test_the_wheel_ships_every_config_group_inside_the_package(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "incr_cli/configs/train.yaml" in names
    expected = sorted(
        p.relative_to(REPOSITORY / "configs").as_posix() for p in (REPOSITORY / "configs").rglob("*.yaml")
    )
    groups = {name.split("/")[0] for name in expected if "/" in name}
    assert groups >= {
        "dataset",
        "model",
        "strategy",
        "hardware",
        "optimizer",
        "scheduler",
        "experiment",
        "debug",
    }
    missing = [name for name in expected if f"incr_cli/configs/{name}" not in names]
    assert not missing, f"not in the wheel: {missing}"
    # and the code of every subpackage
    for module in ("cli.py", "data/stream.py", "models/head.py", "strategies/replay.py"):
        assert f"incr_cli/{module}" in names


def test_the_wheel_declares_the_incr_console_script(wheel):
    archive = zipfile.ZipFile(wheel)
    (entry_points,) = [n for n in archive.namelist() if n.endswith(".dist-info/entry_points.txt")]
    lines = [line.replace(" ", "") for line in archive.read(entry_points).decode().splitlines()]
    assert "[console_scripts]" in lines
    assert "incr=incr_cli.cli:console_main" in lines


def test_the_unpacked_wheel_finds_its_packaged_configs(wheel, tmp_path):
    zipfile.ZipFile(wheel).extractall(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    code = "import incr_cli.config as c; print(c.__file__); print(c.config_dir())"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    module, configs = result.stdout.split()
    assert Path(module).is_relative_to(tmp_path)  # the unpacked copy, not the editable checkout
    assert Path(configs) == tmp_path / "incr_cli" / "configs"
    # the packaged config tree composes: `incr train --cfg job` from the unpacked wheel
    shown = subprocess.run(
        [sys.executable, "-m", "incr_cli", "train", "strategy=joint", "--cfg", "job"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert shown.returncode == 0, shown.stderr
    assert "_target_: incr_cli.strategies.joint.Joint" in shown.stdout


def package_files() -> list[Path]:
    """Everything the wheel is built from."""
    files = [REPOSITORY / "pyproject.toml", REPOSITORY / "README.md"]
    files += sorted((REPOSITORY / "incr_cli").rglob("*.py")) + sorted(
        (REPOSITORY / "configs").rglob("*.yaml")
    )
    return files


@pytest.mark.skipif(
    shutil.which("git") is None or not (REPOSITORY / ".git").exists(), reason="needs a git checkout"
)
def test_no_package_file_is_ignored_by_git():
    # check-ignore leaves tracked files alone and lists the untracked ones an ignore rule hides
    result = subprocess.run(
        ["git", "check-ignore", "--verbose", *(str(p.relative_to(REPOSITORY)) for p in package_files())],
        capture_output=True,
        text=True,
        cwd=REPOSITORY,
    )
    assert result.returncode in (0, 1), result.stderr  # 0: some are ignored, 1: none is
    assert result.stdout == "", f"ignored by git, so never committed:\n{result.stdout}"
