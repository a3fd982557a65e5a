"""Converting an image folder into prepared shards (the format: :mod:`alexnet_mp.shardset`).

Each image is read once, here: scaled so that its short side is 256 (as the paper did, aspect
kept; the image-folder path's own resize) and stored as a JPEG file, which decodes in about a
millisecond and takes a seventh of the disk of raw pixels (docs/shards.md has the figures).
A file that cannot be read is reported once, listed in the manifest and left out.

Shard ``k`` of a split holds images ``k * per_shard`` to ``(k + 1) * per_shard`` of the
split's sorted file list, so an interrupted conversion knows what each shard should hold:
a re-run keeps every shard whose file matches the manifest's size and sha256 and whose file
list is unchanged, and redoes the others. Shards are written under a temporary name and renamed,
then entered in the manifest (itself rewritten atomically); a shard that Ctrl-C cuts short is
never counted as done.
"""

from __future__ import annotations

import errno
import hashlib
import json
import multiprocessing
import os
import signal
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
from torchvision.io import encode_jpeg
from torchvision.transforms import v2
from tqdm import tqdm

from alexnet_mp.errors import UserError
from alexnet_mp.imagefolder import _check_classes, _reason
from alexnet_mp.images import open_rgb
from alexnet_mp.shardset import (
    FORMAT,
    INDEX,
    MANIFEST,
    SIDECAR_FIELDS,
    SPLITS,
    rows,
    sha256_file,
    shard_name,
    sidecar_name,
)

SHORT_SIDE = 256
QUALITY = 90
# About 300 MB of ImageNet-sized records (~37 KB each at 256 px, quality 90) per shard.
PER_SHARD = 8192


def _fsync_write(path: Path, chunks: list[bytes] | bytes) -> None:
    with open(path, "wb") as f:
        for chunk in [chunks] if isinstance(chunks, bytes) else chunks:
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


def _write_atomic(path: Path, chunks: list[bytes] | bytes) -> None:
    """``chunks`` into ``path`` under a temporary name, synced, then renamed: a reader finds the
    old file or the whole new one. An OSError is the caller's to word."""
    tmp = path.with_name(f".{path.name}.tmp")
    _fsync_write(tmp, chunks)
    tmp.replace(path)


def _no_room(path: Path, exc: OSError) -> UserError:
    if exc.errno == errno.ENOSPC:
        return UserError(f"no space left on the device writing {path}; free some (or choose "
                         "another OUT) and run the same command again: finished shards are kept")
    return UserError(f"cannot write {path} ({exc.strerror or exc}); choose a writable OUT")


def scaled_jpeg(path: str, short_side: int, quality: int) -> tuple[bytes, int, int]:
    """The file as RGB, its short side scaled to ``short_side``, encoded as JPEG."""
    # The reader training, evaluate and predict use: 16-bit and float files are scaled to 8
    # bits, not clipped, so a folder and its shards hold the same pixels.
    pixels = v2.functional.pil_to_tensor(open_rgb(path))
    pixels = v2.functional.resize(pixels, [short_side], antialias=True)
    return encode_jpeg(pixels, quality=quality).numpy().tobytes(), *pixels.shape[1:]


def _source_key(items: list[tuple[str, str, int]], short_side: int, quality: int) -> str:
    """What a shard should hold: its files, their labels and the encoding."""
    h = hashlib.sha256(f"{short_side}:{quality}\n".encode())
    for _, rel, label in items:
        h.update(f"{rel}\t{label}\n".encode())
    return h.hexdigest()


def _intact(folder: Path, entry: dict[str, Any] | None, source: str) -> bool:
    if not entry or entry.get("source") != source:
        return False
    try:
        shard, side = folder / entry["file"], folder / entry["sidecar"]
        return (shard.stat().st_size == entry["bytes"] and sha256_file(shard) == entry["sha256"]
                and sha256_file(side) == entry["sidecar_sha256"])
    except (OSError, KeyError, TypeError):
        return False


