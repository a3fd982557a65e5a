"""Entry point: a checkpoint's top-1, top-5 and loss on its data set's test (val) split.

``python launch/evaluate.py CHECKPOINT`` on one device, or ``torchrun --nproc_per_node=2
launch/evaluate.py CHECKPOINT`` (one column per rank). The checkpoint alone says which model and
data set; the results go to a JSON file beside it. It reads the command line and torchrun's
environment, and hands plain values to the package.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from alexnet_mp.cli.common import run_checkpoint_entry


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Evaluate a checkpoint on its data set's test (val) split: top-1, top-5, "
                    "loss. One device, or under torchrun with one column per rank.")
    p.add_argument("checkpoint", help="a .pt file written by launch/train.py")
    p.add_argument("--data-root", help="folder of the data set (default: the checkpoint's "
                                       "data.root)")
    p.add_argument("--data", metavar="NAME", help="data set (default: the checkpoint's); it must "
                                                   "have the checkpoint's classes")
    p.add_argument("--ten-crop", action="store_true",
                   help="the paper's test: softmax averaged over the four corner and the centre "
                        "crops and their flips, of the image scaled by 256/227")
    p.add_argument("--batch-size", type=int, help="global batch (default: the checkpoint's "
                                                  "train.batch_size)")
    p.add_argument("--out", help="JSON file for the results (default: beside the checkpoint, "
                                 "NAME.eval.json, or NAME.eval-10crop.json with --ten-crop)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="override a config key, e.g. data.test_limit=null run.device=cpu")
    return p.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = list(args.overrides)
    # JSON-quoted: a path is a YAML string whatever characters it holds.
    if args.data is not None:
        overrides.append(f"data.name={json.dumps(args.data)}")
    if args.data_root is not None:
        overrides.append(f"data.root={json.dumps(args.data_root)}")

    def body(open_layout) -> int:
        from alexnet_mp import inference

        loaded = inference.load(args.checkpoint, open_layout, overrides)
        main_rank = loaded.layout.is_main

        def warn(text: str) -> None:
            if main_rank:
                print(f"warning: {text}", file=sys.stderr, flush=True)

        for note in loaded.notes:
            warn(note)
        out = Path(args.out) if args.out else inference.default_output(args.checkpoint,
                                                                        args.ten_crop)
        result = inference.evaluate_to_file(
            loaded, out, ten_crop=args.ten_crop, batch_size=args.batch_size, warn=warn,
            show_bar=main_rank and loaded.config.run.progress)
        if main_rank:
            print(f"{inference.summary(result)}; written to {out}", flush=True)
        return 0

    return run_checkpoint_entry(body)


if __name__ == "__main__":
    sys.exit(main())
