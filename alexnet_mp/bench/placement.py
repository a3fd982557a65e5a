"""Where a rank's threads run: its own share of the node's cores, or (a one-device layout)
every core the node's ranks have."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from alexnet_mp.parallel.layout import Layout


def _thread_ids() -> list[int]:
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return [0]


def set_affinity(cpus: set[int]) -> None:
    """Every thread of this process (OpenMP's, gloo's, ours) on ``cpus``; threads started later
    inherit it. ``os.sched_setaffinity(0, ...)`` alone would move only the calling thread."""
    for tid in _thread_ids():
        try:
            os.sched_setaffinity(tid, cpus)
        except OSError:  # a thread that ended meanwhile
            pass


def rank_cores(allowed: set[int], local_rank: int, local_world_size: int) -> set[int]:
    """Local rank ``local_rank``'s own share of ``allowed``: contiguous, equal, disjoint."""
    cpus = sorted(allowed)
    per = max(1, len(cpus) // max(1, local_world_size))
    start = (local_rank * per) % len(cpus)
    return set(cpus[start:start + per])


@contextlib.contextmanager
def pinned(layout: Layout, whole_node: bool) -> Iterator[None]:
    """This rank on its own cores (``whole_node``: every core this process may use, as the
    one-device layouts take), and back afterwards."""
    if not hasattr(os, "sched_getaffinity") or layout.device.type != "cpu":
        yield
        return
    before = os.sched_getaffinity(0)
    set_affinity(before if whole_node else rank_cores(before, layout.local_rank,
                                                      layout.local_world_size))
    try:
        yield
    finally:
        set_affinity(before)


def node_threads(layout: Layout) -> int:
    """Every thread the ranks on this node use, within its cores: what one device gets."""
    return max(1, min(torch.get_num_threads() * layout.local_world_size, os.cpu_count() or 1))
