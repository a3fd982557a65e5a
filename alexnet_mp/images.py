"""Image files as a model reads them: 8-bit L or RGB, whatever the file holds.

Training's image folders, evaluation and prediction all open files here, so a model sees the
same pixels in each. PIL's own ``convert("L")`` and ``convert("RGB")`` clip wider values
instead of scaling them: a 16-bit image becomes almost all white, and is still classified.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# A 32-bit integer or float image says nothing of its scale. The ranges its values are read in,
# smallest first: the first that holds all of them is taken as its full scale (a float image
# of 0..1, 8-bit values stored wide, 16-bit values). Anything else, negative values included,
# is scaled from the image's own minimum to its own maximum. 16-bit modes are 0..65535.
FULL_SCALES = (1.0, 255.0, 65535.0)


def is_wide(mode: str) -> bool:
    """Modes with more than 8 bits a sample: 16-bit, 32-bit integer and float."""
    return mode in ("I", "F") or mode.startswith("I;16")


def to_8bit(img: Image.Image) -> Image.Image:
    """A one-band wide image (I;16, I, F) as an 8-bit L image, scaled so that its ordering is
    kept and its full scale becomes 0..255; other images are returned as they are."""
    if not is_wide(img.mode):
        return img
    values = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if img.mode.startswith("I;16"):
        scale = 65535.0
    elif low >= 0:
        scale = next((s for s in FULL_SCALES if high <= s and (s > 1.0 or img.mode == "F")),
                     None)
    else:
        scale = None
    if scale is not None:
        scaled = values * (255.0 / scale)
    elif high > low:
        scaled = (values - low) * (255.0 / (high - low))
    else:
        scaled = np.zeros_like(values)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))


def as_mode(img: Image.Image, mode: str) -> Image.Image:
    """``img`` as ``mode`` (``"L"`` or ``"RGB"``), wide values scaled rather than clipped."""
    return to_8bit(img).convert(mode)


def open_image(path: str | Path, mode: str) -> Image.Image:
    """The file at ``path``, decoded whole (a truncated file fails here, not later), as ``mode``
    (``"L"`` or ``"RGB"``)."""
    with Image.open(path) as img:
        img.load()
        return as_mode(img, mode)


def open_rgb(path: str) -> Image.Image:
    """:func:`open_image` as RGB: the loader of training's image folders (a module-level
    function, so that loader workers can receive it)."""
    return open_image(path, "RGB")
