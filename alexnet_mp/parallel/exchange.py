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


def process_group(group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    # The functional collectives want a group object; None means the default group, as in dist.*
    return group if group is not None else dist.group.WORLD


def start_gather(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Start an all-gather of ``x`` along dim 0 (rank order); finish it with :func:`finish`.

    Differentiable: each rank's rows get the sum over ranks of their gradients (reduce-scatter).
    """
    with peer_errors("an exchange (all-gather)"):
        return _all_gather(x.contiguous(), 0, process_group(group))


def finish(pending: torch.Tensor) -> torch.Tensor:
    """Wait for a gather from :func:`start_gather` (a no-op if it has finished)."""
    with peer_errors("an exchange (all-gather)"):
        return funcol.wait_tensor(pending)


def gather_batch(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """All-gather along dim 0 (rank order); each rank's rows get the sum of all ranks' grads.

    Every rank must hold the same number of rows.
    """
    return finish(start_gather(x, group))


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


def gather_rows(t: torch.Tensor, sizes: list[int],
                group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """All-gather ``t`` along dim 0 where rank i holds ``sizes[i]`` rows (sizes may differ).

    Not differentiable; the checkpoint's gathers and X5's forward use it.
    """
    rows = max(sizes)
    padded = _padded_rows(t, rows)
    parts = [t.new_empty((rows, *t.shape[1:])) for _ in sizes]
    with peer_errors("gathering rows"):
        dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


class _GatherOwnGrad(torch.autograd.Function):
    """X5: all-gather along dim 1 forward; backward keeps this rank's slice, with no sum."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int], exchange: ColumnExchange) -> torch.Tensor:
        ctx.start = sum(sizes[:exchange.column])
        ctx.stop = ctx.start + sizes[exchange.column]
        # Gathering rows of the transpose lets the columns hold different numbers of classes.
        return exchange.gather_rows(x.t(), sizes).t().contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad[:, ctx.start:ctx.stop].contiguous(), None, None


def _apply(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor,
           bias: torch.Tensor | None) -> torch.Tensor:
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation)
    return F.linear(x, weight, bias)


class ColumnExchange:
    """Rank ``column`` of ``columns`` holds one column; gathers run over ``group``.

    ``into`` needs every column to hold the same number of input channels (or features).
    Every collective an exchange runs goes through :meth:`start`, :meth:`wait` and
    :meth:`gather_rows`, so a subclass that overrides those three sees all of its traffic.
    """

    def __init__(self, column: int, columns: int, group: dist.ProcessGroup | None = None,
                 overlap: bool = True) -> None:
        self.column = column
        self.columns = columns
        self.group = group
        self.overlap = overlap

    def start(self, x: torch.Tensor) -> torch.Tensor:
        """Start the differentiable all-gather of ``x`` along dim 0 (:func:`start_gather`)."""
        return start_gather(x, self.group)

    def wait(self, pending: torch.Tensor) -> torch.Tensor:
        """Wait for a gather from :meth:`start`."""
        return finish(pending)

    def gather_rows(self, t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """All-gather rows of uneven counts, not differentiable (:func:`gather_rows`)."""
        return gather_rows(t, sizes, self.group)

    def into(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """X1–X4: apply ``layer`` (which reads every column's channels) to the gathered ``x``."""
        n, width = x.shape[0], x.shape[1]
        if not self.overlap:
            gathered = self.wait(self.start(x))
            return layer(torch.cat(gathered.split(n), dim=1))
        pending = self.start(x)
        # The layer is linear in its input channels: apply our own half of the weights while
        # the other halves are in flight, then add their contributions when they arrive.
        # One split, not a slice per part: a slice's backward allocates a zero-filled gradient
        # of the whole weight for each part and adds them (two fc7-sized temporaries); the
        # split's backward writes every part into one.
        parts = layer.weight.split(width, dim=1)
        y = _apply(layer, x, parts[self.column], layer.bias)
        gathered = self.wait(pending)
        for c in range(self.columns):
            if c != self.column:
                y = y + _apply(layer, gathered[c * n:(c + 1) * n], parts[c], None)
        return y

    def logits(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """X5: every rank gets the full logits; gradients flow back to the owner's slice only."""
        return _GatherOwnGrad.apply(x, sizes, self)

    def gather_batch(self, x: torch.Tensor) -> torch.Tensor:
        """The hybrid layout's trunk features: every rank's share of the batch, in rank order."""
        return self.wait(self.start(x))
