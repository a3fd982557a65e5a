"""Builds the model a config names: whole on one device, or one column given its exchange.

Which column, which replica and which process group are the parallel layer's business
(``alexnet_mp.parallel.build``); nothing here imports ``torch.distributed``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from alexnet_mp.config import ModelConfig
from alexnet_mp.errors import UserError
from alexnet_mp.models.columns import (
    Arch,
    ColumnAlexNet,
    Exchange,
    canonical_init,
    min_image_size,
)
from alexnet_mp.models.d2l import d2l_alexnet

__all__ = ["build_model", "model_family", "ColumnAlexNet", "Arch", "dropout_seed"]

# Replica r draws its dropout masks from seed + 1 + r * REPLICA_STRIDE: replica 0 keeps the
# single-device stream, and the others stay far from every seed a user is likely to try.
REPLICA_STRIDE = 1_000_003


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


def require_image_size(cfg: ModelConfig, image_size: int) -> None:
    """The columns' net needs at least one pixel left after its last pool."""
    if image_size < min_image_size():
        raise UserError(f"data.image_size={image_size} is too small for {cfg.name}; use at least "
                        f"{min_image_size()} (227 is the paper's input)")


def arch_of(cfg: ModelConfig, image_size: int) -> Arch:
    return Arch(cfg.num_classes, cfg.in_channels, image_size, cfg.width, cfg.dropout)


def dropout_seed(seed: int, replica: int = 0) -> int:
    """The dropout generator's seed: the same for every column of a replica (they must drop the
    same neurons), different between replicas (their batches differ, so must their masks)."""
    return seed + 1 + replica * REPLICA_STRIDE


def materialize(make: Callable[[torch.Generator], nn.Module], cfg: ModelConfig, image_size: int,
                device: torch.device, seed: int, replica: int = 0) -> nn.Module:
    """``make(dropout generator)`` built on the meta device, then only its own rows allocated and
    drawn from the canonical initialisation, so no throw-away full-width tensor ever exists."""
    generator = torch.Generator(device=device).manual_seed(dropout_seed(seed, replica))
    with torch.device("meta"):
        model = make(generator)
    model = model.to_empty(device=device)
    model.load_state_dict(canonical_init(arch_of(cfg, image_size), resolve_init(cfg), seed,
                                         model.slices()))
    return model


def meta_model(cfg: ModelConfig, image_size: int, column: int | None = None,
               exchange: Exchange | None = None) -> nn.Module:
    """The model's shapes without its numbers: built on the meta device, uninitialised, so a
    size whose parameters would not fit in memory can still be described or estimated."""
    if cfg.name == "alexnet_d2l":
        try:
            with torch.device("meta"):
                return d2l_alexnet(cfg.num_classes, cfg.in_channels, image_size, cfg.dropout)
        except RuntimeError:
            raise UserError(f"data.image_size={image_size} is too small for alexnet_d2l; use at "
                            f"least {_d2l_min_size()} (224 as in d2l)") from None
    require_image_size(cfg, image_size)
    with torch.device("meta"):
        return ColumnAlexNet(arch_of(cfg, image_size), column, exchange, torch.Generator())


def build_model(cfg: ModelConfig, image_size: int, place: Any, seed: int, *,
                exchange: Exchange | None = None, replica: int = 0) -> nn.Module:
    """The model on ``place`` (a device, or anything with ``.device``), initialised from ``seed``
    the same way in every layout: the whole model, or with ``exchange`` the column
    ``exchange.column``. ``replica`` picks the dropout stream (see :func:`dropout_seed`).

    A multi-rank layout needs its exchange and gradient sync: build it with
    ``alexnet_mp.parallel.build.build_model``.
    """
    if getattr(place, "world_size", 1) > 1:
        raise TypeError("a layout of several ranks is built by alexnet_mp.parallel.build."
                        "build_model, which hands the model its exchange and gradient sync")
    device = torch.device(getattr(place, "device", place))
    init = resolve_init(cfg)
    if cfg.name == "alexnet_d2l":
        if exchange is not None:
            raise ValueError("alexnet_d2l has no columns to exchange")
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
        if replica:
            # nn.Dropout draws from the global generator; after the shared initialisation each
            # replica moves to its own stream so that replicas do not drop the same neurons.
            torch.manual_seed(dropout_seed(seed, replica))
        return model.to(device)

    require_image_size(cfg, image_size)
    arch = arch_of(cfg, image_size)
    column = None if exchange is None else exchange.column
    return materialize(lambda g: ColumnAlexNet(arch, column, exchange, g), cfg, image_size,
                       device, seed, replica)
