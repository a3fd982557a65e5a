"""The paper's PCA colour lighting (§4.1): the augmentation and its principal components.

The components are the published ImageNet ones, or a training set's own: measured by
launch/pca_lighting.py (:func:`alexnet_mp.pca.rgb_pca`) and kept in the JSON file that
``data.lighting_file`` names, which this module writes and reads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alexnet_mp.config import DataConfig
from alexnet_mp.errors import UserError

# ImageNet RGB eigen-decomposition used for the paper's PCA colour lighting (§4.1).
EIGVAL = torch.tensor([0.2175, 0.0188, 0.0045])
EIGVEC = torch.tensor([[-0.5675, 0.7192, 0.4009],
                       [-0.5808, -0.0045, -0.8140],
                       [-0.5836, -0.6948, 0.4203]])


class Lighting(torch.nn.Module):
    """Adds multiples of the RGB principal components, magnitudes ~ N(0, sigma) (paper §4.1).

    ``eigval``/``eigvec`` (columns are the components): the published ImageNet figures unless
    a training set's own are given (:func:`lighting_components`)."""

    def __init__(self, sigma: float = 0.1, eigval: torch.Tensor | None = None,
                 eigvec: torch.Tensor | None = None) -> None:
        super().__init__()
        self.sigma = sigma
        self.eigval = EIGVAL if eigval is None else eigval
        self.eigvec = EIGVEC if eigvec is None else eigvec

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if img.shape[0] != 3:
            return img
        alpha = torch.randn(3) * self.sigma
        return (img + (self.eigvec @ (alpha * self.eigval)).view(3, 1, 1)).clamp(0, 1)


# -- PCA lighting from a training set's own colours (launch/pca_lighting.py) ------------------

LIGHTING_FORMAT = "alexnet_mp/rgb-pca/1"


@dataclass
class RGBPCA:
    """Principal components of a training set's RGB pixel values, pixels in [0, 1]."""

    eigval: list[float]  # variances along the components, largest first
    eigvec: list[list[float]]  # 3 x 3, column i is component i (as EIGVEC)
    mean: list[float]
    images: int  # images read (a seeded sample when the set is larger than asked for)
    pixels: int
    unreadable: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"format": LIGHTING_FORMAT, "eigval": self.eigval, "eigvec": self.eigvec,
                "mean": self.mean, "images": self.images, "pixels": self.pixels,
                "unreadable": self.unreadable}


def write_lighting(pca: RGBPCA, path: Path) -> None:
    """The JSON file ``data.lighting_file`` names, written atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(pca.to_dict(), indent=2) + "\n")
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(f"could not write '{path}' ({exc.strerror}); pass --out with a writable "
                        "path") from None


def read_lighting(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(eigval, eigvec) from a file :func:`write_lighting` wrote; any problem is one line."""
    path = Path(path)
    redo = "write it with python launch/pca_lighting.py, or set data.lighting_file=null"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"data.lighting_file '{path}' does not exist; {redo}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"data.lighting_file '{path}' is not readable JSON ({exc}); "
                        f"{redo}") from None
    try:
        eigval = torch.tensor(data["eigval"], dtype=torch.float32)
        eigvec = torch.tensor(data["eigvec"], dtype=torch.float32)
    except (TypeError, KeyError, ValueError, RuntimeError):
        raise UserError(f"data.lighting_file '{path}' lacks 'eigval' (3 numbers) and 'eigvec' "
                        f"(3 x 3); {redo}") from None
    if eigval.shape != (3,) or eigvec.shape != (3, 3):
        raise UserError(f"data.lighting_file '{path}' holds eigval {tuple(eigval.shape)} and "
                        f"eigvec {tuple(eigvec.shape)}, not (3,) and (3, 3); {redo}")
    if not (torch.isfinite(eigval).all() and torch.isfinite(eigvec).all()) or (eigval < 0).any():
        raise UserError(f"data.lighting_file '{path}' holds negative or non-finite values; "
                        f"{redo}")
    return eigval, eigvec


def lighting_components(cfg: DataConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``data.lighting_file``'s components, or the published ImageNet ones."""
    if cfg.lighting_file is None:
        return EIGVAL, EIGVEC
    return read_lighting(cfg.lighting_file)
