"""Writes a folder of ImageNet-sized JPEGs (500x375, train/ and val/, two classes) cut from the
photographs scikit-learn ships: ``python scripts/make_photos.py OUT N`` (N training files).
The GPU script prepares shards of it to time the training loop on them."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from alexnet_mp.bench.inputs import photo_folder  # noqa: E402

if __name__ == "__main__":
    photo_folder(Path(sys.argv[1]), int(sys.argv[2]))
