"""The tensor memory of one training step, by kind, on any device.

CUDA has an allocator that counts (``max_memory_allocated``); the CPU has none, and a process's
resident memory is a poor stand-in for comparing layouts: it also holds the interpreter, the
communication library's buffers and whatever the C heap kept from earlier work, and it rises by
less than a layout allocates when the heap reuses memory another layout freed. torch's
``MemTracker`` follows every tensor storage an operator creates, until it is freed, and sorts it
into parameters, gradients, optimizer state, activations (saved for backward) and temporaries:
exact and repeatable for the tensors it follows, so that the memory target can be judged without
noise (on CUDA it rounds each storage up to the allocator's 512-byte blocks and does not see
cuDNN's or cuBLAS's workspaces or NCCL's buffers). It is a private torch tool; without it the
figure is simply absent.

The process's own peak is measured beside it (:class:`PeakRSS`, resident memory sampled in a
thread), with the previous layout's freed heap handed back to the OS first
(:func:`alexnet_mp.host_memory.release_freed_memory`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

try:
    from torch.distributed._tools.mem_tracker import MemTracker
except ImportError:  # pragma: no cover - torch releases before the tool existed
    MemTracker = None

# MemTracker's kinds, by the names the report uses.
KINDS = {"Parameter": "parameters", "Gradient": "gradients", "Optstate": "optimizer state",
         "Activation": "activations", "Temp": "temporaries", "Buffer": "buffers",
         "Other": "other (the batch)"}


def tensor_peak(step: Callable[[], Any], device: torch.device, model: nn.Module,
                optimizer: torch.optim.Optimizer,
                *tensors: torch.Tensor) -> dict[str, Any] | None:
    """Run ``step`` once and return the peak of live tensor bytes on ``device`` and its parts
    at that moment, or None where torch lacks the tracker.

    ``model``'s parameters and gradients, ``optimizer``'s state and ``tensors`` (the batch)
    existed before the step: they are counted from the start, as they occupy memory throughout.
    """
    if MemTracker is None:
        return None
    tracker = MemTracker()
    tracker.track_external(model, optimizer, *tensors)
    with tracker:
        step()
    if device.type == "cuda" and device.index is None:  # the tracker keys devices by index
        device = torch.device("cuda", torch.cuda.current_device())
    snapshot = tracker.get_tracker_snapshot("peak")[device]
    kinds = {KINDS.get(getattr(k, "value", str(k)), str(k)): int(v)
             for k, v in snapshot.items() if k != "Total"}
    return {"peak_tensor_bytes": int(snapshot.get("Total", 0)),
            "peak_tensor_bytes_by_kind": {k: v for k, v in kinds.items() if v}}


class PeakRSS:
    """Samples this process's resident memory in a thread; the CPU's stand-in for CUDA peaks."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._page = 4096

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def __enter__(self) -> PeakRSS:
        self.peak = self._rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())
