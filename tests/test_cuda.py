"""The CUDA paths, on a machine that has them (every test here is skipped without CUDA; the
ones that split the columns also need two GPUs). ``scripts/gpu_check.sh`` runs this file.

What runs: NCCL with one rank through every collective the model and the guard use (the overlap
path included); steady training steps under ``torch.cuda.set_sync_debug_mode("error")``, on one
GPU and over NCCL; the fused LRN, channels_last and both autocast precisions on one GPU against
fp32; training steps through ``launch/train.py`` on one GPU (fp32 and channels_last, fp16 with
its gradient scaler, bf16); and, with two GPUs, the column split over NCCL (overlapped and not)
against the grouped form on one GPU, in each precision.

Tolerances: cuDNN picks convolution algorithms per shape and uses TF32 by default, so split and
grouped are not bit-equal on a GPU even in fp32. Stated per precision in ``LOSS_RTOL``: the
relative difference of every logged loss over the first steps.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import ROOT
from torch import nn

CUDA = torch.cuda.is_available()
GPUS = torch.cuda.device_count() if CUDA else 0
pytestmark = pytest.mark.skipif(not CUDA, reason="no CUDA device")
two_gpus = pytest.mark.skipif(GPUS < 2, reason="the column split needs two GPUs")

# Relative difference allowed between any two logged losses of split and grouped.
LOSS_RTOL = {"none": 5e-3, "bf16": 5e-2, "fp16": 2e-2}
STEPS = 4
SMALL = ["model.width=0.25", "data.image_size=67", "train.batch_size=16",
         "data.train_limit=128", "data.test_limit=32", f"train.max_steps={STEPS}",
         "run.log_every=1", "run.progress=false", "run.device=cuda", "train.resume=none"]


@pytest.fixture
def exact_fp32():
    """fp32 that is fp32: TF32 off for the comparisons made in this process."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _grouped(device: torch.device):
    from alexnet_mp.models.columns import Arch, ColumnAlexNet, canonical_init

    arch = Arch(num_classes=10, in_channels=3, image_size=67, width=0.25, dropout=0.0)
    model = ColumnAlexNet(arch)
    model.load_state_dict(canonical_init(arch, "kaiming", seed=0))
    return model.to(device)


@pytest.fixture
def nccl_layout(tmp_path):
    """One NCCL rank started as setup_layout starts it (bound to this rank's device), and its
    layout; the group is destroyed afterwards."""
    from alexnet_mp.parallel.layout import ParallelDims, mesh_layout

    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1, device_id=device)
    try:
        yield mesh_layout(ParallelDims(1, 1, "columns"), device=device, timeout_s=60)
    finally:
        dist.destroy_process_group()


def test_nccl_with_one_rank_runs_every_collective_the_model_and_guard_use(nccl_layout):
    from alexnet_mp.guard import StepGuard
    from alexnet_mp.parallel.exchange import ColumnExchange, gather_labels

    layout, device = nccl_layout, nccl_layout.device
    conv = nn.Conv2d(4, 6, 3, padding=1).to(device)
    x = torch.randn(2, 4, 5, 5, device=device)
    expected = conv(x)
    for overlap in (True, False):  # the overlap path starts the gather, then waits on it
        exchange = ColumnExchange(0, 1, layout.column_group, overlap)
        xr = x.clone().requires_grad_()
        y = exchange.into(conv, xr)
        torch.testing.assert_close(y, expected)
        y.square().sum().backward()
        assert xr.grad is not None and torch.isfinite(xr.grad).all()
        logits = torch.randn(2, 5, device=device, requires_grad=True)
        out = exchange.logits(logits, [5])
        torch.testing.assert_close(out, logits)
        out.sum().backward()
        torch.testing.assert_close(logits.grad, torch.ones_like(logits))
    labels = torch.tensor([3, 1], device=device)
    assert gather_labels(labels, layout.column_group).tolist() == [3, 1]
    guard = StepGuard(True, layout.step_group, device)
    loss = conv(x).sum()
    loss.backward()
    assert guard.found_inf(loss, conv).item() == 0 and not guard.poll()
    conv.weight.grad[0] = float("nan")
    assert guard.found_inf(loss, conv).item() == 1


