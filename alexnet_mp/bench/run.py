"""Running the comparison: every arm (layout x variant x data mode) on every rank, in
interleaved rounds; what one rank measures in an arm's round; and rank 0's bench.json,
bench.md and bench.png."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from alexnet_mp.bench import attribution, stats
from alexnet_mp.bench.counts import count_flops, matmul_probe
from alexnet_mp.bench.floor import replay
from alexnet_mp.bench.heap import default_heap
from alexnet_mp.bench.layouts import ONE_DEVICE, bench_dims, check_layouts, mesh_name
from alexnet_mp.bench.memory import PeakRSS, tensor_peak
from alexnet_mp.bench.merge import merge_ranks, merge_rounds
from alexnet_mp.bench.placement import node_threads, pinned
from alexnet_mp.bench.report import bar_chart, report_markdown
from alexnet_mp.bench.work import Batches, Variant, Work, build_work
from alexnet_mp.config import Config
from alexnet_mp.engine import LoopOptions, Precision, TrainState, train_one_epoch
from alexnet_mp.engine import sync_device as _sync
from alexnet_mp.errors import UserError
from alexnet_mp.host_memory import keep_freed_memory, release_freed_memory
from alexnet_mp.loader import set_epoch
from alexnet_mp.parallel.exchange import ColumnExchange
from alexnet_mp.parallel.layout import Layout, mesh_layout
from alexnet_mp.pipeline import pipeline

MODES = ("synthetic", "loader", "train")


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
        torch.set_num_threads(node_threads(layout))  # the same cores as the ranks use
    place = pinned(layout, whole_node=one) if "pinned" in variant.flags \
        else contextlib.nullcontext()
    # The heap's behaviour is the process's: the arm switches it, and back for the next arm.
    default = "malloc_default" in variant.flags and layout.device.type == "cpu"
    if default:
        default_heap()
    try:
        with place:
            return _run_layout(name, mode, cfg, layout, steps, warmup, profile_dir, variant,
                               first, cache if cache is not None else {})
    finally:
        torch.set_num_threads(threads)
        if default and cfg.run.keep_host_memory:
            keep_freed_memory()
        if layout.device.type == "cuda":
            torch.cuda.empty_cache()


def _run_layout(name: str, mode: str, cfg: Config, layout: Layout, steps: int, warmup: int,
                profile_dir: Path | None, variant: Variant, first: bool,
                cache: dict) -> dict[str, Any] | None:
    device, rank = layout.device, layout.rank
    dims = bench_dims(name, layout.world_size)
    gc.collect()  # the previous arm's model and batches, some held in cycles
    release_freed_memory()
    _barrier(layout)
    record: dict[str, Any] = {"layout": name, "variant": variant.name, "data": mode,
                              "mesh": mesh_name(name, dims), "columns": dims.columns,
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
    return merge_ranks(name, mode, cfg, records, layout.world_size)


def _measure(work: Work, mode: str, cfg: Config, steps: int, warmup: int,
             profile: Path | None, variant: Variant, first: bool, cache: dict) -> dict[str, Any]:
    if mode == "train":  # the all-reduce is not timed apart here: in compute
        return {**_train_steps(work, cfg, steps, warmup, variant), "allreduce_s": 0.0}
    batches = Batches(mode, cfg, work.layout, work.local_batch, variant.memory_format(cfg))
    if first and mode == "synthetic":
        x, y = batches.next()
        cache["flops"] = count_flops(work, x, y)
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
    """The last timed step's exchanges replayed alone (:mod:`alexnet_mp.bench.floor`), every
    round, so that the floor gets an interval from the same rounds as the step."""
    exchange = getattr(work.module, "exchange", None)
    if not isinstance(exchange, ColumnExchange) or not calls:
        return None
    return replay(calls, exchange.group, work.layout.device, repeats)


def _tensor_memory(work: Work, batches: Batches) -> dict[str, Any] | None:
    """One more step, after the timed ones (the optimizer state exists by then), with every
    tensor followed (:mod:`alexnet_mp.bench.memory`): exact, so measured once per arm."""
    x, y = batches.next()
    work.optimizer.zero_grad(set_to_none=True)

    def step() -> None:
        loss = work.step(x, y)
        work.apply(work.found_inf(loss))

    return tensor_peak(step, batches.device, work.module, work.optimizer, x, y)


def _step_record(work: Work, times: dict[str, list], steps: int) -> dict[str, Any]:
    return {**{f"{k}_steps": v for k, v in times.items()},
            "exchange_bytes_counted": work.meter.bytes // steps,
            "allreduce_bytes_counted": work.allreduce_bytes}


def _timed_steps(work: Work, batches: Batches, steps: int, warmup: int) -> dict[str, Any]:
    """``warmup`` untimed steps, then ``steps`` timed ones; per step: the whole step, forward
    with backward, the guard, the optimizer, time inside the exchanges, and each exchange's
    own duration (for :func:`~alexnet_mp.bench.merge.exchange_waits`)."""
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
        bad = work.found_inf(loss)
        t2 = time.perf_counter()
        work.apply(bad)
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
    feed = pipeline(cfg, on, "train", batch_size=work.local_batch * on.data_shards,
                    channels_last=variant.memory_format(cfg) is torch.channels_last)
    loader, transform = feed.loader, feed.transform
    times: dict[str, list] = {"step_s": [], "exchange_s": [], "calls": []}
    state, total = TrainState(), warmup + steps
    timed = _StepClock(loader, work, state, times, warmup, device)
    while state.global_step < total:
        set_epoch(loader, state.epoch)
        state.step = 0
        # As the main job runs it: rank 0 draws the progress bar (the only work one rank does
        # alone in a step), and the figures are read once, at the end (no log window inside).
        options = LoopOptions(max_steps=total, log_every=10**9,
                              show_bar=on.is_main and cfg.run.progress)
        train_one_epoch(work.runner, timed, work.optimizer, transform, state,
                        Precision(cfg.train.amp, device), options=options, sync=on.step_sync(),
                        guard=work.guard)
        timed.finish()
        state.epoch += 1
    return _step_record(work, times, steps)


class _StepClock:
    """``loader`` for the training loop, timing each step from outside: the time between two
    batches taken (the device synchronised first) is the step in between; an epoch's last step
    ends when the loop returns (:meth:`finish`)."""

    def __init__(self, loader: Any, work: Work, state: TrainState, times: dict[str, list],
                 warmup: int, device: torch.device) -> None:
        self.loader, self.work, self.state, self.times = loader, work, state, times
        self.warmup, self.device = warmup, device
        self.mark = {"t": time.perf_counter(), "seconds": 0.0, "calls": 0}
        self.between_epochs = False  # the next batch starts a step, it ends none

    def finish(self) -> None:
        self._tick()
        self.between_epochs = True

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            self._tick()
            yield batch

    def _tick(self) -> None:
        _sync(self.device)
        now, meter, done = time.perf_counter(), self.work.meter, self.state.global_step
        if self.between_epochs:
            self.between_epochs = False
        elif done == self.warmup:
            meter.reset()
        elif done > self.warmup:
            self.times["step_s"].append(now - self.mark["t"])
            self.times["exchange_s"].append(meter.seconds - self.mark["seconds"])
            self.times["calls"].append(meter.calls[self.mark["calls"]:])
        self.mark.update(t=now, seconds=meter.seconds, calls=len(meter.calls))


def _attribute(work: Work, batches: Batches, path: Path, variant: Variant,
               steps: int = 3) -> dict[str, Any] | None:
    """A few extra steps (not the timed ones) under torch.profiler: the operator table into
    ``path``, and the per-layer attribution (:mod:`alexnet_mp.bench.attribution`) returned."""
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
                bad = work.found_inf(loss)
            with phase("optimizer"):
                work.apply(bad)
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
    verdicts = stats.verdicts(results, cfg.data.image_size, cfg.train.batch_size)
    comparisons = stats.comparisons(results)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"device": str(layout.device), "world_size": world,
            "local_world_size": layout.local_world_size, "cpu_count": os.cpu_count(),
            "threads_per_rank": torch.get_num_threads(),
            "batch_size": cfg.train.batch_size, "image_size": cfg.data.image_size,
            "width": cfg.model.width, "num_classes": cfg.model.num_classes,
            "in_channels": cfg.model.in_channels, "data": cfg.data.name,
            "steps": steps, "warmup": warmup, "repeat": repeat,
            "variants": [v.name for v in chosen], "modes": modes,
            "bootstrap": {"resamples": stats.RESAMPLES, "level": stats.LEVEL},
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
