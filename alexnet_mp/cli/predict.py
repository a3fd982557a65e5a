"""Entry point: the most likely classes of image files, by a checkpoint's model.

``python launch/predict.py CHECKPOINT IMAGE... [--top K] [--json] [--ten-crop]``. Each image is
read with PIL in the checkpoint's channels (L or RGB), cropped as evaluation does and normalised
with the checkpoint's mean and std. An image that cannot be read is one line on stderr naming
it; the others are still classified.

Exit codes: 0 every image classified; 1 some could not be read (the rest were printed); 2 bad
input before any image (checkpoint, option).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from alexnet_mp.cli.common import run_checkpoint_entry

SOME_IMAGES_FAILED = 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Classify image files with a checkpoint: the top classes and their "
                    "probabilities, by name.")
    p.add_argument("checkpoint", help="a .pt file written by launch/train.py")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files PIL can read")
    p.add_argument("--top", type=int, default=5, metavar="K",
                   help="classes shown per image (default 5)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of a "
                                                       "table")
    p.add_argument("--ten-crop", action="store_true",
                   help="average the softmax over ten crops, as evaluate.py --ten-crop")
    return p.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body(open_layout) -> int:
        from alexnet_mp import inference
        from alexnet_mp.errors import UserError

        if args.top < 1:
            raise UserError(f"--top must be at least 1, got {args.top}")
        loaded = inference.load(args.checkpoint, open_layout)
        results = inference.predict(loaded, args.images, args.top, args.ten_crop)
        failed = any("error" in r for r in results)
        if not loaded.layout.is_main:
            return SOME_IMAGES_FAILED if failed else 0
        for note in loaded.notes:
            print(f"warning: {note}", file=sys.stderr, flush=True)
        views = inference.crop_views(args.ten_crop, loaded.config.data.hflip)
        if args.ten_crop and not args.json:
            print(f"each image judged by {views}", file=sys.stderr, flush=True)
        try:
            for r in results:
                if "error" in r:
                    print(f"error: {r['error']}", file=sys.stderr, flush=True)
                elif not args.json:
                    print(inference.format_predictions([r]), flush=True)
            if args.json:
                print(json.dumps({"checkpoint": str(loaded.path), "step": loaded.step,
                                  "ten_crop": args.ten_crop, "views": views,
                                  "results": results}, indent=2),
                      flush=True)
        except BrokenPipeError:  # `predict.py ... | head`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return SOME_IMAGES_FAILED if failed else 0

    return run_checkpoint_entry(body)


if __name__ == "__main__":
    sys.exit(main())
