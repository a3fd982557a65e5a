"""A steady training step never waits for the device, on every layout, and takes the same steps
as a plain loop that reads everything at once.

The loop under test is the trainer's own (``engine.train_one_epoch`` with the guard, the
loader, the on-device transform and the trainer's optimizer). Host syncs are counted by
wrapping what makes the host wait for a tensor's value or for other ranks: ``item``,
``tolist``, ``cpu``, ``numpy``, truth and number conversions, ``torch.cuda.synchronize``, and
the blocking ``torch.distributed`` collectives (``async_op`` false) outside the exchanges. The
exchanges (the model's own forward and backward) and the guard's functional collectives are
not counted: on NCCL they are ordered on the device's stream and no host waits for them (on
gloo, the CPU is the device). The data loader's own host work (the sampler's permutation) is not
a device sync and is left out.

Equality: against one device taking the same global batches with a plain loop, every
parameter agrees to 1e-5 relative, as the layouts' own tests state (float sums over ranks in
another order, and torch's fused SGD, whose arithmetic differs from the foreach form's by about
1e-9); on one device with the paper's update, bit for bit, figures included.
"""

from __future__ import annotations

import dataclasses
import sys

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from ranks import run_ranks
from torch.utils.data import TensorDataset

from alexnet_mp import canonical, models
from alexnet_mp.config import ModelConfig, TrainConfig
from alexnet_mp.data import BatchTransform
from alexnet_mp.engine import LoopOptions, Precision, TrainState, train_one_epoch
from alexnet_mp.guard import StepGuard
from alexnet_mp.loader import make_loader, set_epoch
from alexnet_mp.optim import build_optimizer
from alexnet_mp.parallel.build import build_model
from alexnet_mp.parallel.layout import Layout, mesh_layout, parallel_dims

SEED, BATCH, SIZE, STEPS, LOG_EVERY = 3, 8, 67, 8, 4
TOLERANCE = 1e-5
CFG = ModelConfig(name="alexnet_columns", num_classes=7, in_channels=3, dropout=0.0, width=0.125,
                  init="kaiming")
CPU = torch.device("cpu")
BLOCKING = ("all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor",
            "broadcast", "broadcast_object_list", "barrier", "reduce_scatter_tensor",
            "gather_object", "scatter_object_list")
READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(11)
    x = torch.randint(0, 256, (STEPS * BATCH, 3, SIZE, SIZE), generator=g, dtype=torch.uint8)
    return TensorDataset(x, torch.randint(0, 7, (STEPS * BATCH,), generator=g))


# Not counted: the data loader's host work, and the exchanges' collectives, which are the model's
# own forward and backward (on NCCL a plain torch.distributed call is ordered on the stream).
EXEMPT = ("torch/utils/data/", "alexnet_mp/parallel/exchange.py")


def _exempt(frame) -> bool:
    while frame is not None:
        if any(part in frame.f_code.co_filename.replace("\\", "/") for part in EXEMPT):
            return True
        frame = frame.f_back
    return False


class SyncCounter:
    """Counts host syncs while active (see the module's docstring)."""

    def __init__(self) -> None:
        self.count, self._saved = 0, []

    def __enter__(self) -> SyncCounter:
        def wrap(owner, name, blocking_only=False):
            original = getattr(owner, name)

            def counted(*args, **kwargs):
                if not (blocking_only and kwargs.get("async_op")) and not _exempt(
                        sys._getframe(1)):
                    self.count += 1
                return original(*args, **kwargs)

            self._saved.append((owner, name, original))
            setattr(owner, name, counted)

        for name in READS:
            wrap(torch.Tensor, name)
        wrap(torch.cuda, "synchronize")
        for name in BLOCKING:
            if hasattr(dist, name):
                wrap(dist, name, blocking_only=True)
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)


class Marks:
    """The loader's batches, noting the sync count as each step's batch is taken."""

    def __init__(self, loader, counter: SyncCounter) -> None:
        self.loader, self.counter, self.marks = loader, counter, []

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            self.marks.append(self.counter.count)
            yield batch

    def per_step(self) -> list[int]:
        ends = [*self.marks[1:], self.counter.count]
        return [end - start for start, end in zip(self.marks, ends)]


