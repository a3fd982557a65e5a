"""Gathers what scripts/gpu_check.sh left in its folder into one JSON on stdout: the machine,
each step's exit status and seconds, the CUDA tests' counts (the sync-debug tests on their own),
the input path per loader core, and each bench run's figures with their intervals and verdicts.
Missing pieces are reported as missing, never fatal."""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

KEEP = ("layout", "variant", "data", "ranks", "images_per_s", "images_per_s_ci", "step_s",
        "step_s_ci", "guard_s", "optimizer_s", "peak_memory_bytes", "peak_tensor_bytes",
        "peak_tensor_bytes_by_kind", "flops_step",
        "flops_fraction", "probe_flops", "rounds", "steps_per_round", "error")


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def tests(path: Path) -> dict:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return {"missing": str(path)}
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    cases = suite.findall("testcase") if suite is not None else []
    outcome = {}
    for case in cases:
        name = case.get("name")
        kind = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
        outcome[name] = kind
    counts = {k: sum(v == k for v in outcome.values())
              for k in ("passed", "failure", "error", "skipped")}
    return {**counts, "seconds": float(suite.get("time", 0)) if suite is not None else None,
            "cases": outcome}


def bench(path: Path) -> dict:
    report = _read_json(path / "bench.json")
    if report is None:
        return {"missing": str(path / "bench.json")}
    results = [{k: r[k] for k in KEEP if k in r} for r in report.get("results", [])]
    profiled = [{"layout": r["layout"], "attribution": r["attribution"]}
                for r in report.get("results", []) if r.get("attribution")]
    return {"meta": report.get("meta"), "results": results,
            "verdicts": report.get("verdicts", []), "attribution": profiled}


def main(folder: str, seconds: str = "0") -> None:
    out = Path(folder)
    steps = {}
    for line in (out / "steps.txt").read_text().splitlines() if (out / "steps.txt").is_file() \
            else []:
        name, rc, took = line.split()
        steps[name] = {"exit": int(rc), "seconds": int(took)}
    tested = tests(out / "cuda-tests.xml")
    figures = {"env": _read_json(out / "env.json"), "steps": steps,
               "seconds": int(seconds), "tests": tested,
               # Steady steps under torch.cuda.set_sync_debug_mode("error"): passed means no
               # host sync in a steady step, on one GPU and over NCCL.
               "sync_debug": {name: outcome for name, outcome in tested.get("cases", {}).items()
                              if "never_sync" in name},
               "input_path": _read_json(out / "input-path" / "input_path.json"),
               "bench": {name: bench(out / f"bench-{name}")
                         for name in ("paper", "shards", "profile")}}
    json.dump(figures, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
