"""What a step's exchanges cost with nothing else running: the floor under the exchange share.

Inside a step an exchange's time is its own cost, plus waiting for a slower peer, plus whatever
the step's computation on the same cores takes from the communication library's threads. This
replays the collectives one timed step made, in its order, with the same sizes, through the same
functions, back to back and with no computation between them: what the exchanges cost with no
waiting and no competition for the cores. Where that alone takes most of a target share, the
target is out of the layout's reach on that machine and library (short of hiding the
collectives behind computation, which the overlap path does where the library has a stream of
its own).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from alexnet_mp.engine import sync_device
from alexnet_mp.parallel.exchange import gather_batch, gather_rows, process_group


def _op(kind: str, numel: int, group: dist.ProcessGroup | None,
        device: torch.device) -> Callable[[], object] | None:
    size = process_group(group).size()
    if kind == "all_gather":  # X1-X4 forward: started, then waited for (the "wait" record)
        x = torch.zeros(numel, device=device)
        return lambda: gather_batch(x, group)
    if kind == "all_gather_rows":  # X5
        x = torch.zeros(numel, device=device)
        return lambda: gather_rows(x, [numel] * size, group)
    if kind == "reduce_scatter":  # X1-X4 backward, as torch's gather backward runs it
        g = torch.zeros(size * numel, device=device)
        return lambda: funcol.wait_tensor(funcol.reduce_scatter_tensor(
            g, "sum", 0, process_group(group)))
    return None  # "wait": part of its all_gather above


def replay(calls: Sequence[Sequence], group: dist.ProcessGroup | None, device: torch.device,
           repeats: int) -> list[float]:
    """Seconds per replay of ``calls`` (one step's, as the bench's meter records them:
    phase, seconds, collective, elements), ``repeats`` times; every rank of ``group`` calls this
    with the same calls. The buffers are float32, the dtype of the bench's steps (they run
    without autocast); a step that exchanged half-precision tensors would need the dtype
    recorded too."""
    ops = [op for c in calls if (op := _op(c[2], c[3], group, device)) is not None]
    for op in ops:  # once untimed: first calls set up the library's buffers
        op()
    times = []
    for _ in range(repeats):
        dist.barrier(group=group)
        sync_device(device)
        started = time.perf_counter()
        for op in ops:
            op()
        sync_device(device)
        times.append(time.perf_counter() - started)
    return times
