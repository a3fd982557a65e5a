"""The optimizer a config asks for: torch's SGD or the paper's update, in parameter groups built
by name so that biases can go without weight decay, as in the original code.

Every optimizer here keeps one per-parameter ``momentum_buffer`` tensor and plain param groups
(``lr``, ``momentum``, ``weight_decay``): the canonical checkpoint code saves and restores that
state by parameter name, in any layout.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from alexnet_mp.config import TrainConfig


def is_bias(name: str) -> bool:
    """Every model here names its biases ``<layer>.bias`` (LRN and pooling hold no tensors)."""
    return name.rsplit(".", 1)[-1] == "bias"


def param_groups(model: nn.Module, weight_decay: float, bias_decay: bool) -> list[dict[str, Any]]:
    """One group with ``bias_decay`` (torch's usual form, what runs did before the option), else
    the weights with ``weight_decay`` and the biases with none."""
    named = list(model.named_parameters())
    if bias_decay:
        return [{"params": [p for _, p in named], "weight_decay": weight_decay}]
    groups = [{"params": [p for n, p in named if not is_bias(n)], "weight_decay": weight_decay},
              {"params": [p for n, p in named if is_bias(n)], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


class PaperSGD(torch.optim.Optimizer):
    """The update of Krizhevsky et al. (2012, §5), the learning rate inside the velocity:

        v <- momentum * v - weight_decay * lr * w - lr * grad
        w <- w + v

    torch.optim.SGD keeps the rate outside (v <- momentum * v + grad + weight_decay * w;
    w <- w - lr * v) and has no option for this form. While the rate is constant the two take
    the same steps (this v is -lr times torch's); when the rate is divided, torch's next step
    shrinks the whole accumulated velocity at once, while here the velocity keeps the steps
    already taken at the old rate and only new gradients enter at the new one.

    The velocity starts at zero, so the first step is -lr * (grad + weight_decay * w), as
    torch's is.
    """

    def __init__(self, params: Iterable[Any], lr: float, momentum: float = 0.9,
                 weight_decay: float = 0.0, foreach: bool = True) -> None:
        if lr <= 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"PaperSGD needs lr > 0, momentum >= 0 and weight_decay >= 0, got "
                             f"{lr}, {momentum}, {weight_decay}")
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                                  "foreach": foreach})

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            # foreach kernels take lists of one device and dtype.
            buckets: dict[tuple[torch.device, torch.dtype], tuple[list, list, list]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("PaperSGD does not take sparse gradients")
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format)
                params, grads, bufs = buckets.setdefault((p.device, p.dtype), ([], [], []))
                params.append(p)
                grads.append(p.grad)
                bufs.append(state["momentum_buffer"])
            lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
            for params, grads, bufs in buckets.values():
                if group.get("foreach", True):
                    torch._foreach_mul_(bufs, momentum)
                    if decay:
                        torch._foreach_add_(bufs, params, alpha=-decay * lr)
                    torch._foreach_add_(bufs, grads, alpha=-lr)
                    torch._foreach_add_(params, bufs)
                    continue
                for p, g, v in zip(params, grads, bufs):
                    v.mul_(momentum)
                    if decay:
                        v.add_(p, alpha=-decay * lr)
                    v.add_(g, alpha=-lr)
                    p.add_(v)
        return loss


def build_optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    """``train.momentum_form`` (torch or paper) over ``train.bias_decay``'s groups."""
    groups = param_groups(model, train.weight_decay, train.bias_decay)
    if train.momentum_form == "paper":
        return PaperSGD(groups, lr=train.lr, momentum=train.momentum)
    return torch.optim.SGD(groups, lr=train.lr, momentum=train.momentum)


def set_hyperparameters(optimizer: torch.optim.Optimizer, model: nn.Module,
                        train: TrainConfig) -> None:
    """Momentum and weight decay as the config says now, after a checkpoint's param groups were
    restored; a group of biases alone keeps no decay when ``train.bias_decay`` is false.

    The groups are told apart by their parameters, not by a key of theirs: restoring copies the
    saved groups' keys over, and the saved run may have grouped differently."""
    biases = {id(p) for name, p in model.named_parameters() if is_bias(name)}
    for group in optimizer.param_groups:
        only_biases = all(id(p) in biases for p in group["params"])
        group["momentum"] = train.momentum
        group["weight_decay"] = 0.0 if only_biases and not train.bias_decay else train.weight_decay
