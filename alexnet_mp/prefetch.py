"""Batches on the training device, the next one copied while the current step runs.

On CUDA the loader's pinned batch is copied on a side stream, one batch ahead, so the copy
overlaps the step in flight; the step's stream waits for the copy on the device (an event), and
the tensors are marked as used on it so the caching allocator does not hand their memory back
to the side stream too early. Elsewhere the batches pass through unchanged: a CPU step has no
device to overlap, and a copy to MPS is ordered on its one queue anyway.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to(b, device) for b in batch)
    if hasattr(batch, "to"):  # a tensor, or a batch of its own kind (prepared shards' bytes)
        return batch.to(device, non_blocking=True)
    return batch


def _record(batch: Any, stream: torch.cuda.Stream) -> None:
    if isinstance(batch, (list, tuple)):
        for b in batch:
            _record(b, stream)
    elif hasattr(batch, "record_stream"):
        batch.record_stream(stream)


def on_device(loader: Iterable, device: torch.device) -> Iterator[Any]:
    """``loader``'s batches on ``device``; on CUDA each is copied one batch ahead."""
    if device.type != "cuda":
        for batch in loader:
            yield _to(batch, device)
        return
    side = torch.cuda.Stream(device)
    main = torch.cuda.current_stream(device)
    pending = None
    for batch in loader:
        with torch.cuda.stream(side):
            ready = (_to(batch, device), side.record_event())
        if pending is not None:
            yield _take(*pending, main)
        pending = ready
    if pending is not None:
        yield _take(*pending, main)


def _take(batch: Any, copied: torch.cuda.Event, main: torch.cuda.Stream) -> Any:
    # This batch's own copy, not the side stream's later one: that overlaps this step.
    main.wait_event(copied)
    _record(batch, main)
    return batch
