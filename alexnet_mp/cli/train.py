"""Entry point: ``python launch/train.py`` (one device) or ``torchrun --nproc_per_node=2 ...``;
installed, ``alexnet-train`` (``torchrun --no-python ... alexnet-train``) or ``python -m
alexnet_mp.cli.train`` (``torchrun ... -m alexnet_mp.cli.train``).

It reads the command line and torchrun's environment, and hands plain values to the package.
``kill -USR1 PID`` prints every thread's stack of a hung rank to stderr.
"""

from __future__ import annotations

import argparse
import os
import sys

from alexnet_mp.cli.common import restarts_from_env, run_entry, training_interrupted
from alexnet_mp.cli.process import dump_stacks_on_sigusr1


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
    dump_stacks_on_sigusr1()

    def body(cfg, open_layout) -> None:
        if args.print_shapes:
            from alexnet_mp.models.shapes import shape_table

            try:
                print(shape_table(cfg.model, cfg.data.image_size), flush=True)
            except BrokenPipeError:  # `--print-shapes | head`: the reader has what it wanted
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        from alexnet_mp.run import Trainer

        return Trainer(cfg, open_layout(cfg.model.name),
                       restarts=restarts_from_env()).run().get("exit_code", 0)

    return run_entry(args, body, interrupted=training_interrupted)


if __name__ == "__main__":
    sys.exit(main())