def _engine_run(layout: Layout, cfg: ModelConfig, train: TrainConfig) -> dict:
    """STEPS steps of the trainer's loop on this rank; syncs per step and the canonical state."""
    model = build_model(cfg, SIZE, layout, SEED)
    optimizer = build_optimizer(model, train)
    loader = make_loader(_data(), batch_size=layout.local_batch(BATCH), shuffle=True, seed=SEED,
                         num_workers=0, pin_memory=False, replicas=layout.data_shards,
                         replica=layout.data_shard)
    set_epoch(loader, 0)
    transform = BatchTransform(SIZE, (0.5,) * 3, (0.25,) * 3)
    guard = StepGuard(layout.distributed, layout.step_group, CPU)
    state = TrainState()
    with SyncCounter() as counter:
        marks = Marks(loader, counter)
        train_one_epoch(model, marks, optimizer, transform, state, Precision("auto", CPU),
                        options=LoopOptions(log_every=LOG_EVERY), sync=layout.step_sync(),
                        guard=guard)
    return {"syncs": marks.per_step(), "params": canonical.model_state(model, layout),
            "figures": (state.loss_sum, state.correct, state.seen)}


def _reference(train: TrainConfig) -> dict:
    """The grouped form on one device, a plain loop over the same global batches, every
    figure read at once as a loop that waits would."""
    cfg = dataclasses.replace(CFG, name="alexnet_grouped")
    model = models.build_model(cfg, SIZE, CPU, SEED)
    optimizer = build_optimizer(model, train)
    if isinstance(optimizer, torch.optim.SGD):  # the foreach form: what the loop used to take
        optimizer = torch.optim.SGD(model.parameters(), lr=train.lr, momentum=train.momentum,
                                    weight_decay=train.weight_decay)
    loader = make_loader(_data(), batch_size=BATCH, shuffle=True, seed=SEED, num_workers=0,
                         pin_memory=False)
    set_epoch(loader, 0)
    transform = BatchTransform(SIZE, (0.5,) * 3, (0.25,) * 3)
    loss_sum, correct, seen = 0.0, 0, 0
    for x, y in loader:
        logits = model(transform(x))
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad()
        loss.backward()
        assert torch.isfinite(loss).item()
        optimizer.step()
        loss_sum += (loss.detach() * y.shape[0]).item()
        correct += int((logits.argmax(dim=1) == y).sum())
        seen += y.shape[0]
    return {"params": {k: v.detach() for k, v in model.named_parameters()},
            "figures": (loss_sum, correct, seen)}


def _expected_syncs() -> list[int]:
    return [1 if (step + 1) % LOG_EVERY == 0 else 0 for step in range(STEPS)]


def _assert_same_steps(run: dict, reference: dict) -> None:
    for name, value in reference["params"].items():
        mine = run["params"][name]
        rel = ((mine - value).abs().max() / value.abs().max().clamp_min(1e-12)).item()
        assert rel < TOLERANCE, f"{name}: {rel:.2e}"
    loss, correct, seen = run["figures"]
    ref_loss, ref_correct, ref_seen = reference["figures"]
    assert (correct, seen) == (ref_correct, ref_seen)
    assert loss == pytest.approx(ref_loss, rel=1e-5)


def test_one_device_has_one_host_sync_per_log_window_and_takes_the_plain_loops_steps():
    torch.manual_seed(0)
    train = TrainConfig(lr=0.02)
    cfg = dataclasses.replace(CFG, name="alexnet_grouped")
    run = _engine_run(Layout(), cfg, train)
    assert run["syncs"] == _expected_syncs()
    _assert_same_steps(run, _reference(train))


def test_the_papers_update_on_one_device_is_bit_for_bit_the_plain_loops():
    train = TrainConfig(lr=0.02, momentum_form="paper")
    cfg = dataclasses.replace(CFG, name="alexnet_grouped")
    run, reference = _engine_run(Layout(), cfg, train), _reference(train)
    assert run["syncs"] == _expected_syncs()
    for name, value in reference["params"].items():
        assert torch.equal(run["params"][name], value), name
    assert run["figures"] == reference["figures"]  # the logged sums, exactly


def _layouts(rank: int, world: int) -> dict:
    train = TrainConfig(lr=0.02)
    out = {}
    for name, dims in (("columns", parallel_dims("alexnet_columns", world)),
                       ("hybrid", parallel_dims("alexnet_columns", world, layout="hybrid"))):
        layout = mesh_layout(dims, device=CPU, timeout_s=120)
        out[name] = _engine_run(layout, CFG, train)
    return out


@pytest.fixture(scope="module")
def reference() -> dict:
    return _reference(TrainConfig(lr=0.02))


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_every_layout_has_one_host_sync_per_log_window_and_takes_the_same_steps(
        tmp_path, reference, world):
    """2 ranks: the column split and hybrid; 4 ranks: 2 columns x 2 replicas and hybrid."""
    results = run_ranks(_layouts, world, tmp_path)
    for rank, result in enumerate(results):
        for name, run in result.items():
            assert run["syncs"] == _expected_syncs(), (world, rank, name)
    for run in results[0].values():
        _assert_same_steps(run, reference)
