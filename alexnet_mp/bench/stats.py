"""Intervals and verdicts for the benchmark: is a target met, missed, or not yet decided?

A shared machine drifts (other jobs, clock boosts, caches), so one layout's steps are correlated
with each other and with whatever else ran at the time. The bench therefore runs the layouts in
interleaved rounds (A B C A B C ...) and this module resamples at both levels: rounds with
replacement, then steps with replacement inside each chosen round (a hierarchical bootstrap).
A ratio between two layouts uses the *same* rounds for both, since drift within a round hits
both alike; that pairing is what makes a small difference decidable.

A target's verdict reads its 95 % interval: wholly on the good side of the threshold, met;
wholly on the bad side, missed; straddling it, undecided (more rounds would decide it, or the
two are equal within the noise).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

Rounds = Sequence[Sequence[float]]  # per round, per step
LEVEL = 0.95
RESAMPLES = 2000
# A layout's ratios are read on the synthetic data of the base variant unless said otherwise.
PAPER_SIZE = (227, 128)  # image size, global batch
FLOP_SHARE = {"paper": 0.60, "main": 0.45}


def _tensor(rounds: Rounds) -> torch.Tensor:
    lengths = {len(r) for r in rounds}
    if len(lengths) != 1 or 0 in lengths:
        raise ValueError("every round needs the same, non-zero number of samples")
    return torch.tensor([list(r) for r in rounds], dtype=torch.float64)


def _median(t: torch.Tensor) -> torch.Tensor:
    """Median along the last dimension (the mean of the middle two for an even count)."""
    return t.quantile(0.5, dim=-1)


def bootstrap(samples: dict[str, Rounds], stat: Callable[[dict[str, torch.Tensor]], torch.Tensor],
              paired_steps: Sequence[Sequence[str]] = (), resamples: int = RESAMPLES,
              seed: int = 0, level: float = LEVEL) -> tuple[float, float, float]:
    """(estimate, low, high) of ``stat`` over ``samples`` (name -> per-round samples, every name
    with the same rounds). ``stat`` receives name -> tensor (B, rounds * steps) and returns (B,).

    Rounds are drawn with replacement, the same draw for every name; steps inside each drawn
    round are drawn with replacement, the same draw for the names of one ``paired_steps`` group
    (samples taken at the same step, such as its exchange time and its step time).
    """
    data = {name: _tensor(rounds) for name, rounds in samples.items()}
    n_rounds = {t.shape[0] for t in data.values()}
    if len(n_rounds) != 1:
        raise ValueError("every name must have the same rounds")
    n_rounds = n_rounds.pop()
    point = float(stat({k: t.reshape(1, -1) for k, t in data.items()})[0])
    g = torch.Generator().manual_seed(seed)
    rounds = torch.randint(n_rounds, (resamples, n_rounds), generator=g)
    group_of = {name: i for i, group in enumerate(paired_steps) for name in group}
    draws: dict[object, torch.Tensor] = {}
    resampled = {}
    for name, t in data.items():
        key = group_of.get(name, name)
        steps = t.shape[1]
        if key not in draws:
            draws[key] = torch.randint(steps, (resamples, n_rounds, steps), generator=g)
        idx = draws[key]
        if idx.shape[-1] != steps:
            raise ValueError(f"paired names need the same steps per round ({name})")
        picked = t[rounds.unsqueeze(-1).expand_as(idx), idx]
        resampled[name] = picked.reshape(resamples, -1)
    values = stat(resampled)
    tail = (1 - level) / 2
    low, high = torch.quantile(values, torch.tensor([tail, 1 - tail], dtype=values.dtype))
    return point, float(low), float(high)


def median_interval(rounds: Rounds, **kw) -> tuple[float, float, float]:
    """Median of every sample, with its interval."""
    return bootstrap({"x": rounds}, lambda s: _median(s["x"]), **kw)


def ratio_interval(numerator: Rounds, denominator: Rounds, **kw) -> tuple[float, float, float]:
    """median(numerator) / median(denominator), the two drawn from the same rounds."""
    return bootstrap({"a": numerator, "b": denominator},
                     lambda s: _median(s["a"]) / _median(s["b"]), **kw)


def share_interval(part: Rounds, whole: Rounds, **kw) -> tuple[float, float, float]:
    """median(part) / median(whole) for samples taken at the same steps (paired)."""
    return bootstrap({"a": part, "b": whole}, lambda s: _median(s["a"]) / _median(s["b"]),
                     paired_steps=[("a", "b")], **kw)


def verdict(low: float, high: float, threshold: float, at_least: bool) -> str:
    """met / missed / undecided for "value >= threshold" (``at_least``) or "<= threshold"."""
    if at_least:
        return "met" if low > threshold else "missed" if high < threshold else "undecided"
    return "met" if high < threshold else "missed" if low > threshold else "undecided"


@dataclass(frozen=True)
class Target:
    key: str
    text: str
    threshold: float
    at_least: bool


def flop_target(image_size: int, batch: int) -> Target:
    """60 % of the probe at the paper's size (227 px, batch 128), 45 % at any other (the
    main job's 96 px, batch 64)."""
    paper = (image_size, batch) == PAPER_SIZE
    share = FLOP_SHARE["paper" if paper else "main"]
    where = "the paper's size" if paper else f"{image_size} px, batch {batch}"
    return Target("flops_fraction", f"achieved FLOP/s >= {share:.0%} of the matmul probe "
                  f"({where})", share, True)


