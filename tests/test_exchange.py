"""Each exchange on 2 real gloo ranks against the same layer computed whole on one device.

One spawn runs every check (starting processes costs more than the checks); the tests below
read its results. Each exchange must give the grouped form's values and gradients, with and
without overlap, and count the bytes it moves; a stalled peer must surface as PeerLostError.
"""

from __future__ import annotations

import datetime
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from ranks import run_ranks
from torch import nn

from alexnet_mp.bench.traffic import MeteredExchange, TrafficMeter
from alexnet_mp.errors import PeerLostError
from alexnet_mp.parallel import exchange
from alexnet_mp.parallel.exchange import ColumnExchange

N = 4  # rows of the batch each rank holds
TOL = dict(rtol=1e-5, atol=1e-6)


def _layers() -> dict[str, nn.Module]:
    """Whole layers reading two columns of input: the shapes of X1 (conv3) and X2–X4 (FC)."""
    torch.manual_seed(0)
    return {"X1 conv3": nn.Conv2d(2 * 6, 2 * 5, 3, padding=1),
            "X2 fc6": nn.Linear(2 * 30, 2 * 8),
            "X3 fc7": nn.Linear(2 * 8, 2 * 8),
            "X4 fc8": nn.Linear(2 * 8, 2 * 3)}


def _rows(layer: nn.Module, rank: int) -> nn.Module:
    """Rank ``rank``'s half of the layer's output rows, as a column holds them."""
    half = layer.weight.shape[0] // 2
    own = slice(rank * half, (rank + 1) * half)
    if isinstance(layer, nn.Conv2d):
        out = nn.Conv2d(layer.in_channels, half, layer.kernel_size, padding=layer.padding)
    else:
        out = nn.Linear(layer.in_features, half)
    with torch.no_grad():
        out.weight.copy_(layer.weight[own])
        out.bias.copy_(layer.bias[own])
    return out


def _into_errors(rank: int, overlap: bool) -> dict[str, dict[str, float]]:
    """X1–X4: values and every gradient against the whole layer on the whole input."""
    out = {}
    for name, whole in _layers().items():
        g = torch.Generator().manual_seed(1)
        shape = (N, whole.weight.shape[1], *((7, 7) if whole.weight.dim() == 4 else ()))
        x_all = torch.randn(shape, generator=g, requires_grad=True)
        probe = torch.randn((N, whole.weight.shape[0], *shape[2:]), generator=g)
        ref = whole(x_all)
        (ref * probe).sum().backward()

        width, half = shape[1] // 2, whole.weight.shape[0] // 2
        mine, own = slice(rank * width, (rank + 1) * width), slice(rank * half, (rank + 1) * half)
        x = x_all.detach()[:, mine].clone().requires_grad_()
        layer = _rows(whole, rank)
        meter = TrafficMeter()
        y = MeteredExchange(ColumnExchange(rank, 2, None, overlap), meter).into(layer, x)
        # Each rank's loss term reads only its own rows; their sum is the whole loss.
        (y * probe[:, own]).sum().backward()
        expected_bytes = 2 * x.numel() * x.element_size()  # gathered forward, scattered back
        out[name] = {
            "value": _rel(y, ref[:, own]),
            "input grad": _rel(x.grad, x_all.grad[:, mine]),
            "weight grad": _rel(layer.weight.grad, whole.weight.grad[own]),
            "bias grad": _rel(layer.bias.grad, whole.bias.grad[own]),
            "bytes off": abs(meter.bytes - expected_bytes),
            "seconds": meter.seconds,
        }
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.detach() - b.detach()).abs().max() / b.detach().abs().max().clamp_min(1e-12)).item()


class _SummedLogits(torch.autograd.Function):
    """The pitfall: an X5 whose backward sums over ranks, as X1–X4's do."""

    @staticmethod
    def forward(ctx, x, sizes, rank):
        ctx.start, ctx.stop = sum(sizes[:rank]), sum(sizes[:rank + 1])
        return exchange.gather_rows(x.t(), sizes).t().contiguous()

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[:, ctx.start:ctx.stop], None, None


