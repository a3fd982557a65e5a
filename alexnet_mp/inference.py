"""After training: a checkpoint's model rebuilt for any layout, evaluated, or shown image files.

Everything comes from the checkpoint alone. Its stored config (the model section and
``data.image_size``) builds the model; its ``data`` record (class names, mean and std, channels)
says how to read an image. The stored ``run`` and ``parallel`` sections, ``train.amp``,
``train.channels_last``, ``train.compile`` and the training-only augmentation keys describe how
and where it was trained, not where it is used now, so they start from their defaults; the
command line may set any key.

Every rank reads the checkpoint itself, before any process group exists: the model it holds
decides the layout (two columns or none). Its path must therefore be the same on every node.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import nn
from torch.utils.data import Dataset, Subset
from torchvision.datasets import DatasetFolder
from torchvision.transforms import v2

from alexnet_mp import checkpoint as ckpt
from alexnet_mp.badimages import count_everywhere, settle
from alexnet_mp.config import MODELS, Config, load_config
from alexnet_mp.data import STATS, BatchTransform, build_data
from alexnet_mp.engine import Precision, evaluate, ten_crop_log_probs
from alexnet_mp.errors import UserError, count
from alexnet_mp.images import open_image
from alexnet_mp.loader import make_loader
from alexnet_mp.models import model_family
from alexnet_mp.parallel.build import build_model
from alexnet_mp.parallel.layout import Layout
from alexnet_mp.shardset import ShardDataset

FAMILIES = tuple(sorted({model_family(name) for name in MODELS}))
# Stored keys that describe the training machine or training-only transforms: evaluation starts
# them from their defaults (a lighting file or a GPU-only precision need not exist here).
TRAINING_ONLY = ("train.amp", "train.channels_last", "train.compile", "data.augment",
                 "data.lighting_file")
# The sections a model is rebuilt from; run and parallel are the new machine's business.
KEPT_SECTIONS = ("model", "data", "train")
PREDICT_BATCH = 32


def crop_views(ten_crop: bool, mirror: bool) -> str:
    """How many views judge each image, as the output says it."""
    if not ten_crop:
        return "one view"
    # A model trained without mirroring never saw a mirrored image: its flips would mislead.
    return "10 crops" if mirror else "5 crops (no mirror: data.hflip=false)"


def test_views(cfg: Config) -> str:
    """What training's start line says of its epoch-end test when it is not one view."""
    if not cfg.train.ten_crop:
        return ""
    return f", tested on {crop_views(True, cfg.data.hflip)}"


def scaled_size(image_size: int) -> int:
    """The side images are scaled to before cropping: the paper's 256 for its 227 (224) crops."""
    return round(image_size * 256 / 227)


@dataclass(frozen=True)
class DataInfo:
    """How the checkpoint's model reads an image, and what its outputs are called."""

    name: str  # the data set it was trained on
    classes: list[str]  # index = label
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int
    in_channels: int
    stored: bool = True  # False: an older checkpoint; numbered classes and the set's defaults


@dataclass
class Loaded:
    """A checkpoint's model on this rank's place in ``layout``, in eval mode."""

    path: Path
    config: Config  # the stored config, with this machine's run/parallel and the overrides
    info: DataInfo
    layout: Layout
    model: nn.Module
    step: int
    epoch: int  # whole epochs done (the checkpoint's epoch in progress, 0-based)
    notes: list[str] = field(default_factory=list)  # what the caller should tell the user


def _config(path: Path, saved: dict[str, Any], overrides: Sequence[str],
            notes: list[str]) -> Config:
    """The stored config's model, data and train sections, then ``overrides``, validated.

    Values go through ``load_config``'s own overrides as JSON, a subset of YAML that reads back
    to the same value, so a stored config is checked exactly as a config file would be.
    """
    defaults = Config()
    kept, unknown = [], []
    for section in KEPT_SECTIONS:
        known = {f.name for f in dataclasses.fields(getattr(defaults, section))}
        for key, value in (saved.get(section) or {}).items():
            dotted = f"{section}.{key}"
            if dotted in TRAINING_ONLY:
                continue
            if key not in known:
                if section == "model":  # it shaped the weights: guessing would mislead
                    raise ckpt.CheckpointError(
                        f"checkpoint '{path}' was written with {dotted}, which this version of "
                        "alexnet_mp does not know; use the version that wrote it")
                unknown.append(dotted)
                continue
            kept.append(f"{dotted}={json.dumps(value)}")
    if unknown:
        notes.append(f"ignoring config keys this version does not know: {', '.join(unknown)}")
    try:
        load_config(None, kept)
    except UserError as exc:
        raise ckpt.CheckpointError(f"checkpoint '{path}' holds a config this version cannot use "
                                   f"({exc})") from None
    return load_config(None, [*kept, *overrides])


