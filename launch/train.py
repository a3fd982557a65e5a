"""Entry point: ``python launch/train.py`` (one device) or ``torchrun --nproc_per_node=2 ...``.

It reads the command line and torchrun's environment, and hands plain values to the package.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # a fresh clone runs without `pip install -e .` too
    sys.path.insert(0, str(ROOT))

from alexnet_mp.config import load_config  # noqa: E402
from alexnet_mp.errors import UserError  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train AlexNet: one device, or one column per rank.")
    p.add_argument("--config", help="YAML file (default: configs/default.yaml)")
    p.add_argument("--print-shapes", action="store_true",
                   help="print each layer's output shape for one image and exit")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="override any config field, e.g. train.lr=0.02 data.image_size=96")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env = os.environ
    rank = int(env.get("RANK", 0))
    layout = None
    try:
        cfg = load_config(args.config, args.overrides,
                          default_path=ROOT / "configs" / "default.yaml")
        if args.print_shapes:
            from alexnet_mp.models.shapes import shape_table

            print(shape_table(cfg.model, cfg.data.image_size))
            return 0
        from alexnet_mp.parallel.layout import setup_layout
        from alexnet_mp.run import Trainer

        layout = setup_layout(
            cfg.model.name, rank=rank, world_size=int(env.get("WORLD_SIZE", 1)),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", env.get("WORLD_SIZE", 1))),
            device=cfg.run.device, threads=cfg.run.threads, timeout_s=cfg.run.timeout_s,
            attempt=int(env.get("TORCHELASTIC_RESTART_COUNT", 0)))
        Trainer(cfg, layout).run()
        return 0
    except UserError as exc:
        if rank == 0 or getattr(exc, "broken_group", False):
            print(f"error: {exc}", file=sys.stderr, flush=True)
        if getattr(exc, "broken_group", False):
            # Tearing down a group whose peer is gone can abort the process; leave at once.
            sys.stdout.flush()
            os._exit(exc.exit_code)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    finally:
        if layout is not None:
            layout.close()


if __name__ == "__main__":
    sys.exit(main())
