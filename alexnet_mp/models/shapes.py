"""Per-layer output shapes for one image, as d2l prints them (computed on the meta device)."""

from __future__ import annotations

import torch
from torch import nn

from alexnet_mp.config import ModelConfig
from alexnet_mp.models import meta_model


def layer_shapes(cfg: ModelConfig, image_size: int) -> list[tuple[str, tuple[int, ...]]]:
    """(layer, output shape) in call order; the columns model is shown in its grouped form."""
    model = meta_model(cfg, image_size).eval()  # shapes only: any size, nothing allocated
    rows: list[tuple[str, tuple[int, ...]]] = []
    hooks = []
    leaves = list(model.named_children())
    for name, module in leaves:
        label = type(module).__name__ if isinstance(model, nn.Sequential) else name
        hooks.append(module.register_forward_hook(
            lambda m, i, o, label=label: rows.append((label, tuple(o.shape)))))
    with torch.no_grad():
        model(torch.zeros(1, cfg.in_channels, image_size, image_size, device="meta"))
    for h in hooks:
        h.remove()
    return rows


def shape_table(cfg: ModelConfig, image_size: int) -> str:
    return "\n".join(f"{name} output shape:\t{shape}" for name, shape in
                     layer_shapes(cfg, image_size))
