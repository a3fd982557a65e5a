"""A training set's own RGB principal components, for PCA lighting (launch/pca_lighting.py).

Every pixel of each image counts, as stored (no crop, resize or augmentation); the result goes
to the file ``data.lighting_file`` names (:func:`alexnet_mp.lighting.write_lighting`), from which
training's lighting takes its components.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torchvision
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import v2

from alexnet_mp.config import DataConfig
from alexnet_mp.data import mnist_sample, torchvision_sets
from alexnet_mp.errors import UserError
from alexnet_mp.imagefolder import UnreadableImage, imagefolder_sets
from alexnet_mp.lighting import RGBPCA


def _plain_train(cfg: DataConfig, in_channels: int) -> Dataset:
    """The training set as stored: no crop, resize or augmentation (``data.train_limit`` kept)."""
    plain = v2.PILToTensor()
    if cfg.name == "mnist_sample":
        train: Dataset = mnist_sample(Path(cfg.root))[0]
    elif cfg.name == "fake":
        train = torchvision.datasets.FakeData(
            cfg.fake_size, (in_channels, cfg.image_size, cfg.image_size), 2)
    elif cfg.name == "imagefolder":
        train = imagefolder_sets(cfg, plain)[0]
    else:
        train = torchvision_sets(cfg, plain)[0]
    if cfg.train_limit is not None:
        train = Subset(train, range(min(cfg.train_limit, len(train))))
    return train


class _PixelMoments(Dataset):
    """Per image: (pixels, sum of RGB vectors, sum of their outer products, unreadable path),
    float64, computed in the loader's workers so that only 13 numbers an image travel."""

    def __init__(self, base: Dataset, indices: list[int]) -> None:
        self.base, self.indices = base, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, torch.Tensor, str | None]:
        img, target = self.base[self.indices[i]]
        if isinstance(target, UnreadableImage):  # a stand-in: no pixels of the data set
            return 0, torch.zeros(3, dtype=torch.float64), torch.zeros(
                3, 3, dtype=torch.float64), target.path
        x = v2.functional.to_image(img)
        if x.shape[0] != 3:
            raise UserError(f"PCA lighting needs RGB images, but a training image has "
                            f"{x.shape[0]} channel(s); use an RGB data set (imagefolder, cifar10)")
        scale = 255.0 if x.dtype == torch.uint8 else 1.0  # float images are in [0, 1] already
        x = x.reshape(3, -1).to(torch.float64) / scale
        return x.shape[1], x.sum(dim=1), x @ x.T, None


def _first(batch: list) -> Any:
    return batch[0]


def rgb_pca(cfg: DataConfig, *, in_channels: int = 3, images: int = 10_000, seed: int = 0,
            num_workers: int = 0) -> RGBPCA:
    """Eigenvalues and eigenvectors of the RGB covariance of the training images (pixels in
    [0, 1], every pixel of each image as stored), over a seeded sample of ``images`` images when
    the set holds more. Unreadable files are counted and left out."""
    if images < 1:
        raise UserError(f"--images must be at least 1, got {images}")
    if in_channels != 3:
        raise UserError(f"PCA lighting needs RGB images, but model.in_channels={in_channels}; "
                        "use an RGB data set with model.in_channels=3")
    train = _plain_train(cfg, in_channels)
    if len(train) == 0:
        raise UserError(f"data set '{cfg.name}' has no training images under {cfg.root}")
    order = list(range(len(train)))
    if len(train) > images:
        g = torch.Generator().manual_seed(seed)
        order = sorted(torch.randperm(len(train), generator=g)[:images].tolist())
    loader = DataLoader(_PixelMoments(train, order), batch_size=1, num_workers=num_workers,
                        collate_fn=_first)
    count, total = 0, torch.zeros(3, dtype=torch.float64)
    outer = torch.zeros(3, 3, dtype=torch.float64)
    unreadable: list[str] = []
    for n, s, o, bad in loader:
        if bad is not None:
            unreadable.append(bad)
            continue
        count, total, outer = count + n, total + s, outer + o
    if count == 0:
        raise UserError(f"none of the {len(order)} training images read could be decoded "
                        f"(the first: {unreadable[0] if unreadable else '?'})")
    mean = total / count
    cov = outer / count - torch.outer(mean, mean)
    eigval, eigvec = torch.linalg.eigh(cov)  # ascending
    eigval, eigvec = eigval.flip(0).clamp(min=0), eigvec.flip(1)
    # A component's sign is arbitrary (lighting draws +/- alike); fixing it makes the file
    # reproducible: each column's largest entry is positive.
    signs = torch.sign(eigvec.gather(0, eigvec.abs().argmax(dim=0, keepdim=True)))
    eigvec = eigvec * signs
    return RGBPCA(eigval.tolist(), eigvec.tolist(), mean.tolist(), len(order) - len(unreadable),
                  count, len(unreadable))
