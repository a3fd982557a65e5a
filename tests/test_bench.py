"""The benchmark at a tiny size on 1, 2 and 4 ranks: every layout and field, and the bytes
counted from the tensors that moved equal to the formula's, per rank and per kind of traffic."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

FIELDS = ("images_per_s", "images_per_s_min", "images_per_s_max", "step_s", "compute_s",
          "exchange_s", "allreduce_s", "optimizer_s", "bytes_counted", "bytes_analytic",
          "exchange_bytes_counted", "exchange_bytes_analytic", "allreduce_bytes_counted",
          "allreduce_bytes_analytic", "peak_memory_bytes", "peak_memory_bytes_per_rank",
          "probe_flops", "exchange_fraction", "allreduce_fraction", "ranks", "mesh", "columns",
          "replicas")
# On the CPU whatever the machine has: the byte counts below are exact on gloo (CUDA's allocator
# would round the labels' 64 bytes up to 512).
TINY = ["model.width=0.125", "model.num_classes=10", "data.image_size=67", "train.batch_size=8",
        "run.device=cpu"]


def torchrun_bench(ranks: int, out, *args: str) -> dict:
    """launch/bench.py under torchrun with ``ranks`` ranks; returns its bench.json."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={ranks}", str(ROOT / "launch" / "bench.py"), "--out", str(out),
           *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "bench.json").read_text())


def assert_counted_equals_analytic(r: dict, ranks: int) -> None:
    """Every rank's exchange and all-reduce bytes, counted, equal the formula's."""
    for kind in ("exchange", "allreduce"):
        counted = r[f"{kind}_bytes_counted_per_rank"]
        assert len(counted) == ranks, (r["layout"], kind)
        assert counted == r[f"{kind}_bytes_analytic_per_rank"], (r["layout"], r["mesh"], kind)
    assert r["bytes_counted"] == r["bytes_analytic"]
    assert len(r["peak_memory_bytes_per_rank"]) == ranks


@pytest.mark.slow
def test_bench_reports_every_layout_with_exact_exchange_bytes(idx_root, tmp_path):
    out = tmp_path / "bench"
    report = torchrun_bench(2, out, "--steps", "2", "--warmup", "1", "--profile", *TINY,
                            "data.name=mnist", f"data.root={idx_root}",
                            "run.dir=" + str(tmp_path / "unused"))
    assert report["meta"]["world_size"] == 2
    results = {(r["layout"], r["data"]): r for r in report["results"]}
    layouts = ("d2l", "grouped", "split", "split_overlap", "ddp", "hybrid")
    assert set(results) == {(n, m) for n in layouts for m in ("synthetic", "loader")}
    for (name, mode), r in results.items():
        for field in FIELDS:
            assert field in r, f"{name}/{mode} lacks {field}"
        assert r["images_per_s_min"] <= r["images_per_s"] <= r["images_per_s_max"]
        assert r["ranks"] == (1 if name in ("d2l", "grouped") else 2)
        # Counted from the tensors that moved, equal to the figure from the architecture.
        assert_counted_equals_analytic(r, r["ranks"])
        if mode == "synthetic":
            assert r["flops_step"] > 0 and 0 < r["flops_fraction"]
    assert results[("split", "synthetic")]["exchange_bytes_counted"] > 0
    # The exchanges are timed on every rank of every layout that has them, in both data modes.
    for name in ("split", "split_overlap", "hybrid"):
        for mode in ("synthetic", "loader"):
            r = results[(name, mode)]
            assert r["exchange_s"] > 0 and all(s > 0 for s in r["exchange_s_per_rank"]), name
            assert r["exchange_bytes_counted"] > 0, name
    meshes = {name: results[(name, "loader")]["mesh"] for name in ("split", "ddp", "hybrid")}
    assert meshes == {"split": "column split", "ddp": "data parallel, 2 replicas",
                      "hybrid": "hybrid over 2 ranks"}
    # One replica of columns has no gradient all-reduce; DDP has no exchange.
    assert results[("split", "loader")]["allreduce_bytes_counted"] == 0
    assert results[("ddp", "loader")]["exchange_bytes_counted"] == 0
    assert results[("hybrid", "loader")]["allreduce_bytes_counted"] > 0
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

    from alexnet_mp.bench.counts import grouped_conv_backward_flop

    fixed = {torch.ops.aten.convolution_backward: grouped_conv_backward_flop}
    x = torch.randn(4, 12, 9, 9, requires_grad=True)
    with FlopCounterMode(display=False, custom_mapping=fixed) as grouped:
        torch.nn.Conv2d(12, 32, 5, padding=2, groups=2)(x).sum().backward()
    half = torch.randn(4, 6, 9, 9, requires_grad=True)
    with FlopCounterMode(display=False, custom_mapping=fixed) as one:
        torch.nn.Conv2d(6, 16, 5, padding=2)(half).sum().backward()
    assert grouped.get_total_flops() == 2 * one.get_total_flops()


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory) -> dict:
    """One 4-rank run: the grouped reference on rank 0, 2 columns x 2 replicas, data parallel
    over 4 and hybrid over 4, one synthetic step each (counts need no more)."""
    out = tmp_path_factory.mktemp("bench4")
    return torchrun_bench(4, out, "--layouts", "grouped,split,ddp,hybrid", "--data",
                          "synthetic", "--steps", "1", "--warmup", "0", *TINY, "data.name=fake")


