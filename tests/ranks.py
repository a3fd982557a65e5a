"""Runs a function on N real processes joined by a gloo process group (one thread each)."""

from __future__ import annotations

import os
import socket
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
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
    mp.start_processes(_entry, args=(world, free_port(), fn, args, out), nprocs=world,
                       join=True, start_method="spawn")
    results = []
    for rank in range(world):
        payload = torch.load(f"{out}.{rank}", weights_only=False)
        assert payload["ok"], payload.get("error")
        results.append(payload["result"])
    return results