def _data_info(path: Path, state: dict[str, Any], cfg: Config, notes: list[str]) -> DataInfo:
    saved = state.get("data")
    if isinstance(saved, dict) and {"classes", "mean", "std", "in_channels"} <= saved.keys():
        return DataInfo(str(saved.get("name", cfg.data.name)), [str(c) for c in saved["classes"]],
                        tuple(float(m) for m in saved["mean"]),
                        tuple(float(s) for s in saved["std"]), cfg.data.image_size,
                        int(saved["in_channels"]))
    # The data set it trained on, even when --data names another one for this evaluation.
    name = str((state["config"].get("data") or {}).get("name", cfg.data.name))
    channels, classes = cfg.model.in_channels, cfg.model.num_classes
    mean, std = STATS.get(name, (None,) * 4)[2:]
    if mean is None or len(mean) != channels:  # what build_data gives data sets without stats
        mean, std = (0.5,) * channels, (0.25,) * channels
    notes.append(f"'{path}' predates stored class names and normalisation: classes are shown as "
                 f"numbers 0-{classes - 1}, and images are normalised with {name}'s usual mean "
                 "and std")
    return DataInfo(name, [str(i) for i in range(classes)], tuple(mean), tuple(std),
                    cfg.data.image_size, channels, stored=False)


def read_checkpoint(path: str | Path, overrides: Sequence[str] = ()
                    ) -> tuple[dict[str, Any], Config, DataInfo, list[str]]:
    """The verified state, the config to rebuild its model with, its data record and notes.

    A missing, corrupt, foreign or unsafe file, or one holding a model this version cannot
    build, is a one-line :class:`~alexnet_mp.checkpoint.CheckpointError`.
    """
    path = Path(path)
    if not path.is_file():
        raise ckpt.CheckpointError(f"checkpoint '{path}' does not exist or is not a file; pass a "
                                   ".pt file written by launch/train.py (RUN_DIR/checkpoints/"
                                   "last.pt, best.pt or step-N.pt)")
    state = ckpt.load(path, remedy="pass an older checkpoint as the checkpoint argument (such "
                                   "as another step-N.pt beside it)")
    family = state.get("model_name")
    if family not in FAMILIES:
        raise ckpt.CheckpointError(f"checkpoint '{path}' holds a model '{family}' that this "
                                   f"version cannot build (it builds {', '.join(FAMILIES)}); use "
                                   "the version of alexnet_mp that wrote it")
    if not isinstance(state.get("config"), dict) or not isinstance(
            state["config"].get("model"), dict):
        raise ckpt.CheckpointError(f"checkpoint '{path}' holds no config, so its model cannot be "
                                   "rebuilt; it was not written by launch/train.py")
    notes: list[str] = []
    cfg = _config(path, state["config"], overrides, notes)
    return state, cfg, _data_info(path, state, cfg, notes), notes


def load(path: str | Path, open_layout: Callable[[Config], Layout],
         overrides: Sequence[str] = ()) -> Loaded:
    """The checkpoint's model for this rank, ready to evaluate, from the file alone.

    ``open_layout(config)`` gives this process's place (one device, or a column of the
    torchrun job); it is called once the checkpoint says which model it holds. Each rank builds
    only its own rows (``parallel.build.build_model``) and copies them from the canonical
    state; a checkpoint that does not fit is one line on every rank.
    """
    state, cfg, info, notes = read_checkpoint(path, overrides)
    layout = open_layout(cfg)
    error, model = None, None
    try:
        model = build_model(cfg.model, cfg.data.image_size, layout, cfg.train.seed)
        ckpt.check_fits(state, model_family(cfg.model.name), ckpt.canonical_shapes(model), path)
        ckpt.restore_model(state, model)
        if cfg.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
    except UserError as exc:
        error = exc
    layout.agree(error)
    model.eval()
    train = state.get("train") or {}
    return Loaded(Path(path), cfg, info, layout, model, int(train.get("global_step", 0)),
                  int(train.get("epoch", 0)), notes)


# -- evaluation -------------------------------------------------------------------------------

