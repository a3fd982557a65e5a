"""The layout-free state: the grouped form's tensors, whichever part of them this rank holds.

A split run gathers every column's rows to all ranks, so that rank 0 can write one file; any
layout loads that state back by cutting out its own rows.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from alexnet_mp.parallel.exchange import gather_rows
from alexnet_mp.parallel.layout import Layout


def _row_slices(model: nn.Module) -> dict[str, slice]:
    return model.slices() if hasattr(model, "slices") else {}


def canonical_shapes(model: nn.Module) -> dict[str, torch.Size]:
    """Shapes of the grouped form's tensors, whichever part of them this rank holds."""
    full = getattr(model, "full_rows", None)
    return {name: torch.Size((full[name.split(".")[0]], *p.shape[1:])) if full else p.shape
            for name, p in model.named_parameters()}


ROW_CONTRACT = ("slices", "row_split", "full_rows", "column")


def holds_rows(model: nn.Module, layout: Layout) -> bool:
    """Whether this rank holds only some rows of the canonical tensors.

    A model split over ranks must describe its rows (``slices()``, ``row_split``, ``full_rows``,
    ``column``): without them its tensors would be saved as they are, one column written as if
    it were the model. That is a programming error, raised as such, never a silent save.
    """
    if layout.column is None:
        return False
    missing = [name for name in ROW_CONTRACT if not hasattr(model, name)]
    if missing:
        raise TypeError(f"{type(model).__name__} runs split ({layout.name}) but does not "
                        f"describe its rows ({', '.join(missing)} missing); the checkpoint code "
                        "cannot tell which rows this rank holds")
    return model.column is not None


def _canonical(model: nn.Module, tensors: dict[str, torch.Tensor], layout: Layout
               ) -> dict[str, torch.Tensor]:
    """Whole (grouped-form) tensors on the CPU from this rank's rows of ``tensors``."""
    if not holds_rows(model, layout):
        return {k: v.detach().cpu() for k, v in tensors.items()}
    out = {}
    for name, t in tensors.items():
        layer = name.split(".")[0]
        out[name] = gather_rows(t.detach(), model.row_split[layer], layout.group).cpu()
    return out


def model_state(model: nn.Module, layout: Layout) -> dict[str, torch.Tensor]:
    return _canonical(model, dict(model.named_parameters()), layout)


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, layout: Layout
                    ) -> dict[str, Any]:
    """The whole optimizer state in canonical form: param groups (learning rate, momentum, ...)
    with parameters named instead of numbered, and per-parameter tensors as whole tensors.

    ``optimizer.state_dict()`` numbers parameters by position and holds this rank's rows only, so
    it cannot move between layouts; this form can.
    """
    names = {p: name for name, p in model.named_parameters()}
    groups = [{**{k: v for k, v in g.items() if k != "params"},
               "params": [names[p] for p in g["params"]]} for g in optimizer.param_groups]
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    plain: dict[str, dict[str, Any]] = {}
    for p, name in names.items():
        for key, value in optimizer.state.get(p, {}).items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                tensors.setdefault(key, {})[name] = value
            else:  # scalars such as Adam's step are the same on every rank
                plain.setdefault(name, {})[key] = value
    state: dict[str, dict[str, Any]] = {name: dict(v) for name, v in plain.items()}
    for key, by_name in tensors.items():
        for name, t in _canonical(model, by_name, layout).items():
            state.setdefault(name, {})[key] = t
    return {"param_groups": groups, "state": state}


def restore_optimizer(saved: dict[str, Any], model: nn.Module,
                      optimizer: torch.optim.Optimizer) -> None:
    """Load :func:`optimizer_state`'s form into this rank's optimizer, by name and by rows."""
    rows = _row_slices(model)
    params = dict(model.named_parameters())
    by_name = {name: i for i, g in enumerate(saved["param_groups"]) for name in g["params"]}
    for group in optimizer.param_groups:
        names = [n for n, p in params.items() if any(p is q for q in group["params"])]
        source = saved["param_groups"][by_name[names[0]]] if names else None
        if source is not None:
            group.update({k: v for k, v in source.items() if k != "params"})
    for name, entries in saved["state"].items():
        p = params[name]
        optimizer.state[p] = {
            k: (v[rows.get(name, slice(None))].to(p.device).clone()
                if isinstance(v, torch.Tensor) and v.dim() > 0 else v)
            for k, v in entries.items()}


def nonfinite_parameters(model: nn.Module) -> list[str]:
    """Names of this rank's parameters that hold a NaN or an infinity."""
    return [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]


def estimated_size(model: nn.Module) -> int:
    """Bytes of one checkpoint: the canonical parameters and as much again of momentum."""
    full = canonical_shapes(model)
    return sum(2 * math.prod(shape) * 4 for shape in full.values()) + (1 << 20)

def restore_model(state: dict[str, Any], model: nn.Module) -> None:
    """Load the canonical parameters into this rank's part of the model, by rows."""
    rows = _row_slices(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(state["model"][name][rows.get(name, slice(None))])


def restore(state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load canonical model and optimizer state into this rank's part of the model, by rows."""
    restore_model(state, model)
    rows = _row_slices(model)
    if "optimizer" in state:
        restore_optimizer(state["optimizer"], model, optimizer)
        return
    for name, p in model.named_parameters():  # format 1: momentum only
        m = state["momentum"].get(name)
        if m is not None:
            optimizer.state[p]["momentum_buffer"] = m[rows.get(name, slice(None))].to(
                p.device).clone()
