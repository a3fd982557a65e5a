"""The learning-rate schedule: built from the config, stepped at each whole epoch's end, and
carried over a resume, rescaled when the resumed run changes ``train.lr``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from alexnet_mp.config import Config, TrainConfig
from alexnet_mp.optim import set_hyperparameters

Plateau = torch.optim.lr_scheduler.ReduceLROnPlateau
Scheduler = torch.optim.lr_scheduler.LRScheduler | Plateau
# The scheduler's lists of rates that follow train.lr; min_lrs are floors, and stay.
SCALED = ("base_lrs", "_last_lr")


def make_scheduler(cfg: Config, optimizer: torch.optim.Optimizer) -> Scheduler | None:
    t = cfg.train
    if t.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, t.step_size, t.gamma)
    if t.schedule == "plateau":
        # The paper: divide by 10 when the validation error stops improving.
        return Plateau(optimizer, "max", t.gamma, t.patience)
    return None


def step_schedule(scheduler: Scheduler | None, test_acc: float) -> None:
    """The end of a whole epoch: the plateau schedule judges its test accuracy."""
    if isinstance(scheduler, Plateau):
        scheduler.step(test_acc)
    elif scheduler is not None:
        scheduler.step()


def resume_rates(optimizer: torch.optim.Optimizer, model: nn.Module,
                 scheduler: Scheduler | None, train: TrainConfig,
                 saved_schedule: dict[str, Any] | None, saved_train: dict[str, Any]) -> None:
    """The schedule's saved state, then the config's hyperparameters, once the checkpoint's param
    groups are restored. A resumed run that changes train.lr scales the schedule's rates by
    new/old, so a rate already divided by the schedule stays divided; momentum and weight decay
    are taken as they are now."""
    if scheduler is not None and saved_schedule:
        scheduler.load_state_dict(saved_schedule)
    ratio = train.lr / saved_train["lr"] if saved_train.get("lr") else 1.0
    set_hyperparameters(optimizer, model, train)
    if ratio == 1.0:
        return
    for group in optimizer.param_groups:
        group["lr"] *= ratio
        if "initial_lr" in group:
            group["initial_lr"] *= ratio
    if scheduler is not None:
        state = scheduler.state_dict()
        scheduler.load_state_dict({**state, **{
            name: [v * ratio for v in state[name]]
            for name in SCALED if isinstance(state.get(name), list)}})
