"""The layout comparison: the same global batch, image size and cores for every layout.

Layouts (DESIGN §5): ``d2l`` and ``grouped`` on one device (rank 0, with every core, while the
other rank waits), ``split`` (one column per rank; ``split_overlap`` with async exchanges), ``ddp``
(the grouped model data-parallel, half the batch each) and ``hybrid`` (data-parallel convolutions,
model-parallel FC layers). Every rank runs this in lockstep; rank 0 reports.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import json
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from alexnet_mp.config import Config
from alexnet_mp.data import BatchTransform, build_data, make_loader, set_epoch
from alexnet_mp.engine import sync_device as _sync
from alexnet_mp.errors import UserError
from alexnet_mp.models import arch_of, materialize
from alexnet_mp.models.columns import Arch, ColumnAlexNet, sides
from alexnet_mp.parallel.build import build_model
from alexnet_mp.parallel.exchange import Meter, gather_labels
from alexnet_mp.parallel.hybrid import HybridAlexNet, sum_trunk_grads
from alexnet_mp.parallel.layout import Layout

LAYOUTS = ("d2l", "grouped", "split", "split_overlap", "ddp", "hybrid")
ONE_DEVICE = ("d2l", "grouped")
FLOAT_BYTES = 4


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


@dataclass
class Work:
    """One layout's model and step, as the timing loop sees it."""

    model: nn.Module
    step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # forward + backward → loss
    optimizer: torch.optim.Optimizer
    meter: Meter
    local_batch: int
    active: bool  # False on the rank that waits during one-device layouts


def _sgd(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    t = cfg.train
    return torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum,
                           weight_decay=t.weight_decay)


def _arch(cfg: Config) -> Arch:
    return arch_of(cfg.model, cfg.data.image_size)


def _model(cfg: Config, layout: Layout, name: str, meter: Meter | None = None,
           overlap: bool = False) -> nn.Module:
    """The training path's own model builder; ``layout`` decides grouped form or column."""
    model_cfg = dataclasses.replace(cfg.model, name=name, overlap=overlap)
    return build_model(model_cfg, cfg.data.image_size, layout, cfg.train.seed, meter)


