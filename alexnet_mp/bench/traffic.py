"""What a model's exchanges cost, measured from outside the training code: each collective's
duration in order (with the phase it ran in) and the bytes it brought in, and the bytes the
gradient all-reduce moves per step.

:class:`MeteredExchange` takes the place of a model's :class:`ColumnExchange` (the same
column, group and overlap) and times the three methods every exchange goes through. On CUDA it
synchronises around each collective, which serialises what overlap would hide: it is for
measuring, not training. :func:`~alexnet_mp.bench.merge.exchange_waits` tells a rank's waiting
for its peer from the exchange's own cost out of the recorded durations.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator

import torch
from torch import nn

from alexnet_mp.parallel.exchange import ColumnExchange, process_group
from alexnet_mp.parallel.layout import Layout


class TrafficMeter:
    """Seconds inside the exchanges, the bytes they received, and every exchange as
    (phase, seconds, collective, elements put in), in order."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.sync = device is not None and device.type == "cuda"
        self.reset()

    def reset(self) -> None:
        self.seconds, self.bytes = 0.0, 0
        self.calls: list[tuple[str, float, str, int]] = []

    def start(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def stop(self, started: float, received: int, kind: str, numel: int) -> None:
        if self.sync:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        self.seconds += seconds
        self.bytes += received
        # Only the gathers' backward reduce-scatters, which autograd runs, are backward
        # exchanges; so the phase holds in the training loop too, which does not tell the meter.
        phase = "backward" if kind == "reduce_scatter" else "forward"
        self.calls.append((phase, seconds, kind, numel))

    @contextlib.contextmanager
    def timed(self, received: int, kind: str, numel: int) -> Iterator[None]:
        started = self.start()
        try:
            yield
        finally:
            self.stop(started, received, kind, numel)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _gather_node(gathered: torch.Tensor):
    """The autograd node of the all-gather behind ``gathered`` (its backward is the
    reduce-scatter), found a few nodes down when torch wrapped the result; None if not found.
    torch gives the node no public handle, so it is told by its class name."""
    node, seen = gathered.grad_fn, 0
    while node is not None and "all_gather" not in type(node).__name__ and seen < 4:
        node = node.next_functions[0][0] if node.next_functions else None
        seen += 1
    return node if node is not None and "all_gather" in type(node).__name__ else None


class MeteredExchange(ColumnExchange):
    """``exchange``'s column, group and overlap, with every collective timed into ``meter``."""

    def __init__(self, exchange: ColumnExchange, meter: TrafficMeter) -> None:
        super().__init__(exchange.column, exchange.columns, exchange.group, exchange.overlap)
        self.meter = meter

    def start(self, x: torch.Tensor) -> torch.Tensor:
        received = (process_group(self.group).size() - 1) * _nbytes(x)
        with self.meter.timed(received, "all_gather", x.numel()):
            out = super().start(x)
        if out.requires_grad:
            self._time_backward(out, received, x.numel())
        return out

    def wait(self, pending: torch.Tensor) -> torch.Tensor:
        with self.meter.timed(0, "wait", 0):
            return super().wait(pending)

    def gather_rows(self, t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        padded = max(sizes) * math.prod(t.shape[1:])
        with self.meter.timed((len(sizes) - 1) * padded * t.element_size(), "all_gather_rows",
                              padded):
            return super().gather_rows(t, sizes)

    def _time_backward(self, gathered: torch.Tensor, received: int, numel: int) -> None:
        """Time and count the reduce-scatter that torch runs in the gather's backward.

        Hooks on the gather's own autograd node bracket exactly that collective; a hook on a
        tensor would also time whatever backward work autograd happens to schedule in between.
        """
        meter, node = self.meter, _gather_node(gathered)
        if node is None:
            gathered.register_hook(lambda g: meter.stop(meter.start(), received,
                                                        "reduce_scatter", numel))
            return
        started: list[float] = []
        node.register_prehook(lambda grads: started.append(meter.start()))
        node.register_hook(lambda grads_in, grads_out: meter.stop(started.pop(), received,
                                                                  "reduce_scatter", numel))


def meter_exchanges(model: nn.Module, meter: TrafficMeter) -> nn.Module:
    """``model`` (the same object) with its exchange, if it has one, timed into ``meter``."""
    exchange = getattr(model, "exchange", None)
    if isinstance(exchange, ColumnExchange):
        model.exchange = MeteredExchange(exchange, meter)
    return model


def allreduce_bytes(model: nn.Module, layout: Layout) -> int:
    """Bytes each rank receives per step in the gradient all-reduce, from the gradients it
    syncs: a ring all-reduce brings in 2 (R-1)/R of them."""
    names, ranks = layout.plan.synced_parameters(model, layout)
    if ranks < 2:
        return 0
    size = sum(_nbytes(p) for name, p in model.named_parameters() if name in names)
    return 2 * (ranks - 1) * size // ranks