def _by_layout(report: dict) -> dict[str, dict]:
    return {r["layout"]: r for r in report["results"]}


@pytest.mark.slow
def test_two_columns_by_two_replicas_counts_what_the_formula_says(four_ranks):
    assert four_ranks["meta"]["world_size"] == 4
    r = _by_layout(four_ranks)["split"]
    assert (r["mesh"], r["columns"], r["replicas"], r["ranks"]) == (
        "2 columns x 2 replicas", 2, 2, 4)
    assert_counted_equals_analytic(r, 4)
    assert r["exchange_bytes_counted"] > 0 and r["allreduce_bytes_counted"] > 0
    # Two replicas on half the batch each do the grouped form's FLOPs on the whole batch.
    assert r["flops_step"] == _by_layout(four_ranks)["grouped"]["flops_step"]


@pytest.mark.slow
def test_hybrid_and_data_parallel_over_four_count_what_the_formula_says(four_ranks):
    results = _by_layout(four_ranks)
    hybrid, ddp = results["hybrid"], results["ddp"]
    assert (hybrid["mesh"], hybrid["columns"], hybrid["replicas"]) == (
        "hybrid over 4 ranks", 4, 1)
    assert (ddp["mesh"], ddp["columns"], ddp["replicas"]) == ("data parallel, 4 replicas", 1, 4)
    for r in (hybrid, ddp):
        assert r["ranks"] == 4
        assert_counted_equals_analytic(r, 4)
        assert r["flops_step"] == results["grouped"]["flops_step"]
    assert hybrid["exchange_bytes_counted"] > 0 and hybrid["allreduce_bytes_counted"] > 0
    assert ddp["exchange_bytes_counted"] == 0
    # The hybrid layout's point: only the trunk's gradients cross, far fewer than every one.
    assert hybrid["bytes_counted"] < ddp["bytes_counted"]


