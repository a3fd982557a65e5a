"""``python launch/prepare_data.py FOLDER OUT``: an image folder (train/ and val/ of class
folders) converted into prepared shards, which training reads with ``data.name=shards
data.root=OUT``.

Images are scaled to a short side of 256 and stored as JPEG files in shards of --per-shard
images, with an index, the class names and a sha256 per shard in OUT/manifest.json. Every
core converts; an interrupted conversion resumes when run again with the same arguments.
"""

from __future__ import annotations

import argparse
import sys

from alexnet_mp.cli.common import guarded


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from alexnet_mp.prepare import PER_SHARD, QUALITY, SHORT_SIDE

    p = argparse.ArgumentParser(description="Convert an image folder into prepared shards "
                                            "(data.name=shards).")
    p.add_argument("folder", help="the folder holding train/ and val/, one subfolder per class")
    p.add_argument("out", help="the folder to write the shards to (data.root for training)")
    p.add_argument("--per-shard", type=int, default=PER_SHARD,
                   help=f"images per shard (default {PER_SHARD}: about 300 MB of ImageNet)")
    p.add_argument("--short-side", type=int, default=SHORT_SIDE,
                   help=f"the side images are scaled to (default {SHORT_SIDE}, the paper's)")
    p.add_argument("--quality", type=int, default=QUALITY,
                   help=f"JPEG quality (default {QUALITY})")
    p.add_argument("--workers", type=int, help="processes (default: every core)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body(_open_layout) -> int:
        from alexnet_mp.prepare import prepare

        prepare(args.folder, args.out, per_shard=args.per_shard, short_side=args.short_side,
                quality=args.quality, workers=args.workers, show_bar=not args.no_progress)
        return 0

    return guarded(body, "interrupted; the finished shards are kept: run the same command "
                          "again to resume")


if __name__ == "__main__":
    sys.exit(main())
