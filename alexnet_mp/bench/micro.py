"""Two measurements beside the layout comparison: the main job's start-up (launch to first
step, and what one process spends on each part of it), and the LRN alone, fused against torch's
(:mod:`alexnet_mp.bench.lrn`), interleaved like the bench's arms.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from alexnet_mp.bench import stats
from alexnet_mp.bench.lrn import VARIANTS, make_lrn
from alexnet_mp.bench.work import arch_for, make_model, make_sgd
from alexnet_mp.config import Config
from alexnet_mp.errors import UserError
from alexnet_mp.models.columns import COLUMNS, sides
from alexnet_mp.parallel.layout import Layout
from alexnet_mp.pipeline import pipeline


def time_to_first_step(command: list[str], metrics: Path, timeout: float = 600.0,
                       poll: float = 0.02) -> dict[str, float | None]:
    """Launch ``command`` (a training run that logs every step into ``metrics``) and time, from
    the launch, the end of its first and second step; the first step's end less the second
    step's length is its start-up (interpreter, imports, process group, data, model, loader)."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    seen: list[float] = []
    try:
        while len(seen) < 2 and time.perf_counter() - start < timeout:
            if metrics.is_file():
                steps = sum('"kind": "step"' in line for line in
                            metrics.read_text().splitlines())
                while len(seen) < min(steps, 2):
                    seen.append(time.perf_counter() - start)
            if proc.poll() is not None and len(seen) < 2:
                break
            time.sleep(poll)
        _, err = proc.communicate(timeout=max(1.0, timeout - (time.perf_counter() - start)))
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    if len(seen) < 2:
        tail = (err or "").strip().splitlines()[-3:]
        raise UserError(f"the training run logged {len(seen)} step(s) (exit {proc.returncode}):"
                        f" {' / '.join(tail) or 'no output'}")
    step = seen[1] - seen[0]
    return {"first_step_end_s": seen[0], "second_step_s": step, "startup_s": seen[0] - step,
            "exit_s": time.perf_counter() - start}


def import_seconds() -> float:
    """A fresh interpreter's imports of the training path (torch, torchvision, the package)."""
    code = ("import time; t = time.perf_counter(); import alexnet_mp.run, "
            "torch.distributed.run; print(time.perf_counter() - t)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, check=True)
    return float(proc.stdout.strip().splitlines()[-1])


def startup_parts(cfg: Config) -> dict[str, float]:
    """What a rank does before its first step, each part timed on one device: the imports (in
    a fresh interpreter), the data set, the loader's first batch and its transform, the model
    (the grouped form: a column builds half of it), the optimizer, the first step itself."""
    device = torch.device("cpu")
    times: dict[str, float] = {"imports (fresh interpreter)": import_seconds()}
    t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        times[name] = now - t
        t = now

    feed = pipeline(cfg, Layout(device=device), "train", batch_size=cfg.train.batch_size)
    lap("data set")
    transform = feed.transform
    batches = iter(feed.loader)
    x, y = next(batches)
    x = transform(x)
    lap("loader: first batch and transform")
    # The input path's cost per step once running (not start-up; reported beside it).
    fetch, resize = [], []
    for _ in range(10):
        t0 = time.perf_counter()
        raw, _ = next(batches)
        t1 = time.perf_counter()
        transform(raw)
        fetch.append(t1 - t0)
        resize.append(time.perf_counter() - t1)
    t = time.perf_counter()
    model = make_model(cfg, Layout(device=device), "alexnet_grouped")
    lap("model (grouped form, canonical init)")
    optimizer = make_sgd(model, cfg)
    lap("optimizer")
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    lap("first step (one device)")
    times["per step: loader batch (median of 10)"] = statistics.median(fetch)
    times["per step: on-device resize and normalise (median of 10)"] = statistics.median(resize)
    return times


def lrn_bench(cfg: Config, rounds: int, reps: int = 5) -> list[dict]:
    """The LRN alone, forward and backward, in both variants
    (:func:`~alexnet_mp.bench.lrn.make_lrn`), at the shapes the config gives it after conv1 and
    conv2 (both columns, the global batch), with this process's threads. Variants and shapes
    interleave within each round, so the ratio reference / fused comes with a paired interval
    like every other comparison here."""
    c1, c2 = arch_for(cfg).per_column[:2]
    s1, s2 = sides(cfg.data.image_size)[:2]
    n = cfg.train.batch_size
    shapes = {"after conv1": (n, COLUMNS * c1, s1, s1), "after conv2": (n, COLUMNS * c2, s2, s2)}
    g = torch.Generator().manual_seed(cfg.train.seed)
    inputs = {k: (torch.randn(shape, generator=g) * 10).relu() for k, shape in shapes.items()}
    samples = {(k, v): [] for k in shapes for v in VARIANTS}
    for _ in range(rounds + 1):  # the first round warms the allocator up and is dropped
        for (key, variant), out in samples.items():
            lrn = make_lrn(COLUMNS, variant)
            x = inputs[key].clone().requires_grad_()
            grad = torch.ones(shapes[key])
            times = []
            for _ in range(reps):
                x.grad = None
                t0 = time.perf_counter()
                lrn(x).backward(grad)
                times.append(time.perf_counter() - t0)
            out.append(times)
    rows = []
    for key, shape in shapes.items():
        fused, ref = samples[(key, "fused")][1:], samples[(key, "reference")][1:]
        ratio, low, high = stats.ratio_interval(ref, fused)
        rows.append({"where": key, "shape": list(shape), "threads": torch.get_num_threads(),
                     "fused_ms": 1e3 * statistics.median(t for r in fused for t in r),
                     "reference_ms": 1e3 * statistics.median(t for r in ref for t in r),
                     "speedup": ratio, "ci": [low, high], "rounds": rounds, "reps": reps})
    return rows


def lrn_markdown(rows: list[dict]) -> str:
    out = ["| LRN input | threads | reference ms (fwd + bwd) | fused ms | reference / fused | 95 % "
           "interval |", "|" + " --- |" * 6]
    for r in rows:
        low, high = r["ci"]
        out.append(f"| {r['where']} {'×'.join(map(str, r['shape']))} | {r['threads']} | "
                   f"{r['reference_ms']:.1f} | {r['fused_ms']:.1f} | {r['speedup']:.2f} | "
                   f"{low:.2f} – {high:.2f} |")
    return "\n".join(out)
