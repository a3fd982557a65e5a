"""The LRN the fused one is measured against: torch's own ``local_response_norm`` on each
column's channels (the grouped view, columns folded into the batch), which is the same function
to float rounding, computed as torch computes it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from alexnet_mp.models.columns import LRN, ColumnLRN

VARIANTS = ("fused", "reference")


class ReferenceLRN(nn.Module):
    """``F.local_response_norm`` per column: each column's channels normalised on their own."""

    def __init__(self, columns: int) -> None:
        super().__init__()
        self.columns = columns

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        grouped = x.reshape(n * self.columns, c // self.columns, h, w)
        y = F.local_response_norm(grouped, LRN["size"], LRN["alpha"], LRN["beta"], LRN["k"])
        return y.reshape(n, c, h, w)


def make_lrn(columns: int, variant: str = "fused") -> nn.Module:
    """The model's :class:`ColumnLRN` ("fused") or :class:`ReferenceLRN` ("reference")."""
    if variant not in VARIANTS:
        raise ValueError(f"LRN variant must be one of {VARIANTS}, not {variant!r}")
    return ColumnLRN(columns) if variant == "fused" else ReferenceLRN(columns)


def use_reference_lrn(model: nn.Module) -> None:
    """Every :class:`ColumnLRN` in ``model`` replaced by :class:`ReferenceLRN`, in place."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, ColumnLRN):
                setattr(parent, name, ReferenceLRN(child.columns))