def test_fused_lrn_on_the_gpu_equals_torch_per_column():
    from alexnet_mp.bench.lrn import VARIANTS, make_lrn

    x = (torch.randn(4, 96, 13, 13, device="cuda") * 30).relu()
    lrn = nn.LocalResponseNorm(5, 1e-4, 0.75, 2)
    for variant in VARIANTS:
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        y = make_lrn(2, variant)(a)
        ref = torch.cat([lrn(b[:, :48]), lrn(b[:, 48:])], 1)
        g = torch.randn_like(ref)
        y.backward(g)
        ref.backward(g)
        torch.testing.assert_close(y, ref)
        torch.testing.assert_close(a.grad, b.grad)


def test_channels_last_gives_the_same_step(exact_fp32):
    device = torch.device("cuda")
    x = torch.randn(8, 3, 67, 67, device=device)
    y = torch.randint(0, 10, (8,), device=device)
    results = []
    for memory_format in (torch.contiguous_format, torch.channels_last):
        model = _grouped(device).to(memory_format=memory_format)
        loss = F.cross_entropy(model(x.contiguous(memory_format=memory_format)), y)
        loss.backward()
        results.append((loss.detach(), model.conv1.weight.grad, model.fc8.weight.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_autocast_step_stays_close_to_fp32(amp, exact_fp32):
    """One step in reduced precision (fp16 through the scaler) lands near the fp32 step."""
    from alexnet_mp.engine import Precision

    device = torch.device("cuda")
    x = torch.randn(8, 3, 67, 67, device=device)
    y = torch.randint(0, 10, (8,), device=device)
    ref = _grouped(device)
    F.cross_entropy(ref(x), y).backward()
    model = _grouped(device)
    precision = Precision(amp, device)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    for _ in range(24):
        opt.zero_grad(set_to_none=True)
        with precision.autocast():
            logits = model(x)
        precision.backward(F.cross_entropy(logits.float(), y))
        if precision.scaler is not None:
            precision.scaler.unscale_(opt)
        if all(torch.isfinite(p.grad).all() for p in model.parameters()):
            break
        # An overflow at the scaler's first, large scale is routine: it skips the step and
        # halves the scale (lr 0: nothing moves either way).
        precision.step(opt)
    for name in ("conv1", "conv5", "fc8"):
        got = getattr(model, name).weight.grad
        want = getattr(ref, name).weight.grad
        assert torch.isfinite(got).all()
        rel = ((got - want).norm() / want.norm()).item()
        assert rel < 0.05, (amp, name, rel)
    precision.step(opt)


def _train(tmp_path, name: str, ranks: int, *extra: str) -> list[float]:
    """launch/train.py on ``ranks`` GPUs; the losses it logged, one per step."""
    run = tmp_path / name
    script = str(ROOT / "launch" / "train.py")
    launcher = [sys.executable] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={ranks}"]
    proc = subprocess.run([*launcher, script, *SMALL, f"run.dir={run}", *extra],
                          capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r.get("kind") == "step"]
    assert len(losses) == STEPS and all(v == v for v in losses)  # no NaN
    assert (run / "checkpoints" / "last.pt").is_file()
    return losses


@pytest.mark.parametrize("extra", [["train.amp=none", "train.channels_last=true"],
                                   ["train.amp=fp16"], ["train.amp=bf16"]],
                         ids=["fp32-channels_last", "fp16-scaler", "bf16"])
def test_training_steps_on_one_gpu_through_the_entry_point(tmp_path, extra):
    _train(tmp_path, "one", 1, *extra)


@two_gpus
@pytest.mark.parametrize("amp", ["none", "bf16", "fp16"])
def test_the_column_split_over_nccl_takes_the_grouped_forms_steps(tmp_path, amp):
    grouped = _train(tmp_path, "grouped", 1, f"train.amp={amp}")
    for overlap in ("true", "false"):
        split = _train(tmp_path, f"split-{overlap}", 2, f"train.amp={amp}",
                       f"model.overlap={overlap}")
        for step, (a, b) in enumerate(zip(split, grouped), 1):
            assert abs(a - b) <= LOSS_RTOL[amp] * abs(b), (amp, overlap, step, a, b)


def _steady_steps_without_syncs(layout, device: torch.device, amp: str,
                                group=None) -> None:
    """The trainer's loop for 2 log windows of 6 steps; every step but the first of the run and
    the last of each window (the window's one read) runs with sync debugging set to "error",
    so any host sync there raises."""
    from torch.utils.data import TensorDataset

    from alexnet_mp.config import ModelConfig, TrainConfig
    from alexnet_mp.data import BatchTransform
    from alexnet_mp.engine import LoopOptions, Precision, TrainState, train_one_epoch
    from alexnet_mp.guard import StepGuard, StepSync
    from alexnet_mp.loader import make_loader, set_epoch
    from alexnet_mp.optim import build_optimizer
    from alexnet_mp.parallel.build import build_model

    cfg = ModelConfig(name="alexnet_columns", num_classes=10, in_channels=3, width=0.25)
    model = build_model(cfg, 67, layout, 0)
    data = TensorDataset(torch.randint(0, 256, (12 * 16, 3, 67, 67), dtype=torch.uint8),
                         torch.arange(12 * 16) % 10)
    loader = make_loader(data, batch_size=16, shuffle=True, seed=0, num_workers=0,
                         pin_memory=True)
    set_epoch(loader, 0)

    class Checked:
        def __len__(self):
            return len(loader)

        def __iter__(self):
            for i, batch in enumerate(loader):
                steady = i != 0 and (i + 1) % 6 != 0
                torch.cuda.set_sync_debug_mode("error" if steady else "default")
                yield batch
            torch.cuda.set_sync_debug_mode("default")

    state = TrainState()
    try:
        train_one_epoch(model, Checked(), build_optimizer(model, TrainConfig()),
                        BatchTransform(67, (0.5,) * 3, (0.25,) * 3).to(device), state,
                        Precision(amp, device), options=LoopOptions(log_every=6),
                        sync=StepSync(group=group, targets=layout.loss_targets),
                        guard=StepGuard(group is not None, group, device))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert state.global_step == 12 and state.seen == 12 * 16


@pytest.mark.parametrize("amp", ["none", "auto"])
def test_steady_steps_on_one_gpu_never_sync_the_host(amp):
    from alexnet_mp.parallel.layout import Layout

    device = torch.device("cuda", 0)
    _steady_steps_without_syncs(Layout(device=device), device, amp)


def test_steady_steps_over_nccl_never_sync_the_host(nccl_layout):
    """One NCCL rank: the guard's and the window's all-reduces, on the device's stream. A world
    of one is not "distributed" to the layout, so the group is handed over by hand."""
    _steady_steps_without_syncs(nccl_layout, nccl_layout.device, "auto",
                                group=nccl_layout.step_group)


def test_shards_decoded_on_the_gpu_match_the_cpu_decode(tmp_path):
    """The loader hands bytes over and the GPU decodes, crops, mirrors and lights them.

    nvjpeg and libjpeg-turbo round their IDCT and upsample the halved chroma differently, which
    shows most at the sharp colour edges of these shapes: the batches agree within 3/255 on
    average and 48/255 at any pixel before normalisation (a wrong crop or mirror moves the mean
    by tens), and the GPU path leaves the batch on the device.
    """
    from conftest import write_shapes_folder

    from alexnet_mp.data import BatchTransform
    from alexnet_mp.device_decode import collate_samples
    from alexnet_mp.lighting import EIGVAL, EIGVEC
    from alexnet_mp.prepare import prepare
    from alexnet_mp.shardset import ShardDataset, ShardView

    folder = write_shapes_folder(tmp_path / "folder", per_class=4, size=96)
    prepare(folder, tmp_path / "out", workers=0, show_bar=False, say=lambda s: None)
    batches = {}
    for decode in (True, False):
        view = ShardView(227, random=True, hflip=True, lighting=(EIGVAL, EIGVEC), decode=decode)
        data = ShardDataset(tmp_path / "out", "train", view)
        torch.manual_seed(0)
        samples = [data[i][0] for i in range(len(data))]
        device = "cpu" if decode else "cuda"
        transform = BatchTransform(227, (0.0,) * 3, (1.0,) * 3).to(device)
        batches[device] = transform(collate_samples(samples).pin_memory().to(device))
    assert batches["cuda"].device.type == "cuda"
    diff = (batches["cuda"].cpu() - batches["cpu"]).abs() * 255
    assert diff.max() <= 48 and diff.mean() <= 3, (float(diff.max()), float(diff.mean()))