SPEED = Target("split_vs_grouped", "split >= 1.0x grouped images/s", 1.0, True)
EXCHANGE = Target("exchange_fraction", "exchange <= 5 % of the split step", 0.05, False)
# Not a target of its own: where the step's collectives alone miss 5 %, EXCHANGE cannot be met on
# that machine and library by any layout of the computation that does not hide them.
FLOOR = Target("exchange_floor_fraction",
               "floor: the step's exchanges alone <= 5 % of the split step", 0.05, False)
MEMORY = Target("memory_vs_grouped", "peak tensor memory per split rank <= 0.6x grouped", 0.6,
                False)
PROCESS_MEMORY = Target("process_memory_vs_grouped",
                        "peak process memory per split rank <= 0.6x grouped", 0.6, False)
INPUT = Target("train_vs_synthetic", "training loop images/s >= 0.95x the bench's synthetic",
               0.95, True)


def _rounds(r: dict, key: str) -> list[list[float]]:
    return [list(v) for v in r[f"{key}_rounds"]]


def _per_round(r: dict, key: str) -> list[list[float]]:
    return [[v] for v in r[f"{key}_rounds"]]


def _row(target: Target, r: dict, estimate: tuple[float, float, float], against: str = "",
         exact: bool = False) -> dict:
    """``exact``: a count, not a timing (one measurement is the figure, its interval a point)."""
    value, low, high = estimate
    samples = r["rounds"] * r.get("steps_per_round", 1)
    decided = verdict(low, high, target.threshold, target.at_least) \
        if samples > 1 or exact else "undecided"
    return {"target": target.key, "text": target.text, "layout": r["layout"],
            "variant": r.get("variant", "base"), "data": r["data"], "against": against,
            "value": value, "ci": [low, high], "threshold": target.threshold,
            "at_least": target.at_least, "verdict": decided}


