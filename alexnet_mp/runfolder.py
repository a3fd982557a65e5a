"""The run folder: its lock, the resolved config, the metrics log, the curves and the history.

Rank 0 alone writes files. Before training it proves there is one job at a time, a writable
folder and room for checkpoints: a problem found then costs seconds; found at the first save it
would cost an epoch.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alexnet_mp.checkpoint import remove_temporaries
from alexnet_mp.config import Config, dump_config
from alexnet_mp.errors import UserError, count
from alexnet_mp.metrics import MetricsLog, append_json, plot_curves, read_log

if TYPE_CHECKING:
    from alexnet_mp.parallel.layout import Layout

LOCK_NAME = ".lock"


class RunFolderLock:
    """An exclusive ``flock`` on ``<run>/.lock``, held for the life of the process.

    The kernel drops the lock when the holder dies, SIGKILL included, so a crashed job never
    leaves a stale lock; but workers left running by a killed torchrun still hold it, which is
    the point: a second job must not write checkpoints beside them.
    """

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK_NAME
        self.fd: int | None = None
        # What this job created, deepest first, so that a refusal can leave the disk as it was.
        self.created: list[Path] = []

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UserError(f"run folder '{self.path.parent}' is in use by another job "
                            f"({holder}); wait for it to end or stop it, or set run.dir to "
                            "another folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        self.fd = fd

    def __del__(self) -> None:
        self.release()

    def release(self, tidy: bool = False) -> None:
        """Drop the lock; with ``tidy`` (a job refused before it trained) also remove the lock
        file and the folders this job created, where they are still empty."""
        if tidy and self.fd is not None:
            # Removed while still held: a job that opened it meanwhile fails to lock it and says
            # the folder is in use, which it was.
            for path in self.created:
                with contextlib.suppress(OSError):  # a folder no longer empty stays
                    if path == self.path:
                        path.unlink()
                    else:
                        path.rmdir()
        if self.fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self.fd, fcntl.LOCK_UN)
                os.close(self.fd)
            self.fd = None


def prepare(folder: Path, checkpoints: Path,
            warn: Callable[[str], None] = lambda text: None) -> RunFolderLock:
    """Create the folders, take the lock, prove that checkpoints can be written there and
    remove what an interrupted save left (safe only now, under the lock)."""
    missing = []
    path = checkpoints
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    try:
        checkpoints.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"run folder '{folder}' is not writable ({exc.strerror}); set run.dir "
                        "to a folder you can write") from None
    lock = RunFolderLock(folder)
    new_lock = not lock.path.exists()
    try:
        lock.acquire()
        lock.created = ([lock.path] if new_lock else []) + missing
        probe = checkpoints / ".write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        lock.release()
        raise UserError(f"checkpoint folder '{checkpoints}' is not writable ({exc.strerror}); "
                        "set run.dir to a folder you can write") from None
    removed = remove_temporaries(checkpoints)
    if removed:
        size = sum(n for _, n in removed) / 2**20
        warn(f"removed {count(len(removed), 'unfinished checkpoint file')} ({removed[0][0]}"
             f"{', ...' if len(removed) > 1 else ''}; {size:.1f} MiB) that an interrupted save "
             f"left in '{checkpoints}'")
    return lock


def check_room(checkpoints: Path, checkpoint_bytes: int, keep: int) -> None:
    """The ``keep`` checkpoints pruning leaves, and the one being written beside them, must fit
    (files already there count as room, since they will be replaced)."""
    present = sum(p.stat().st_size for p in checkpoints.glob("step-*.pt"))
    free = shutil.disk_usage(checkpoints).free + present
    need = (keep + 1) * checkpoint_bytes
    if free < need:
        raise UserError(f"only {free / 2**20:.1f} MiB free in '{checkpoints}' but {keep + 1} "
                        f"checkpoints (run.keep_checkpoints + 1) need about {need / 2**20:.1f} "
                        "MiB; free space, lower run.keep_checkpoints or set run.dir to another "
                        "disk")


def previous_world_size(history: Path) -> int | None:
    """The world size the last recorded start ran at (None before any, or in a history written
    before starts recorded it)."""
    for record in reversed(read_log(history)):
        if record.get("event") in ("start", "eval_only"):
            return record.get("world_size")
    return None


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


class RunFolder:
    """A run's files, written by rank 0 alone; on the other ranks every write does nothing.

    ``config.yaml`` is the config in force; ``history.jsonl`` keeps every start's config (with
    the keys changed since the checkpoint it resumed from) and every stop on request.
    """

    def __init__(self, path: Path, is_main: bool) -> None:
        self.path, self.is_main = path, is_main
        self.checkpoints = path / "checkpoints"
        self.lock: RunFolderLock | None = None
        self.log: MetricsLog | None = None

    def open(self, tensorboard: bool, warn: Callable[[str], None]) -> None:
        """Rank 0 prepares the folder and takes its lock (:func:`prepare`); then every rank
        opens the metrics log, which only rank 0's writes."""
        if self.is_main:
            self.lock = prepare(self.path, self.checkpoints, warn)
        self.log = MetricsLog(self.path / "metrics.jsonl", enabled=self.is_main,
                              tensorboard=self.path if tensorboard else None)

    def close(self, tidy: bool = False) -> None:
        """``tidy``: a job refused before it trained leaves the disk as it found it."""
        if self.log is not None:
            self.log.close()
        if self.lock is not None:
            self.lock.release(tidy)
            self.lock = None

    def record_start(self, cfg: Config, step: int, resumed_from: Path | None,
                     changes: list[str], layout: Layout | None = None) -> int | None:
        """One line of ``history.jsonl`` for this start, with the world size, layout and mesh
        when ``layout`` is given; returns the world size of the start before it (None: none
        recorded), so that a change of membership (an elastic job that lost or gained a node)
        reads as old -> new at this step."""
        if not self.is_main:
            return None
        previous = previous_world_size(self.path / "history.jsonl")
        shape = {} if layout is None else {
            "world_size": layout.world_size, "layout": layout.name,
            "mesh": {"replica": layout.replicas, "column": layout.columns}}
        append_json(self.path / "history.jsonl", {
            "event": "eval_only" if cfg.train.eval_only else "start", "time": _now(),
            "step": step, "resumed_from": str(resumed_from) if resumed_from else None,
            **shape, "changed": changes, "config": cfg.to_dict()})
        if not cfg.train.eval_only:
            try:
                dump_config(cfg, self.path / "config.yaml")
            except OSError as exc:
                raise UserError(f"could not write '{self.path / 'config.yaml'}' "
                                f"({exc.strerror}); free space or set run.dir") from None
        return previous

    def record_stop(self, signal: str, step: int) -> None:
        if self.is_main:
            append_json(self.path / "history.jsonl", {
                "event": "stopped", "signal": signal, "step": step, "time": _now()})

    def plot(self) -> None:
        if self.is_main:
            plot_curves(self.log.path, self.path / "curves.png")

    def write(self, record: dict[str, Any]) -> None:
        """One line of ``metrics.jsonl``."""
        self.log.write(record)
