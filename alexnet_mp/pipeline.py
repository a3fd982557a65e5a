"""The data pipeline, assembled in one place: data set, this rank's loader, the batch transform.

Training, evaluation and the benchmark all take their batches from :func:`pipeline`, so a loader
built for one reads exactly as it does for the others.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.utils.data import Dataset, Subset
from torchvision.datasets import DatasetFolder
from torchvision.transforms import v2

from alexnet_mp.config import Config
from alexnet_mp.data import BatchTransform, Data, build_data
from alexnet_mp.loader import CheckedLoader, make_loader
from alexnet_mp.parallel.layout import Layout
from alexnet_mp.shardset import ShardDataset


@dataclass
class Pipeline:
    """One split's loader of this rank's share and the transform its batches go through."""

    data: Data  # both splits, the class names and the normalisation
    loader: CheckedLoader
    transform: BatchTransform


def scaled_size(image_size: int) -> int:
    """The side images are scaled to before cropping: the paper's 256 for its 227 (224) crops."""
    return round(image_size * 256 / 227)


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


def pipeline(cfg: Config, layout: Layout, split: str, *, batch_size: int,
             data: Data | None = None, channels_last: bool = False, ten_crop: bool = False,
             stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None) -> Pipeline:
    """``split`` ("train": shuffled; "test": in order, the replicas' padding labelled -1) of
    ``cfg``'s data set, this rank's share of each global batch of ``batch_size`` examples, sent
    through a batch transform on ``layout.device``.

    ``data``: the data set already built (a run's other split), else built here. ``ten_crop``
    (the test split): images come whole, scaled, and the transform keeps that size, for the
    crops to be cut from. ``stats``: the (mean, std) to normalise with when they are not the
    data set's own (a checkpoint's, whatever set it is shown now).
    """
    if data is None:
        data = build_data(cfg.data, num_classes=cfg.model.num_classes,
                          in_channels=cfg.model.in_channels, seed=cfg.train.seed,
                          device=layout.device)
    size, test = cfg.data.image_size, split == "test"
    if ten_crop and test:
        whole_scaled_images(data.test, size)
        size = scaled_size(size)
    # An unreadable image arrives as a stand-in labelled -1 (data.bad_images), so every share
    # keeps its size and the ranks need not agree on each batch.
    loader = make_loader(data.test if test else data.train,
                         batch_size=layout.local_batch(batch_size),
                         shuffle=not test, seed=cfg.train.seed, num_workers=cfg.data.num_workers,
                         pin_memory=layout.device.type == "cuda", replicas=layout.data_shards,
                         replica=layout.data_shard, bad_images=cfg.data.bad_images,
                         mark_padding=test)
    mean, std = stats if stats is not None else (data.mean, data.std)
    transform = BatchTransform(size, mean, std, channels_last).to(layout.device)
    return Pipeline(data, loader, transform)
