"""The benchmark at a tiny size: every layout and field, and counted bytes = analytic bytes."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT

FIELDS = ("images_per_s", "images_per_s_min", "images_per_s_max", "step_s", "compute_s",
          "exchange_s", "optimizer_s", "bytes_counted", "bytes_analytic", "peak_memory_bytes",
          "probe_flops", "exchange_fraction", "ranks")


def test_bench_reports_every_layout_with_exact_exchange_bytes(idx_root, tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "launch" / "bench.py"), "--steps", "2", "--warmup", "1", "--profile",
           "--out", str(out), "model.width=0.125", "model.num_classes=10",
           "data.name=mnist", f"data.root={idx_root}", "data.image_size=67",
           "train.batch_size=8", "run.dir=" + str(tmp_path / "unused")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "bench.json").read_text())
    results = {(r["layout"], r["data"]): r for r in report["results"]}
    layouts = ("d2l", "grouped", "split", "split_overlap", "ddp", "hybrid")
    assert set(results) == {(n, m) for n in layouts for m in ("synthetic", "loader")}
    for (name, mode), r in results.items():
        for field in FIELDS:
            assert field in r, f"{name}/{mode} lacks {field}"
        assert r["images_per_s_min"] <= r["images_per_s"] <= r["images_per_s_max"]
        assert r["ranks"] == (1 if name in ("d2l", "grouped") else 2)
        # Counted from the tensors that moved, equal to the figure from the architecture.
        assert r["bytes_counted"] == r["bytes_analytic"], (name, mode)
        if mode == "synthetic":
            assert r["flops_step"] > 0 and 0 < r["flops_fraction"]
    assert results[("split", "synthetic")]["bytes_counted"] > 0
    # The split and DDP do the same model FLOPs per step as the grouped form on one device.
    grouped = results[("grouped", "synthetic")]["flops_step"]
    assert results[("split", "synthetic")]["flops_step"] == grouped
    assert results[("ddp", "synthetic")]["flops_step"] == grouped
    assert (out / "bench.md").read_text().startswith("| layout |")
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"
    # --profile: a torch.profiler table per layout and rank, taken after the timed steps.
    for rank in (0, 1):
        assert "convolution" in (out / f"profile-split-rank{rank}.txt").read_text()
    assert len(results[("split", "synthetic")]["exchange_s_per_rank"]) == 2


def test_flop_count_of_a_grouped_conv_equals_its_two_halves():
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from alexnet_mp.bench import grouped_conv_backward_flop

    fixed = {torch.ops.aten.convolution_backward: grouped_conv_backward_flop}
    x = torch.randn(4, 12, 9, 9, requires_grad=True)
    with FlopCounterMode(display=False, custom_mapping=fixed) as grouped:
        torch.nn.Conv2d(12, 32, 5, padding=2, groups=2)(x).sum().backward()
    half = torch.randn(4, 6, 9, 9, requires_grad=True)
    with FlopCounterMode(display=False, custom_mapping=fixed) as one:
        torch.nn.Conv2d(6, 16, 5, padding=2)(half).sum().backward()
    assert grouped.get_total_flops() == 2 * one.get_total_flops()