def build_shard(task: dict[str, Any]) -> dict[str, Any]:
    """Write (or keep, when intact) one shard; returns its manifest entry, or {'error': text}.

    Runs in a pool worker: errors come back as values, so that the main process says them as
    one line.
    """
    torch.set_num_threads(1)
    folder, number, items = Path(task["folder"]), task["number"], task["items"]
    source = _source_key(items, task["short_side"], task["quality"])
    where = {"split": task["split"], "number": number, "items": len(items)}
    if _intact(folder, task["old"], source):
        return {**task["old"], **where, "kept": True}
    chunks, records, unreadable, offset = [], [], [], 0
    digest = hashlib.sha256()
    for path, rel, label in items:
        try:
            data, height, width = scaled_jpeg(path, task["short_side"], task["quality"])
        except Exception as exc:  # any decoder failure: the file is reported and left out
            unreadable.append([rel, _reason(exc)])
            continue
        chunks.append(data)
        digest.update(data)
        records.append([offset, len(data), label, zlib.crc32(data), height, width])
        offset += len(data)
    shard, side = folder / shard_name(number), folder / sidecar_name(number)
    index = torch.tensor(records, dtype=torch.int64).view(-1, len(SIDECAR_FIELDS))
    index_bytes = index.numpy().astype("<i8").tobytes()
    try:
        for final, body in ((side, index_bytes), (shard, chunks)):
            _write_atomic(final, body)
    except OSError as exc:
        return {"error": str(_no_room(shard, exc))}
    return {"file": shard.name, "bytes": offset, "sha256": digest.hexdigest(),
            "records": len(records), "sidecar": side.name,
            "sidecar_sha256": hashlib.sha256(index_bytes).hexdigest(), "source": source,
            "unreadable": unreadable, **where, "kept": False}


def _ignore_sigint() -> None:
    # Ctrl-C reaches the whole process group; the main process ends the workers itself, and a
    # worker's own KeyboardInterrupt would only print a traceback per worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    try:
        _write_atomic(out / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
    except OSError as exc:
        raise _no_room(out / MANIFEST, exc) from None


def _old_manifest(out: Path) -> dict[str, Any]:
    try:
        old = json.loads((out / MANIFEST).read_text())
        return old if isinstance(old, dict) and old.get("format") == FORMAT else {}
    except (OSError, ValueError):
        return {}  # nothing to resume from: every shard is redone


def _check_out(out: Path) -> None:
    try:
        for split in SPLITS:
            (out / split).mkdir(parents=True, exist_ok=True)
        probe = out / ".write-probe.tmp"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write to OUT {out} ({exc.strerror or exc}); choose a folder "
                        "you can write to") from None
    for split in SPLITS:  # what an interrupted run left half written
        for stale in (out / split).glob(".*.tmp"):
            stale.unlink(missing_ok=True)


def _plan(folder: Path) -> tuple[list[str], dict[str, list[tuple[str, str, int]]]]:
    for part in SPLITS:
        if not (folder / part).is_dir():
            raise UserError(f"{folder} has no {part}/ folder; FOLDER must hold train/ and val/, "
                            "each with one subfolder of images per class")
    try:
        _check_classes(folder)
        classes, to_index = find_classes(str(folder / "train"))
        plan = {split: [(path, os.path.relpath(path, folder), label) for path, label in
                        make_dataset(str(folder / split), to_index, extensions=IMG_EXTENSIONS)]
                for split in SPLITS}
    except FileNotFoundError as exc:  # a class folder without images
        raise UserError(f"{folder}: {exc}") from None
    return classes, plan


