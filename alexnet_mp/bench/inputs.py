"""The input path on one loader core: images/s each way of feeding the training loop delivers.

Three arms, each the training set's real loader (its own process, ``num_workers=0``, one torch
thread: one core) with the paper's augmentation, interleaved over rounds:

- ``folder``: the image folder through PIL (decode, resize to 256, crop, mirror, lighting);
- ``shards_cpu``: prepared shards decoded in the loader (torchvision.io), as on a CPU;
- ``shards_bytes``: prepared shards read for decoding on the device (the bytes and the drawn
  numbers only), as on a GPU.

The images are JPEGs of ImageNet's typical size (500 x 375, some upright), cut from the two
photographs scikit-learn ships (random crops of 60-100 % of each side, resized), in two
classes, one per photograph. It also reports what the storage choice rests on: a record's
bytes as JPEG against raw pixels, and one decode's time.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from alexnet_mp.config import Config
from alexnet_mp.data import build_data
from alexnet_mp.loader import make_loader, set_epoch
from alexnet_mp.prepare import prepare
from alexnet_mp.shardset import ShardDataset

ARMS = ("folder", "shards_cpu", "shards_bytes")
TARGET_BYTES = 10_000  # images/s per core, shards read for device decoding
TARGET_RATIO = 3.0  # shards decoded on the CPU against the folder, per core


def photo_folder(root: Path, files: int, seed: int = 0) -> Path:
    """``root``/train/<photo>/ (``files`` JPEGs) and val/ (an eighth as many)."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images()
    g = torch.Generator().manual_seed(seed)
    for part, n in (("train", files), ("val", max(2, files // 8))):
        for i in range(n):
            k = i % len(photos.images)
            img = photos.images[k]
            h, w = img.shape[:2]
            scale = 0.6 + 0.4 * float(torch.rand(1, generator=g))
            ch, cw = int(h * scale), int(w * scale)
            top = int(torch.randint(0, h - ch + 1, (1,), generator=g))
            left = int(torch.randint(0, w - cw + 1, (1,), generator=g))
            size = (375, 500) if float(torch.rand(1, generator=g)) < 0.2 else (500, 375)
            folder = root / part / Path(photos.filenames[k]).stem
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img[top:top + ch, left:left + cw]).resize(size, Image.BILINEAR).save(
                folder / f"{i:05d}.jpg", quality=90)
    return root


def _loader(cfg: Config, arm: str, root: Path, batch: int):
    name = "imagefolder" if arm == "folder" else "shards"
    data_cfg = dataclasses.replace(cfg.data, name=name, root=str(root), augment=True,
                                   image_size=227, num_workers=0, train_limit=None)
    # A CUDA device only decides that the loader hands over bytes; nothing runs on a GPU here.
    data = build_data(data_cfg, num_classes=2, in_channels=3, seed=cfg.train.seed,
                      device="cuda" if arm == "shards_bytes" else "cpu")
    return make_loader(data.train, batch_size=batch, shuffle=True, seed=cfg.train.seed,
                       num_workers=0, pin_memory=False)


def _images_per_s(loader, min_seconds: float) -> float:
    images, epoch = 0, 0
    start = time.perf_counter()
    while True:
        set_epoch(loader, epoch)
        for x, _ in loader:
            images += len(x)
        epoch += 1
        seconds = time.perf_counter() - start
        if seconds >= min_seconds:
            return images / seconds


def storage_figures(shards: Path, samples: int = 64) -> dict[str, float]:
    """Mean bytes per record as stored (JPEG) and as raw 8-bit RGB, and one decode's time."""
    from alexnet_mp.device_decode import decode

    data = ShardDataset(shards, "train")
    n = min(samples, len(data))
    files = [data.read(i) for i in range(n)]
    raw = statistics.mean(3 * data._rows[i][5] * data._rows[i][6] for i in range(n))
    jpeg = statistics.mean(f.numel() for f in files)
    start = time.perf_counter()
    for f in files:
        decode(f)
    return {"jpeg_bytes": jpeg, "raw_bytes": raw, "raw_over_jpeg": raw / jpeg,
            "decode_ms": 1000 * (time.perf_counter() - start) / n}


def input_path_bench(cfg: Config, work: Path, *, files: int = 400, rounds: int = 3,
                     batch: int = 64, min_seconds: float = 1.0,
                     say: Callable[[str], None] = print) -> dict[str, Any]:
    """Every arm once per round, rounds interleaved; medians over rounds, in images/s on one
    core. ``work``: where the photographs and their shards are written (kept)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        folder, shards = work / "photos", work / "shards"
        if not (folder / "val").is_dir():
            photo_folder(folder, files)
        prepare(folder, shards, per_shard=max(1, files // 4), show_bar=False, say=say)
        loaders = {arm: _loader(cfg, arm, folder if arm == "folder" else shards, batch)
                   for arm in ARMS}
        runs: dict[str, list[float]] = {arm: [] for arm in ARMS}
        for r in range(rounds):
            for arm in ARMS:
                runs[arm].append(_images_per_s(loaders[arm], min_seconds))
            say(f"round {r + 1}/{rounds}: " + ", ".join(f"{a} {runs[a][-1]:,.0f}" for a in ARMS)
                + " images/s")
        median = {arm: statistics.median(v) for arm, v in runs.items()}
        return {"images": len(loaders["folder"].dataset), "batch": batch, "rounds": runs,
                "median": median, "storage": storage_figures(shards),
                "cpu_over_folder": median["shards_cpu"] / median["folder"],
                "targets": {"shards_bytes_per_core": TARGET_BYTES,
                            "shards_cpu_over_folder": TARGET_RATIO}}
    finally:
        torch.set_num_threads(threads)


def input_path_markdown(result: dict[str, Any]) -> str:
    m, s = result["median"], result["storage"]
    rows = [("image folder, PIL (decode, resize, crop, mirror, lighting)", m["folder"], ""),
            ("shards decoded in the loader (torchvision.io)", m["shards_cpu"],
             f"{result['cpu_over_folder']:.1f}x the folder (target >= {TARGET_RATIO:.0f}x): "
             f"{'met' if result['cpu_over_folder'] >= TARGET_RATIO else 'missed'}"),
            ("shards read for device decoding (bytes only)", m["shards_bytes"],
             f"target >= {TARGET_BYTES:,}: "
             f"{'met' if m['shards_bytes'] >= TARGET_BYTES else 'missed'}")]
    lines = ["| input path (one loader core, batch "
             f"{result['batch']}, median of {len(result['rounds']['folder'])} rounds) "
             "| images/s | against target |", "|---|---:|---|"]
    lines += [f"| {name} | {value:,.0f} | {note} |" for name, value, note in rows]
    lines.append("")
    lines.append(f"stored record: {s['jpeg_bytes'] / 1024:.1f} KiB as JPEG against "
                 f"{s['raw_bytes'] / 1024:.1f} KiB of raw pixels ({s['raw_over_jpeg']:.1f}x); "
                 f"one decode {s['decode_ms']:.2f} ms on one core")
    return "\n".join(lines)