def _launch_bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("launch_bench", ROOT / "launch" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_one_rank_then_the_scaling_table_joins_it_with_four(four_ranks, tmp_path, capsys):
    launch = _launch_bench()
    threads = torch.get_num_threads()
    try:  # one rank needs no torchrun: in this process, as `python launch/bench.py` runs it
        assert launch.main(["--layouts", "grouped", "--data", "synthetic", "--steps", "1",
                            "--warmup", "0", "--out", str(tmp_path / "one"), *TINY,
                            "data.name=fake", "run.threads=1"]) == 0
    finally:
        torch.set_num_threads(threads)
    one = json.loads((tmp_path / "one" / "bench.json").read_text())
    assert one["meta"]["world_size"] == 1
    assert [(r["layout"], r["ranks"], r["mesh"]) for r in one["results"]] == [
        ("grouped", 1, "single device")]
    four = tmp_path / "four.json"
    four.write_text(json.dumps(four_ranks))
    capsys.readouterr()
    assert launch.main(["--scaling-table", str(tmp_path / "one" / "bench.json"), str(four),
                        "--out", str(tmp_path / "scale")]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table == (tmp_path / "scale" / "scaling.md").read_text().splitlines()
    rows = [line.split(" | ") for line in table[2:]]
    assert [(row[0].strip("| "), row[1], row[2]) for row in rows] == [
        ("1", "grouped", "single device"), ("1 of 4", "grouped", "single device"),
        ("4", "split", "2 columns x 2 replicas"), ("4", "ddp", "data parallel, 4 replicas"),
        ("4", "hybrid", "hybrid over 4 ranks")]
    assert rows[0][5] == "1.00"  # images/s against the 1-rank grouped run: itself
    assert len(json.loads((tmp_path / "scale" / "scaling.json").read_text())) == 2


def test_scaling_table_refuses_a_file_that_is_not_a_report(tmp_path, capsys):
    bad = tmp_path / "bench.json"
    bad.write_text("{}")
    assert _launch_bench().main(["--scaling-table", str(bad)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {bad} is not a readable bench.json")


def test_layouts_a_world_size_cannot_run_are_refused_in_one_line():
    from alexnet_mp.bench.layouts import check_layouts, layouts_for
    from alexnet_mp.errors import UserError

    assert layouts_for(1) == ["d2l", "grouped"]
    assert layouts_for(3) == ["d2l", "grouped", "ddp", "hybrid"]
    assert layouts_for(4) == ["d2l", "grouped", "split", "split_overlap", "ddp", "hybrid"]
    with pytest.raises(UserError, match="split cannot run on 3 rank"):
        check_layouts(["ddp", "split"], 3)
    with pytest.raises(UserError, match="unknown bench layout"):
        check_layouts(["pipeline"], 4)


def test_the_formula_at_the_papers_size():
    """The figures docs/scaling.md projects from: 227 px, global batch 128, 1000 classes."""
    from alexnet_mp.bench.counts import analytic_table, analytic_traffic
    from alexnet_mp.config import load_config

    cfg = load_config(None, ["model.num_classes=1000", "model.in_channels=3",
                             "data.image_size=227", "train.batch_size=128"],
                      default_path=ROOT / "configs" / "default.yaml")
    params = 60_965_224  # the paper's two-column net
    # Data parallel over 2: a ring all-reduce receives 2 (R-1)/R = 1 copy of every gradient.
    assert analytic_traffic("ddp", cfg, 2) == (0, 4 * params)
    split2, split4 = analytic_traffic("split", cfg, 2), analytic_traffic("split", cfg, 4)
    # Per example and column: X1-X4 there and back (128·13² + 128·6² + 2·2048 floats), X5's 500.
    assert split2 == (4 * 128 * (2 * (128 * 13 * 13 + 128 * 6 * 6 + 2048 + 2048) + 500), 0)
    # A second replica halves each replica's batch, and averages one column's gradients.
    assert split4.exchange * 2 == split2.exchange
    assert split4.allreduce == analytic_traffic("split", cfg, 4, rank=1).allreduce
    assert 2 * split4.allreduce == 4 * params  # both columns' halves of the gradients: all
    assert "60,965,224 parameters" in analytic_table(cfg, [2, 4])


# -- decisive comparisons: rounds, intervals, verdicts, attribution ----------------------------


@pytest.mark.slow
def test_rounds_give_intervals_verdicts_comparisons_and_a_per_layer_table(tmp_path):
    """Two interleaved rounds of one timed step: every figure gets an interval, every target a
    verdict, the old LRN a comparison, and the profiled split a per-layer table on both ranks
    whose FLOPs add up to the step's. Counts only; how fast anything ran is never asserted."""
    out = tmp_path / "rounds"
    report = torchrun_bench(2, out, "--layouts", "grouped,split", "--data", "synthetic,train",
                            "--variants", "base,lrn_ref", "--repeat", "2", "--steps", "1",
                            "--warmup", "0", "--profile", *TINY, "data.name=fake",
                            "data.fake_size=64")
    assert report["meta"]["repeat"] == 2
    results = {(r["layout"], r["variant"], r["data"]): r for r in report["results"]}
    assert set(results) == {(n, v, m) for n in ("grouped", "split")
                            for v in ("base", "lrn_ref") for m in ("synthetic", "train")}
    for key, r in results.items():
        assert "error" not in r, (key, r.get("error"))
        assert (r["rounds"], r["steps_per_round"]) == (2, 1)
        assert [len(v) for v in r["images_per_s_rounds"]] == [1, 1]
        low, high = r["images_per_s_ci"]
        assert low <= r["images_per_s"] <= high
        assert len(r["peak_memory_bytes_rounds"]) == 2
    split = results[("split", "base", "synthetic")]
    assert len(split["exchange_wait_s_per_rank"]) == 2
    # A step's exchanges, in order: X1-X4 started and waited for, X5, then the four gathers'
    # reduce-scatters in backward; the floor replays exactly these, every round.
    calls = [tuple(c) for c in split["exchange_calls"]]
    assert [c[:2] for c in calls] == [("forward", "all_gather"), ("forward", "wait")] * 4 + [
        ("forward", "all_gather_rows")] + [("backward", "reduce_scatter")] * 4
    gathered = [c[2] for c in calls if c[1] == "all_gather"]
    assert sorted(gathered) == sorted(c[2] for c in calls if c[1] == "reduce_scatter")
    # Two ranks: each receives the other's half once forward (and X5's rows) and once backward.
    assert 4 * sum(gathered) * 2 + 4 * calls[8][2] == split["exchange_bytes_counted"]
    assert len(split["exchange_floor_s_rounds"]) == 2
    assert all(t > 0 for r in split["exchange_floor_s_rounds"] for t in r)
    assert len(split["exchange_fraction_ci"]) == 2
    verdicts = {(v["target"], v["layout"]): v for v in report["verdicts"]}
    assert set(verdicts) == {("split_vs_grouped", "split"), ("memory_vs_grouped", "split"),
                             ("process_memory_vs_grouped", "split"),
                             ("exchange_floor_fraction", "split"),
                             ("exchange_fraction", "split"), ("flops_fraction", "grouped"),
                             ("flops_fraction", "split"), ("train_vs_synthetic", "grouped"),
                             ("train_vs_synthetic", "split")}
    for v in verdicts.values():
        assert v["verdict"] in ("met", "missed", "undecided")
        assert v["ci"][0] <= v["ci"][1] and v["variant"] == "base"
    assert verdicts[("flops_fraction", "split")]["threshold"] == 0.45  # not the paper's size
    compared = {(c["layout"], c["data"], c["variant"]) for c in report["comparisons"]}
    assert compared == {(n, m, "lrn_ref") for n in ("grouped", "split")
                        for m in ("synthetic", "train")}
    # The tensor memory is a count: the parameters are the architecture's, per column on the
    # split; momentum at least matches them (the optimizer's step adds its own temporaries);
    # every rank holds the whole batch (8 images of 67 px, labels).
    from alexnet_mp.bench.counts import param_counts
    from alexnet_mp.bench.work import arch_for
    from alexnet_mp.config import load_config

    arch = arch_for(load_config(None, TINY))
    grouped = results[("grouped", "base", "synthetic")]
    assert verdicts[("memory_vs_grouped", "split")]["value"] == pytest.approx(
        split["peak_tensor_bytes"] / grouped["peak_tensor_bytes"])
    for r, params in ((grouped, param_counts(arch)), (split, param_counts(arch, 0))):
        kinds = r["peak_tensor_bytes_by_kind"]
        assert kinds["parameters"] == 4 * sum(params.values())
        assert kinds["optimizer state"] >= kinds["parameters"]
        assert kinds["other (the batch)"] == 4 * 8 * 67 * 67 + 8 * 8
        assert sum(kinds.values()) == r["peak_tensor_bytes"]
    assert split["peak_tensor_bytes_per_rank"][0] == split["peak_tensor_bytes_per_rank"][1]
    table = split["attribution"]
    assert len(table["ranks"]) == 2
    for lines, flops in zip(table["ranks"], table["flops"]):
        for layer in ("conv1", "conv3", "fc6", "fc8", "LRN", "pooling", "exchanges (forward)",
                      "exchanges (backward)", "guard", "optimizer"):
            assert layer in lines, layer
        assert set(flops) == {"conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"}
    # The layers' FLOPs, from the shapes each saw, are the step's as torch's counter has it.
    per_layer = sum(sum(f) for flops in table["flops"] for f in flops.values())
    assert per_layer == split["flops_step"]
    md = (out / "bench.md").read_text()
    assert "## Targets" in md and "## Where the time goes" in md and "lrn_ref" in md
    assert "## Where the memory goes" in md
    assert (out / "profile-split+lrn_ref-rank1.txt").is_file()


def test_paired_rounds_decide_what_drift_would_hide():
    """Rounds drift by a factor of 3; inside each, B is 10 % faster than A. Resampling the same
    rounds for both finds the 10 %; the rounds' spread alone would straddle 1."""
    from alexnet_mp.bench import stats

    drift = [1.0, 3.0, 1.5, 2.5, 2.0]
    a = [[d * (1 + 0.01 * k) for k in range(4)] for d in drift]
    b = [[1.1 * v for v in r] for r in a]
    value, low, high = stats.ratio_interval(b, a)
    assert low > 1.05 and high < 1.15 and abs(value - 1.1) < 1e-9
    pooled_b = sorted(v for r in b for v in r)
    pooled_a = sorted(v for r in a for v in r)
    assert pooled_b[0] / pooled_a[-1] < 1 < pooled_b[-1] / pooled_a[0]
    assert stats.verdict(low, high, 1.0, at_least=True) == "met"
    assert stats.verdict(0.9, 1.2, 1.0, at_least=True) == "undecided"
    assert stats.verdict(0.7, 0.9, 1.0, at_least=True) == "missed"
    assert stats.verdict(0.02, 0.04, 0.05, at_least=False) == "met"
    assert stats.verdict(0.06, 0.08, 0.05, at_least=False) == "missed"
    assert stats.flop_target(227, 128).threshold == 0.60
    assert stats.flop_target(96, 64).threshold == 0.45


def test_waiting_for_a_peer_is_told_from_the_exchanges_own_cost():
    from alexnet_mp.bench.merge import exchange_waits

    # One step, two exchanges: rank 0 arrived 4 s early at the first, rank 1 3 s at the second.
    calls = [[[("forward", 5.0), ("backward", 1.0)]], [[("forward", 1.0), ("backward", 4.0)]]]
    waits = exchange_waits(calls, [[0, 1]])
    assert waits[0][0] == {"forward": 4.0, "backward": 0.0}
    assert waits[1][0] == {"forward": 0.0, "backward": 3.0}


def test_every_millisecond_of_a_profiled_step_is_attributed():
    """In one process: the lines add up to the phases' time, and the matmul-like layers' FLOPs
    to torch's own count."""
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    from alexnet_mp.bench import attribution
    from alexnet_mp.bench.counts import grouped_conv_backward_flop
    from alexnet_mp.models.columns import Arch, ColumnAlexNet, canonical_init

    arch = Arch(num_classes=10, in_channels=1, image_size=67, width=0.125)
    model = ColumnAlexNet(arch, generator=torch.Generator().manual_seed(1))
    model.load_state_dict(canonical_init(arch, "kaiming", seed=0))
    x, y = torch.randn(4, 1, 67, 67), torch.tensor([0, 1, 2, 3])
    fixed = {torch.ops.aten.convolution_backward: grouped_conv_backward_flop}
    with FlopCounterMode(display=False, custom_mapping=fixed) as counter:
        torch.nn.functional.cross_entropy(model(x), y).backward()
    with attribution.LayerRanges(model) as ranges, \
            profile(activities=[ProfilerActivity.CPU]) as prof:
        with attribution.phase("forward"):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        with attribution.phase("backward"):
            loss.backward()
        with attribution.phase("optimizer"):
            model.zero_grad()
    lines = attribution.attribute(prof.events(), steps=1)
    phases = sum(e.time_range.elapsed_us() / 1e6 for e in prof.events()
                 if e.name.startswith("step::"))
    assert abs(sum(sum(v.values()) for v in lines.values()) - phases) < 1e-3 * phases + 1e-6
    for layer in ("conv1", "conv5", "fc6", "fc8", "LRN", "pooling"):
        assert lines[layer]["forward"] > 0 and lines[layer]["backward"] > 0, layer
    assert sum(sum(f) for f in ranges.flops.values()) == counter.get_total_flops()


def test_time_to_first_step_reads_the_step_records_as_they_appear(tmp_path):
    from alexnet_mp.bench.micro import time_to_first_step

    metrics = tmp_path / "metrics.jsonl"
    script = ("import json, sys, time\n"
              "for step in (1, 2):\n"
              "    time.sleep(0.3)\n"
              f"    with open({str(metrics)!r}, 'a') as f:\n"
              "        f.write(json.dumps({'kind': 'step', 'step': step}) + '\\n')\n")
    t = time_to_first_step([sys.executable, "-c", script], metrics, timeout=60)
    assert 0 < t["first_step_end_s"] < t["first_step_end_s"] + t["second_step_s"] <= t["exit_s"]
    assert t["startup_s"] == pytest.approx(t["first_step_end_s"] - t["second_step_s"])


def test_variants_are_checked_and_named():
    from alexnet_mp.bench.placement import rank_cores
    from alexnet_mp.bench.work import Variant
    from alexnet_mp.errors import UserError

    assert Variant.parse("base").name == "base"
    assert Variant.parse("pinned+lrn_ref").name == "lrn_ref+pinned"
    with pytest.raises(UserError, match="unknown bench variant flag"):
        Variant.parse("lrn_ref+turbo")
    assert rank_cores({0, 1}, 0, 2) == {0} and rank_cores({0, 1}, 1, 2) == {1}
    assert rank_cores({4, 5, 6, 7}, 1, 2) == {6, 7}


def test_the_saves_bench_reports_how_long_a_save_blocks_the_loop(idx_root, tmp_path):
    from conftest import one_process_layout, small_overrides

    from alexnet_mp.bench.saves import saves_bench, saves_markdown
    from alexnet_mp.config import load_config

    cfg = load_config(None, small_overrides(idx_root, tmp_path / "r"))
    result = saves_bench(cfg, one_process_layout(cfg.model.name), tmp_path / "w", rounds=2)
    assert len(result["blocked_s"]["sync"]) == len(result["blocked_s"]["async"]) == 2
    assert result["file_bytes"] > 4 * result["parameters"]  # parameters and momentum, float32
    assert result["async_fraction"] == result["async_blocked_s"] / result["sync_blocked_s"]
    # Both arms wrote whole checkpoints of every round.
    for arm in ("sync", "async"):
        assert ckpt_steps(tmp_path / "w" / arm) == [2, 1]
    assert "background blocks the loop for" in saves_markdown(result)


def ckpt_steps(folder) -> list[int]:
    from alexnet_mp import checkpoint as ckpt

    return [ckpt.load(p)["train"]["global_step"] for p in ckpt.step_files(folder)]