def build_work(name: str, cfg: Config, layout: Layout) -> Work:
    meter = Meter(layout.device)
    batch = cfg.train.batch_size
    rank, world = layout.rank, layout.world_size
    group = dist.group.WORLD

    def plain_step(model: nn.Module) -> Callable:
        def step(x, y):
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss
        return step

    if name in ONE_DEVICE:
        active = rank == 0
        if not active:
            return Work(nn.Identity(), lambda x, y: None, None, meter, batch, False)
        one = Layout(device=layout.device)
        model = _model(cfg, one, "alexnet_d2l" if name == "d2l" else "alexnet_grouped")
        return Work(model, plain_step(model), _sgd(model, cfg), meter, batch, True)
    if name in ("split", "split_overlap"):
        model = _model(cfg, layout, "alexnet_columns", meter, overlap=name == "split_overlap")
        return Work(model, plain_step(model), _sgd(model, cfg), meter, batch, True)
    if batch % world:
        raise UserError(f"train.batch_size={batch} must divide by {world} ranks for {name}")
    if name == "ddp":
        model = _model(cfg, Layout(device=layout.device), "alexnet_grouped")
        ddp = DistributedDataParallel(model, device_ids=[layout.device.index]
                                      if layout.device.type == "cuda" else None)

        def counting_hook(state, bucket):
            buf = bucket.buffer()
            meter.bytes += 2 * (world - 1) * buf.numel() * buf.element_size() // world
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

            return allreduce_hook(state, bucket)

        ddp.register_comm_hook(group, counting_hook)
        return Work(ddp, plain_step(ddp), _sgd(model, cfg), meter, batch // world, True)
    if name == "hybrid":
        arch = _arch(cfg)
        model = materialize(lambda g: HybridAlexNet(arch, rank, world, group, g, meter),
                            cfg.model, cfg.data.image_size, layout.device, cfg.train.seed)
        sum_trunk_grads(model, group=group, meter=meter)  # during backward, as DDP does

        def hybrid_step(x, y):
            # Every rank gets the whole batch's logits, so the loss needs the whole batch's labels.
            loss = F.cross_entropy(model(x), gather_labels(y, group))
            loss.backward()
            return loss

        return Work(model, hybrid_step, _sgd(model, cfg), meter, batch // world, True)
    raise UserError(f"unknown bench layout '{name}'; choose from {', '.join(LAYOUTS)}")


def analytic_bytes(name: str, cfg: Config, world: int) -> int:
    """Bytes each rank receives per step, from the architecture alone."""
    arch = _arch(cfg)
    c1, c2, c3, c4, c5, f = arch.per_column
    _, _, s2, s3 = sides(cfg.data.image_size)
    n = cfg.train.batch_size
    others = world - 1
    classes = max(arch.class_split)
    trunk_features = world * c5 * s3 * s3
    if name in ONE_DEVICE:
        return 0
    if name in ("split", "split_overlap"):
        # X1–X4 forward (all-gather) and backward (reduce-scatter), X5 forward only.
        per_exchange = [c2 * s2 * s2, c5 * s3 * s3, f, f]
        return FLOAT_BYTES * n * others * (2 * sum(per_exchange) + classes)
    with torch.device("meta"):
        params = {k: p.numel() for k, p in ColumnAlexNet(arch).named_parameters()}
    ring = 2 * others / world
    if name == "ddp":
        return int(FLOAT_BYTES * ring * sum(params.values()))
    if name == "hybrid":
        trunk = sum(v for k, v in params.items() if not k.startswith("fc"))
        batch_gather = 2 * (n // world) * others * trunk_features
        fc = n * others * (2 * (f + f) + classes)
        return FLOAT_BYTES * (batch_gather + fc) + int(FLOAT_BYTES * ring * trunk)
    raise ValueError(name)


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
    """Synthetic tensors already on the device, or the real loader and on-device transform."""

    def __init__(self, mode: str, cfg: Config, layout: Layout, local_batch: int,
                 replicas: int, replica: int) -> None:
        self.mode, self.device = mode, layout.device
        size, c = cfg.data.image_size, cfg.model.in_channels
        g = torch.Generator().manual_seed(cfg.train.seed + replica)
        if mode == "synthetic":
            self.x = torch.randn(local_batch, c, size, size, generator=g).to(layout.device)
            self.y = torch.randint(0, cfg.model.num_classes, (local_batch,), generator=g).to(
                layout.device)
            return
        data = build_data(cfg.data, num_classes=cfg.model.num_classes, in_channels=c,
                          seed=cfg.train.seed)
        self.loader = make_loader(data.train, batch_size=local_batch, shuffle=True,
                                  seed=cfg.train.seed, num_workers=cfg.data.num_workers,
                                  pin_memory=layout.device.type == "cuda", replicas=replicas,
                                  replica=replica)
        self.transform = BatchTransform(size, data.mean, data.std).to(layout.device)
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


def run_layout(name: str, mode: str, cfg: Config, layout: Layout, steps: int,
               warmup: int, profile_dir: Path | None = None) -> dict[str, Any] | None:
    """Time one layout on one data mode; every rank calls it, rank 0 gets the merged result."""
    one_device = name in ONE_DEVICE
    threads = torch.get_num_threads()
    if one_device and layout.device.type == "cpu" and layout.rank == 0:
        torch.set_num_threads(threads * layout.world_size)  # the same cores as the pair uses
    try:
        return _run_layout(name, mode, cfg, layout, steps, warmup, profile_dir)
    finally:
        torch.set_num_threads(threads)
        if layout.device.type == "cuda":
            torch.cuda.empty_cache()


def _run_layout(name, mode, cfg, layout, steps, warmup, profile_dir) -> dict[str, Any] | None:
    device, rank, world = layout.device, layout.rank, layout.world_size
    return_freed_memory_to_the_os()
    dist.barrier()
    with PeakRSS() as rss:
        baseline = rss.peak
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        work = build_work(name, cfg, layout)
        record: dict[str, Any] = {"layout": name, "data": mode}
        if work.active:
            replicas = world if name in ("ddp", "hybrid") else 1
            replica = rank if replicas > 1 else 0
            batches = Batches(mode, cfg, layout, work.local_batch, replicas, replica)
            x, y = batches.next()
            flops = _count_flops(work, x, y) if mode == "synthetic" else None
            times, fwd_bwd, opt_times, exch = [], [], [], []
            for i in range(warmup + steps):
                _sync(device)
                if i == warmup:
                    work.meter.seconds, work.meter.bytes = 0.0, 0
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
            moved = work.meter.bytes // steps
            memory = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                      else rss.peak - baseline)
            if profile_dir is not None and mode == "synthetic":  # after the measurements
                _profile(work, batches, profile_dir / f"profile-{name}-rank{rank}.txt")
            exchange_s = statistics.median(exch)
            if name == "ddp":
                exchange_s = _ddp_exposed_comm(work, batches, warmup, statistics.median(fwd_bwd))
            record.update({
                "step_s": statistics.median(times), "step_s_min": min(times),
                "step_s_max": max(times),
                "compute_s": statistics.median(fwd_bwd) - exchange_s,
                "exchange_s": exchange_s, "optimizer_s": statistics.median(opt_times),
                "bytes_counted": moved, "flops_rank": flops, "peak_memory_bytes": memory,
            })
            batch = cfg.train.batch_size
            ips = [batch / t for t in times]
            record.update({"images_per_s": statistics.median(ips), "images_per_s_min": min(ips),
                           "images_per_s_max": max(ips)})
        del work
    record.setdefault("peak_memory_bytes", 0)  # the waiting rank of a one-device layout
    record["peak_rss_bytes"] = rss.peak
    dist.barrier()
    probe = matmul_probe(device) if (record.get("step_s") is not None) else 0.0
    records: list[dict] = [None] * world  # type: ignore[list-item]
    dist.all_gather_object(records, {**record, "probe_flops": probe})
    if rank != 0:
        return None
    return _merge(name, mode, cfg, records, world)


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


def _ddp_exposed_comm(work: Work, batches: Batches, warmup: int, with_comm: float) -> float:
    """DDP overlaps its all-reduce with backward; what it costs is the time no_sync() saves."""
    times = []
    for i in range(warmup + 3):
        x, y = batches.next()
        work.optimizer.zero_grad(set_to_none=True)
        _sync(batches.device)
        t0 = time.perf_counter()
        with work.model.no_sync():
            work.step(x, y)
        _sync(batches.device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return max(0.0, with_comm - statistics.median(times))


def _merge(name: str, mode: str, cfg: Config, records: list[dict], world: int) -> dict:
    active = [r for r in records if r.get("step_s") is not None]
    out = dict(active[0])
    # A step ends when its slowest rank ends; bytes and memory are per rank.
    for key in ("step_s", "step_s_max", "compute_s", "exchange_s", "optimizer_s"):
        out[key] = max(r[key] for r in active)
    out["step_s_min"] = max(r["step_s_min"] for r in active)
    out["ranks"] = len(active)
    # Per rank: a rank that waits long in the exchanges is waiting for a slower peer.
    out["step_s_per_rank"] = [r["step_s"] for r in active]
    out["exchange_s_per_rank"] = [r["exchange_s"] for r in active]
    out["bytes_analytic"] = analytic_bytes(name, cfg, world)
    out["peak_memory_bytes"] = max(r["peak_memory_bytes"] for r in active)
    out["peak_rss_bytes"] = max(r["peak_rss_bytes"] for r in active)
    out["probe_flops"] = sum(r["probe_flops"] for r in active)
    if mode == "synthetic":
        out["flops_step"] = sum(r["flops_rank"] for r in active)
        out["achieved_flops"] = out["flops_step"] / out["step_s"]
        out["flops_fraction"] = out["achieved_flops"] / out["probe_flops"]
    out["exchange_fraction"] = out["exchange_s"] / out["step_s"]
    out.pop("flops_rank", None)
    return out


def markdown(results: list[dict]) -> str:
    head = ("| layout | data | ranks | images/s (min–max) | step ms | compute | exchange | "
            "optimizer | exchange bytes/step (analytic) | peak memory MiB | GFLOP/step | "
            "of matmul probe |")
    rows = [head, "|" + " --- |" * 12]
    for r in results:
        gflop = f"{r['flops_step'] / 1e9:.1f}" if "flops_step" in r else "–"
        frac = f"{100 * r['flops_fraction']:.0f} %" if "flops_fraction" in r else "–"
        rows.append(
            f"| {r['layout']} | {r['data']} | {r['ranks']} | {r['images_per_s']:.1f} "
            f"({r['images_per_s_min']:.1f}–{r['images_per_s_max']:.1f}) | "
            f"{1e3 * r['step_s']:.0f} | {1e3 * r['compute_s']:.0f} | "
            f"{1e3 * r['exchange_s']:.0f} ({100 * r['exchange_fraction']:.1f} %) | "
            f"{1e3 * r['optimizer_s']:.0f} | {r['bytes_counted'] / 2**20:.2f} MiB "
            f"({r['bytes_analytic'] / 2**20:.2f}) | {r['peak_memory_bytes'] / 2**20:.0f} | "
            f"{gflop} | {frac} |")
    return "\n".join(rows)


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


def run_bench(cfg: Config, layout: Layout, out: Path, layouts: list[str], modes: list[str],
              steps: int, warmup: int, say: Callable[[str], None] = print,
              profile: bool = False) -> list[dict]:
    """Every layout × data mode; rank 0 writes bench.json, bench.md and bench.png into ``out``,
    and with ``profile`` every rank writes a torch.profiler table per layout."""
    if layout.world_size != 2:
        raise UserError("the benchmark compares 2-rank layouts: run it with "
                        "torchrun --nproc_per_node=2 launch/bench.py")
    unknown = [n for n in layouts if n not in LAYOUTS]
    if unknown:
        raise UserError(f"unknown bench layout(s) {', '.join(unknown)}; choose from "
                        f"{', '.join(LAYOUTS)}")
    results = []
    for name in layouts:
        for mode in modes:
            result = run_layout(name, mode, cfg, layout, steps, warmup,
                                out if profile else None)
            if result is not None:
                results.append(result)
                say(f"{name:>14} {mode:>9}: {result['images_per_s']:7.1f} images/s, exchange "
                    f"{100 * result['exchange_fraction']:4.1f} % of the step")
    if layout.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        meta = {"device": str(layout.device), "threads_per_rank": torch.get_num_threads(),
                "batch_size": cfg.train.batch_size, "image_size": cfg.data.image_size,
                "width": cfg.model.width, "steps": steps, "warmup": warmup,
                "torch": torch.__version__}
        (out / "bench.json").write_text(json.dumps({"meta": meta, "results": results},
                                                   indent=1))
        table = markdown(results)
        (out / "bench.md").write_text(table + "\n")
        bar_chart(results, out / "bench.png")
        say(table)
    return results