def _logits_errors(rank: int) -> dict[str, float]:
    """X5 with uneven halves (4 and 3 classes): full logits, and the loss's own-slice gradient."""
    g = torch.Generator().manual_seed(2)
    sizes = [4, 3]
    logits = torch.randn(N, 7, generator=g, requires_grad=True)
    y = torch.randint(0, 7, (N,), generator=g)
    F.cross_entropy(logits, y).backward()
    own = slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))
    out = {}
    for kind in ("own", "summed"):
        x = logits.detach()[:, own].clone().requires_grad_()
        full = (ColumnExchange(rank, 2).logits(x, sizes) if kind == "own"
                else _SummedLogits.apply(x, sizes, rank))
        F.cross_entropy(full, y).backward()
        out[f"{kind} value"] = _rel(full, logits)
        out[f"{kind} grad"] = _rel(x.grad, logits.grad[:, own])
        out[f"{kind} ratio"] = (x.grad.norm() / logits.grad[:, own].norm()).item()
    return out


def _batch_errors(rank: int, world: int) -> dict[str, float]:
    """The hybrid layout's gather along the batch: gradients summed over the ranks' uses."""
    g = torch.Generator().manual_seed(3)
    x_all = torch.randn(world * N, 5, generator=g)
    probes = torch.randn(world, world * N, 5, generator=g)  # each rank uses the batch its way
    x = x_all[rank * N:(rank + 1) * N].clone().requires_grad_()
    gathered = exchange.gather_batch(x)
    (gathered * probes[rank]).sum().backward()
    labels = exchange.gather_labels(torch.arange(N) + 10 * rank)
    return {"value": _rel(gathered, x_all),
            "grad": _rel(x.grad, probes.sum(0)[rank * N:(rank + 1) * N]),
            "labels ok": float(labels.tolist() == [*range(N), *range(10, 10 + N)])}


def _stalled_peer(rank: int, world: int) -> str:
    """Rank 1 stops answering; rank 0's exchange must end in PeerLostError within the timeout."""
    group = dist.new_group(list(range(world)), timeout=datetime.timedelta(seconds=1))
    if rank == 1:
        time.sleep(3)
        return "stalled"
    started = time.monotonic()
    x = torch.ones(N, 3, requires_grad=True)
    try:
        ColumnExchange(0, 2, group, overlap=True).into(nn.Linear(6, 2), x)
    except PeerLostError as exc:
        return f"PeerLostError after {time.monotonic() - started:.1f} s: {exc}"
    return "no error"


def _worker(rank: int, world: int) -> dict:
    return {"into": {overlap: _into_errors(rank, overlap) for overlap in (True, False)},
            "logits": _logits_errors(rank), "batch": _batch_errors(rank, world),
            "stalled": _stalled_peer(rank, world)}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    return run_ranks(_worker, 2, tmp_path_factory.mktemp("exchange"))


@pytest.mark.parametrize("overlap", [True, False])
def test_x1_to_x4_equal_the_whole_layer_in_values_and_gradients(results, overlap):
    for rank, result in enumerate(results):
        for name, errors in result["into"][overlap].items():
            bad = {k: v for k, v in errors.items() if k not in ("bytes off", "seconds")
                   and v > 1e-5}
            assert not bad, f"rank {rank}, {name}, overlap={overlap}: {bad}"
            # The meter counts the gather and its reduce-scatter, and times them.
            assert errors["bytes off"] == 0 and errors["seconds"] > 0, (rank, name, errors)


def test_x5_keeps_its_own_slice_and_a_summing_backward_doubles_it(results):
    for result in results:
        r = result["logits"]
        assert r["own value"] <= 1e-6 and r["own grad"] <= 1e-6
        # The negative control: summing over the 2 ranks doubles the gradient, and the same
        # comparison catches it.
        assert r["summed value"] <= 1e-6
        assert abs(r["summed ratio"] - 2.0) < 1e-5 and r["summed grad"] > 0.5


def test_batch_gather_sums_each_rows_gradient_over_the_ranks(results):
    for result in results:
        b = result["batch"]
        assert b["value"] <= 1e-6 and b["grad"] <= 1e-6 and b["labels ok"] == 1.0


def test_a_stalled_peer_becomes_peer_lost_error(results):
    message = results[0]["stalled"]
    assert message.startswith("PeerLostError"), message
    assert "exchange" in message
    # The group's own 1 s timeout ended the wait (gloo names it), not rank 1 leaving 3 s later
    # nor the default's 30 min.
    assert "Timed out waiting 1000ms" in message, message
