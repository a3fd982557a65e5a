"""The layout comparison: the same global batch, image size and cores for every layout, on 1, 2,
4 or more ranks.

Layouts (README, "Growing"), each placed on the training path's own (replica x column) mesh
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

A timed step is what the training loop does: forward, backward, the cross-rank guard, the
optimizer. Each layout runs as one or more *variants* (:class:`Variant`: the old LRN,
channels_last, torch.compile, ranks pinned to their cores), and every (layout, variant, data)
*arm* runs once per round, the rounds interleaved, so that the machine's drift hits every arm
alike; :mod:`alexnet_mp.benchstats` turns the rounds into intervals and verdicts, and
:mod:`alexnet_mp.attribution` the profiled steps into a per-layer table.
:mod:`alexnet_mp.microbench` holds the two measurements beside it (start-up, the LRN alone).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import json
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from alexnet_mp import attribution, benchstats, exchangefloor, stepmemory
from alexnet_mp.config import Config
from alexnet_mp.data import BatchTransform, build_data, make_loader, set_epoch
from alexnet_mp.engine import Precision, TrainState, train_one_epoch
from alexnet_mp.engine import sync_device as _sync
from alexnet_mp.errors import UserError
from alexnet_mp.guard import StepGuard
from alexnet_mp.models import arch_of
from alexnet_mp.models.columns import COLUMNS, Arch, ColumnAlexNet, ColumnLRN, even_split, sides
from alexnet_mp.parallel.build import build_model
from alexnet_mp.parallel.exchange import ColumnExchange, Meter
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




MODES = ("synthetic", "loader", "train")


class TrafficMeter(Meter):
    """The exchange meter, telling the two kinds of traffic apart, and keeping every exchange's
    duration in order (with the phase it ran in), from which :func:`_waits` tells a rank's
    waiting for its peer from the exchange's own cost.

    Every exchange reports through :meth:`stop`; the gradient all-reduce hooks (replicas,
    hybrid trunk) add to ``bytes`` directly, so what ``stop`` did not see is all-reduce traffic.
    """

    def __init__(self, device: torch.device | None = None) -> None:
        super().__init__(device)
        self.exchange_bytes = 0
        # (phase, seconds, collective, elements put in) per exchange, in order
        self.calls: list[tuple[str, float, str, int]] = []

    def stop(self, started: float, received: int = 0, call: tuple[str, int] | None = None) -> None:
        seconds = self.seconds
        super().stop(started, received, call)
        kind, numel = call or ("", 0)
        # Only the gathers' backward reduce-scatters, which autograd runs, are backward
        # exchanges; so the phase holds in the training loop too, which does not tell the meter.
        phase = "backward" if kind == "reduce_scatter" else "forward"
        self.calls.append((phase, self.seconds - seconds, kind, numel))
        self.exchange_bytes += received

    @property
    def allreduce_bytes(self) -> int:
        return self.bytes - self.exchange_bytes

    def reset(self) -> None:
        self.seconds, self.bytes, self.exchange_bytes = 0.0, 0, 0
        self.calls = []


VARIANT_FLAGS = ("lrn_ref", "channels_last", "compile", "pinned")
VARIANT_HELP = {
    "lrn_ref": "the LRN as it was before (autograd through a fractional power), for before/after",
    "channels_last": "model and input in channels_last memory format",
    "compile": "torch.compile on the model (the warm-up steps absorb the compilation)",
    "pinned": "each local rank's threads pinned to its own share of the cores",
}


@dataclass(frozen=True)
class Variant:
    """What an arm changes against the run's configuration ("base": nothing)."""

    flags: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, text: str) -> Variant:
        flags = frozenset(f for f in text.split("+") if f and f != "base")
        unknown = sorted(flags - set(VARIANT_FLAGS))
        if unknown:
            raise UserError(f"unknown bench variant flag(s) {', '.join(unknown)}; join flags from "
                            f"{', '.join(VARIANT_FLAGS)} with '+', or say base")
        return cls(flags)

    @property
    def name(self) -> str:
        return "+".join(f for f in VARIANT_FLAGS if f in self.flags) or "base"

    def memory_format(self, cfg: Config) -> torch.memory_format:
        cl = cfg.train.channels_last or "channels_last" in self.flags
        return torch.channels_last if cl else torch.contiguous_format

    def prepare(self, model: nn.Module, cfg: Config) -> nn.Module:
        """The model as this variant runs it (the same object, changed in place)."""
        if "lrn_ref" in self.flags:
            for m in model.modules():
                if isinstance(m, ColumnLRN):
                    m.variant = "reference"
        if self.memory_format(cfg) is torch.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model


def _thread_ids() -> list[int]:
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return [0]


def set_affinity(cpus: set[int]) -> None:
    """Every thread of this process (OpenMP's, gloo's, ours) on ``cpus``; threads started later
    inherit it. ``os.sched_setaffinity(0, ...)`` alone would move only the calling thread."""
    for tid in _thread_ids():
        try:
            os.sched_setaffinity(tid, cpus)
        except OSError:  # a thread that ended meanwhile
            pass


