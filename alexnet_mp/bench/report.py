"""What rank 0 writes for people: bench.md's tables (the arms, the targets' verdicts, where the
memory goes, the variants against base, where the time goes), the scaling table over several
runs, and bench.png."""

from __future__ import annotations

from pathlib import Path

from alexnet_mp.bench import attribution, stats
from alexnet_mp.bench.layouts import LAYOUTS
from alexnet_mp.bench.memory import KINDS


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
    kinds = list(dict.fromkeys(KINDS.values()))
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
                 "it straddles the threshold.\n\n" + stats.verdict_table(verdicts))
    memory = memory_markdown(results)
    if memory:
        parts.append("## Where the memory goes (tensors alive at the step's peak, MiB)\n\n"
                     "Every tensor storage followed through one step (torch's MemTracker); "
                     "the process's own peak (resident memory on the CPU) is in the first "
                     "table.\n\n" + memory)
    if comparisons:
        parts.append("## Variants against base (same run, same rounds)\n\n"
                     + stats.comparison_table(comparisons))
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
