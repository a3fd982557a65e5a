"""The differentiable exchanges X1–X5 between columns (README), on torch's collectives.

X1–X4 feed a layer that reads every column. Each rank's slice of the gathered input is used by
*different* computations on every rank, so its gradient is the sum over ranks: a reduce-scatter.
torch's differentiable functional all-gather (``_functional_collectives``) has exactly that
backward, and in eager mode it returns a tensor whose wait is deferred, which is what the overlap
path needs: the column applies its own half of the weights while the other halves are in flight.
The same gather moves the hybrid layout's trunk features along the batch dimension.

X5 gathers the logits, which feed the *same* loss on every rank; summing there would multiply
every gradient by the number of columns, so its backward keeps the rank's own slice and nothing
else. torch has no collective with that backward: the functional all-gather always
reduce-scatters, and ``torch.distributed.nn.functional`` (deprecated) likewise sums. DTensor
expresses it (a ``Shard -> Replicate`` redistribute whose gradient comes back ``Replicate`` and is
cut locally), but DTensor cannot shard a convolution by output channels into grouped halves, and
the columns' fc8 halves are uneven for an odd class count, so X5 stays a small autograd function.

Every collective our code starts or waits on runs inside :func:`alexnet_mp.errors.peer_errors`,
so a dead or stalled peer surfaces as :class:`~alexnet_mp.errors.PeerLostError`. The backward
collectives run inside autograd (torch's reduce-scatter): the caller wraps ``backward()``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn

from alexnet_mp.errors import peer_errors

# torch 2.14 made the plain name differentiable and deprecated the *_tensor_autograd spelling;
# older releases have only the latter.
_all_gather = getattr(funcol, "all_gather_single_autograd", None) or \
    funcol.all_gather_tensor_autograd
_all_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class Meter:
    """Seconds spent waiting on exchanges and bytes received, for the benchmark.

    On CUDA it synchronises around each exchange, which serialises what overlap would hide:
    use it to measure, not in training.
    """

    def __init__(self, device: torch.device | None = None) -> None:
        self.sync = device is not None and device.type == "cuda"
        self.seconds = 0.0
        self.bytes = 0

    def start(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def stop(self, started: float, received: int = 0, call: tuple[str, int] | None = None) -> None:
        """``call``: which collective, and how many elements this rank put in (a subclass may
        keep them, to replay the step's collectives alone)."""
        if self.sync:
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - started
        self.bytes += received

    @contextlib.contextmanager
    def timed(self, received: int = 0, call: tuple[str, int] | None = None) -> Iterator[None]:
        started = self.start()
        try:
            yield
        finally:
            self.stop(started, received, call)


def _timed(meter: Meter | None, received: int = 0, call: tuple[str, int] | None = None):
    return meter.timed(received, call) if meter is not None else contextlib.nullcontext()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def process_group(group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    # The functional collectives want a group object; None means the default group, as in dist.*
    return group if group is not None else dist.group.WORLD


def _meter_backward(gathered: torch.Tensor, meter: Meter, received: int, numel: int) -> None:
    """Time and count the reduce-scatter that torch runs in the gather's backward.

    Hooks on the gather's own autograd node bracket exactly that collective; a hook on a tensor
    would also time whatever backward work autograd happens to schedule in between.
    """
    node, seen = gathered.grad_fn, 0
    while node is not None and "all_gather" not in type(node).__name__ and seen < 4:
        node = node.next_functions[0][0] if node.next_functions else None
        seen += 1
    if node is None or "all_gather" not in type(node).__name__:
        gathered.register_hook(lambda g: meter.stop(meter.start(), received,
                                                    ("reduce_scatter", numel)))
        return
    started: list[float] = []
    node.register_prehook(lambda grads: started.append(meter.start()))
    node.register_hook(lambda grads_in, grads_out: meter.stop(started.pop(), received,
                                                              ("reduce_scatter", numel)))


def start_gather(x: torch.Tensor, group: dist.ProcessGroup | None = None,
                 meter: Meter | None = None) -> torch.Tensor:
    """Start an all-gather of ``x`` along dim 0 (rank order); finish it with :func:`finish`.

    Differentiable: each rank's rows get the sum over ranks of their gradients (reduce-scatter).
    """
    group = process_group(group)
    received = (group.size() - 1) * _nbytes(x)
    with peer_errors("an exchange (all-gather)"), _timed(meter, received,
                                                         ("all_gather", x.numel())):
        out = _all_gather(x.contiguous(), 0, group)
    if meter is not None and out.requires_grad:
        _meter_backward(out, meter, received, x.numel())
    return out


def finish(pending: torch.Tensor, meter: Meter | None = None) -> torch.Tensor:
    """Wait for a gather from :func:`start_gather` (a no-op if it has finished)."""
    with peer_errors("an exchange (all-gather)"), _timed(meter, 0, ("wait", 0)):
        return funcol.wait_tensor(pending)


def gather_batch(x: torch.Tensor, group: dist.ProcessGroup | None = None,
                 meter: Meter | None = None) -> torch.Tensor:
    """All-gather along dim 0 (rank order); each rank's rows get the sum of all ranks' grads.

    Every rank must hold the same number of rows.
    """
    return finish(start_gather(x, group, meter), meter)


def gather_labels(y: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Every rank's labels, in rank order (no gradient): the targets of a gathered batch."""
    group = process_group(group)
    out = y.new_empty((group.size() * y.shape[0], *y.shape[1:]))
    with peer_errors("gathering the labels"):
        _all_gather_into(out, y.contiguous(), group=group)
    return out


def _padded_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t.contiguous()
    pad = t.new_zeros((rows - t.shape[0], *t.shape[1:]))
    return torch.cat([t, pad])


def gather_rows(t: torch.Tensor, sizes: list[int], group: dist.ProcessGroup | None = None,
                meter: Meter | None = None) -> torch.Tensor:
    """All-gather ``t`` along dim 0 where rank i holds ``sizes[i]`` rows (sizes may differ).

    Not differentiable; the checkpoint's gathers and X5's forward use it.
    """
    rows = max(sizes)
    padded = _padded_rows(t, rows)
    parts = [t.new_empty((rows, *t.shape[1:])) for _ in sizes]
    with peer_errors("gathering rows"), _timed(meter, (len(sizes) - 1) * _nbytes(padded),
                                               ("all_gather_rows", padded.numel())):
        dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


class _GatherOwnGrad(torch.autograd.Function):
    """X5: all-gather along dim 1 forward; backward keeps this rank's slice, with no sum."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int], rank: int,
                group: dist.ProcessGroup | None, meter: Meter | None) -> torch.Tensor:
        ctx.start = sum(sizes[:rank])
        ctx.stop = ctx.start + sizes[rank]
        # Gathering rows of the transpose lets the columns hold different numbers of classes.
        return gather_rows(x.t(), sizes, group, meter).t().contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad[:, ctx.start:ctx.stop].contiguous(), None, None, None, None


def _apply(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor,
           bias: torch.Tensor | None) -> torch.Tensor:
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation)
    return F.linear(x, weight, bias)


class ColumnExchange:
    """Rank ``column`` of ``columns`` holds one column; gathers run over ``group``.

    ``into`` needs every column to hold the same number of input channels (or features).
    """

    def __init__(self, column: int, columns: int, group: dist.ProcessGroup | None = None,
                 overlap: bool = True, meter: Meter | None = None) -> None:
        self.column = column
        self.columns = columns
        self.group = group
        self.overlap = overlap
        self.meter = meter

    def into(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """X1–X4: apply ``layer`` (which reads every column's channels) to the gathered ``x``."""
        n, width = x.shape[0], x.shape[1]
        if not self.overlap:
            gathered = gather_batch(x, self.group, self.meter)
            return layer(torch.cat(gathered.split(n), dim=1))
        pending = start_gather(x, self.group, self.meter)
        # The layer is linear in its input channels: apply our own half of the weights while
        # the other halves are in flight, then add their contributions when they arrive.
        # One split, not a slice per part: a slice's backward allocates a zero-filled gradient
        # of the whole weight for each part and adds them (two fc7-sized temporaries); the
        # split's backward writes every part into one.
        parts = layer.weight.split(width, dim=1)
        y = _apply(layer, x, parts[self.column], layer.bias)
        gathered = finish(pending, self.meter)
        for c in range(self.columns):
            if c != self.column:
                y = y + _apply(layer, gathered[c * n:(c + 1) * n], parts[c], None)
        return y

    def logits(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """X5: every rank gets the full logits; gradients flow back to the owner's slice only."""
        return _GatherOwnGrad.apply(x, sizes, self.column, self.group, self.meter)

    def gather_batch(self, x: torch.Tensor) -> torch.Tensor:
        """The hybrid layout's trunk features: every rank's share of the batch, in rank order."""
        return gather_batch(x, self.group, self.meter)
