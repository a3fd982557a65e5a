"""The layout comparison: the same global batch, image size and cores for every layout, on 1, 2,
4 or more ranks.

Layouts (DESIGN §5), each placed on the training path's own (replica x column) mesh
(``alexnet_mp.parallel.layout``) for the world size the bench runs on:

- ``d2l``, ``grouped``: one device (rank 0, with the cores of every rank on its node, while the
  other ranks wait);
- ``split``: the paper's two columns per replica, W/2 replicas (one rank: not available; two:
  the column split; four: 2 columns x 2 replicas); ``split_overlap`` the same with the
  exchanges overlapped with the column's own half of each layer;
- ``ddp``: the grouped model whole on every rank, W replicas;
- ``hybrid``: the convolution trunk data-parallel over all W ranks, the FC layers split over them.

Every rank runs this in lockstep; rank 0 reports. Traffic is reported per rank and per step in two
kinds, each counted from the tensors that moved and computed from the architecture
(:func:`analytic_traffic`): *exchange* (activations between the columns, or the hybrid layout's
trunk features) and *all-reduce* (gradients averaged or summed between replicas).
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import json
import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from alexnet_mp.config import Config
from alexnet_mp.data import BatchTransform, build_data, make_loader, set_epoch
from alexnet_mp.engine import sync_device as _sync
from alexnet_mp.errors import UserError
from alexnet_mp.models import arch_of
from alexnet_mp.models.columns import COLUMNS, Arch, ColumnAlexNet, even_split, sides
from alexnet_mp.parallel.build import build_model
from alexnet_mp.parallel.exchange import Meter
from alexnet_mp.parallel.hybrid import HEAD
from alexnet_mp.parallel.layout import Layout, ParallelDims, mesh_layout, parallel_dims

LAYOUTS = ("d2l", "grouped", "split", "split_overlap", "ddp", "hybrid")
ONE_DEVICE = ("d2l", "grouped")
COLUMN_SPLIT = ("split", "split_overlap")
FLOAT_BYTES = 4


def layouts_for(world: int) -> list[str]:
    """The bench layouts ``world`` ranks can run, in report order."""
    if world == 1:
        return list(ONE_DEVICE)
    split = list(COLUMN_SPLIT) if world % COLUMNS == 0 else []
    return [*ONE_DEVICE, *split, "ddp", "hybrid"]


def bench_dims(name: str, world: int) -> ParallelDims:
    """The mesh a bench layout uses on ``world`` ranks, through the training path's own check."""
    if name in ONE_DEVICE:
        return ParallelDims(1, 1, "columns")
    if name in COLUMN_SPLIT:
        return parallel_dims("alexnet_columns", world, columns=COLUMNS)
    if name == "ddp":
        return parallel_dims("alexnet_grouped", world, columns=1)
    if name == "hybrid":
        return parallel_dims("alexnet_columns", world, layout="hybrid")
    raise UserError(f"unknown bench layout '{name}'; choose from {', '.join(LAYOUTS)}")


def return_freed_memory_to_the_os() -> None:
    """Hand the previous layout's freed heap back to the OS, so that the next layout's RSS peak
    is its own. (Forcing every tensor through mmap instead doubled step times in system calls.)"""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakRSS:
    """Samples this process's resident memory in a thread; the CPU's stand-in for CUDA peaks."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._page = 4096

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def __enter__(self) -> PeakRSS:
        self.peak = self._rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


class TrafficMeter(Meter):
    """The exchange meter, telling the two kinds of traffic apart.

    Every exchange reports through :meth:`stop`; the gradient all-reduce hooks (replicas,
    hybrid trunk) add to ``bytes`` directly, so what ``stop`` did not see is all-reduce traffic.
    """

    def __init__(self, device: torch.device | None = None) -> None:
        super().__init__(device)
        self.exchange_bytes = 0

    def stop(self, started: float, received: int = 0) -> None:
        super().stop(started, received)
        self.exchange_bytes += received

    @property
    def allreduce_bytes(self) -> int:
        return self.bytes - self.exchange_bytes

    def reset(self) -> None:
        self.seconds, self.bytes, self.exchange_bytes = 0.0, 0, 0


@dataclass
class Work:
    """One layout's model and step on this rank, as the timing loop sees it."""

    model: nn.Module
    step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None]  # forward + backward
    optimizer: torch.optim.Optimizer | None
    meter: TrafficMeter
    local_batch: int
    active: bool  # False on the ranks that wait during one-device layouts
    data_shards: int = 1  # into how many shares the global batch is cut
    data_shard: int = 0  # which one this rank takes


