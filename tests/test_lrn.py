"""The fused LRN is the paper's LRN, per column: nn.LocalResponseNorm(5, 1e-4, 0.75, 2) on each
column's channels, forward and gradients, to float32 rounding; the bench's reference
(torch's LRN per column) equals it too."""

from __future__ import annotations

import pytest
import torch

from alexnet_mp.bench.lrn import VARIANTS, make_lrn
from alexnet_mp.models import columns
from alexnet_mp.models.columns import ColumnLRN


def _per_column_reference(x: torch.Tensor, n: int) -> torch.Tensor:
    lrn = torch.nn.LocalResponseNorm(5, 1e-4, 0.75, 2)
    return torch.cat([lrn(part) for part in x.chunk(n, dim=1)], dim=1)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("n", [1, 2])
def test_lrn_equals_torch_per_column_forward_and_backward(variant, channels_last, n):
    g = torch.Generator().manual_seed(n)
    # ReLU outputs of every scale the net sees, zeros included, 48 channels per column.
    x = (torch.randn(3, 48 * n, 6, 5, generator=g) * 40).relu()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ours, ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = make_lrn(n, variant)(ours)
    y_ref = _per_column_reference(ref, n)
    grad = torch.randn(y.shape, generator=g)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(y, y_ref)  # float32 tolerances: rounding, nothing more
    torch.testing.assert_close(ours.grad, ref.grad)


def test_the_hand_written_backward_is_the_derivative(monkeypatch):
    """With the paper's alpha the cross-channel term is tiny; a large one makes gradcheck see it.
    float64, so that only a wrong formula (not rounding) can fail."""
    monkeypatch.setitem(columns.LRN, "alpha", 3.0)
    x = (torch.rand(2, 14, 3, 3, dtype=torch.float64) * 2).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: ColumnLRN(2)(t), (x,))
    reference = make_lrn(2, "reference")
    torch.testing.assert_close(ColumnLRN(2)(x), reference(x))


def test_half_precision_is_normalised_in_float32():
    """Squares of fp16 activations overflow; the fused LRN computes in float32 and hands back
    the input's dtype."""
    x = torch.full((1, 10, 2, 2), 300.0)
    y = ColumnLRN(2)(x.half())
    assert y.dtype is torch.float16 and torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), ColumnLRN(2)(x), rtol=1e-3, atol=1e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = ColumnLRN(2)(x.bfloat16().requires_grad_())
    assert z.dtype is torch.bfloat16


def test_an_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="fused"):
        make_lrn(2, "fast")
