"""Entry point of the layout comparison: ``torchrun --nproc_per_node=2 launch/bench.py``.

It takes the training config (``--config``, ``section.key=value``) so that the benchmark runs the
same work as the training job, and writes bench.json, bench.md and bench.png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # a fresh clone runs without `pip install -e .` too
    sys.path.insert(0, str(ROOT))

from alexnet_mp.errors import UserError  # noqa: E402
from launch.common import run_entry  # noqa: E402

DEFAULT_LAYOUTS = "d2l,grouped,split,split_overlap,ddp,hybrid"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Compare AlexNet layouts on the same work.")
    p.add_argument("--config", help="YAML file (default: configs/default.yaml)")
    p.add_argument("--layouts", default=DEFAULT_LAYOUTS, help=f"default: {DEFAULT_LAYOUTS}")
    p.add_argument("--data", default="synthetic,loader",
                   help="synthetic (tensors on the device), loader (the real pipeline), or both")
    p.add_argument("--steps", type=int, default=8, help="timed steps per layout")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--out", help="output folder (default: runs/<config>-bench)")
    p.add_argument("--profile", action="store_true",
                   help="also write a torch.profiler table per layout and rank")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body(cfg, open_layout) -> None:
        modes = [m for m in args.data.split(",") if m]
        bad = [m for m in modes if m not in ("synthetic", "loader")]
        if bad or args.steps < 1 or args.warmup < 0:
            raise UserError("--data takes synthetic and/or loader, --steps >= 1, --warmup >= 0")
        from alexnet_mp.bench import run_bench

        # The layout check is for training; the bench builds every layout itself.
        layout = open_layout("alexnet_columns")
        out = Path(args.out) if args.out else Path("runs") / f"{cfg.name}-bench"
        say = print if layout.is_main else (lambda *a, **k: None)
        run_bench(cfg, layout, out, args.layouts.split(","), modes, args.steps, args.warmup,
                  say=lambda s: say(s, flush=True), profile=args.profile)

    return run_entry(args, body)


if __name__ == "__main__":
    sys.exit(main())
