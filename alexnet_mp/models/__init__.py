"""Builds the model a config names, for the rank's place in the layout."""

from __future__ import annotations

import torch
from torch import nn

from alexnet_mp.config import ModelConfig
from alexnet_mp.errors import UserError
from alexnet_mp.models.columns import Arch, ColumnAlexNet, canonical_init, min_image_size
from alexnet_mp.models.d2l import d2l_alexnet
from alexnet_mp.parallel.exchange import ColumnExchange, Meter
from alexnet_mp.parallel.layout import Layout

__all__ = ["build_model", "model_family", "ColumnAlexNet", "Arch"]


def model_family(name: str) -> str:
    """Names whose checkpoints are interchangeable: the grouped form is the columns' canonical."""
    return "alexnet_columns" if name in ("alexnet_columns", "alexnet_grouped") else name


def _d2l_min_size() -> int:
    for size in range(1, 512):
        try:
            d2l_alexnet(image_size=size)
            return size
        except RuntimeError:
            continue
    raise AssertionError("unreachable")


def build_model(cfg: ModelConfig, image_size: int, layout: Layout, seed: int,
                meter: Meter | None = None) -> nn.Module:
    """The model on ``layout.device``, initialised from ``seed`` the same way in every layout.

    ``meter`` (the benchmark's) times the column exchanges and counts their bytes.
    """
    init = cfg.init if cfg.init != "auto" else (
        "xavier_relu" if cfg.name == "alexnet_d2l" else "kaiming")
    if cfg.name == "alexnet_d2l":
        torch.manual_seed(seed)
        try:
            model = d2l_alexnet(cfg.num_classes, cfg.in_channels, image_size, cfg.dropout)
        except RuntimeError:
            raise UserError(f"data.image_size={image_size} is too small for alexnet_d2l; use at "
                            f"least {_d2l_min_size()} (224 as in d2l)") from None
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                if init in ("xavier", "xavier_relu"):
                    gain = nn.init.calculate_gain("relu") if init == "xavier_relu" else 1.0
                    nn.init.xavier_uniform_(m.weight, gain=gain)
                elif init == "kaiming":
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                else:
                    nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)
        return model.to(layout.device)

    if image_size < min_image_size():
        raise UserError(f"data.image_size={image_size} is too small for {cfg.name}; use at least "
                        f"{min_image_size()} (227 is the paper's input)")
    arch = Arch(cfg.num_classes, cfg.in_channels, image_size, cfg.width, cfg.dropout)
    generator = torch.Generator(device=layout.device).manual_seed(seed + 1)
    exchange = None
    if layout.column is not None:
        overlap = cfg.overlap if cfg.overlap is not None else layout.device.type == "cuda"
        exchange = ColumnExchange(layout.column, layout.columns, layout.group, overlap, meter)
    # Built on the meta device so that no throw-away full-width tensors are ever allocated.
    with torch.device("meta"):
        model = ColumnAlexNet(arch, layout.column, exchange, generator)
    model = model.to_empty(device=layout.device)
    model.load_state_dict(canonical_init(arch, init, seed, model.slices()))
    return model
