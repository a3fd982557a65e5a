"""Image folders (``data.name=imagefolder``): train/ and val/ checked, unreadable files marked.

An image file that cannot be decoded becomes a stand-in: a black image, transformed as any
other, whose target is an :class:`UnreadableImage` naming the file. The loader labels it -1,
which no loss or figure counts, and records the file (:class:`alexnet_mp.loader.CheckedLoader`);
every share of a batch keeps its size, so ranks reading different shares need not agree on each
batch. The training loop reads the ranks' counts with its figures and decides
(``data.bad_images``) whether to stop, naming the file, or to go on and name it at the epoch's
end.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import PIL
import PIL.Image
import torch
import torchvision
from torch.utils.data import Dataset
from torchvision.datasets.folder import find_classes

from alexnet_mp.config import DataConfig
from alexnet_mp.errors import UserError
from alexnet_mp.images import open_rgb


class UnreadableImage:
    """The target of a stand-in for a file that could not be decoded (see
    :func:`alexnet_mp.loader.collate`)."""

    __slots__ = ("path", "reason")

    def __init__(self, path: str, reason: str) -> None:
        self.path, self.reason = path, reason


def _reason(exc: BaseException) -> str:
    if isinstance(exc, PIL.UnidentifiedImageError):
        # PIL's own text repeats the path inside a file object's repr.
        return "not an image PIL can identify (corrupt, or not an image at all)"
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__


class CheckedImageFolder(torchvision.datasets.ImageFolder):
    """ImageFolder whose unreadable files come back as stand-ins: a black image, and an
    :class:`UnreadableImage` as the target.

    Raising instead would surface as a traceback from inside a loader worker, which a
    DataLoader re-raises without the file's path (PIL's truncation errors do not name it).
    Only the read is guarded: the stand-in is transformed as any image is, so it has the
    batch's shape.
    """

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        path, target = self.samples[index]
        try:
            sample = self.loader(path)
        except Exception as exc:  # any decoder failure; the main process reports or skips it
            sample, target = stand_in(), UnreadableImage(path, _reason(exc))
        if self.transform is not None:
            sample = self.transform(sample)
        if self.target_transform is not None and not isinstance(target, UnreadableImage):
            target = self.target_transform(target)
        return sample, target


def stand_in() -> PIL.Image.Image:
    """The image that takes an unreadable file's place: black, at the paper's 256 scale (every
    transform here resizes or crops it to the batch's shape)."""
    return PIL.Image.new("RGB", (256, 256))


def _few(names: list[str], shown: int = 3) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _check_classes(root: Path) -> None:
    """train/ and val/ must hold the same class folders.

    ImageFolder numbers classes by the sorted folder names of each split on its own, so a class
    missing from val/ shifts every later label (silently wrong accuracy), and an extra one
    gives labels the model has no output for (an IndexError after a whole epoch).
    """
    train, _ = find_classes(str(root / "train"))
    val, _ = find_classes(str(root / "val"))
    if train == val:
        return
    missing = sorted(set(train) - set(val))
    extra = sorted(set(val) - set(train))
    diff = "; ".join(([f"missing from val/: {_few(missing)}"] if missing else [])
                     + ([f"extra in val/: {_few(extra)}"] if extra else []))
    raise UserError(f"data.name=imagefolder: {root / 'val'} and {root / 'train'} must hold the "
                    f"same class folders, since labels are numbered by folder name ({diff}); "
                    "give val/ a folder of images for each missing class and remove (or move to "
                    "train/) each extra one")


def imagefolder_sets(cfg: DataConfig, test_tf: torch.nn.Module) -> tuple[Dataset, Dataset]:
    root = Path(cfg.root)
    for part in ("train", "val"):
        if not (root / part).is_dir():
            raise UserError(f"data.name=imagefolder needs {root / part}/<class>/<image> folders; "
                            f"set data.root to the folder that holds train/ and val/")
    try:
        # Before the (for ImageNet, long) scan of every file.
        _check_classes(root)
        return (CheckedImageFolder(str(root / "train"), loader=open_rgb),
                CheckedImageFolder(str(root / "val"), transform=test_tf, loader=open_rgb))
    except FileNotFoundError as exc:
        raise UserError(f"data.name=imagefolder: {exc}") from None
