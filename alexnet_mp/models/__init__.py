"""Builds the model a config names, for the rank's place in the layout."""

from __future__ import annotations

from collections.abc import Callable

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


def resolve_init(cfg: ModelConfig) -> str:
    """``auto``: Glorot with the ReLU gain for d2l's net, He init for the columns (README)."""
    if cfg.init != "auto":
        return cfg.init
    return "xavier_relu" if cfg.name == "alexnet_d2l" else "kaiming"


def arch_of(cfg: ModelConfig, image_size: int) -> Arch:
    return Arch(cfg.num_classes, cfg.in_channels, image_size, cfg.width, cfg.dropout)


def materialize(make: Callable[[torch.Generator], nn.Module], cfg: ModelConfig, image_size: int,
                device: torch.device, seed: int) -> nn.Module:
    """``make(dropout generator)`` built on the meta device, then only its own rows allocated and
    drawn from the canonical initialisation, so no throw-away full-width tensor ever exists."""
    generator = torch.Generator(device=device).manual_seed(seed + 1)
    with torch.device("meta"):
        model = make(generator)
    model = model.to_empty(device=device)
    model.load_state_dict(canonical_init(arch_of(cfg, image_size), resolve_init(cfg), seed,
                                         model.slices()))
    return model


def build_model(cfg: ModelConfig, image_size: int, layout: Layout, seed: int,
                meter: Meter | None = None) -> nn.Module:
    """The model on ``layout.device``, initialised from ``seed`` the same way in every layout.

    ``meter`` (the benchmark's) times the column exchanges and counts their bytes.
    """
    init = resolve_init(cfg)
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
    exchange = None
    if layout.column is not None:
        overlap = cfg.overlap if cfg.overlap is not None else layout.device.type == "cuda"
        exchange = ColumnExchange(layout.column, layout.columns, layout.group, overlap, meter)
    arch = arch_of(cfg, image_size)
    return materialize(lambda g: ColumnAlexNet(arch, layout.column, exchange, g), cfg,
                       image_size, layout.device, seed)
