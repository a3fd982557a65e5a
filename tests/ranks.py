"""Runs a function on N real processes joined by a gloo process group (one thread each)."""

from __future__ import annotations

import os
import random
import socket
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

_GIVEN: set[int] = set()


def free_port() -> int:
    """A free TCP port for a process this test starts, which binds it itself.

    The port is free when this returns, and another process could take it before the child
    binds it. Not the kernel's bind(0): that draws from the ephemeral range, which every
    outgoing connection and every other test's bind(0) also draws from. Here the port comes
    from below that range (32768 up on Linux), from a band of its own per pytest-xdist worker,
    and never twice in a process. Where this process can hold the port for the children (the
    rendezvous of :func:`run_ranks`), it does, and no port is ever free in between.
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:]
    low = 20000 + 1000 * (int(worker) % 10 if worker.isdigit() else 0)
    for _ in range(500):
        port = random.randrange(low, low + 1000)
        if port in _GIVEN:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _GIVEN.add(port)
        return port
    raise RuntimeError(f"no free port between {low} and {low + 999}")


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple, out: str) -> None:
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, is_master=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        torch.save({"ok": True, "result": result}, f"{out}.{rank}")
    except BaseException:
        torch.save({"ok": False, "error": traceback.format_exc()}, f"{out}.{rank}")
        raise
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable, world: int, tmp: Path, *args) -> list:
    """``fn(rank, world, *args)`` on every rank; returns each rank's result, raises on failure."""
    out = str(tmp / "rank-result")
    # This process hosts the ranks' rendezvous on a port the kernel picks and holds it until
    # they are done, so no other process can take the port between its choice and its use.
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    mp.start_processes(_entry, args=(world, store.port, fn, args, out), nprocs=world,
                       join=True, start_method="spawn")
    results = []
    for rank in range(world):
        payload = torch.load(f"{out}.{rank}", weights_only=False)
        assert payload["ok"], payload.get("error")
        results.append(payload["result"])
    return results
