"""The d2l Sequential AlexNet: the book's shape table, any image size the arithmetic allows."""

from __future__ import annotations

import pytest
import torch

from alexnet_mp.config import ModelConfig
from alexnet_mp.errors import UserError
from alexnet_mp.models import build_model
from alexnet_mp.models.shapes import layer_shapes, shape_table
from alexnet_mp.parallel.layout import Layout

# d2l §8.1, for a 1x1x224x224 input.
D2L_TABLE = [
    ("Conv2d", (1, 96, 54, 54)), ("ReLU", (1, 96, 54, 54)), ("MaxPool2d", (1, 96, 26, 26)),
    ("Conv2d", (1, 256, 26, 26)), ("ReLU", (1, 256, 26, 26)), ("MaxPool2d", (1, 256, 12, 12)),
    ("Conv2d", (1, 384, 12, 12)), ("ReLU", (1, 384, 12, 12)),
    ("Conv2d", (1, 384, 12, 12)), ("ReLU", (1, 384, 12, 12)),
    ("Conv2d", (1, 256, 12, 12)), ("ReLU", (1, 256, 12, 12)), ("MaxPool2d", (1, 256, 5, 5)),
    ("Flatten", (1, 6400)),
    ("Linear", (1, 4096)), ("ReLU", (1, 4096)), ("Dropout", (1, 4096)),
    ("Linear", (1, 4096)), ("ReLU", (1, 4096)), ("Dropout", (1, 4096)),
    ("Linear", (1, 10)),
]


def test_shape_table_matches_d2l_exactly():
    assert layer_shapes(ModelConfig(name="alexnet_d2l"), 224) == D2L_TABLE
    assert shape_table(ModelConfig(name="alexnet_d2l"), 224).splitlines()[0] == (
        "Conv2d output shape:\t(1, 96, 54, 54)")


@pytest.mark.parametrize("size", [96, 128, 227])
def test_fc_input_follows_the_image_size(size):
    model = build_model(ModelConfig(name="alexnet_d2l", num_classes=3, in_channels=3), size,
                        Layout(), seed=0)
    assert model(torch.zeros(2, 3, size, size)).shape == (2, 3)


def test_too_small_image_names_the_minimum():
    with pytest.raises(UserError, match="too small for alexnet_d2l; use at least 6"):
        build_model(ModelConfig(name="alexnet_d2l"), 40, Layout(), seed=0)
    with pytest.raises(UserError, match="too small for alexnet_columns; use at least 67"):
        build_model(ModelConfig(name="alexnet_columns"), 40, Layout(), seed=0)


def test_same_seed_same_initial_parameters():
    a = build_model(ModelConfig(name="alexnet_d2l", init="xavier"), 96, Layout(), seed=3)
    b = build_model(ModelConfig(name="alexnet_d2l", init="xavier"), 96, Layout(), seed=3)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
