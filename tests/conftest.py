"""Shared fixtures: tiny MNIST-format data that torchvision itself reads, and small configs."""

from __future__ import annotations

import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def write_idx_mnist(root: Path, n_train: int = 48, n_test: int = 16, seed: int = 0) -> Path:
    """MNIST IDX files under ``root/MNIST/raw``: class c is a bright bar in row band c, + noise.

    The classes are separable, so a few SGD steps show learning, and torchvision.datasets.MNIST
    reads the files exactly as it reads the real ones.
    """
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = torch.arange(n) % 10
        images = (torch.rand(n, 28, 28, generator=g) * 60).to(torch.uint8)
        for i, c in enumerate(labels.tolist()):
            images[i, 2 + 2 * c: 4 + 2 * c, 4:24] = 255
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 0x803, n, 28, 28) + images.numpy().tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            struct.pack(">II", 0x801, n) + labels.to(torch.uint8).numpy().tobytes())
    return root


@pytest.fixture
def idx_root(tmp_path: Path) -> Path:
    return write_idx_mnist(tmp_path / "data")


def small_overrides(data_root: Path, run_dir: Path, **extra) -> list[str]:
    """A run that takes seconds: 1/8 width, 67-pixel input, batches of 8."""
    values = {"model.name": "alexnet_grouped", "model.width": 0.125, "model.init": "xavier",
              "data.name": "mnist", "data.root": str(data_root), "data.image_size": 67,
              "train.batch_size": 8, "train.epochs": 1, "train.lr": 0.02,
              "run.dir": str(run_dir), "run.progress": False, "run.log_every": 2,
              "run.threads": 1, **extra}
    return [f"{k}={v}" for k, v in values.items()]


def run_cli(args: list[str], *, torchrun: int | None = None, timeout: float = 240,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run launch/train.py as a user would: plain python, or under torchrun with N ranks."""
    script = str(ROOT / "launch" / "train.py")
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={torchrun}",
               "--standalone", script, *args]
    else:
        cmd = [sys.executable, script, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd or ROOT)


def wait_for(predicate, timeout: float = 180, what: str = "") -> None:
    """Poll ``predicate`` until it holds; the timeout is a generous bound, never a measurement."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
