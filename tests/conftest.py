"""Shared fixtures: tiny MNIST-format data that torchvision itself reads, and small configs."""

from __future__ import annotations

import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from alexnet_mp.cli.process import configure_process
from alexnet_mp.parallel.layout import Layout, setup_layout

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


def one_process_layout(model_name: str) -> Layout:
    """This process as a one-rank run, set up as the entry points set one up, on one thread."""
    layout = setup_layout(model_name)
    configure_process(layout.device, threads=1)
    return layout


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


def write_shapes_folder(root: Path, per_class: int, size: int = 48, seed: int = 0) -> Path:
    """An ImageFolder of small PNGs, ``train/`` and ``val/`` (a quarter as many), three classes:
    a disc, a square and a cross, each of random colour, size and place on a noisy background.

    A task a small net must learn shapes for (colour tells nothing), in the kind of folder users
    bring: a thousand or two small images.
    """
    from PIL import Image, ImageDraw

    g = torch.Generator().manual_seed(seed)

    def rand(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    for part, n in (("train", per_class), ("val", max(1, per_class // 4))):
        for shape in ("cross", "disc", "square"):
            folder = root / part / shape
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                noise = (torch.rand(size, size, 3, generator=g) * 90).to(torch.uint8)
                img = Image.fromarray(noise.numpy())
                draw = ImageDraw.Draw(img)
                r = rand(size // 6, size // 3)
                cx, cy = rand(r, size - r - 1), rand(r, size - r - 1)
                colour = (rand(90, 255), rand(90, 255), rand(90, 255))
                box = (cx - r, cy - r, cx + r, cy + r)
                if shape == "disc":
                    draw.ellipse(box, fill=colour)
                elif shape == "square":
                    draw.rectangle(box, fill=colour)
                else:
                    w = max(2, r // 3)
                    draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=colour)
                    draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=colour)
                img.save(folder / f"{i:04d}.png")
    return root