def rank_cores(allowed: set[int], local_rank: int, local_world_size: int) -> set[int]:
    """Local rank ``local_rank``'s own share of ``allowed``: contiguous, equal, disjoint."""
    cpus = sorted(allowed)
    per = max(1, len(cpus) // max(1, local_world_size))
    start = (local_rank * per) % len(cpus)
    return set(cpus[start:start + per])


@contextlib.contextmanager
def pinned(layout: Layout, whole_node: bool) -> Iterator[None]:
    """This rank on its own cores (``whole_node``: every core this process may use, as the
    one-device layouts take), and back afterwards."""
    if not hasattr(os, "sched_getaffinity") or layout.device.type != "cpu":
        yield
        return
    before = os.sched_getaffinity(0)
    set_affinity(before if whole_node else rank_cores(before, layout.local_rank,
                                                      layout.local_world_size))
    try:
        yield
    finally:
        set_affinity(before)


@dataclass
class Work:
    """One layout's model and step on this rank, as the timing loop sees it."""

    module: nn.Module  # the model: its parameters, its exchange
    runner: nn.Module  # what the step calls: the model, or its compiled form
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # the loss
    optimizer: torch.optim.Optimizer | None
    meter: TrafficMeter
    local_batch: int
    active: bool  # False on the ranks that wait during one-device layouts
    layout: Layout  # where the model runs (one device: a layout of its own)
    guard: StepGuard | None = None
    data_shards: int = 1  # into how many shares the global batch is cut
    data_shard: int = 0  # which one this rank takes

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Forward and backward, as the training loop runs them."""
        loss = self.forward(x, y)
        loss.backward()
        return loss


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


def build_work(name: str, cfg: Config, layout: Layout, variant: Variant = Variant()) -> Work:
    """Layout ``name`` on this rank; ``layout`` is its mesh from :func:`bench_dims`."""
    meter = TrafficMeter(layout.device)
    batch = cfg.train.batch_size
    if name in ONE_DEVICE:
        if layout.rank != 0:
            idle = nn.Identity()
            return Work(idle, idle, lambda x, y: x, None, meter, batch, False, layout)
        on = Layout(device=layout.device)
        model = _model(cfg, on, "alexnet_d2l" if name == "d2l" else "alexnet_grouped")
    else:
        on = layout
        model_name = "alexnet_grouped" if name == "ddp" else "alexnet_columns"
        model = _model(cfg, layout, model_name, meter, overlap=name == "split_overlap")
    model = variant.prepare(model, cfg)
    runner = torch.compile(model) if "compile" in variant.flags else model

    def forward(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # The hybrid layout returns the whole batch's logits: loss_targets gathers the labels.
        return F.cross_entropy(runner(x), on.loss_targets(y))

    guard = StepGuard(on.distributed, on.step_group, on.device)
    return Work(model, runner, forward, _sgd(model, cfg), meter, on.local_batch(batch), True,
                on, guard, on.data_shards, on.data_shard)


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
                 shards: int, shard: int,
                 memory_format: torch.memory_format = torch.contiguous_format) -> None:
        self.mode, self.device = mode, device
        size, c = cfg.data.image_size, cfg.model.in_channels
        g = torch.Generator().manual_seed(cfg.train.seed + shard)
        if mode == "synthetic":
            x = torch.randn(local_batch, c, size, size, generator=g)
            self.x = x.to(device).contiguous(memory_format=memory_format)
            self.y = torch.randint(0, cfg.model.num_classes, (local_batch,), generator=g).to(
                device)
            return
        data = build_data(cfg.data, num_classes=cfg.model.num_classes, in_channels=c,
                          seed=cfg.train.seed)
        self.loader = make_loader(data.train, batch_size=local_batch, shuffle=True,
                                  seed=cfg.train.seed, num_workers=cfg.data.num_workers,
                                  pin_memory=device.type == "cuda", replicas=shards,
                                  replica=shard, bad_images=cfg.data.bad_images)
        self.transform = BatchTransform(size, data.mean, data.std,
                                        memory_format is torch.channels_last).to(device)
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


def _load_average() -> float | None:
    """The machine's 1-minute load average: on a shared machine, how many others ran too."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _node_threads(layout: Layout) -> int:
    """Every thread the ranks on this node use, within its cores: what one device gets."""
    return max(1, min(torch.get_num_threads() * layout.local_world_size, os.cpu_count() or 1))


def run_layout(name: str, mode: str, cfg: Config, layout: Layout, steps: int,
               warmup: int, profile_dir: Path | None = None, variant: Variant = Variant(),
               first: bool = True, cache: dict | None = None) -> dict[str, Any] | None:
    """Time one arm (layout, variant, data mode) for one round; every rank calls it with the
    layout's mesh, rank 0 gets the merged result. ``first``: the arm's first round, which also
    counts FLOPs, measures the exposed all-reduce and (with ``profile_dir``) profiles;
    later rounds take those from ``cache`` (this rank's, shared between rounds)."""
    threads = torch.get_num_threads()
    one = name in ONE_DEVICE
    if one and layout.device.type == "cpu" and layout.rank == 0:
        torch.set_num_threads(_node_threads(layout))  # the same cores as the ranks use
    place = pinned(layout, whole_node=one) if "pinned" in variant.flags \
        else contextlib.nullcontext()
    try:
        with place:
            return _run_layout(name, mode, cfg, layout, steps, warmup, profile_dir, variant,
                               first, cache if cache is not None else {})
    finally:
        torch.set_num_threads(threads)
        if layout.device.type == "cuda":
            torch.cuda.empty_cache()


def _run_layout(name: str, mode: str, cfg: Config, layout: Layout, steps: int, warmup: int,
                profile_dir: Path | None, variant: Variant, first: bool,
                cache: dict) -> dict[str, Any] | None:
    device, rank = layout.device, layout.rank
    dims = bench_dims(name, layout.world_size)
    return_freed_memory_to_the_os()
    _barrier(layout)
    record: dict[str, Any] = {"layout": name, "variant": variant.name, "data": mode,
                              "mesh": _mesh_name(name, dims), "columns": dims.columns,
                              "replicas": dims.replicas, "load_average": _load_average()}
    key = (name, variant.name, mode)
    with PeakRSS() as rss:
        baseline = rss.peak
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            work = build_work(name, cfg, layout, variant)
            if work.active:
                label = name if variant.name == "base" else f"{name}+{variant.name}"
                profile = (profile_dir / f"profile-{label}-rank{rank}.txt"
                           if profile_dir is not None else None)
                record.update(_measure(work, mode, cfg, steps, warmup, profile, variant,
                                       first, cache.setdefault(key, {})))
                record["peak_memory_bytes"] = (torch.cuda.max_memory_allocated(device)
                                               if device.type == "cuda"
                                               else rss.peak - baseline)
            del work
        except Exception as exc:  # noqa: BLE001 - one arm failing (a compile) ends no run
            record["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"
    record.setdefault("peak_memory_bytes", 0)  # the waiting ranks of a one-device layout
    record["peak_rss_bytes"] = rss.peak
    _barrier(layout)
    # Only synthetic data has a FLOP count to compare with the probe.
    probe = matmul_probe(device) if record.get("step_s_steps") and mode == "synthetic" else 0.0
    records = _gather(layout, {**record, "probe_flops": probe})
    if rank != 0:
        return None
    return _merge(name, mode, cfg, records, layout.world_size)


def _measure(work: Work, mode: str, cfg: Config, steps: int, warmup: int,
             profile: Path | None, variant: Variant, first: bool, cache: dict) -> dict[str, Any]:
    device = work.layout.device
    if mode == "train":  # the all-reduce is not timed apart here: in compute
        return {**_train_steps(work, cfg, steps, warmup, variant), "allreduce_s": 0.0}
    batches = Batches(mode, cfg, device, work.local_batch, work.data_shards, work.data_shard,
                      variant.memory_format(cfg))
    if first and mode == "synthetic":
        x, y = batches.next()
        cache["flops"] = _count_flops(work, x, y)
    out = _timed_steps(work, batches, steps, warmup)
    out["flops_rank"] = cache.get("flops") if mode == "synthetic" else None
    if mode == "synthetic":
        floor = _exchange_floor(work, out["calls_steps"][-1], max(steps, 3))
        if floor is not None:
            out["exchange_floor_s_steps"] = floor
    if first and mode == "synthetic" and "compile" not in variant.flags:
        out.update(_tensor_memory(work, batches) or {})
    if first:
        if profile is not None and mode == "synthetic":  # after the measurements
            cache["attribution"] = _attribute(work, batches, profile, variant)
        with_sync = statistics.median(out["fwd_bwd_s_steps"])
        cache["allreduce_s"] = _exposed_allreduce(work, batches, warmup, min(steps, 3),
                                                  with_sync)
    out["allreduce_s"] = cache["allreduce_s"]
    if first and cache.get("attribution") is not None:
        out["attribution"] = cache["attribution"]
    return out


def _exchange_floor(work: Work, calls: list, repeats: int) -> list[float] | None:
    """The last timed step's exchanges replayed alone (:mod:`alexnet_mp.exchangefloor`), every
    round, so that the floor gets an interval from the same rounds as the step."""
    exchange = getattr(work.module, "exchange", None)
    if not isinstance(exchange, ColumnExchange) or not calls:
        return None
    return exchangefloor.replay(calls, exchange.group, work.layout.device, repeats)


def _tensor_memory(work: Work, batches: Batches) -> dict[str, Any] | None:
    """One more step, after the timed ones (the optimizer state exists by then), with every
    tensor followed (:mod:`alexnet_mp.stepmemory`): exact, so measured once per arm."""
    x, y = batches.next()
    work.optimizer.zero_grad(set_to_none=True)

    def step() -> None:
        loss = work.step(x, y)
        work.guard.check(loss, work.module)
        work.optimizer.step()

    return stepmemory.tensor_peak(step, batches.device, work.module, work.optimizer, x, y)


def _step_record(work: Work, times: dict[str, list], steps: int) -> dict[str, Any]:
    meter = work.meter
    return {**{f"{k}_steps": v for k, v in times.items()},
            "exchange_bytes_counted": meter.exchange_bytes // steps,
            "allreduce_bytes_counted": meter.allreduce_bytes // steps}


def _timed_steps(work: Work, batches: Batches, steps: int, warmup: int) -> dict[str, Any]:
    """``warmup`` untimed steps, then ``steps`` timed ones; per step: the whole step, forward
    with backward, the guard, the optimizer, time inside the exchanges, and each exchange's
    own duration (for :func:`_waits`)."""
    device = batches.device
    times: dict[str, list] = {k: [] for k in ("step_s", "fwd_bwd_s", "guard_s", "optimizer_s",
                                              "exchange_s", "calls", "guard_call")}
    for i in range(warmup + steps):
        _sync(device)
        if i == warmup:
            work.meter.reset()
        seconds, calls = work.meter.seconds, len(work.meter.calls)
        t0 = time.perf_counter()
        x, y = batches.next()
        work.optimizer.zero_grad(set_to_none=True)
        loss = work.step(x, y)
        _sync(device)
        t1 = time.perf_counter()
        work.guard.check(loss, work.module)
        t2 = time.perf_counter()
        work.optimizer.step()
        _sync(device)
        t3 = time.perf_counter()
        if i >= warmup:
            for k, v in (("step_s", t3 - t0), ("fwd_bwd_s", t1 - t0), ("guard_s", t2 - t1),
                         ("optimizer_s", t3 - t2), ("exchange_s", work.meter.seconds - seconds),
                         ("calls", work.meter.calls[calls:]), ("guard_call", t2 - t1)):
                times[k].append(v)
    return _step_record(work, times, steps)


def _train_steps(work: Work, cfg: Config, steps: int, warmup: int,
                 variant: Variant) -> dict[str, Any]:
    """The training loop itself (``engine.train_one_epoch``: loader, on-device transform,
    guard, the figures it reduces, optimizer) on this layout, timed between its steps."""
    on, device = work.layout, work.layout.device
    data = build_data(cfg.data, num_classes=cfg.model.num_classes,
                      in_channels=cfg.model.in_channels, seed=cfg.train.seed)
    loader = make_loader(data.train, batch_size=work.local_batch, shuffle=True,
                         seed=cfg.train.seed, num_workers=cfg.data.num_workers,
                         pin_memory=device.type == "cuda", replicas=on.data_shards,
                         replica=on.data_shard, bad_images=cfg.data.bad_images)
    transform = BatchTransform(cfg.data.image_size, data.mean, data.std,
                               variant.memory_format(cfg) is torch.channels_last).to(device)

    def reduce(t: torch.Tensor) -> torch.Tensor:
        if on.replicas > 1:
            dist.all_reduce(t, group=on.replica_group)
        return t

    times: dict[str, list] = {"step_s": [], "exchange_s": [], "calls": []}
    mark = {"t": 0.0, "seconds": 0.0, "calls": 0}

    def after_step(state: TrainState) -> None:
        _sync(device)
        now = time.perf_counter()
        if state.global_step == warmup:
            work.meter.reset()
        elif state.global_step > warmup:
            times["step_s"].append(now - mark["t"])
            times["exchange_s"].append(work.meter.seconds - mark["seconds"])
            times["calls"].append(work.meter.calls[mark["calls"]:])
        mark.update(t=now, seconds=work.meter.seconds, calls=len(work.meter.calls))

    state, total = TrainState(), warmup + steps
    mark["t"] = time.perf_counter()
    while state.global_step < total:
        set_epoch(loader, state.epoch)
        state.step = 0
        # As the main job runs it: rank 0 draws the progress bar (the only work one rank does
        # alone in a step; the metrics line every run.log_every steps is left out).
        train_one_epoch(work.runner, loader, work.optimizer, transform, state,
                        Precision(cfg.train.amp, device), max_steps=total,
                        log_every=10**9, show_bar=on.is_main and cfg.run.progress,
                        guard=work.guard, after_step=after_step, targets=on.loss_targets,
                        reduce=reduce)
        state.epoch += 1
    return _step_record(work, times, steps)


def _attribute(work: Work, batches: Batches, path: Path, variant: Variant,
               steps: int = 3) -> dict[str, Any] | None:
    """A few extra steps (not the timed ones) under torch.profiler: the operator table into
    ``path``, and the per-layer attribution (:mod:`alexnet_mp.attribution`) returned."""
    from torch.profiler import ProfilerActivity, profile

    device = batches.device
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    phase = attribution.phase
    calls: list[list[tuple[str, float]]] = []
    # Hooks inside a compiled graph are not ours to time: a compiled arm gets the table only.
    ranges = (attribution.LayerRanges(work.module) if "compile" not in variant.flags
              else contextlib.nullcontext())
    with ranges, profile(activities=activities) as prof:
        for _ in range(steps):
            x, y = batches.next()
            before = len(work.meter.calls)
            with phase("optimizer"):
                work.optimizer.zero_grad(set_to_none=True)
            with phase("forward"):
                loss = work.forward(x, y)
                _sync(device)
            with phase("backward"):
                loss.backward()
                _sync(device)
            with phase("guard"):
                work.guard.check(loss, work.module)
            with phase("optimizer"):
                work.optimizer.step()
                _sync(device)
            calls.append(work.meter.calls[before:])
    path.parent.mkdir(parents=True, exist_ok=True)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    path.write_text(f"{steps} steps\n" + prof.key_averages().table(sort_by=key, row_limit=20))
    if not isinstance(ranges, attribution.LayerRanges):
        return None
    return {"lines": attribution.attribute(prof.events(), steps, device.type == "cuda"),
            "flops": ranges.flops, "calls": calls, "steps": steps}


def _exposed_allreduce(work: Work, batches: Batches, warmup: int, steps: int,
                       with_sync: float) -> float:
    """The gradient all-reduce overlaps with backward (torch's replicate buckets it, as DDP
    does), so no meter can time it alone; what it costs is the time turning it off saves.
    Layouts without one (a single device, one replica of columns) cost nothing here."""
    model = work.module
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


def _groups(name: str, records: list[dict]) -> list[list[int]]:
    """Which active ranks exchange with which: a replica's columns, or (hybrid) all."""
    ranks = list(range(len(records)))
    columns = records[0]["columns"]
    if name == "hybrid" or columns <= 1:
        return [ranks]
    return [ranks[i:i + columns] for i in range(0, len(ranks), columns)]


def _waits(calls: list[list[list]], groups: list[list[int]]) -> list[list[dict[str, float]]]:
    """Per rank and step, seconds spent waiting for a slower peer inside the exchanges, by phase.

    Every rank of a group runs the same exchanges in the same order, so the k-th exchange of a
    step is one collective on all of them; the rank that arrived last spent the least in it
    (the exchange's own cost), and the time each other rank spent beyond that was waiting.
    Ranks whose exchange counts differ (none should) get no figure.
    """
    steps = min(len(c) for c in calls)
    out = [[{"forward": 0.0, "backward": 0.0} for _ in range(steps)] for _ in calls]
    for group in groups:
        for i in range(steps):
            per = [calls[r][i] for r in group]
            if len({len(p) for p in per}) != 1:
                continue
            for k in range(len(per[0])):
                fastest = min(p[k][1] for p in per)
                for r, p in zip(group, per):
                    phase, seconds = p[k][:2]
                    out[r][i][phase] = out[r][i].get(phase, 0.0) + seconds - fastest
    return out


def _waits_by_call(calls: list[list[list]], groups: list[list[int]]) -> list[list[list]]:
    """Per rank: for the k-th exchange of a step, its phase and the median over steps of this
    rank's wait in it (which exchange the waiting happens in, not only how much)."""
    out = []
    for group in groups:
        steps = min(len(calls[r]) for r in group)
        counts = {len(calls[r][i]) for r in group for i in range(steps)}
        if len(counts) != 1:
            out.extend([] for _ in group)
            continue
        for r in group:
            row = []
            for k in range(next(iter(counts))):
                waits = [calls[r][i][k][1] - min(calls[q][i][k][1] for q in group)
                         for i in range(steps)]
                row.append([calls[r][0][k][0], statistics.median(waits)])
            out.append(row)
    return out


def _guard_waits(records: list[dict]) -> list[float]:
    """The guard is one all-reduce over the whole world: the same reading as :func:`_waits`."""
    per = [r.get("guard_call_steps") or [] for r in records]
    steps = min(len(p) for p in per)
    if not steps or len(per) < 2:
        return [0.0] * len(per)
    fastest = [min(p[i] for p in per) for i in range(steps)]
    return [statistics.median(p[i] - fastest[i] for i in range(steps)) for p in per]


def _attribution(name: str, records: list[dict]) -> dict[str, Any] | None:
    """Every rank's per-layer seconds, with each rank's waiting inside the exchanges moved from
    the exchange lines to a line of its own."""
    tables = [r.get("attribution") for r in records]
    if any(t is None for t in tables):
        return None
    waits = _waits([t["calls"] for t in tables], _groups(name, records))
    ranks = []
    for t, w in zip(tables, waits):
        lines = {k: dict(v) for k, v in t["lines"].items()}
        wait = {phase: sum(step[phase] for step in w) / max(len(w), 1)
                for phase in ("forward", "backward")}
        for phase, line in (("forward", attribution.EXCHANGE_FWD),
                            ("backward", attribution.EXCHANGE_BWD)):
            if line in lines and wait[phase] > 0:
                moved = min(wait[phase], lines[line].get(phase, 0.0))
                lines[line][phase] -= moved
                lines.setdefault(attribution.IMBALANCE, {})[phase] = moved
        ranks.append({k: lines[k] for k in attribution.ORDER if k in lines})
    return {"ranks": ranks, "flops": [t["flops"] for t in tables],
            "probe_flops_per_rank": [r["probe_flops"] for r in records],
            "steps": tables[0]["steps"]}


def _merge(name: str, mode: str, cfg: Config, records: list[dict], world: int) -> dict:
    """One round of one arm: every rank's record into one (a step ends when its slowest rank
    ends), with per-step lists kept for :func:`merge_rounds`."""
    out = {k: records[0][k] for k in ("layout", "variant", "data", "mesh", "columns",
                                       "replicas", "load_average")}
    errors = [r["error"] for r in records if "error" in r]
    if errors:
        return {**out, "error": errors[0]}
    active = [r for r in records if r.get("step_s_steps")]
    n = min(len(r["step_s_steps"]) for r in active)
    for key in ("step_s", "exchange_s", "fwd_bwd_s", "guard_s", "optimizer_s"):
        if f"{key}_steps" in active[0]:
            out[f"{key}_steps"] = [max(r[f"{key}_steps"][i] for r in active) for i in range(n)]
    if all("exchange_floor_s_steps" in r for r in active):
        floors = [r["exchange_floor_s_steps"] for r in active]
        out["exchange_floor_s_steps"] = [max(f[i] for f in floors)
                                         for i in range(min(map(len, floors)))]
    out["ranks"] = len(active)
    # Per rank: a rank that waits long in the exchanges is waiting for a slower peer.
    out["step_s_per_rank"] = [statistics.median(r["step_s_steps"]) for r in active]
    out["exchange_s_per_rank"] = [statistics.median(r["exchange_s_steps"]) for r in active]
    out["allreduce_s_per_rank"] = [r["allreduce_s"] for r in active]
    out["allreduce_s"] = max(out["allreduce_s_per_rank"])
    calls = [r["calls_steps"] for r in active]
    waits = _waits(calls, _groups(name, active))
    out["exchange_wait_s_per_rank"] = [
        statistics.median(s["forward"] + s["backward"] for s in w) if w else 0.0 for w in waits]
    out["exchange_wait_by_call_s_per_rank"] = _waits_by_call(calls, _groups(name, active))
    # What the exchanges of a step are: phase, collective, elements this rank put in.
    out["exchange_calls"] = [[c[0], *c[2:]] for c in (calls[0][-1] if calls[0] else [])]
    if "guard_s_steps" in active[0]:
        out["guard_s_per_rank"] = [statistics.median(r["guard_s_steps"]) for r in active]
        out["guard_wait_s_per_rank"] = _guard_waits(active)
    ranks = range(len(active)) if name not in ONE_DEVICE else [0]
    analytic = [analytic_traffic(name, cfg, world, rank) for rank in ranks]
    for kind in ("exchange", "allreduce"):
        out[f"{kind}_bytes_counted_per_rank"] = [r[f"{kind}_bytes_counted"] for r in active]
        out[f"{kind}_bytes_analytic_per_rank"] = [getattr(t, kind) for t in analytic]
        out[f"{kind}_bytes_counted"] = out[f"{kind}_bytes_counted_per_rank"][0]
        out[f"{kind}_bytes_analytic"] = getattr(analytic[0], kind)
    out["bytes_counted"] = out["exchange_bytes_counted"] + out["allreduce_bytes_counted"]
    out["bytes_analytic"] = analytic[0].total
    out["peak_memory_bytes_per_rank"] = [r["peak_memory_bytes"] for r in active]
    out["peak_memory_bytes"] = max(out["peak_memory_bytes_per_rank"])
    out["peak_rss_bytes"] = max(r["peak_rss_bytes"] for r in active)
    if all("peak_tensor_bytes" in r for r in active):
        tensor = [r["peak_tensor_bytes"] for r in active]
        out["peak_tensor_bytes_per_rank"] = tensor
        out["peak_tensor_bytes"] = max(tensor)
        out["peak_tensor_bytes_by_kind"] = active[tensor.index(max(tensor))][
            "peak_tensor_bytes_by_kind"]
    out["probe_flops_per_rank"] = [r["probe_flops"] for r in active]
    out["probe_flops"] = sum(out["probe_flops_per_rank"])
    if mode == "synthetic" and all(r.get("flops_rank") for r in active):
        out["flops_step"] = sum(r["flops_rank"] for r in active)
    table = _attribution(name, active)
    if table is not None:
        out["attribution"] = table
    return out


def _median_per_rank(rounds: list[dict], key: str) -> list[float] | None:
    lists = [r[key] for r in rounds if key in r]
    if not lists:
        return None
    return [statistics.median(v[i] for v in lists) for i in range(len(lists[0]))]


def merge_rounds(rounds: list[dict], batch: int) -> dict:
    """An arm's rounds into its result: medians over every step of every round, per-round
    lists for the intervals (``*_rounds``), and each figure's 95 % interval."""
    ok = [r for r in rounds if "error" not in r]
    if not ok:
        return dict(rounds[0])
    out = {k: v for k, v in ok[0].items() if not k.endswith("_steps")}
    for key in ("step_s", "exchange_s", "fwd_bwd_s", "guard_s", "optimizer_s",
                "exchange_floor_s"):
        if all(f"{key}_steps" in r for r in ok):
            out[f"{key}_rounds"] = [r[f"{key}_steps"] for r in ok]
    out["images_per_s_rounds"] = [[batch / t for t in r["step_s_steps"]] for r in ok]
    out["peak_memory_bytes_rounds"] = [r["peak_memory_bytes"] for r in ok]
    out["load_average_rounds"] = [r.get("load_average") for r in ok]
    out["probe_flops_rounds"] = [r["probe_flops"] for r in ok]
    out["rounds"], out["steps_per_round"] = len(ok), len(ok[0]["step_s_steps"])
    if len(ok) < len(rounds):
        out["failed_rounds"] = len(rounds) - len(ok)
    for key in ("step_s_per_rank", "exchange_s_per_rank", "exchange_wait_s_per_rank",
                "guard_s_per_rank", "guard_wait_s_per_rank", "peak_memory_bytes_per_rank",
                "probe_flops_per_rank"):
        merged = _median_per_rank(ok, key)
        if merged is not None:
            out[key] = merged
    pooled = {k[:-len("_rounds")]: [v for r in out[k] for v in r]
              for k in list(out) if k.endswith("_rounds") and isinstance(out[k][0], list)}
    for key, values in pooled.items():
        out[key] = statistics.median(values)
    out["step_s_min"], out["step_s_max"] = min(pooled["step_s"]), max(pooled["step_s"])
    out["images_per_s_min"] = min(pooled["images_per_s"])
    out["images_per_s_max"] = max(pooled["images_per_s"])
    out["peak_memory_bytes"] = statistics.median(out["peak_memory_bytes_rounds"])
    out["probe_flops"] = statistics.median(out["probe_flops_rounds"])
    busy = out.get("fwd_bwd_s", out["step_s"])
    out["compute_s"] = max(0.0, busy - out["exchange_s"] - out["allreduce_s"])
    out["exchange_fraction"] = out["exchange_s"] / out["step_s"]
    out["allreduce_fraction"] = out["allreduce_s"] / out["step_s"]
    out["images_per_s_ci"] = list(benchstats.median_interval(out["images_per_s_rounds"])[1:])
    out["step_s_ci"] = list(benchstats.median_interval(out["step_s_rounds"])[1:])
    out["exchange_fraction_ci"] = list(benchstats.share_interval(
        out["exchange_s_rounds"], out["step_s_rounds"])[1:])
    if "exchange_floor_s_rounds" in out:
        share = benchstats.ratio_interval(out["exchange_floor_s_rounds"], out["step_s_rounds"])
        out["exchange_floor_fraction"], out["exchange_floor_fraction_ci"] = share[0], [*share[1:]]
    if out.get("flops_step"):
        out["achieved_flops"] = out["flops_step"] / out["step_s"]
        out["flops_fraction"] = out["achieved_flops"] / out["probe_flops"]
    return out


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def _label(r: dict) -> str:
    variant = r.get("variant", "base")
    return r["layout"] if variant == "base" else f"{r['layout']} [{variant}]"


def markdown(results: list[dict]) -> str:
    """One run's table: rank 0's traffic, the largest peak memory of any rank; images/s is the
    median over every timed step of every round, with its 95 % interval."""
    head = ("| layout | mesh | data | ranks | images/s | 95 % interval | min–max | step ms | "
            "compute | exchange | of it waiting (max rank) | exchange floor | all-reduce | guard | "
            "optimizer | "
            "exchange MiB/step (analytic) | all-reduce MiB/step (analytic) | peak tensors MiB | "
            "peak process MiB | GFLOP/step | of matmul probe |")
    rows = [head, "|" + " --- |" * 21]
    for r in results:
        if "error" in r:
            rows.append(f"| {_label(r)} | {r['mesh']} | {r['data']} | – | failed: "
                        f"{r['error'][:80]} |" + " – |" * 16)
            continue
        gflop = f"{r['flops_step'] / 1e9:.1f}" if "flops_step" in r else "–"
        frac = f"{100 * r['flops_fraction']:.0f} %" if "flops_fraction" in r else "–"
        low, high = r["images_per_s_ci"]
        wait = max(r.get("exchange_wait_s_per_rank") or [0.0])
        guard = f"{1e3 * r['guard_s']:.0f}" if "guard_s" in r else "–"
        opt = f"{1e3 * r['optimizer_s']:.0f}" if "optimizer_s" in r else "–"
        tensors = f"{r['peak_tensor_bytes'] / 2**20:.0f}" if "peak_tensor_bytes" in r else "–"
        floor = (f"{1e3 * r['exchange_floor_s']:.0f} ({100 * r['exchange_floor_fraction']:.1f} %)"
                 if "exchange_floor_fraction" in r else "–")
        rows.append(
            f"| {_label(r)} | {r['mesh']} | {r['data']} | {r['ranks']} | "
            f"{r['images_per_s']:.1f} | {low:.1f}–{high:.1f} | "
            f"{r['images_per_s_min']:.1f}–{r['images_per_s_max']:.1f} | "
            f"{1e3 * r['step_s']:.0f} | {1e3 * r['compute_s']:.0f} | "
            f"{1e3 * r['exchange_s']:.0f} ({100 * r['exchange_fraction']:.1f} %) | "
            f"{1e3 * wait:.0f} | {floor} | "
            f"{1e3 * r['allreduce_s']:.0f} ({100 * r['allreduce_fraction']:.1f} %) | "
            f"{guard} | {opt} | {_mib(r['exchange_bytes_counted'])} "
            f"({_mib(r['exchange_bytes_analytic'])}) | {_mib(r['allreduce_bytes_counted'])} "
            f"({_mib(r['allreduce_bytes_analytic'])}) | {tensors} | "
            f"{r['peak_memory_bytes'] / 2**20:.0f} | {gflop} | {frac} |")
    return "\n".join(rows)


def memory_markdown(results: list[dict]) -> str:
    """Where the memory goes: the tensors alive at the step's peak, by kind (MiB, the rank
    with the largest peak)."""
    kinds = list(dict.fromkeys(stepmemory.KINDS.values()))
    rows = ["| layout | data | " + " | ".join(kinds) + " | total |",
            "|" + " --- |" * (len(kinds) + 3)]
    for r in results:
        parts = r.get("peak_tensor_bytes_by_kind")
        if not parts:
            continue
        cells = " | ".join(f"{parts.get(k, 0) / 2**20:.1f}" for k in kinds)
        rows.append(f"| {_label(r)} | {r['data']} | {cells} | "
                    f"{r['peak_tensor_bytes'] / 2**20:.1f} |")
    return "\n".join(rows) if len(rows) > 2 else ""


def attribution_markdown(results: list[dict]) -> str:
    """The per-layer table of every profiled arm."""
    parts = []
    for r in results:
        if r.get("attribution"):
            parts.append(f"### {_label(r)} ({r['mesh']}, {r['data']})\n\n"
                         + attribution.markdown(r["attribution"]))
    return "\n\n".join(parts)


def report_markdown(results: list[dict], verdicts: list[dict], comparisons: list[dict],
                    meta: dict) -> str:
    """bench.md: the table, the verdicts, the variants against base, the per-layer tables."""
    parts = [markdown(results)]
    rounds = meta.get("repeat", 1)
    parts.append(f"## Targets\n\n{rounds} interleaved round(s) of {meta['steps']} timed step(s) "
                 "per arm; 95 % intervals by a bootstrap over rounds and over steps within a "
                 "round (ratios resample the same rounds for both sides). met: the interval "
                 "lies on the good side of the threshold; missed: on the bad side; undecided: "
                 "it straddles the threshold.\n\n" + benchstats.verdict_table(verdicts))
    memory = memory_markdown(results)
    if memory:
        parts.append("## Where the memory goes (tensors alive at the step's peak, MiB)\n\n"
                     "Every tensor storage followed through one step (torch's MemTracker); "
                     "the process's own peak (resident memory on the CPU) is in the first "
                     "table.\n\n" + memory)
    if comparisons:
        parts.append("## Variants against base (same run, same rounds)\n\n"
                     + benchstats.comparison_table(comparisons))
    table = attribution_markdown(results)
    if table:
        parts.append("## Where the time goes (profiled steps after the timed ones)\n\n"
                     + attribution.EXPLAIN + "\n\n" + table)
    return "\n\n".join(parts)


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
    """images/s per arm and data mode, with the 95 % interval as the error bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [r for r in results if "error" not in r]
    modes = sorted({r["data"] for r in results}, reverse=True)
    names = list(dict.fromkeys(_label(r) for r in results))
    fig, ax = plt.subplots(figsize=(max(7, 1.1 * len(names)), 3.5))
    width = 0.8 / max(len(modes), 1)
    for i, mode in enumerate(modes):
        rs = {_label(r): r for r in results if r["data"] == mode}
        xs = [k + i * width for k in range(len(names))]
        ys = [rs[n]["images_per_s"] if n in rs else 0 for n in names]
        lo = [rs[n]["images_per_s"] - rs[n]["images_per_s_ci"][0] if n in rs else 0
              for n in names]
        hi = [rs[n]["images_per_s_ci"][1] - rs[n]["images_per_s"] if n in rs else 0
              for n in names]
        ax.bar(xs, ys, width, yerr=[lo, hi], label=mode, capsize=3)
    ax.set_xticks([k + width * (len(modes) - 1) / 2 for k in range(len(names))], names,
                  rotation=20, ha="right")
    ax.set_ylabel("images/s (95 % interval)")
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
              profile: bool = False, repeat: int = 1,
              variants: list[str] | None = None) -> list[dict]:
    """Every layout × variant × data mode (an *arm*) on this world's meshes, in ``repeat``
    interleaved rounds; rank 0 writes bench.json, bench.md and bench.png into ``out``, and with
    ``profile`` every rank writes a torch.profiler table per arm and the per-layer attribution
    goes into the report. ``layout`` is the process's own (its default group, device, threads).
    """
    world = layout.world_size
    check_layouts(layouts, world)
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise UserError(f"--data takes {', '.join(MODES)}; got {','.join(modes) or 'nothing'}")
    chosen = [Variant.parse(v) for v in (variants or ["base"])]
    meshes = {}
    for name in layouts:
        # Every rank creates every group of the mesh, in the same order (torch requires it),
        # once: the rounds reuse them.
        meshes[name] = layout if name in ONE_DEVICE or not layout.distributed else mesh_layout(
            bench_dims(name, world), device=layout.device, timeout_s=cfg.run.timeout_s,
            local_rank=layout.local_rank, local_world_size=layout.local_world_size)
    arms = [(name, variant, mode) for name in layouts for variant in chosen for mode in modes]
    rounds: dict[tuple, list[dict]] = {(n, v.name, m): [] for n, v, m in arms}
    cache: dict = {}
    for i in range(repeat):
        for name, variant, mode in arms:
            result = run_layout(name, mode, cfg, meshes[name], steps, warmup,
                                out if profile and i == 0 else None, variant, first=i == 0,
                                cache=cache)
            if result is None:
                continue
            rounds[(name, variant.name, mode)].append(result)
            arm = f"{name}{'' if variant.name == 'base' else ' [' + variant.name + ']'}"
            if "error" in result:
                say(f"round {i + 1}/{repeat} {arm:>24} {mode:>9}: failed ({result['error']})")
                continue
            step = statistics.median(result["step_s_steps"])
            exchange = statistics.median(result["exchange_s_steps"])
            say(f"round {i + 1}/{repeat} {arm:>24} {mode:>9} ({result['mesh']}): "
                f"{cfg.train.batch_size / step:7.1f} images/s, exchange "
                f"{100 * exchange / step:4.1f} % of the step")
    if layout.rank != 0:
        return []
    results = [merge_rounds(rs, cfg.train.batch_size) for rs in rounds.values() if rs]
    verdicts = benchstats.verdicts(results, cfg.data.image_size, cfg.train.batch_size)
    comparisons = benchstats.comparisons(results)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"device": str(layout.device), "world_size": world,
            "local_world_size": layout.local_world_size, "cpu_count": os.cpu_count(),
            "threads_per_rank": torch.get_num_threads(),
            "batch_size": cfg.train.batch_size, "image_size": cfg.data.image_size,
            "width": cfg.model.width, "num_classes": cfg.model.num_classes,
            "in_channels": cfg.model.in_channels, "data": cfg.data.name,
            "steps": steps, "warmup": warmup, "repeat": repeat,
            "variants": [v.name for v in chosen], "modes": modes,
            "bootstrap": {"resamples": benchstats.RESAMPLES, "level": benchstats.LEVEL},
            "load_average_end": _load_average(),
            "torch": torch.__version__}
    if layout.device.type == "cuda":
        meta["device_name"] = torch.cuda.get_device_name(layout.device)
    (out / "bench.json").write_text(json.dumps(
        {"meta": meta, "results": results, "verdicts": verdicts, "comparisons": comparisons},
        indent=1))
    report = report_markdown(results, verdicts, comparisons, meta)
    (out / "bench.md").write_text(report + "\n")
    bar_chart(results, out / "bench.png")
    say(report)
    return results

