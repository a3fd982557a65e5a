"""``python launch/prepare_data.py`` in a clone: runs :mod:`alexnet_mp.cli.prepare_data`."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # a plain clone runs this file without installing the package
    sys.path.insert(0, str(ROOT))

from alexnet_mp.cli.prepare_data import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