def _sgd(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    t = cfg.train
    return torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum,
                           weight_decay=t.weight_decay)


def _arch(cfg: Config) -> Arch:
    return arch_of(cfg.model, cfg.data.image_size)


def _model(cfg: Config, layout: Layout, name: str, meter: Meter | None = None,
           overlap: bool = False) -> nn.Module:
    """The training path's own builder: the exchange and gradient sync ``layout`` calls for."""
    model_cfg = dataclasses.replace(cfg.model, name=name, overlap=overlap)
    return build_model(model_cfg, cfg.data.image_size, layout, cfg.train.seed, meter)


def build_work(name: str, cfg: Config, layout: Layout) -> Work:
    """Layout ``name`` on this rank; ``layout`` is its mesh from :func:`bench_dims`."""
    meter = TrafficMeter(layout.device)
    batch = cfg.train.batch_size
    if name in ONE_DEVICE:
        if layout.rank != 0:
            return Work(nn.Identity(), lambda x, y: None, None, meter, batch, False)
        one = Layout(device=layout.device)
        model = _model(cfg, one, "alexnet_d2l" if name == "d2l" else "alexnet_grouped")

        def plain_step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        return Work(model, plain_step, _sgd(model, cfg), meter, batch, True)
    model_name = "alexnet_grouped" if name == "ddp" else "alexnet_columns"
    model = _model(cfg, layout, model_name, meter, overlap=name == "split_overlap")

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # The hybrid layout returns the whole batch's logits: loss_targets gathers the labels.
        loss = F.cross_entropy(model(x), layout.loss_targets(y))
        loss.backward()
        return loss

    return Work(model, step, _sgd(model, cfg), meter, layout.local_batch(batch), True,
                layout.data_shards, layout.data_shard)


class Traffic(NamedTuple):
    """Bytes one rank receives per step."""

    exchange: int  # activations (and their gradients) between the ranks of a replica
    allreduce: int  # gradients between replicas (hybrid: the trunk's, between every rank)

    @property
    def total(self) -> int:
        return self.exchange + self.allreduce


def _params(arch: Arch, column: int | None = None) -> dict[str, int]:
    with torch.device("meta"):
        model = ColumnAlexNet(arch, column)
    return {k: p.numel() for k, p in model.named_parameters()}


def ring_bytes(numel: int, ranks: int) -> int:
    """What each rank receives in a ring all-reduce of ``numel`` floats: 2 (R-1)/R of them.

    The hooks count each bucket with the same integer division, so the sum over buckets equals
    this whenever R divides 8·numel of every bucket (always, for R = 2, 4 or 8).
    """
    return FLOAT_BYTES * 2 * (ranks - 1) * numel // ranks


