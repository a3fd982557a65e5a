"""The column split on 2 real gloo ranks equals the grouped single-device form."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from ranks import run_ranks

from alexnet_mp.models.columns import Arch, ColumnAlexNet, canonical_init
from alexnet_mp.parallel import exchange
from alexnet_mp.parallel.exchange import ColumnExchange

# Odd class count: the columns hold 4 and 3 fc8 neurons, the uneven case of X5.
ARCH = Arch(num_classes=7, in_channels=3, image_size=67, width=0.125, dropout=0.5)
DROPOUT_SEED = 11


def _grouped() -> ColumnAlexNet:
    model = ColumnAlexNet(ARCH, generator=torch.Generator().manual_seed(DROPOUT_SEED))
    model.load_state_dict(canonical_init(ARCH, "kaiming", seed=0))
    return model


def _split(rank: int, overlap: bool) -> ColumnAlexNet:
    model = ColumnAlexNet(ARCH, column=rank, exchange=ColumnExchange(rank, 2, None, overlap),
                          generator=torch.Generator().manual_seed(DROPOUT_SEED))
    model.load_state_dict(canonical_init(ARCH, "kaiming", seed=0, rows=model.slices()))
    return model


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(6, 3, 67, 67, generator=g), torch.randint(0, 7, (6,), generator=g)


def _grad_errors(split: ColumnAlexNet, grouped: ColumnAlexNet) -> dict[str, float]:
    rows = split.slices()
    ref = dict(grouped.named_parameters())
    return {n: _rel(p.grad, ref[n].grad[rows[n]]) for n, p in split.named_parameters()}


class _SummedLogits(torch.autograd.Function):
    """The pitfall: X5 backward that sums over ranks, as the X1–X4 exchanges do."""

    @staticmethod
    def forward(ctx, x, sizes, rank, group):
        ctx.start, ctx.stop = sum(sizes[:rank]), sum(sizes[:rank + 1])
        return exchange.gather_rows(x.t(), sizes, group).t().contiguous()

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[:, ctx.start:ctx.stop], None, None, None


def _equivalence_worker(rank: int, world: int) -> dict:
    out: dict = {}
    x, y = _batch(0)
    for overlap in (True, False):
        grouped, split = _grouped(), _split(rank, overlap)
        # Forward, with dropout active: the same mask slice on both sides.
        ref_logits = grouped(x)
        logits = split(x)
        out[f"forward_{overlap}"] = _rel(logits.detach(), ref_logits.detach())
        F.cross_entropy(ref_logits, y).backward()
        F.cross_entropy(logits, y).backward()
        out[f"grads_{overlap}"] = _grad_errors(split, grouped)

    # A doubled X5 gradient must show up as a mismatch, or the check above proves nothing.
    grouped, split = _grouped(), _split(rank, True)
    split.exchange.logits = lambda t, sizes: _SummedLogits.apply(t, sizes, rank, None)
    F.cross_entropy(grouped(x), y).backward()
    F.cross_entropy(split(x), y).backward()
    rows = split.slices()
    out["doubled_fc8_ratio"] = (split.fc8.weight.grad.norm()
                                / grouped.fc8.weight.grad[rows["fc8.weight"]].norm()).item()
    out["doubled_errors"] = _grad_errors(split, grouped)

    # Five SGD steps with momentum, weight decay and dropout leave both layouts equal.
    grouped, split = _grouped(), _split(rank, True)
    opts = [torch.optim.SGD(m.parameters(), lr=0.02, momentum=0.9, weight_decay=5e-4)
            for m in (grouped, split)]
    for step in range(5):
        xb, yb = _batch(step)
        for model, opt in zip((grouped, split), opts):
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
    ref = dict(grouped.named_parameters())
    rows = split.slices()
    out["trained"] = {n: _rel(p.detach(), ref[n].detach()[rows[n]])
                      for n, p in split.named_parameters()}
    return out


@pytest.mark.slow
def test_split_equals_grouped_forward_backward_and_training(tmp_path):
    for result in run_ranks(_equivalence_worker, 2, tmp_path):
        for overlap in (True, False):
            assert result[f"forward_{overlap}"] <= 1e-5
            bad = {n: e for n, e in result[f"grads_{overlap}"].items() if e > 1e-5}
            assert not bad, f"gradients differ (overlap={overlap}): {bad}"
        # Summing the logits' gradient doubles it, and the comparison catches that.
        assert abs(result["doubled_fc8_ratio"] - 2.0) < 1e-4
        assert min(result["doubled_errors"].values()) > 0.5
        bad = {n: e for n, e in result["trained"].items() if e > 1e-4}
        assert not bad, f"parameters differ after 5 steps: {bad}"


def test_paper_configuration_has_the_papers_parameter_count():
    with torch.device("meta"):
        model = ColumnAlexNet(Arch(num_classes=1000, in_channels=3, image_size=227))
    assert sum(p.numel() for p in model.parameters()) == 60_965_224


def test_paper_input_gives_the_papers_shape_table():
    from alexnet_mp.config import ModelConfig
    from alexnet_mp.models.shapes import layer_shapes

    shapes = dict(layer_shapes(ModelConfig(name="alexnet_columns", in_channels=3,
                                           num_classes=1000), 227))
    sides = [shapes[n][-1] for n in ("conv1", "conv2", "conv3", "conv4", "conv5")]
    assert sides == [55, 27, 13, 13, 13]
    assert shapes["fc6"] == (1, 4096) and shapes["fc8"] == (1, 1000)
    # The last pool gives 6x6 maps: fc6 reads 256 * 6 * 6 = 9216 inputs.
    assert shapes["pool"] == (1, 256, 6, 6)


def test_grouped_lrn_normalises_each_column_alone():
    """Per-column LRN differs from LRN across all 96 channels at the column boundary."""
    from alexnet_mp.models.columns import ColumnLRN

    x = torch.rand(2, 96, 5, 5) * 30
    lrn = torch.nn.LocalResponseNorm(5, 1e-4, 0.75, 2)
    per_column = ColumnLRN(2)(x)
    torch.testing.assert_close(per_column[:, :48], lrn(x[:, :48]))
    torch.testing.assert_close(per_column[:, 48:], lrn(x[:, 48:]))
    torch.testing.assert_close(ColumnLRN(1)(x), lrn(x))
    # At the boundary, normalising across columns is a different function.
    assert not torch.allclose(per_column[:, 46:50], lrn(x)[:, 46:50], rtol=1e-6, atol=0)
