"""A rebuilt checkpoint measured on its data set's test split, and the results as JSON."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from alexnet_mp.badimages import count_everywhere, settle
from alexnet_mp.engine import Precision, evaluate
from alexnet_mp.errors import UserError, count
from alexnet_mp.pipeline import crop_views, pipeline, scaled_size
from alexnet_mp.rebuild import Loaded


def _first_difference(a: list[str], b: list[str]) -> str:
    if len(a) != len(b):
        return f"{len(a)} classes against {len(b)}"
    i = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    return f"label {i} is '{a[i]}' there but '{b[i]}' here"


def evaluate_checkpoint(loaded: Loaded, *, ten_crop: bool = False,
                        batch_size: int | None = None, show_bar: bool = False,
                        warn: Callable[[str], None] = lambda text: None) -> dict[str, Any]:
    """Top-1, top-5 and loss of ``loaded`` on its data set's test (val) split, every example
    counted once in any layout; with ``ten_crop`` the paper's ten-view test.

    Every rank calls this in lockstep; each gets the same figures. ``batch_size`` (default the
    stored ``train.batch_size``) is the global batch, split over replicas.
    """
    cfg, layout, info = loaded.config, loaded.layout, loaded.info
    size = cfg.data.image_size
    batch = batch_size if batch_size is not None else cfg.train.batch_size
    if batch < 1:
        raise UserError(f"--batch-size must be positive, got {batch}")
    # The checkpoint's normalisation: the model learnt with it, whatever set it is shown now.
    feed = pipeline(cfg, layout, "test", batch_size=batch, channels_last=cfg.train.channels_last,
                    ten_crop=ten_crop, stats=(info.mean, info.std))
    data, loader = feed.data, feed.loader
    if info.stored and data.names != info.classes:
        # Labels are indices: another set's labels would be scored against the wrong classes.
        differ = _first_difference(info.classes, data.names)
        raise UserError(f"data set '{cfg.data.name}' at {cfg.data.root} does not have the classes "
                        f"of checkpoint '{loaded.path}' ({differ}); evaluate on the data it was "
                        "trained for (--data-root, --data)")
    start = time.perf_counter()
    result = evaluate(loaded.model, loader, feed.transform,
                      Precision(cfg.train.amp, layout.device),
                      sync=layout.step_sync(), ten_crop=ten_crop, crop_size=size,
                      mirror=cfg.data.hflip,
                      show_bar=show_bar)
    seconds = time.perf_counter() - start
    group = layout.step_sync().group
    bad = settle(loader, group, count_everywhere(loader, group), cfg.data.bad_images)
    if bad:
        first, why = bad[0]
        warn(f"left out {len(bad)} unreadable image(s) (data.bad_images=skip), "
             f"first {first}: {why}")
    return {
        "checkpoint": str(loaded.path), "step": loaded.step, "epochs_done": loaded.epoch,
        "model": cfg.model.name, "data": cfg.data.name, "data_root": cfg.data.root,
        "split": "val" if cfg.data.name in ("imagefolder", "shards") else "test",
        "images": result["test_images"], "ten_crop": ten_crop,
        "views": crop_views(ten_crop, cfg.data.hflip), "image_size": size,
        "scaled_size": scaled_size(size) if ten_crop else None,
        "top1": result["test_acc"], "top5": result["test_top5"],
        "top1_error": 1.0 - result["test_acc"], "top5_error": 1.0 - result["test_top5"],
        "loss": result["test_loss"], "layout": layout.name, "ranks": layout.world_size,
        "device": layout.device.type, "batch_size": batch, "seconds": seconds,
        "unreadable_images": [path for path, _ in bad], "notes": loaded.notes,
    }


def default_output(checkpoint: str | Path, ten_crop: bool) -> Path:
    """Beside the checkpoint: ``step-N.eval.json`` or ``step-N.eval-10crop.json``."""
    path = Path(checkpoint)
    return path.with_name(f"{path.stem}.eval{'-10crop' if ten_crop else ''}.json")


def write_json(obj: Any, path: Path) -> None:
    """Atomically, so that a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(f"could not write '{path}' ({exc.strerror or exc}); pass --out with a "
                        "writable path") from None


def _check_writable(path: Path) -> None:
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create '{folder}' for the results ({exc.strerror or exc}); pass "
                        "--out with a writable path") from None
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UserError(f"cannot write the results to '{path}' (permission denied); pass --out "
                        "with a writable path")


def evaluate_to_file(loaded: Loaded, out: Path, **options: Any) -> dict[str, Any]:
    """:func:`evaluate_checkpoint`, its results written by rank 0 to ``out`` as JSON.

    ``out`` is checked before the evaluation starts, on every rank's behalf, so that a long
    evaluation never ends in a file that cannot be written.
    """
    error = None
    if loaded.layout.is_main:
        try:
            _check_writable(out)
        except UserError as exc:
            error = exc
    loaded.layout.agree(error)
    result = evaluate_checkpoint(loaded, **options)
    if loaded.layout.is_main:
        write_json(result, out)
    return result


def summary(result: dict[str, Any]) -> str:
    """One line for the console."""
    views = result["views"]
    images = count(result["images"], f"{result['split']} image")
    return (f"{Path(result['checkpoint']).name} (step {result['step']}) on {images} of "
            f"{result['data']}, {views}: top-1 {result['top1']:.4f} "
            f"(error {100 * result['top1_error']:.2f} %), top-5 {result['top5']:.4f} (error "
            f"{100 * result['top5_error']:.2f} %), loss {result['loss']:.4f}")
