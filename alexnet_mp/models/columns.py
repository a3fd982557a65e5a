"""The paper's two-column AlexNet (README): one column per rank, or both in grouped form.

One module serves both layouts. Its parameters carry the grouped form's names, and a column's
parameter is the grouped one's rows ``slices[name]`` (every layer splits along its output
dimension), so the canonical state is the grouped ``state_dict`` whatever the layout.
The exchange object decides whether a layer that reads both columns gathers over the network
(``alexnet_mp.parallel.exchange.ColumnExchange``, handed in by the parallel layer) or has them at
hand (:class:`LocalMixing`). This module never reaches for a process group itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

COLUMNS = 2
# Per column, as in the paper: conv1..conv5 kernels, then fc6/fc7 neurons.
PAPER_WIDTHS = (48, 128, 192, 192, 128, 2048)
# The original code's LRN: alpha/n per channel, which nn.LocalResponseNorm computes.
LRN = dict(size=5, alpha=1e-4, beta=0.75, k=2.0)
# Biases set to 1 "accelerate the early stages of learning by providing the ReLUs with positive
# inputs" (paper §5); every other bias starts at 0.
ONE_BIAS = ("conv2", "conv4", "conv5", "fc6", "fc7")
LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")
INIT_BLOCK = 64  # rows drawn at a time by canonical_init


@dataclass(frozen=True)
class Arch:
    num_classes: int = 1000
    in_channels: int = 3
    image_size: int = 227
    width: float = 1.0
    dropout: float = 0.5

    @property
    def per_column(self) -> tuple[int, ...]:
        return tuple(max(1, round(w * self.width)) for w in PAPER_WIDTHS)

    @property
    def class_split(self) -> list[int]:
        """fc8 neurons per column: the first column takes the odd one out."""
        return even_split(self.num_classes, COLUMNS)


def even_split(total: int, parts: int) -> list[int]:
    """``total`` rows over ``parts`` holders, the first ones taking one more where it is uneven
    (for two parts that is the paper's fc8 split: the first column takes the odd class)."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


class Exchange(Protocol):
    """What the model asks of the exchange it is handed: ``column`` of ``columns``."""

    column: int
    columns: int

    def into(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor: ...

    def logits(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor: ...


class LocalMixing:
    """The grouped single-device form: every column is here, so nothing moves."""

    column = 0
    columns = 1

    def into(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return layer(x)

    def logits(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        return x


def sides(image_size: int) -> tuple[int, int, int, int]:
    """Map sides after conv1 and after each 3/2 pool: 227 → 55, 27, 13, 6."""
    out = [(image_size - 11) // 4 + 1]  # conv1, no padding; conv2–conv5 keep the size
    for _ in range(3):
        out.append((out[-1] - 3) // 2 + 1)
    return tuple(out)


def trunk_size(image_size: int) -> int:
    """Side of the conv5 maps after the last pool (6 for the paper's 227)."""
    return sides(image_size)[-1]


def min_image_size() -> int:
    return next(s for s in range(11, 1024) if trunk_size(s) >= 1 and (s - 11) // 4 + 1 >= 3)


def _window_sum(sq: torch.Tensor) -> torch.Tensor:
    """Sum over the ``LRN["size"]`` nearest channels (dim 2) of each column, zeros past its
    edges. Shifted in-place adds into one copy: no padded tensor, no slice gradients."""
    out = sq.clone()
    for shift in range(1, LRN["size"] // 2 + 1):
        out[:, :, shift:] += sq[:, :, :-shift]
        out[:, :, :-shift] += sq[:, :, shift:]
    return out


def _inverse_power(d: torch.Tensor, spare: torch.Tensor | None = None) -> torch.Tensor:
    """``d ** -beta``: for the paper's 0.75 as rsqrt(d) * sqrt(rsqrt(d)), two cheap vectorised
    roots instead of the exp-and-log of a fractional power. ``spare``, a tensor of ``d``'s shape
    and dtype whose contents are no longer needed, receives the result."""
    if LRN["beta"] != 0.75:
        return torch.pow(d, -LRN["beta"], out=spare)
    r = torch.rsqrt(d, out=spare)
    return r.mul_(r.sqrt())


def _float(t: torch.Tensor) -> torch.Tensor:
    # Five squares of half-precision activations overflow fp16 (and lose bits in bf16).
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class _FusedLRN(torch.autograd.Function):
    """LRN per column with a hand-written backward.

    y = x * d^-b with d = k + a/n * S(x^2), S the window sum. Then
    dx = dy * d^-b - (2 a b / n) * x * S(dy * y / d), since the window is symmetric (S is its
    own transpose). Only d is saved beyond x and y, which the ReLU before and the pool after
    keep anyway; autograd's version of the formula saves d and d^b and differentiates a
    fractional power, a division and five slices of a padded copy.
    """

    # Every fresh tensor of a layer's size costs page faults on first touch (on the CPU, where
    # large blocks come straight from the OS); a buffer whose contents are no longer needed
    # takes the next result instead. The arithmetic, and so every bit, is as before.

    @staticmethod
    def forward(ctx, x: torch.Tensor, columns: int) -> torch.Tensor:
        n, c, h, w = x.shape
        g = _float(x.reshape(n, columns, c // columns, h, w))
        squares = g * g
        d = _window_sum(squares).mul_(LRN["alpha"] / LRN["size"]).add_(LRN["k"])
        y = (g * _inverse_power(d, squares)).to(x.dtype).reshape(n, c, h, w)
        ctx.save_for_backward(x, y, d)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, None]:
        x, y, d = ctx.saved_tensors
        shape = d.shape
        g, out, grad = (_float(t.reshape(shape)) for t in (x, y, dy))
        ratio = (grad * out).div_(d)
        s = _window_sum(ratio)
        s.mul_(g).mul_(-2 * LRN["alpha"] * LRN["beta"] / LRN["size"])
        dx = s.addcmul_(grad, _inverse_power(d, ratio))
        return dx.to(x.dtype).reshape(x.shape), None


class ColumnLRN(nn.Module):
    """LRN that never mixes columns: each column's channels are normalised on their own.

    The same function as ``nn.LocalResponseNorm(5, 1e-4, 0.75, 2)`` per column, computed by
    :class:`_FusedLRN`.
    """

    def __init__(self, columns: int) -> None:
        super().__init__()
        self.columns = columns

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FusedLRN.apply(x, self.columns)


class ColumnDropout(nn.Module):
    """Dropout whose mask is drawn for the *full* width from a generator every rank seeds alike.

    Each column keeps its own slice of the same mask, so the split and the grouped form drop the
    same neurons and take the same steps.

    ``shares`` > 1: the rows of ``x`` are ``shares`` equal shares of the global batch stacked in
    share order, where share ``r`` holds the global batch's examples ``r, r + shares, ...`` (the
    distributed sampler's stride). The mask is drawn for the global batch in its own order, as
    the grouped form draws it, and its rows are put in the shares' order, so every example keeps
    the mask row it has on one device.
    """

    def __init__(self, p: float, full: int, own: slice, generator: torch.Generator,
                 shares: int = 1) -> None:
        super().__init__()
        self.p, self.full, self.own, self.generator = p, full, own, generator
        self.shares = shares

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        n = x.shape[0]
        keep = torch.rand((n, self.full), generator=self.generator,
                          device=self.generator.device)
        if self.shares > 1:
            # Global row r + shares * j is share r's row j.
            keep = keep.view(n // self.shares, self.shares, self.full).transpose(0, 1)
            keep = keep.reshape(n, self.full)
        mask = (keep[:, self.own] >= self.p).to(device=x.device, dtype=x.dtype)
        return x * mask / (1 - self.p)


def conv_layers(arch: Arch, n: int) -> dict[str, nn.Module]:
    """conv1–conv5 with their LRN and pool, for ``n`` columns held (2: the grouped form)."""
    c1, c2, c3, c4, c5, _ = arch.per_column
    # A layer that reads only its own column is a grouped convolution in the grouped form.
    return {
        "conv1": nn.Conv2d(arch.in_channels, n * c1, 11, stride=4),
        "conv2": nn.Conv2d(n * c1, n * c2, 5, padding=2, groups=n),
        "conv3": nn.Conv2d(COLUMNS * c2, n * c3, 3, padding=1),
        "conv4": nn.Conv2d(n * c3, n * c4, 3, padding=1, groups=n),
        "conv5": nn.Conv2d(n * c4, n * c5, 3, padding=1, groups=n),
        "lrn": ColumnLRN(n),
        "pool": nn.MaxPool2d(3, stride=2),
    }


def conv_features(m: nn.Module, x: torch.Tensor,
                  into: Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The flattened conv5 maps of a module holding :func:`conv_layers`; ``into`` feeds conv3,
    the one convolution that reads both columns (X1)."""
    x = m.pool(m.lrn(F.relu(m.conv1(x))))
    x = m.pool(m.lrn(F.relu(m.conv2(x))))
    x = F.relu(into(m.conv3, x))
    x = F.relu(m.conv4(x))
    return m.pool(F.relu(m.conv5(x))).flatten(1)


class ColumnAlexNet(nn.Module):
    """Both columns (``column=None``: grouped form) or one of them (``column=0`` or ``1``)."""

    def __init__(self, arch: Arch, column: int | None = None,
                 exchange: Exchange | None = None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if trunk_size(arch.image_size) < 1:
            raise ValueError(f"image size {arch.image_size} is below {min_image_size()}")
        self.arch = arch
        self.column = column
        self.exchange = exchange if exchange is not None else LocalMixing()
        self.generator = generator if generator is not None else torch.Generator()
        c1, c2, c3, c4, c5, f = arch.per_column
        n = 1 if column is not None else COLUMNS  # columns held here
        side = trunk_size(arch.image_size)
        split = arch.class_split
        own_classes = arch.num_classes if column is None else split[column]
        for name, module in conv_layers(arch, n).items():
            setattr(self, name, module)
        self.fc6 = nn.Linear(COLUMNS * c5 * side * side, n * f)
        self.fc7 = nn.Linear(COLUMNS * f, n * f)
        self.fc8 = nn.Linear(COLUMNS * f, own_classes)
        own_f = slice(0, COLUMNS * f) if column is None else slice(column * f, (column + 1) * f)
        self.drop6 = ColumnDropout(arch.dropout, COLUMNS * f, own_f, self.generator)
        self.drop7 = ColumnDropout(arch.dropout, COLUMNS * f, own_f, self.generator)

        self.full_rows = {"conv1": COLUMNS * c1, "conv2": COLUMNS * c2, "conv3": COLUMNS * c3,
                          "conv4": COLUMNS * c4, "conv5": COLUMNS * c5, "fc6": COLUMNS * f,
                          "fc7": COLUMNS * f, "fc8": arch.num_classes}
        self.row_split = {name: [rows // COLUMNS] * COLUMNS
                          for name, rows in self.full_rows.items()}
        self.row_split["fc8"] = split

    def slices(self) -> dict[str, slice]:
        """Rows of each canonical (grouped) tensor that this module holds."""
        out = {}
        for layer in LAYERS:
            sizes = self.row_split[layer]
            start = 0 if self.column is None else sum(sizes[:self.column])
            stop = self.full_rows[layer] if self.column is None else start + sizes[self.column]
            for kind in ("weight", "bias"):
                out[f"{layer}.{kind}"] = slice(start, stop)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = conv_features(self, x, self.exchange.into)  # X1 inside
        x = self.drop6(F.relu(self.exchange.into(self.fc6, x)))  # X2
        x = self.drop7(F.relu(self.exchange.into(self.fc7, x)))  # X3
        x = self.exchange.into(self.fc8, x)  # X4
        return self.exchange.logits(x, self.row_split["fc8"])  # X5


def _scale(scheme: str, shape: torch.Size) -> tuple[str, float]:
    """(distribution, scale) of a layer's weights; fans per group, as nn.init counts them."""
    fan_in = math.prod(shape[1:])
    fan_out = shape[0] * math.prod(shape[2:])
    if scheme == "paper":
        return "normal", 0.01
    if scheme == "kaiming":
        # He et al.: keeps the ReLU stack's activations at unit scale, so the deep net leaves
        # its initial plateau in tens of steps rather than hundreds.
        return "normal", math.sqrt(2.0 / fan_in)
    gain = math.sqrt(2.0) if scheme == "xavier_relu" else 1.0
    return "uniform", gain * math.sqrt(6.0 / (fan_in + fan_out))


def canonical_init(arch: Arch, scheme: str, seed: int,
                   rows: dict[str, slice] | None = None) -> dict[str, torch.Tensor]:
    """The grouped form's initial parameters from ``seed`` alone, cut to ``rows`` if given.

    Weights are drawn in blocks of ``INIT_BLOCK`` rows from one generator, in order, and a rank
    keeps the blocks that overlap its rows: every layout gets the same numbers, and no rank ever
    holds more than one block of a layer it does not own.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in ColumnAlexNet(arch).named_parameters()}
    state = {}
    for layer in LAYERS:
        shape = shapes[f"{layer}.weight"]
        kind, scale = _scale(scheme, shape)
        want = rows[f"{layer}.weight"] if rows is not None else slice(0, shape[0])
        start, stop = want.indices(shape[0])[:2]
        kept = []
        for first in range(0, shape[0], INIT_BLOCK):
            block_shape = (min(INIT_BLOCK, shape[0] - first), *shape[1:])
            block = (torch.randn(block_shape, generator=g) if kind == "normal"
                     else torch.rand(block_shape, generator=g) * 2 - 1)
            lo, hi = max(start, first), min(stop, first + block_shape[0])
            if lo < hi:
                kept.append(block[lo - first:hi - first] * scale)
        state[f"{layer}.weight"] = torch.cat(kept)
        bias = 1.0 if scheme == "paper" and layer in ONE_BIAS else 0.0
        state[f"{layer}.bias"] = torch.full((stop - start,), bias)
    return state
