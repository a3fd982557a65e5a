"""The package installed from a wheel, not from the clone: its commands and its default config
travel inside it, and run from any folder without the clone on the path."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, small_overrides, write_idx_mnist

pytestmark = pytest.mark.slow

COMMANDS = ["alexnet-train", "alexnet-evaluate", "alexnet-predict", "alexnet-bench",
            "alexnet-prepare-data", "alexnet-pca-lighting"]


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A virtual environment that sees this interpreter's packages (torch, ...) and holds
    alexnet_mp installed, not editable, from a copy of the sources (a build leaves files in the
    folder it builds)."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for name in ("alexnet_mp", "configs"):
        shutil.copytree(ROOT / name, src / name, symlinks=True, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    env = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip",
                    str(env)], check=True, timeout=120)
    # The venv borrows this interpreter's pip and setuptools: nothing is downloaded.
    pip = subprocess.run([str(env / "bin" / "python"), "-m", "pip", "install", "--no-deps",
                          "--no-build-isolation", "--no-index", "--quiet", str(src)],
                         capture_output=True, text=True, timeout=300, env=_outside_env())
    assert pip.returncode == 0, pip.stderr
    return env


def _outside_env() -> dict[str, str]:
    """This process's environment without PYTHONPATH, so that nothing finds the clone."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=cwd,
                          env=_outside_env())


def test_the_installed_package_is_the_wheels_not_the_clone(venv, tmp_path):
    where = _run([str(venv / "bin" / "python"), "-c",
                  "import alexnet_mp.cli.train as m; print(m.__file__)"], tmp_path)
    assert where.returncode == 0, where.stderr
    path = Path(where.stdout.strip())
    assert path.is_relative_to(venv) and not path.is_relative_to(ROOT), path


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_is_installed(venv, tmp_path, command):
    proc = _run([str(venv / "bin" / command), "--help"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: "), proc.stdout


def test_the_installed_module_trains_a_step_with_its_own_default_config(venv, tmp_path):
    root, run = write_idx_mnist(tmp_path / "data"), tmp_path / "run"
    proc = _run([str(venv / "bin" / "python"), "-m", "alexnet_mp.cli.train",
                 *small_overrides(root, run, **{"train.max_steps": 1})], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (run / "checkpoints" / "last.pt").is_file()
    # configs/default.yaml read from inside the installed package: its name and its keys.
    written = (run / "config.yaml").read_text()
    assert "name: default" in written and "step_size: 6" in written, written