def verdicts(results: list[dict], image_size: int, batch: int) -> list[dict]:
    """Every target the run's layouts allow, on the base variant (the configuration as it
    stands; the other variants are compared with it by :func:`comparisons`): the layout targets
    on the bench's own loop (synthetic and loader data), the input-path target on the
    training loop against synthetic data."""
    by = {(r["layout"], r["data"]): r for r in results
          if r.get("step_s_rounds") and r.get("variant", "base") == "base"}
    flops = flop_target(image_size, batch)
    rows = []
    for (name, mode), r in by.items():
        grouped = by.get(("grouped", mode))
        if name in ("split", "split_overlap") and mode != "train":
            if grouped is not None:
                rows.append(_row(SPEED, r, ratio_interval(_rounds(r, "images_per_s"),
                                                          _rounds(grouped, "images_per_s")),
                                 "grouped"))
                if r.get("peak_tensor_bytes") and grouped.get("peak_tensor_bytes"):
                    ratio = r["peak_tensor_bytes"] / grouped["peak_tensor_bytes"]
                    rows.append(_row(MEMORY, r, (ratio, ratio, ratio), "grouped", exact=True))
                rows.append(_row(PROCESS_MEMORY, r, ratio_interval(
                    _per_round(r, "peak_memory_bytes"), _per_round(grouped, "peak_memory_bytes")),
                    "grouped"))
            rows.append(_row(EXCHANGE, r, share_interval(_rounds(r, "exchange_s"),
                                                         _rounds(r, "step_s"))))
            if r.get("exchange_floor_s_rounds"):
                rows.append(_row(FLOOR, r, ratio_interval(_rounds(r, "exchange_floor_s"),
                                                          _rounds(r, "step_s"))))
        if (name in ("grouped", "split", "split_overlap") and mode == "synthetic"
                and r.get("flops_step")):
            estimate = bootstrap(
                {"step": _rounds(r, "step_s"), "probe": _per_round(r, "probe_flops")},
                lambda s, f=r["flops_step"]: f / _median(s["step"]) / _median(s["probe"]))
            rows.append(_row(flops, r, estimate))
        synthetic = by.get((name, "synthetic"))
        if mode == "train" and synthetic is not None:
            rows.append(_row(INPUT, r, ratio_interval(_rounds(r, "images_per_s"),
                                                      _rounds(synthetic, "images_per_s")),
                             "synthetic"))
    return rows


def comparisons(results: list[dict]) -> list[dict]:
    """Each variant against the base variant of the same layout and data, in the same run:
    images/s after / before, with its interval (above 1: the variant is faster)."""
    base = {(r["layout"], r["data"]): r for r in results
            if r.get("variant", "base") == "base" and r.get("step_s_rounds")}
    rows = []
    for r in results:
        ref = base.get((r["layout"], r["data"]))
        if r.get("variant", "base") == "base" or ref is None or not r.get("step_s_rounds"):
            continue
        value, low, high = ratio_interval(_rounds(r, "images_per_s"),
                                          _rounds(ref, "images_per_s"))
        rows.append({"layout": r["layout"], "data": r["data"], "variant": r["variant"],
                     "images_per_s": r["images_per_s"], "base_images_per_s": ref["images_per_s"],
                     "ratio": value, "ci": [low, high],
                     "faster": verdict(low, high, 1.0, True)})
    return rows


def _pct(v: float) -> str:
    return f"{100 * v:.1f} %"


def _fmt(key: str, v: float) -> str:
    return _pct(v) if key.endswith("_fraction") else f"{v:.3f}"


def verdict_table(rows: list[dict]) -> str:
    out = ["| target | layout | variant | data | value | 95 % interval | verdict |",
           "|" + " --- |" * 7]
    for v in rows:
        low, high = v["ci"]
        out.append(f"| {v['text']} | {v['layout']} | {v['variant']} | {v['data']} | "
                   f"{_fmt(v['target'], v['value'])} | {_fmt(v['target'], low)} – "
                   f"{_fmt(v['target'], high)} | **{v['verdict']}** |")
    return "\n".join(out)


def comparison_table(rows: list[dict]) -> str:
    out = ["| layout | data | variant | images/s | base images/s | variant / base | 95 % "
           "interval | faster? |", "|" + " --- |" * 8]
    answer = {"met": "yes", "missed": "no (slower)", "undecided": "undecided"}
    for c in rows:
        low, high = c["ci"]
        out.append(f"| {c['layout']} | {c['data']} | {c['variant']} | {c['images_per_s']:.1f} | "
                   f"{c['base_images_per_s']:.1f} | {c['ratio']:.3f} | {low:.3f} – {high:.3f} "
                   f"| {answer[c['faster']]} |")
    return "\n".join(out)
