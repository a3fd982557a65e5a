"""Samplers and loaders: the order of an epoch, exact mid-epoch resume, unreadable images.

Both columns build the same loader with the same seed, so they see the same batches: the split
is of the model, not of the data.

A sample whose file could not be decoded arrives as a stand-in labelled -1, and the main
process records the file (:class:`CheckedLoader`).
"""

from __future__ import annotations

import functools
import itertools
import multiprocessing
import os
import select
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, default_collate

from alexnet_mp.data import SeededTransform
from alexnet_mp.imagefolder import UnreadableImage


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


class BadBatch(NamedTuple):
    """A batch that had stand-ins for unreadable images (labelled -1 in ``y``) and a
    (path, reason) pair for each.

    A named tuple, so that pin_memory pins ``x`` and ``y`` and keeps the type.
    """

    x: torch.Tensor
    y: torch.Tensor
    bad: tuple[tuple[str, str], ...]


def _is_bad(sample: Any) -> bool:
    if not isinstance(sample, (tuple, list)) or len(sample) < 2:
        return False
    return isinstance(sample[1], UnreadableImage)


def collate(batch: list) -> Any:
    """default_collate, or a :class:`BadBatch` when some samples are stand-ins.

    default_collate cannot stack an UnreadableImage target, so the samples are only looked at
    when it fails: a batch of readable samples costs exactly what default_collate costs.
    """
    try:
        return default_collate(batch)
    except Exception:
        bad = tuple((s[1].path, s[1].reason) for s in batch if _is_bad(s))
        if not bad:
            raise
    x, y = default_collate([(s[0], -1) if _is_bad(s) else s for s in batch])
    return BadBatch(x, y, bad)


def _exit_on_parent_sigterm(parents: frozenset[int]) -> None:
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid in parents:
            os._exit(0)


def _exit_when_gone(main_pid: int) -> None:
    """End this worker when the process it loads for has ended, however it ended.

    torch's workers watch their parent, which for a worker started by the forkserver is the
    forkserver, and the forkserver lives until its last child has ended: a worker of a process
    killed outright (SIGKILL, the OOM killer) would wait for it forever, holding the job's
    output pipes open.
    """
    try:
        with os.fdopen(os.pidfd_open(main_pid), "rb") as handle:
            select.select([handle], [], [])  # readable once the process has exited
    except ProcessLookupError:
        pass  # gone already
    except (AttributeError, OSError):  # no pidfd here: ask every second
        while True:
            time.sleep(1.0)
            try:
                os.kill(main_pid, 0)
            except ProcessLookupError:
                break
            except OSError:
                continue
    os._exit(1)


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
    if os.getppid() != main_pid:
        threading.Thread(target=_exit_when_gone, args=(main_pid,), daemon=True,
                         name="exit-with-main").start()
    unblock = set(_STOP_SIGNALS)
    if _CAN_MASK and hasattr(signal, "sigwaitinfo"):
        parents = frozenset({main_pid, os.getppid()})
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        threading.Thread(target=_exit_on_parent_sigterm, args=(parents,), daemon=True,
                         name="sigterm-from-parent").start()
        unblock.discard(signal.SIGTERM)
    if _CAN_MASK:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, unblock)


# Workers are forked from a forkserver: a process started once, fresh from exec and without
# threads, that has imported torch and this package. Forking the rank itself at every epoch is
# what the DataLoader does by default, and a rank has threads (the process group's, tqdm's
# monitor, the index queues' feeders of the epoch that just ended); Python before 3.12 can leave
# a forked child hung in its first instant on a lock one of them held (the interpreter's
# thread-list lock among them), and the ranks with it. The dataset is pickled to each worker
# once an epoch instead of being inherited.
_PRELOAD = ["__main__", "torch", "torchvision", "alexnet_mp.loader", "alexnet_mp.data",
            "alexnet_mp.imagefolder", "alexnet_mp.shardset"]


def worker_context() -> multiprocessing.context.BaseContext | None:
    """The start method of the loader workers: "forkserver" where the platform has it (None, the
    DataLoader's default, elsewhere).

    The forkserver is started by the first loader that starts workers, inside
    :meth:`CheckedLoader.__iter__`, with the stop signals blocked: it inherits that mask
    across exec, keeps it (a group signal stays pending in it; it exits when this process does),
    and hands it to every worker it forks, as a worker forked from here would have had it.
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return None
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_PRELOAD)
    return context


def _start_forkserver() -> None:
    """Start the forkserver, if it is not running, with the stop signals blocked.

    Called with them blocked already. multiprocessing starts its resource tracker first, the
    first time, and unblocks SIGINT and SIGTERM in the calling thread when it has (it blocks
    them only for the tracker): they are blocked again before the forkserver itself starts.
    """
    from multiprocessing import forkserver, resource_tracker

    resource_tracker.ensure_running()
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    forkserver.ensure_running()


class CheckedLoader(DataLoader):
    """A DataLoader that records unreadable images in the main process.

    Each arrives as a stand-in labelled -1 (the batch keeps its size, so the sampler's order,
    every batch's membership and every share's size are unchanged), and ``(path, reason)`` is
    appended to :attr:`bad_files`, which the training loop counts over the ranks with its
    figures and the caller reads and clears: ``bad_images="stop"`` stops every rank naming the
    file, ``"skip"`` names the files once an epoch.
    """

    def __init__(self, *args: Any, bad_images: str = "stop", **kwargs: Any) -> None:
        if bad_images not in ("stop", "skip"):
            raise ValueError(f"bad_images must be 'stop' or 'skip', got {bad_images!r}")
        super().__init__(*args, **kwargs)
        self.bad_images = bad_images
        self.bad_files: list[tuple[str, str]] = []

    def __iter__(self) -> _CheckedIter:
        if self.num_workers == 0:
            return _CheckedIter(self, super().__iter__())
        if not _CAN_MASK:
            inner = super().__iter__()
        else:
            # Workers are started here (every epoch) and inherit this thread's signal mask: a
            # stop signal sent to the group while one is still starting would otherwise find
            # torch's SIGTERM handler, or no handler at all, in place. This process gets its own
            # copy of the signal when the mask is restored, a moment later.
            old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
            try:
                if self.multiprocessing_context is not None and (
                        self.multiprocessing_context.get_start_method() == "forkserver"):
                    _start_forkserver()
                inner = super().__iter__()
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)
        return _CheckedIter(self, inner)

    def _accept(self, batch: BadBatch) -> list[torch.Tensor]:
        self.bad_files.extend((str(path), str(reason)) for path, reason in batch.bad)
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
        try:
            batch = next(self._inner)
        except StopIteration:
            raise
        except BaseException:
            # A worker's error ends the epoch, and usually the process a moment later: the other
            # workers are ended now, while the queues they are still unpickling (started by the
            # forkserver, they read their start-up state from a pipe) exist, rather than failing
            # with a traceback of their own when this process has gone.
            shutdown = getattr(self._inner, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            raise
        if type(batch) is BadBatch:
            batch = self._loader._accept(batch)
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
                         multiprocessing_context=worker_context() if num_workers else None,
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