def whole_scaled_images(test: Dataset, image_size: int) -> None:
    """Image files come out as the scaled square (the paper's central 256 x 256) rather than its
    centre crop, so that the ten crops can be cut from it. Tensor data sets keep their stored
    size: the batch transform scales those on the device."""
    base = test
    while isinstance(base, Subset):
        base = base.dataset
    if isinstance(base, DatasetFolder):
        scale = scaled_size(image_size)
        base.transform = v2.Compose([v2.PILToTensor(), v2.Resize(scale), v2.CenterCrop(scale)])
    elif isinstance(base, ShardDataset):
        base.whole_views()


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
    data = build_data(cfg.data, num_classes=cfg.model.num_classes,
                      in_channels=cfg.model.in_channels, seed=cfg.train.seed,
                      device=layout.device)
    if info.stored and data.names != info.classes:
        # Labels are indices: another set's labels would be scored against the wrong classes.
        differ = _first_difference(info.classes, data.names)
        raise UserError(f"data set '{cfg.data.name}' at {cfg.data.root} does not have the classes "
                        f"of checkpoint '{loaded.path}' ({differ}); evaluate on the data it was "
                        "trained for (--data-root, --data)")
    if ten_crop:
        whole_scaled_images(data.test, size)
    loader = make_loader(data.test, batch_size=layout.local_batch(batch), shuffle=False,
                         seed=cfg.train.seed, num_workers=cfg.data.num_workers,
                         pin_memory=layout.device.type == "cuda",
                         replicas=layout.data_shards, replica=layout.data_shard,
                         bad_images=cfg.data.bad_images, mark_padding=True)
    # The checkpoint's normalisation: the model learnt with it, whatever set it is shown now.
    transform = BatchTransform(scaled_size(size) if ten_crop else size, info.mean, info.std,
                               cfg.train.channels_last).to(layout.device)
    start = time.perf_counter()
    result = evaluate(loaded.model, loader, transform, Precision(cfg.train.amp, layout.device),
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


# -- image files ------------------------------------------------------------------------------

class ImageError(UserError):
    """One image file that cannot be classified; the others still are."""


def _square(img: torch.Tensor) -> torch.Tensor:
    side = min(img.shape[-2:])
    return v2.functional.center_crop(img, [side, side])


def sample_transform(info: DataInfo, ten_crop: bool = False
                     ) -> Callable[[Image.Image], torch.Tensor]:
    """What evaluation does to one image on the CPU, before the batch transform.

    Image-folder models: the shorter side scaled to :func:`scaled_size`, then the centre crop of
    ``image_size`` (as ``data.build_data``'s test split), or with ``ten_crop`` the central
    square that the ten crops are cut from. Models of fixed-size tensor sets saw the whole square
    image resized on the device: the file's central square, resized later.
    """
    if info.name in ("imagefolder", "shards"):  # shards hold image folders, scaled the same
        scale = scaled_size(info.image_size)
        crop = scale if ten_crop else info.image_size
        return v2.Compose([v2.PILToTensor(), v2.Resize(scale), v2.CenterCrop(crop)])
    return v2.Compose([v2.PILToTensor(), _square])


def _why(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, UnidentifiedImageError):
        return "not an image PIL can identify (corrupt, or not an image at all)"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__


def read_image(path: str | Path, info: DataInfo, ten_crop: bool = False) -> torch.Tensor:
    """``path`` as the model's channels (L or RGB), cropped as evaluation does: uint8 C x H x W.

    Any failure to read or decode it is one :class:`ImageError` naming the file.
    """
    if info.in_channels not in (1, 3):
        raise UserError(f"image files are read as L (1 channel) or RGB (3), but this model takes "
                        f"{info.in_channels} channels")
    try:
        img = open_image(path, "L" if info.in_channels == 1 else "RGB")
    except Exception as exc:  # PIL raises many types for many kinds of damage
        raise ImageError(f"cannot read image '{path}': {_why(exc)}") from None
    return sample_transform(info, ten_crop)(img)


def predict(loaded: Loaded, paths: Sequence[str | Path], top: int = 5,
            ten_crop: bool = False) -> list[dict[str, Any]]:
    """For each image, its ``top`` classes and probabilities, or the reason it was not read;
    with ``ten_crop`` the softmax averaged over the ten crops (five for a model trained with
    data.hflip=false), as evaluation's ``--ten-crop``.

    Every rank calls this in lockstep with the same files.
    """
    info, device = loaded.info, loaded.layout.device
    if loaded.layout.plan.splits_batch and loaded.layout.distributed:
        # Its model gathers a share of the batch from every rank: the same images on every rank
        # would come back once per rank.
        raise UserError("predict runs the same images on every rank, which parallel.layout="
                        "hybrid cannot; use parallel.layout=columns")
    side = scaled_size(info.image_size) if ten_crop else info.image_size
    transform = BatchTransform(side, info.mean, info.std).to(device)
    results: list[dict[str, Any]] = [{"image": str(p)} for p in paths]
    ready: list[tuple[int, torch.Tensor]] = []
    for i, path in enumerate(paths):
        try:
            ready.append((i, read_image(path, info, ten_crop)))
        except ImageError as exc:
            results[i]["error"] = str(exc)
    k = min(top, len(info.classes))
    for first in range(0, len(ready), PREDICT_BATCH):
        chunk = ready[first:first + PREDICT_BATCH]
        # Images of different sizes are scaled one by one, then judged as one batch.
        x = torch.cat([transform(img.unsqueeze(0).to(device)) for _, img in chunk])
        with torch.no_grad():
            if ten_crop:
                probs = ten_crop_log_probs(loaded.model, x, info.image_size,
                                           mirror=loaded.config.data.hflip).exp()
            else:
                probs = F.softmax(loaded.model(x).float(), dim=1)
        values, indices = probs.topk(k, dim=1)
        for (i, _), p, idx in zip(chunk, values.tolist(), indices.tolist()):
            results[i]["top"] = [{"class": info.classes[c], "index": c, "probability": q}
                                 for c, q in zip(idx, p)]
    return results


def format_predictions(results: list[dict[str, Any]]) -> str:
    """A table: each image's name, then one line per class (rank, probability, name)."""
    lines = []
    for r in results:
        if "top" not in r:
            continue
        lines.append(r["image"])
        lines += [f"  {n:>2}  {t['probability']:7.2%}  {t['class']}"
                  for n, t in enumerate(r["top"], 1)]
    return "\n".join(lines)

