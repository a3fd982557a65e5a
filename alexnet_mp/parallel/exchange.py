"""The differentiable exchanges X1–X5 between the two columns (DESIGN §3).

X1–X4 feed a layer that reads both columns. Each rank's slice of the gathered input is used by
*different* computations on every rank, so its gradient is the sum over ranks (reduce-scatter),
which is what ``torch.distributed.nn.functional.all_gather`` does; that function is deprecated
in torch 2.14 and cannot leave the gather in flight, so :class:`_StartGather` does the same with
an async all-gather into one tensor and a reduce-scatter backward. X5 gathers the logits, which
feed the *same* loss on every rank; summing there would multiply every gradient by the number
of columns, so its backward keeps the rank's own slice alone.

The grouped single-device form uses :class:`LocalMixing`, which does the same maths with no
communication, so the model's forward is written once for both layouts.
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

# torch 2.14 renamed the tensor collectives; older releases have only the former names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class Meter:
    """Seconds spent waiting on exchanges and bytes received, for the benchmark.

    On CUDA it synchronises around each exchange, which serialises what overlap would hide:
    use it to measure, not in training.
    """

    def __init__(self, device: torch.device | None = None) -> None:
        self.sync = device is not None and device.type == "cuda"
        self.seconds = 0.0
        self.bytes = 0

    @contextlib.contextmanager
    def timed(self, received: int = 0):
        if self.sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize()
            self.seconds += time.perf_counter() - start
            self.bytes += received


def _timed(meter: Meter | None, received: int = 0):
    return meter.timed(received) if meter is not None else contextlib.nullcontext()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _apply(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor,
           bias: torch.Tensor | None) -> torch.Tensor:
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation)
    return F.linear(x, weight, bias)


def _padded_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t.contiguous()
    pad = t.new_zeros((rows - t.shape[0], *t.shape[1:]))
    return torch.cat([t, pad])


def gather_rows(t: torch.Tensor, sizes: list[int], group: dist.ProcessGroup | None = None,
                meter: Meter | None = None) -> torch.Tensor:
    """All-gather ``t`` along dim 0 where rank i holds ``sizes[i]`` rows (sizes may differ)."""
    rows = max(sizes)
    padded = _padded_rows(t, rows)
    parts = [t.new_empty((rows, *t.shape[1:])) for _ in sizes]
    with _timed(meter, (len(sizes) - 1) * _nbytes(padded)):
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


class _StartGather(torch.autograd.Function):
    """Starts an async all-gather of ``x``; backward sums each slice's gradient over ranks."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup | None, box: list,
                meter: Meter | None) -> torch.Tensor:
        ctx.group, ctx.meter = group, meter
        world = dist.get_world_size(group)
        out = x.new_empty((world * x.shape[0], *x.shape[1:]))
        with _timed(meter, (world - 1) * _nbytes(x)):
            box.append(_all_gather_single(out, x.contiguous(), group=group, async_op=True))
        return out  # rows [c*N, (c+1)*N) are column c's; read them only after wait()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        world = dist.get_world_size(ctx.group)
        out = grad.new_empty((grad.shape[0] // world, *grad.shape[1:]))
        with _timed(ctx.meter, (world - 1) * _nbytes(out)):
            _reduce_scatter_single(out, grad.contiguous(), group=ctx.group)
        return out, None, None, None


def gather_batch(x: torch.Tensor, group: dist.ProcessGroup | None = None,
                 meter: Meter | None = None) -> torch.Tensor:
    """All-gather along dim 0 (rank order); each rank's rows get the sum of all ranks' grads."""
    box: list = []
    out = _StartGather.apply(x, group, box, meter)
    with _timed(meter):
        box[0].wait()
    return out


class ColumnExchange:
    """Rank ``column`` of ``columns`` holds one column; gathers run over ``group``."""

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
        box: list = []
        gathered = _StartGather.apply(x, self.group, box, self.meter)
        # The layer is linear in its input channels: convolve our own half while the others'
        # halves are in flight, then add their contributions as they arrive.
        own = slice(self.column * width, (self.column + 1) * width)
        y = _apply(layer, x, layer.weight[:, own], layer.bias)
        with _timed(self.meter):  # only the wait that compute did not hide
            box[0].wait()
        for c in range(self.columns):
            if c != self.column:
                part = layer.weight[:, c * width:(c + 1) * width]
                rows = gathered[c * n:(c + 1) * n]
                y = y + _apply(layer, rows, part, None)
        return y

    def logits(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """X5: every rank gets the full logits; gradients flow back to the owner's slice only."""
        return _GatherOwnGrad.apply(x, sizes, self.column, self.group, self.meter)


class LocalMixing:
    """The grouped single-device form: every column is here, so nothing moves."""

    column = 0
    columns = 1

    def into(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return layer(x)

    def logits(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        return x