def prepare(folder: str | Path, out: str | Path, *, per_shard: int = PER_SHARD,
            short_side: int = SHORT_SIDE, quality: int = QUALITY, workers: int | None = None,
            show_bar: bool = True, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Convert ``folder`` (train/ and val/ of class folders) into shards under ``out``; returns
    the manifest. ``workers``: processes (default every core; 0 converts in this process)."""
    folder, out = Path(folder), Path(out)
    if per_shard < 1 or short_side < 1 or not 1 <= quality <= 100:
        raise UserError("--per-shard and --short-side must be positive, --quality 1-100")
    classes, plan = _plan(folder)
    _check_out(out)
    old = _old_manifest(out)
    manifest: dict[str, Any] = {"format": FORMAT, "complete": False, "short_side": short_side,
                                "quality": quality, "classes": classes, "source": str(folder),
                                "splits": {}}
    tasks = []
    for split in SPLITS:
        items = plan[split]
        old_shards = (old.get("splits", {}).get(split) or {}).get("shards", [])
        count = max(1, -(-len(items) // per_shard))
        manifest["splits"][split] = {"shards": [None] * count}
        for k in range(count):
            tasks.append({"folder": str(out / split), "split": split, "number": k,
                          "items": items[k * per_shard:(k + 1) * per_shard],
                          "short_side": short_side, "quality": quality,
                          "old": old_shards[k] if k < len(old_shards) else None})
    total = sum(len(t["items"]) for t in tasks)
    workers = min(len(tasks), os.cpu_count() or 1) if workers is None else workers
    bar = tqdm(total=total, unit="img", desc="preparing", disable=not show_bar,
               dynamic_ncols=True)
    pool = (multiprocessing.get_context("spawn").Pool(workers, initializer=_ignore_sigint)
            if workers > 0 else None)
    try:
        results = pool.imap_unordered(build_shard, tasks) if pool else map(build_shard, tasks)
        for entry in results:
            if "error" in entry:
                raise UserError(entry["error"])
            manifest["splits"][entry["split"]]["shards"][entry["number"]] = entry
            if not entry["kept"]:
                for rel, why in entry["unreadable"]:
                    bar.write(f"unreadable, left out: {rel}: {why}")
            bar.update(entry["items"])
            _write_manifest(out, manifest)  # a finished shard survives an interruption
    except BaseException:
        if pool:
            pool.terminate()
        raise
    finally:
        bar.close()
        if pool:
            pool.close()
            pool.join()
    return _finish(out, manifest, say)


def _finish(out: Path, manifest: dict[str, Any], say: Callable[[str], None]) -> dict[str, Any]:
    """The split indices, then the manifest marked complete."""
    unreadable = []
    for split in SPLITS:
        entry = manifest["splits"][split]
        parts = []
        for number, shard in enumerate(entry["shards"]):
            side = rows((out / split / shard["sidecar"]).read_bytes(), len(SIDECAR_FIELDS))
            parts.append(torch.cat([torch.full((len(side), 1), number), side], dim=1))
            unreadable += shard["unreadable"]
        index = torch.cat(parts).numpy().astype("<i8").tobytes()
        path = out / split / INDEX
        try:
            _write_atomic(path, index)
        except OSError as exc:
            raise _no_room(path, exc) from None
        entry["index"], entry["index_sha256"] = INDEX, hashlib.sha256(index).hexdigest()
        entry["images"] = sum(s["records"] for s in entry["shards"])
    manifest["unreadable"] = unreadable
    manifest["complete"] = True
    _write_manifest(out, manifest)
    for split in SPLITS:  # shards of an earlier conversion with more of them
        listed = {name for s in manifest["splits"][split]["shards"]
                  for name in (s["file"], s["sidecar"])}
        for stale in (out / split).glob("shard-*"):
            if stale.name not in listed:
                stale.unlink(missing_ok=True)
    kept = sum(s["kept"] for e in manifest["splits"].values() for s in e["shards"])
    counts = ", ".join(f"{split} {manifest['splits'][split]['images']} images in "
                       f"{len(manifest['splits'][split]['shards'])} shard(s)" for split in SPLITS)
    say(f"prepared {out}: {counts}" + (f"; {kept} intact shard(s) kept" if kept else "")
        + (f"; {len(unreadable)} unreadable file(s) left out, listed in {out / MANIFEST}"
           if unreadable else ""))
    return manifest
