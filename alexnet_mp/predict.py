"""Image files classified by a rebuilt checkpoint, each read and cropped as evaluation does."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import v2

from alexnet_mp.data import BatchTransform
from alexnet_mp.engine import ten_crop_log_probs
from alexnet_mp.errors import UserError
from alexnet_mp.images import open_image
from alexnet_mp.pipeline import scaled_size
from alexnet_mp.rebuild import DataInfo, Loaded

PREDICT_BATCH = 32


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

