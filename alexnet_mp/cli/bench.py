"""Entry point of the layout comparison: ``torchrun --nproc_per_node=N launch/bench.py``.

It takes the training config (``--config``, ``section.key=value``) so that the benchmark runs the
same work as the training job, and writes bench.json, bench.md and bench.png. Without torchrun,
``--scaling-table`` joins several runs' bench.json into one table and ``--analytic`` prints the
traffic formula's figures; neither starts a process group.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from alexnet_mp.cli.common import PACKAGE, report, run_entry
from alexnet_mp.errors import UserError

EPILOG = """\
layouts by world size (torchrun --nproc_per_node=N; train.batch_size is the global batch):
  1 rank   d2l, grouped (one device)
  2 ranks  also split (2 columns x 1 replica), split_overlap, ddp (2 replicas), hybrid (over 2)
  4 ranks  split = 2 columns x 2 replicas, ddp = 4 replicas, hybrid over 4
d2l and grouped always run on rank 0 alone (on a CPU, with the threads of all the node's ranks).
Every run writes OUT/bench.json: per layout, images/s, exchange and all-reduce bytes per step
per rank (counted from the tensors that moved, and from the architecture's formula: they are
equal), per-rank peak memory.

decisive comparisons: --repeat R runs every arm (layout x variant x data) once per round, the
rounds interleaved, and reports 95 % intervals and a verdict per target (met, missed,
undecided), e.g. at the paper's size with the old LRN beside the new one:
  torchrun --nproc_per_node=2 launch/bench.py --layouts grouped,split --data synthetic \\
      --repeat 5 --steps 4 --warmup 1 --variants base,lrn_ref --profile \\
      model.num_classes=1000 model.in_channels=3 data.name=fake data.image_size=227 \\
      train.batch_size=128
variants (join flags with +): lrn_ref, malloc_default, channels_last, compile, pinned.
--data train runs the training loop itself (loader, guard, figures) for the input-path target.

start-up of the main job (launch to first step), N ranks, R launches:
  python launch/bench.py --startup N --repeat R [overrides]
the host's share of a step per layout (the training loop on a tiny model), N ranks:
  torchrun --nproc_per_node=N launch/bench.py --host-overhead --repeat 3 --steps 20
the LRN alone, fused against the reference formulation, at the config's shapes:
  python launch/bench.py --lrn --repeat R run.threads=1 [overrides]
the input path on one loader core (image folder with PIL, shards decoded on the CPU, shards read
as bytes for the device), on 500 x 375 JPEGs cut from scikit-learn's sample photographs, which
it keeps (and their shards) in --out for a training-loop run on them:
  python launch/bench.py --input-path --repeat 3 --out runs/input-path
  python launch/bench.py --layouts grouped --data synthetic,train data.name=shards \
      data.root=runs/input-path/shards model.num_classes=2 model.in_channels=3 \
      data.image_size=227 data.augment=true

scaling table over 1, 2 and 4 ranks:
  python launch/bench.py --layouts grouped --data synthetic --out runs/scale-1
  torchrun --nproc_per_node=2 launch/bench.py --layouts split,ddp,hybrid --data synthetic \\
      --out runs/scale-2
  torchrun --nproc_per_node=4 launch/bench.py --layouts split,ddp,hybrid --data synthetic \\
      --out runs/scale-4
  python launch/bench.py --scaling-table runs/scale-{1,2,4}/bench.json [--out runs/scale]
prints one markdown table ("x 1 rank": images/s against the 1-rank grouped run); with --out it
also writes scaling.md and scaling.json (the runs' reports, in order) there.

traffic formula only, e.g. at the paper's size for 2, 4 ... 32 ranks:
  python launch/bench.py --analytic 2,4,8,16,32 model.num_classes=1000 model.in_channels=3 \\
      data.image_size=227 train.batch_size=128
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Compare AlexNet layouts on the same work.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file (default: configs/default.yaml)")
    p.add_argument("--layouts", default="auto",
                   help="comma-separated: d2l, grouped, split, split_overlap, ddp, hybrid "
                        "(default auto: every one this world size can run)")
    p.add_argument("--data", default="synthetic,loader",
                   help="comma-separated: synthetic (tensors on the device), loader (the real "
                        "pipeline in the bench's loop), train (the training loop itself)")
    p.add_argument("--repeat", type=int, default=1,
                   help="interleaved rounds of every arm (intervals over rounds and steps)")
    p.add_argument("--variants", default="base",
                   help="comma-separated: base, or flags joined by + from lrn_ref, "
                        "malloc_default, channels_last, compile, pinned (each runs every "
                        "layout)")
    p.add_argument("--lrn", action="store_true",
                   help="time the LRN alone, fused against the reference formulation, --repeat "
                        "rounds at the config's shapes; run nothing else (no torchrun)")
    p.add_argument("--input-path", action="store_true",
                   help="images/s per loader core: the image folder (PIL), shards decoded on "
                        "the CPU, shards read as bytes for the device; --repeat rounds; run "
                        "nothing else (no torchrun)")
    p.add_argument("--startup", type=int, metavar="RANKS",
                   help="time launch/train.py from launch to its first step on RANKS ranks, "
                        "--repeat times; run nothing else (no torchrun)")
    p.add_argument("--host-overhead", action="store_true",
                   help="the host's share of a step: the training loop itself (--data train) "
                        "on a tiny model (1/32 width, 67 px, 2 images per rank), whose device "
                        "work is next to nothing, so each layout's step time is what the host "
                        "spends on it")
    p.add_argument("--saves", action="store_true",
                   help="how long a checkpoint save blocks the loop, synchronous and background")
    p.add_argument("--steps", type=int, default=8, help="timed steps per layout")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--out", help="output folder (default: runs/<config>-bench)")
    p.add_argument("--profile", action="store_true",
                   help="also write a torch.profiler table per arm and rank, and put the "
                        "per-layer attribution into the report")
    p.add_argument("--scaling-table", nargs="+", metavar="BENCH_JSON",
                   help="join these runs' bench.json into one table, run nothing (no torchrun)")
    p.add_argument("--analytic", metavar="WORLDS",
                   help="comma-separated world sizes: print the bytes per rank and step the "
                        "formula gives for the config, run nothing (no torchrun)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    return p.parse_args(argv)


def scaling(paths: list[str], out: str | None) -> int:
    from alexnet_mp.bench.report import scaling_table

    try:
        reports = []
        for path in paths:
            try:
                report_ = json.loads(Path(path).read_text())
                why = None if isinstance(report_, dict) and isinstance(
                    report_.get("results"), list) else "no results"
            except (OSError, ValueError) as exc:
                why = type(exc).__name__
            if why is not None:
                raise UserError(f"{path} is not a readable bench.json ({why}); give the files "
                                "launch/bench.py wrote")
            reports.append(report_)
        table = scaling_table(reports)
    except UserError as exc:
        return report(exc)
    print(table)
    if out:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "scaling.md").write_text(table + "\n")
        (folder / "scaling.json").write_text(json.dumps(reports, indent=1))
    return 0


def startup(args: argparse.Namespace, cfg) -> None:
    """Launch the main job ``args.repeat`` times, each in a fresh run folder, logging every
    step; report the median time to its first step and what one process spends on each part."""
    import statistics
    import tempfile

    from alexnet_mp.bench.micro import startup_parts, time_to_first_step

    if args.startup < 1 or args.repeat < 1:
        raise UserError("--startup takes a number of ranks >= 1, --repeat >= 1")
    # The main job as its users start it: the clone's launch/train.py, else the installed module.
    script = PACKAGE.parent / "launch" / "train.py"
    entry = [str(script)] if script.is_file() else ["-m", "alexnet_mp.cli.train"]
    runs = []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            metrics = Path(tmp) / "run" / "metrics.jsonl"
            train = [*entry, *(["--config", args.config] if args.config else []),
                     *args.overrides, f"run.dir={Path(tmp) / 'run'}", "run.log_every=1",
                     "run.progress=false", "train.max_steps=2", "train.resume=none",
                     "data.test_limit=64"]
            launcher = ([sys.executable] if args.startup == 1 else
                        [sys.executable, "-m", "torch.distributed.run", "--standalone",
                         f"--nproc_per_node={args.startup}"])
            runs.append(time_to_first_step([*launcher, *train], metrics))
    figures = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    parts = startup_parts(cfg)
    lines = [f"launch to the end of step 1 ({args.startup} rank(s), median of {len(runs)}): "
             f"{figures['first_step_end_s']:.2f} s; step 2 {figures['second_step_s']:.2f} s; "
             f"start-up (step 1's end less one step) {figures['startup_s']:.2f} s"]
    lines += [f"  {name}: {seconds:.3f} s" for name, seconds in parts.items()]
    print("\n".join(lines), flush=True)
    if args.out:
        folder = Path(args.out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "startup.json").write_text(json.dumps(
            {"ranks": args.startup, "runs": runs, "median": figures, "parts": parts}, indent=1))


def lrn(args: argparse.Namespace, cfg, open_layout) -> None:
    from alexnet_mp.bench.micro import lrn_bench, lrn_markdown

    open_layout("alexnet_columns")  # one process: its threads, as a one-rank run sets them
    rows = lrn_bench(cfg, max(2, args.repeat))
    print(lrn_markdown(rows), flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "lrn.json").write_text(json.dumps(rows, indent=1))


def input_path(args: argparse.Namespace, cfg) -> None:
    import tempfile

    from alexnet_mp.bench.inputs import input_path_bench, input_path_markdown

    if args.repeat < 1:
        raise UserError("--repeat takes a number >= 1")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.out) if args.out else Path(tmp)
        result = input_path_bench(cfg, work, rounds=args.repeat,
                                  say=lambda s: print(s, flush=True))
        print(input_path_markdown(result), flush=True)
        if args.out:
            (work / "input_path.json").write_text(json.dumps(result, indent=1))
            (work / "input_path.md").write_text(input_path_markdown(result) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.scaling_table:
        return scaling(args.scaling_table, args.out)
    if args.startup is not None:
        return run_entry(args, lambda cfg, open_layout: startup(args, cfg))
    if args.lrn:
        return run_entry(args, lambda cfg, open_layout: lrn(args, cfg, open_layout))
    if args.saves:
        from alexnet_mp.bench.saves import saves
        return run_entry(args, lambda cfg, open_layout: saves(args, cfg, open_layout))
    if args.input_path:
        return run_entry(args, lambda cfg, open_layout: input_path(args, cfg))

    def analytic(cfg, open_layout) -> None:
        from alexnet_mp.bench.counts import analytic_table

        try:
            worlds = [int(w) for w in args.analytic.split(",") if w]
        except ValueError:
            worlds = []
        if not worlds or min(worlds) < 2:
            raise UserError(f"--analytic takes world sizes of 2 or more, such as 2,4,8; got "
                            f"'{args.analytic}'")
        print(analytic_table(cfg, worlds))

    def body(cfg, open_layout) -> None:
        from alexnet_mp.bench.layouts import layouts_for
        from alexnet_mp.bench.run import MODES, run_bench

        modes = ["train"] if args.host_overhead else [m for m in args.data.split(",") if m]
        bad = [m for m in modes if m not in MODES]
        if bad or not modes or args.steps < 1 or args.warmup < 0 or args.repeat < 1:
            raise UserError(f"--data takes {', '.join(MODES)}; --steps >= 1, --warmup >= 0, "
                            "--repeat >= 1")

        # The process's own layout: its default group, device and threads. The bench builds
        # each layout's mesh itself.
        layout = open_layout("alexnet_columns")
        if args.host_overhead:
            cfg.model.width, cfg.data.image_size = 1 / 32, 67
            cfg.train.batch_size = 2 * layout.world_size
        layouts = (layouts_for(layout.world_size) if args.layouts == "auto"
                   else [n for n in args.layouts.split(",") if n])
        if args.host_overhead:  # d2l's widths are fixed: it is never a tiny model
            layouts = [n for n in layouts if n != "d2l"]
        out = Path(args.out) if args.out else Path("runs") / f"{cfg.name}-bench"
        say = print if layout.is_main else (lambda *a, **k: None)
        run_bench(cfg, layout, out, layouts, modes, args.steps, args.warmup,
                  say=lambda s: say(s, flush=True), profile=args.profile, repeat=args.repeat,
                  variants=[v for v in args.variants.split(",") if v])

    return run_entry(args, analytic if args.analytic else body)


if __name__ == "__main__":
    sys.exit(main())