def analytic_traffic(name: str, cfg: Config, world: int, rank: int = 0) -> Traffic:
    """Bytes rank ``rank`` of ``world`` receives per step in layout ``name``, from the
    architecture alone. Labels gathered for the hybrid loss (8 bytes an example) are left out,
    as the meter leaves them out.

    Columns x replicas (C = 2 columns, R = W/2 replicas, n = global batch / R per replica):
    X1–X4 forward (all-gather) and backward (reduce-scatter) and X5 forward only,
    ``4·n·(C-1)·(2·(c2·s2² + c5·s3² + f + f) + ⌈classes/2⌉)``, plus the ring all-reduce of the
    column's parameters over the R replicas. DDP: the ring all-reduce of every parameter over W.
    Hybrid: the trunk features gathered along the batch (forward and backward), the inputs of
    fc7 and fc8 (each rank's 2f/W rows, forward and backward), the logits (forward), and the ring
    all-reduce of the trunk's parameters over W.
    """
    if name in ONE_DEVICE:
        return Traffic(0, 0)
    dims = bench_dims(name, world)
    arch = _arch(cfg)
    c1, c2, c3, c4, c5, f = arch.per_column
    _, _, s2, s3 = sides(cfg.data.image_size)
    n = cfg.train.batch_size
    if name in COLUMN_SPLIT:
        local, others = n // dims.replicas, dims.columns - 1
        per_exchange = c2 * s2 * s2 + c5 * s3 * s3 + f + f
        exchange = FLOAT_BYTES * local * others * (2 * per_exchange + max(arch.class_split))
        column = rank % dims.columns
        return Traffic(exchange, ring_bytes(sum(_params(arch, column).values()), dims.replicas))
    if name == "ddp":
        return Traffic(0, ring_bytes(sum(_params(arch).values()), world))
    if name == "hybrid":
        others = world - 1
        trunk_features = COLUMNS * c5 * s3 * s3
        fc_rows = even_split(COLUMNS * f, world)[rank]  # the layout refuses uneven splits
        classes = max(even_split(arch.num_classes, world))
        floats = (2 * (n // world) * others * trunk_features  # the trunk's features
                  + 2 * 2 * n * others * fc_rows  # fc7's and fc8's inputs
                  + n * others * classes)  # the logits
        trunk = sum(v for k, v in _params(arch).items() if k.split(".")[0] not in HEAD)
        return Traffic(FLOAT_BYTES * floats, ring_bytes(trunk, world))
    raise ValueError(name)


def analytic_bytes(name: str, cfg: Config, world: int, rank: int = 0) -> int:
    """Both kinds of :func:`analytic_traffic` together."""
    return analytic_traffic(name, cfg, world, rank).total


def analytic_table(cfg: Config, worlds: list[int]) -> str:
    """Per-rank bytes per step of every multi-rank layout at each world size, from the formula
    alone (nothing runs): the figures a projection to larger machines starts from."""
    arch = _arch(cfg)
    params = sum(_params(arch).values())
    lines = [f"{params:,} parameters; image {cfg.data.image_size} px, global batch "
             f"{cfg.train.batch_size}, {arch.num_classes} classes, width {arch.width}; "
             "MB = 10^6 bytes, received per rank per step (rank 0)", "",
             "| ranks | layout | mesh | exchange MB | all-reduce MB | total MB |",
             "|" + " --- |" * 6]
    for world in worlds:
        for name in ("split", "ddp", "hybrid"):
            if name not in layouts_for(world):
                continue
            try:
                dims = bench_dims(name, world)
                t = analytic_traffic(name, cfg, world)
            except UserError:
                continue
            lines.append(f"| {world} | {name} | {_mesh_name(name, dims)} | "
                         f"{t.exchange / 1e6:.2f} | {t.allreduce / 1e6:.2f} | "
                         f"{t.total / 1e6:.2f} |")
    return "\n".join(lines)


def _mesh_name(name: str, dims: ParallelDims) -> str:
    """The name the training path gives this mesh (``Layout.name``)."""
    if name in ONE_DEVICE:
        return Layout().name
    whole = dims.layout == "columns" and dims.columns == 1
    return Layout(world_size=dims.world_size, layout=dims.layout, columns=dims.columns,
                  column=None if whole else 0, replicas=dims.replicas).name


def matmul_probe(device: torch.device, seconds: float = 0.5, n: int = 1024) -> float:
    """FLOP/s of a square fp32 matmul on this device with the current threads."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    for _ in range(3):
        a @ b
    _sync(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    _sync(device)
    return 2 * n ** 3 * count / (time.perf_counter() - start)


def grouped_conv_backward_flop(grad_out_shape, x_shape, w_shape, bias, stride, padding,
                               dilation, transposed, output_padding, groups, output_mask,
                               out_shape, **kwargs) -> int:
    """torch's formula, with the weight gradient of a grouped conv divided by its groups.

    torch.utils.flop_counter counts that term as if the conv were ungrouped (twice the work for
    the columns' groups=2 convs), which would credit the grouped form with FLOPs it never does.
    """
    def t(shape):
        return [shape[1], shape[0], *shape[2:]]

    flops = 0
    if output_mask[0]:  # grad_input: a transposed conv of grad_out with the weight
        flops += flop_counter.conv_flop_count(grad_out_shape, w_shape, x_shape, not transposed)
    if output_mask[1]:  # grad_weight: input against grad_out, within each group only
        pair = (t(grad_out_shape), t(x_shape)) if transposed else (t(x_shape), t(grad_out_shape))
        flops += flop_counter.conv_flop_count(*pair, t(w_shape)) // groups
    return flops


def _count_flops(work: Work, x: torch.Tensor, y: torch.Tensor) -> int:
    fixed = {torch.ops.aten.convolution_backward: grouped_conv_backward_flop}
    with FlopCounterMode(display=False, custom_mapping=fixed) as counter:
        work.step(x, y)
    work.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops()


class Batches:
    """Synthetic tensors already on the device, or the real loader and on-device transform;
    ``shard`` of ``shards`` picks this rank's share of each global batch."""

    def __init__(self, mode: str, cfg: Config, device: torch.device, local_batch: int,
                 shards: int, shard: int) -> None:
        self.mode, self.device = mode, device
        size, c = cfg.data.image_size, cfg.model.in_channels
        g = torch.Generator().manual_seed(cfg.train.seed + shard)
        if mode == "synthetic":
            self.x = torch.randn(local_batch, c, size, size, generator=g).to(device)
            self.y = torch.randint(0, cfg.model.num_classes, (local_batch,), generator=g).to(
                device)
            return
        data = build_data(cfg.data, num_classes=cfg.model.num_classes, in_channels=c,
                          seed=cfg.train.seed)
        self.loader = make_loader(data.train, batch_size=local_batch, shuffle=True,
                                  seed=cfg.train.seed, num_workers=cfg.data.num_workers,
                                  pin_memory=device.type == "cuda", replicas=shards,
                                  replica=shard)
        self.transform = BatchTransform(size, data.mean, data.std).to(device)
        self.epoch, self.it = 0, iter(())

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mode == "synthetic":
            return self.x, self.y
        batch = next(self.it, None)
        while batch is None or batch[0].shape[0] != self.loader.batch_size:
            set_epoch(self.loader, self.epoch)
            self.epoch += 1
            self.it = iter(self.loader)
            batch = next(self.it, None)
        x, y = batch
        return self.transform(x.to(self.device, non_blocking=True)), y.to(self.device)


def _barrier(layout: Layout) -> None:
    if layout.distributed:
        dist.barrier()


def _gather(layout: Layout, record: dict) -> list[dict]:
    if not layout.distributed:
        return [record]
    records: list[dict] = [{} for _ in range(layout.world_size)]
    dist.all_gather_object(records, record)
    return records


def _node_threads(layout: Layout) -> int:
    """Every thread the ranks on this node use, within its cores: what one device gets."""
    return max(1, min(torch.get_num_threads() * layout.local_world_size, os.cpu_count() or 1))


def run_layout(name: str, mode: str, cfg: Config, layout: Layout, steps: int,
               warmup: int, profile_dir: Path | None = None) -> dict[str, Any] | None:
    """Time one layout on one data mode; every rank calls it with the layout's mesh, rank 0 gets
    the merged result."""
    threads = torch.get_num_threads()
    if name in ONE_DEVICE and layout.device.type == "cpu" and layout.rank == 0:
        torch.set_num_threads(_node_threads(layout))  # the same cores as the ranks use
    try:
        return _run_layout(name, mode, cfg, layout, steps, warmup, profile_dir)
    finally:
        torch.set_num_threads(threads)
        if layout.device.type == "cuda":
            torch.cuda.empty_cache()


def _run_layout(name: str, mode: str, cfg: Config, layout: Layout, steps: int, warmup: int,
                profile_dir: Path | None) -> dict[str, Any] | None:
    device, rank = layout.device, layout.rank
    dims = bench_dims(name, layout.world_size)
    return_freed_memory_to_the_os()
    _barrier(layout)
    record: dict[str, Any] = {"layout": name, "data": mode, "mesh": _mesh_name(name, dims),
                              "columns": dims.columns, "replicas": dims.replicas}
    with PeakRSS() as rss:
        baseline = rss.peak
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        work = build_work(name, cfg, layout)
        if work.active:
            batches = Batches(mode, cfg, device, work.local_batch, work.data_shards,
                              work.data_shard)
            x, y = batches.next()
            flops = _count_flops(work, x, y) if mode == "synthetic" else None
            times, fwd_bwd, opt_times, exch = [], [], [], []
            for i in range(warmup + steps):
                _sync(device)
                if i == warmup:
                    work.meter.reset()
                t0 = time.perf_counter()
                x, y = batches.next()
                seconds_before = work.meter.seconds
                work.optimizer.zero_grad(set_to_none=True)
                work.step(x, y)
                _sync(device)
                t1 = time.perf_counter()
                work.optimizer.step()
                _sync(device)
                t2 = time.perf_counter()
                if i >= warmup:
                    times.append(t2 - t0)
                    fwd_bwd.append(t1 - t0)
                    opt_times.append(t2 - t1)
                    exch.append(work.meter.seconds - seconds_before)
            exchange_bytes = work.meter.exchange_bytes // steps
            allreduce_bytes = work.meter.allreduce_bytes // steps
            memory = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                      else rss.peak - baseline)
            if profile_dir is not None and mode == "synthetic":  # after the measurements
                _profile(work, batches, profile_dir / f"profile-{name}-rank{rank}.txt")
            with_sync = statistics.median(fwd_bwd)
            exchange_s = statistics.median(exch)
            allreduce_s = _exposed_allreduce(work, batches, warmup, min(steps, 3), with_sync)
            record.update({
                "step_s": statistics.median(times), "step_s_min": min(times),
                "step_s_max": max(times),
                "compute_s": max(0.0, with_sync - exchange_s - allreduce_s),
                "exchange_s": exchange_s, "allreduce_s": allreduce_s,
                "optimizer_s": statistics.median(opt_times),
                "exchange_bytes_counted": exchange_bytes,
                "allreduce_bytes_counted": allreduce_bytes,
                "flops_rank": flops, "peak_memory_bytes": memory,
            })
            batch = cfg.train.batch_size
            ips = [batch / t for t in times]
            record.update({"images_per_s": statistics.median(ips), "images_per_s_min": min(ips),
                           "images_per_s_max": max(ips)})
        del work
    record.setdefault("peak_memory_bytes", 0)  # the waiting ranks of a one-device layout
    record["peak_rss_bytes"] = rss.peak
    _barrier(layout)
    probe = matmul_probe(device) if (record.get("step_s") is not None) else 0.0
    records = _gather(layout, {**record, "probe_flops": probe})
    if rank != 0:
        return None
    return _merge(name, mode, cfg, records, layout.world_size)


def _profile(work: Work, batches: Batches, path: Path, steps: int = 3) -> None:
    """torch.profiler over a few extra steps (not the timed ones): where each rank's time goes."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if batches.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            x, y = batches.next()
            work.optimizer.zero_grad(set_to_none=True)
            work.step(x, y)
            work.optimizer.step()
        _sync(batches.device)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = "self_cuda_time_total" if batches.device.type == "cuda" else "self_cpu_time_total"
    path.write_text(f"{steps} steps\n" + prof.key_averages().table(sort_by=key, row_limit=20))


def _exposed_allreduce(work: Work, batches: Batches, warmup: int, steps: int,
                       with_sync: float) -> float:
    """The gradient all-reduce overlaps with backward (torch's replicate buckets it, as DDP
    does), so no meter can time it alone; what it costs is the time turning it off saves.
    Layouts without one (a single device, one replica of columns) cost nothing here."""
    model = work.model
    if not hasattr(model, "set_requires_gradient_sync"):
        return 0.0
    times = []
    model.set_requires_gradient_sync(False)
    try:
        for i in range(warmup + steps):
            x, y = batches.next()
            work.optimizer.zero_grad(set_to_none=True)
            _sync(batches.device)
            t0 = time.perf_counter()
            work.step(x, y)
            _sync(batches.device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    finally:
        model.set_requires_gradient_sync(True)
        work.optimizer.zero_grad(set_to_none=True)
    return max(0.0, with_sync - statistics.median(times))


def _merge(name: str, mode: str, cfg: Config, records: list[dict], world: int) -> dict:
    active = [r for r in records if r.get("step_s") is not None]
    out = dict(active[0])
    # A step ends when its slowest rank ends.
    for key in ("step_s", "step_s_max", "compute_s", "exchange_s", "allreduce_s", "optimizer_s"):
        out[key] = max(r[key] for r in active)
    out["step_s_min"] = max(r["step_s_min"] for r in active)
    out["ranks"] = len(active)
    # Per rank: a rank that waits long in the exchanges is waiting for a slower peer.
    out["step_s_per_rank"] = [r["step_s"] for r in active]
    out["exchange_s_per_rank"] = [r["exchange_s"] for r in active]
    out["allreduce_s_per_rank"] = [r["allreduce_s"] for r in active]
    ranks = range(len(active)) if name not in ONE_DEVICE else [0]
    analytic = [analytic_traffic(name, cfg, world, rank) for rank in ranks]
    for kind in ("exchange", "allreduce"):
        out[f"{kind}_bytes_counted_per_rank"] = [r[f"{kind}_bytes_counted"] for r in active]
        out[f"{kind}_bytes_analytic_per_rank"] = [getattr(t, kind) for t in analytic]
        out[f"{kind}_bytes_analytic"] = getattr(analytic[0], kind)
    out["bytes_counted"] = out["exchange_bytes_counted"] + out["allreduce_bytes_counted"]
    out["bytes_analytic"] = analytic[0].total
    out["peak_memory_bytes_per_rank"] = [r["peak_memory_bytes"] for r in active]
    out["peak_memory_bytes"] = max(out["peak_memory_bytes_per_rank"])
    out["peak_rss_bytes"] = max(r["peak_rss_bytes"] for r in active)
    out["probe_flops"] = sum(r["probe_flops"] for r in active)
    if mode == "synthetic":
        out["flops_step"] = sum(r["flops_rank"] for r in active)
        out["achieved_flops"] = out["flops_step"] / out["step_s"]
        out["flops_fraction"] = out["achieved_flops"] / out["probe_flops"]
    out["exchange_fraction"] = out["exchange_s"] / out["step_s"]
    out["allreduce_fraction"] = out["allreduce_s"] / out["step_s"]
    out.pop("flops_rank", None)
    return out


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def markdown(results: list[dict]) -> str:
    """One run's table: rank 0's traffic, the largest peak memory of any rank."""
    head = ("| layout | mesh | data | ranks | images/s (min–max) | step ms | compute | exchange | "
            "all-reduce | optimizer | exchange MiB/step (analytic) | all-reduce MiB/step "
            "(analytic) | peak memory MiB | GFLOP/step | of matmul probe |")
    rows = [head, "|" + " --- |" * 15]
    for r in results:
        gflop = f"{r['flops_step'] / 1e9:.1f}" if "flops_step" in r else "–"
        frac = f"{100 * r['flops_fraction']:.0f} %" if "flops_fraction" in r else "–"
        rows.append(
            f"| {r['layout']} | {r['mesh']} | {r['data']} | {r['ranks']} | "
            f"{r['images_per_s']:.1f} ({r['images_per_s_min']:.1f}–{r['images_per_s_max']:.1f})"
            f" | {1e3 * r['step_s']:.0f} | {1e3 * r['compute_s']:.0f} | "
            f"{1e3 * r['exchange_s']:.0f} ({100 * r['exchange_fraction']:.1f} %) | "
            f"{1e3 * r['allreduce_s']:.0f} ({100 * r['allreduce_fraction']:.1f} %) | "
            f"{1e3 * r['optimizer_s']:.0f} | {_mib(r['exchange_bytes_counted'])} "
            f"({_mib(r['exchange_bytes_analytic'])}) | {_mib(r['allreduce_bytes_counted'])} "
            f"({_mib(r['allreduce_bytes_analytic'])}) | {r['peak_memory_bytes'] / 2**20:.0f} | "
            f"{gflop} | {frac} |")
    return "\n".join(rows)


def scaling_table(reports: list[dict]) -> str:
    """Rows of several runs' bench.json (1, 2, 4 ... ranks) in one table, sorted by ranks.

    "× 1 rank" is images/s against the grouped form on a 1-rank run, same data mode, when one
    of the reports is such a run. Traffic is the busiest rank's, counted (analytic).
    """
    rows = [(report.get("meta", {}), r) for report in reports for r in report["results"]]
    base = {r["data"]: r["images_per_s"] for meta, r in rows
            if r["layout"] == "grouped" and meta.get("world_size") == 1}
    order = {name: i for i, name in enumerate(LAYOUTS)}
    rows.sort(key=lambda mr: (mr[1]["ranks"], mr[0].get("world_size", 0),
                              order.get(mr[1]["layout"], len(order)), mr[1]["data"]))
    out = ["| ranks | layout | mesh | data | images/s (min–max) | × 1 rank | step ms | "
           "exchange ms | all-reduce ms | exchange MiB/step (analytic) | all-reduce MiB/step "
           "(analytic) | peak MiB per rank |", "|" + " --- |" * 12]
    for meta, r in rows:
        ratio = f"{r['images_per_s'] / base[r['data']]:.2f}" if r["data"] in base else "–"
        traffic = []
        for kind in ("exchange", "allreduce"):
            counted = max(r.get(f"{kind}_bytes_counted_per_rank", [0]))
            analytic = max(r.get(f"{kind}_bytes_analytic_per_rank", [0]))
            traffic.append(f"{_mib(counted)} ({_mib(analytic)})")
        memory = " / ".join(f"{m / 2**20:.0f}" for m in r["peak_memory_bytes_per_rank"])
        ranks = f"{r['ranks']}" + (f" of {meta['world_size']}"
                                   if meta.get("world_size", r["ranks"]) != r["ranks"] else "")
        out.append(
            f"| {ranks} | {r['layout']} | {r['mesh']} | {r['data']} | {r['images_per_s']:.1f} "
            f"({r['images_per_s_min']:.1f}–{r['images_per_s_max']:.1f}) | {ratio} | "
            f"{1e3 * r['step_s']:.0f} | {1e3 * r['exchange_s']:.0f} | "
            f"{1e3 * r['allreduce_s']:.0f} | {traffic[0]} | {traffic[1]} | {memory} |")
    return "\n".join(out)


def bar_chart(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = sorted({r["data"] for r in results}, reverse=True)
    names = list(dict.fromkeys(r["layout"] for r in results))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / max(len(modes), 1)
    for i, mode in enumerate(modes):
        rs = {r["layout"]: r for r in results if r["data"] == mode}
        xs = [k + i * width for k in range(len(names))]
        ys = [rs[n]["images_per_s"] if n in rs else 0 for n in names]
        lo = [rs[n]["images_per_s"] - rs[n]["images_per_s_min"] if n in rs else 0 for n in names]
        hi = [rs[n]["images_per_s_max"] - rs[n]["images_per_s"] if n in rs else 0 for n in names]
        ax.bar(xs, ys, width, yerr=[lo, hi], label=mode, capsize=3)
    ax.set_xticks([k + width * (len(modes) - 1) / 2 for k in range(len(names))], names)
    ax.set_ylabel("images/s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def check_layouts(layouts: list[str], world: int) -> None:
    """Every requested layout exists and runs on ``world`` ranks; else one line saying which."""
    unknown = [n for n in layouts if n not in LAYOUTS]
    if unknown:
        raise UserError(f"unknown bench layout(s) {', '.join(unknown)}; choose from "
                        f"{', '.join(LAYOUTS)}")
    possible = layouts_for(world)
    unfit = [n for n in layouts if n not in possible]
    if unfit:
        raise UserError(f"bench layout(s) {', '.join(unfit)} cannot run on {world} rank(s); "
                        f"with {world} choose from {', '.join(possible)}, or change "
                        "--nproc_per_node (split needs an even number of ranks, ddp and hybrid "
                        "at least 2)")


def run_bench(cfg: Config, layout: Layout, out: Path, layouts: list[str], modes: list[str],
              steps: int, warmup: int, say: Callable[[str], None] = print,
              profile: bool = False) -> list[dict]:
    """Every layout × data mode on this world's meshes; rank 0 writes bench.json, bench.md and
    bench.png into ``out``, and with ``profile`` every rank writes a torch.profiler table per
    layout. ``layout`` is the process's own (its default group, device and threads)."""
    world = layout.world_size
    check_layouts(layouts, world)
    results = []
    for name in layouts:
        dims = bench_dims(name, world)
        # Every rank creates every group of the mesh, in the same order (torch requires it).
        mesh = layout if name in ONE_DEVICE or not layout.distributed else mesh_layout(
            dims, device=layout.device, timeout_s=cfg.run.timeout_s,
            local_rank=layout.local_rank, local_world_size=layout.local_world_size)
        for mode in modes:
            result = run_layout(name, mode, cfg, mesh, steps, warmup,
                                out if profile else None)
            if result is not None:
                results.append(result)
                say(f"{name:>14} {mode:>9} ({result['mesh']}): {result['images_per_s']:7.1f} "
                    f"images/s, exchange {100 * result['exchange_fraction']:4.1f} %, all-reduce "
                    f"{100 * result['allreduce_fraction']:4.1f} % of the step")
    if layout.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        meta = {"device": str(layout.device), "world_size": world,
                "local_world_size": layout.local_world_size, "cpu_count": os.cpu_count(),
                "threads_per_rank": torch.get_num_threads(),
                "batch_size": cfg.train.batch_size, "image_size": cfg.data.image_size,
                "width": cfg.model.width, "num_classes": cfg.model.num_classes,
                "steps": steps, "warmup": warmup, "torch": torch.__version__}
        if layout.device.type == "cuda":
            meta["device_name"] = torch.cuda.get_device_name(layout.device)
        (out / "bench.json").write_text(json.dumps({"meta": meta, "results": results},
                                                   indent=1))
        table = markdown(results)
        (out / "bench.md").write_text(table + "\n")
        bar_chart(results, out / "bench.png")
        say(table)
    return results
