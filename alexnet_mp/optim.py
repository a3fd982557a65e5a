"""The optimizer a config asks for: torch's SGD or the paper's update, in parameter groups built
by name so that biases can go without weight decay, as in the original code.

Every optimizer here keeps one per-parameter ``momentum_buffer`` tensor and plain param groups
(``lr``, ``momentum``, ``weight_decay``): the canonical checkpoint code saves and restores that
state by parameter name, in any layout.

Every optimizer here also takes a step that the device decides to skip (:func:`step_unless`):
torch's SGD through its fused kernel's ``found_inf``, the paper's form by choosing the old
values on the device. The host never reads whether a step was finite.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

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

    # Set for one step by :func:`step_unless`, as torch's fused optimizers take it from a
    # gradient scaler: a 0-d tensor, nonzero when the step must not be applied.
    found_inf: torch.Tensor | None = None

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
                if self.found_inf is not None:
                    self._step_unless_found_inf(params, grads, bufs, lr, momentum, decay)
                    continue
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

    def _step_unless_found_inf(self, params: list[torch.Tensor], grads: list[torch.Tensor],
                               bufs: list[torch.Tensor], lr: float, momentum: float,
                               decay: float) -> None:
        """The foreach step's arithmetic into new tensors, kept only where ``found_inf`` is 0.

        torch has no foreach "where", and scaling the update by 0 would keep a NaN gradient's
        NaN; so the step is computed whole and chosen per tensor. A finite step's values are
        those of :meth:`step`'s foreach path, bit for bit (the same kernels in the same order).
        """
        keep_old = self.found_inf.to(params[0].device).bool()
        new_bufs = torch._foreach_mul(bufs, momentum)
        if decay:
            torch._foreach_add_(new_bufs, params, alpha=-decay * lr)
        torch._foreach_add_(new_bufs, grads, alpha=-lr)
        new_params = torch._foreach_add(params, new_bufs)
        for old, new in zip((*bufs, *params), (*new_bufs, *new_params)):
            old.copy_(torch.where(keep_old, old, new))


def step_unless(optimizer: torch.optim.Optimizer, found_inf: torch.Tensor | None) -> None:
    """``optimizer.step()``, not applied where the 0-d device tensor ``found_inf`` is nonzero;
    nothing is read on the host. Momentum buffers stay as they were on a skipped step.

    torch's SGD must be ``fused`` (:func:`build_optimizer` makes it so): its fused kernel is the
    one that takes ``found_inf``, as it does from a gradient scaler.
    """
    if found_inf is None:
        optimizer.step()
        return
    if isinstance(optimizer, torch.optim.SGD):
        # The fused kernel's first step fills buffers made with empty_like, and a skipped first
        # step would leave that garbage in place for every later one. A zero buffer gives the
        # first step's value exactly (0 * momentum + grad = grad), skipped or not.
        for group in optimizer.param_groups:
            if group["momentum"]:
                for p in group["params"]:
                    state = optimizer.state[p]
                    if state.get("momentum_buffer") is None:
                        state["momentum_buffer"] = torch.zeros_like(
                            p, memory_format=torch.preserve_format)
    optimizer.found_inf = found_inf
    try:
        optimizer.step()
    finally:
        optimizer.found_inf = None


def build_optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    """``train.momentum_form`` (torch or paper) over ``train.bias_decay``'s groups.

    torch's SGD is the fused one wherever torch has the kernel: the form whose step takes a
    device-side ``found_inf`` (:func:`step_unless`). Its arithmetic is torch's own, equal to the
    foreach form's within float rounding.
    """
    groups = param_groups(model, train.weight_decay, train.bias_decay)
    if train.momentum_form == "paper":
        return PaperSGD(groups, lr=train.lr, momentum=train.momentum)
    devices = {p.device.type for p in model.parameters()}
    fused = devices <= set(_get_fused_kernels_supported_devices())
    return torch.optim.SGD(groups, lr=train.lr, momentum=train.momentum, fused=fused or None)


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
