"""``python launch/pca_lighting.py [--config FILE] [section.key=value ...]``: the RGB principal
components of the configured training set, for the paper's PCA lighting.

Writes a small JSON file (to --out, else data.lighting_file, else <data.root>/rgb_pca.json);
training uses it with data.lighting_file=PATH.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from alexnet_mp.cli.common import run_entry


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="RGB covariance eigen-decomposition of the training "
                                            "images, for PCA lighting (data.lighting_file).")
    p.add_argument("--config", help="YAML file (default: configs/default.yaml)")
    p.add_argument("--images", type=int, default=10_000,
                   help="read a seeded sample of this many images when the set holds more "
                        "(default 10000)")
    p.add_argument("--out", help="output JSON (default: data.lighting_file, else "
                                 "<data.root>/rgb_pca.json)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="override any config field, e.g. data.root=/data/imagenet")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body(cfg, _open_layout) -> int:
        from alexnet_mp.lighting import write_lighting
        from alexnet_mp.pca import rgb_pca

        out = Path(args.out or cfg.data.lighting_file or Path(cfg.data.root) / "rgb_pca.json")
        pca = rgb_pca(cfg.data, in_channels=cfg.model.in_channels, images=args.images,
                      seed=cfg.train.seed, num_workers=cfg.data.num_workers)
        write_lighting(pca, out)
        if pca.unreadable:
            print(f"warning: {pca.unreadable} unreadable image(s) left out", file=sys.stderr)
        print(f"{pca.images} images, {pca.pixels} pixels: eigenvalues "
              f"{', '.join(f'{v:.6g}' for v in pca.eigval)}; wrote {out}; train with "
              f"data.lighting_file={out}", flush=True)
        return 0

    return run_entry(args, body)


if __name__ == "__main__":
    sys.exit(main())
