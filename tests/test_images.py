"""Image files of every mode PIL reports come out as 8-bit L or RGB, wide values scaled rather
than clipped, alike in training's image folders, evaluation and prediction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from alexnet_mp import inference
from alexnet_mp.config import DataConfig
from alexnet_mp.data import build_data
from alexnet_mp.images import open_image


def _gradient(high: float, dtype, low: float = 0.0) -> np.ndarray:
    """32 x 64, rising left to right from ``low`` to ``high``."""
    return np.tile(np.linspace(low, high, 64), (32, 1)).astype(dtype)


def _save(img: Image.Image, path: Path) -> Path:
    img.save(path)
    with Image.open(path) as back:
        assert back.mode == img.mode, f"{path.suffix} did not keep {img.mode}"
    return path


def _assert_scaled_gradient(path: Path, mode: str = "L") -> np.ndarray:
    got = np.asarray(open_image(path, mode)).astype(int)
    row = got[0] if mode == "L" else got[0, :, 0]
    assert row.min() == 0 and row.max() == 255  # the whole 8-bit range, nothing clipped
    assert (np.diff(row) >= 0).all() and len(np.unique(row)) > 50  # ordering kept, not banded
    return got


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_a_16_bit_gradient_keeps_its_ordering_and_range(tmp_path, mode):
    path = _save(Image.fromarray(_gradient(65535, np.uint16)), tmp_path / "g16.png")
    with Image.open(path) as img:
        assert img.mode == "I;16"
        clipped = np.asarray(img.convert("L"))
    assert (clipped == 255).mean() > 0.9  # what PIL alone does
    got = _assert_scaled_gradient(path, mode)
    expected = np.rint(_gradient(65535, np.uint16)[0].astype(float) / 257)
    row = got[0] if mode == "L" else got[0, :, 0]
    assert np.array_equal(row, expected)
    if mode == "RGB":
        assert (got[..., 0] == got[..., 1]).all() and (got[..., 1] == got[..., 2]).all()


@pytest.mark.parametrize("values,expected_high", [
    (_gradient(65535, np.int32), 255),  # 16-bit values stored as 32-bit: /257
    (_gradient(200, np.int32), 200),  # 8-bit values stored wide: as they are
])
def test_a_32_bit_integer_image_is_read_on_its_scale(tmp_path, values, expected_high):
    path = _save(Image.fromarray(values), tmp_path / "i.tif")
    with Image.open(path) as img:
        assert img.mode == "I"
    got = np.asarray(open_image(path, "L")).astype(int)[0]
    assert got.min() == 0 and got.max() == expected_high and (np.diff(got) >= 0).all()


def test_a_32_bit_integer_image_beyond_16_bits_spans_its_own_range(tmp_path):
    path = _save(Image.fromarray(_gradient(3_000_000, np.int32, low=-1000)), tmp_path / "i.tif")
    _assert_scaled_gradient(path)


@pytest.mark.parametrize("high", [1.0, 65535.0, 1e9])
def test_a_float_image_is_scaled_not_clipped(tmp_path, high):
    path = _save(Image.fromarray(_gradient(high, np.float32)), tmp_path / "f.tif")
    with Image.open(path) as img:
        assert img.mode == "F"
    _assert_scaled_gradient(path)


def test_palette_grey_alpha_and_cmyk_images_convert_as_pil_does(tmp_path):
    rgb = Image.fromarray((np.random.default_rng(0).random((20, 30, 3)) * 255).astype(np.uint8))
    cases = {"P": (rgb.convert("P"), "p.png"), "LA": (rgb.convert("LA"), "la.png"),
             "CMYK": (rgb.convert("CMYK"), "cmyk.tif"), "L": (rgb.convert("L"), "l.png"),
             "RGB": (rgb, "rgb.png")}
    for mode, (img, name) in cases.items():
        path = _save(img, tmp_path / name)
        for target in ("L", "RGB"):
            with Image.open(path) as original:
                expected = np.asarray(original.convert(target))
            assert np.array_equal(np.asarray(open_image(path, target)), expected), (mode, target)
    # 8-bit files are left exactly as they are.
    assert np.array_equal(np.asarray(open_image(tmp_path / "rgb.png", "RGB")), np.asarray(rgb))


def test_training_evaluation_and_prediction_read_a_16_bit_file_alike(tmp_path):
    root = tmp_path / "folder"
    for part in ("train", "val"):
        for name in ("a", "b"):
            (root / part / name).mkdir(parents=True)
            _save(Image.fromarray(_gradient(65535, np.uint16)), root / part / name / "0.png")
    cfg = DataConfig(name="imagefolder", root=str(root), image_size=32, augment=False)
    data = build_data(cfg, num_classes=2, in_channels=3, seed=0)
    train = data.train
    while not hasattr(train, "loader"):  # under the augmentation's and a Subset's wrappers
        train = getattr(train, "base", None) or train.dataset
    path = root / "train" / "a" / "0.png"
    assert np.array_equal(np.asarray(train.loader(str(path))),
                          np.asarray(open_image(path, "RGB")))
    sample = torch.as_tensor(data.train[0][0])  # after training's crop
    assert (sample == 255).float().mean() < 0.1  # not the clipped white image
    info = inference.DataInfo("imagefolder", ["a", "b"], (0.5,) * 3, (0.25,) * 3, 32, 3)
    test = data.test[0][0]
    predicted = inference.read_image(root / "val" / "a" / "0.png", info)
    assert torch.equal(torch.as_tensor(test), predicted)  # evaluate and predict, same pixels
    assert (predicted == 255).float().mean() < 0.1  # not the clipped white image
