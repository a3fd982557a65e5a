"""The rounds' records into an arm's result: every rank's record of a round into one (a step
ends when its slowest rank ends), a rank's waiting for its peer told from the exchanges' own
cost, the profiled ranks' per-layer tables joined, and an arm's rounds into medians with their
95 % intervals."""

from __future__ import annotations

import statistics
from typing import Any

from alexnet_mp.bench import attribution, stats
from alexnet_mp.bench.counts import analytic_traffic
from alexnet_mp.bench.layouts import ONE_DEVICE
from alexnet_mp.config import Config


def _groups(records: list[dict]) -> list[list[int]]:
    """Which active ranks exchange with which: a replica's columns (the hybrid layout's
    "columns" are all of its ranks)."""
    ranks = list(range(len(records)))
    columns = records[0]["columns"]
    if columns <= 1:
        return [ranks]
    return [ranks[i:i + columns] for i in range(0, len(ranks), columns)]


def exchange_waits(calls: list[list[list]],
                   groups: list[list[int]]) -> list[list[dict[str, float]]]:
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
    """The guard is one all-reduce over the whole world: the same reading as
    :func:`exchange_waits`."""
    per = [r.get("guard_call_steps") or [] for r in records]
    steps = min(len(p) for p in per)
    if not steps or len(per) < 2:
        return [0.0] * len(per)
    fastest = [min(p[i] for p in per) for i in range(steps)]
    return [statistics.median(p[i] - fastest[i] for i in range(steps)) for p in per]


def _attribution(records: list[dict]) -> dict[str, Any] | None:
    """Every rank's per-layer seconds, with each rank's waiting inside the exchanges moved from
    the exchange lines to a line of its own."""
    tables = [r.get("attribution") for r in records]
    if any(t is None for t in tables):
        return None
    waits = exchange_waits([t["calls"] for t in tables], _groups(records))
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


def merge_ranks(name: str, mode: str, cfg: Config, records: list[dict], world: int) -> dict:
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
    waits = exchange_waits(calls, _groups(active))
    out["exchange_wait_s_per_rank"] = [
        statistics.median(s["forward"] + s["backward"] for s in w) if w else 0.0 for w in waits]
    out["exchange_wait_by_call_s_per_rank"] = _waits_by_call(calls, _groups(active))
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
    table = _attribution(active)
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
    out["images_per_s_ci"] = list(stats.median_interval(out["images_per_s_rounds"])[1:])
    out["step_s_ci"] = list(stats.median_interval(out["step_s_rounds"])[1:])
    out["exchange_fraction_ci"] = list(stats.share_interval(
        out["exchange_s_rounds"], out["step_s_rounds"])[1:])
    if "exchange_floor_s_rounds" in out:
        share = stats.ratio_interval(out["exchange_floor_s_rounds"], out["step_s_rounds"])
        out["exchange_floor_fraction"], out["exchange_floor_fraction_ci"] = share[0], [*share[1:]]
    if out.get("flops_step"):
        out["achieved_flops"] = out["flops_step"] / out["step_s"]
        out["flops_fraction"] = out["achieved_flops"] / out["probe_flops"]
    return out
