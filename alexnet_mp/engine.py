"""One SGD loop and one evaluation for every layout.

The loop never asks where the model lives: every layout's model returns full logits on every
rank. Running sums stay on the device and are read every ``log_every`` steps; the only other
host sync is the guard's one flag per step (finite everywhere? asked to stop?).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from alexnet_mp.errors import UserError
from alexnet_mp.guard import StepGuard


@dataclass
class TrainState:
    epoch: int = 0  # the epoch in progress (0-based)
    step: int = 0  # batches of that epoch already done
    global_step: int = 0
    best_acc: float = -1.0

    def to_dict(self) -> dict:
        return asdict(self)


class NonFiniteError(UserError):
    """The loss turned NaN or infinite; the last good checkpoint is kept."""


class Precision:
    """Autocast and (for fp16 on CUDA) a gradient scaler, or plain fp32."""

    def __init__(self, amp: str, device: torch.device) -> None:
        if amp == "fp16" and device.type != "cuda":
            raise UserError(f"train.amp=fp16 needs CUDA (this run is on {device.type}); use "
                            "train.amp=bf16 or none")
        self.device = device
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        self.scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            optimizer.step()
        else:  # the scaler skips steps with inf gradients itself and lowers its scale
            self.scaler.step(optimizer)
            self.scaler.update()


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _topk_correct(logits: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == y[:, None]).any(dim=1).sum()


def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    transform: nn.Module, state: TrainState, precision: Precision, *,
                    max_steps: int | None = None, log_every: int = 20, show_bar: bool = False,
                    guard: StepGuard | None = None, skip_nonfinite: bool = False,
                    on_log: Callable[[dict], None] = lambda r: None,
                    after_step: Callable[[TrainState], None] = lambda s: None) -> dict:
    """Train from batch ``state.step`` of epoch ``state.epoch`` to its end, ``max_steps``, or
    until the guard says every rank is stopping.

    A step whose loss or gradients are not finite on some rank is never applied: the run stops
    with :class:`NonFiniteError` or, with ``skip_nonfinite``, goes on to the next batch.
    Returns the epoch's mean loss, accuracy and images/s over the batches run here.
    """
    model.train()
    device = precision.device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    window_start, window_seen = time.perf_counter(), 0
    epoch_start = window_start
    total = state.step + len(loader)
    bar = tqdm(total=total, initial=state.step, desc=f"epoch {state.epoch + 1}",
               disable=not show_bar, dynamic_ncols=True, leave=False, mininterval=1.0)
    for x, y in loader:
        x = transform(x.to(device, non_blocking=True))
        y = y.to(device, non_blocking=True)
        with precision.autocast():
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        precision.backward(loss)
        # With a gradient scaler, inf gradients are routine: the scaler skips those steps.
        if guard is not None and not guard.check(loss, model, grads=precision.scaler is None):
            if not skip_nonfinite:
                raise NonFiniteError(
                    f"the loss or a gradient became NaN or infinite at step "
                    f"{state.global_step + 1} (epoch {state.epoch + 1}); that step was not applied "
                    "and the last good checkpoint is kept: lower train.lr or check the data "
                    "(train.nonfinite=skip steps over such batches)")
            optimizer.zero_grad(set_to_none=True)
            on_log({"kind": "skipped", "epoch": state.epoch + 1, "step": state.global_step + 1})
        else:
            precision.step(optimizer)

        n = y.shape[0]
        loss_sum += torch.nan_to_num(loss.detach()) * n
        correct += (logits.detach().argmax(dim=1) == y).sum()
        seen += n
        window_seen += n
        state.step += 1
        state.global_step += 1
        bar.update(1)
        last = (state.step == total or (max_steps is not None and state.global_step >= max_steps)
                or (guard is not None and guard.stopping))
        if state.global_step % log_every == 0 or last:
            value = loss.item()
            now = time.perf_counter()
            record = {"kind": "step", "epoch": state.epoch + 1, "step": state.global_step,
                      "loss": value, "lr": optimizer.param_groups[0]["lr"],
                      "images_per_s": window_seen / max(now - window_start, 1e-9)}
            window_start, window_seen = now, 0
            bar.set_postfix(loss=f"{value:.3f}", acc=f"{correct.item() / seen:.3f}",
                            img_s=f"{record['images_per_s']:.0f}")
            on_log(record)
        after_step(state)
        if last:
            break
    bar.close()
    sync_device(device)
    elapsed = time.perf_counter() - epoch_start
    return {"train_loss": (loss_sum / max(seen, 1)).item(),
            "train_acc": correct.item() / max(seen, 1),
            "images_per_s": seen / max(elapsed, 1e-9), "images": seen}


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, transform: nn.Module,
             precision: Precision) -> dict:
    """Top-1, top-5 and loss over every test example (each rank runs every batch in lockstep)."""
    model.eval()
    device = precision.device
    loss_sum = torch.zeros((), device=device)
    top1 = torch.zeros((), device=device, dtype=torch.long)
    top5 = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    for x, y in loader:
        x = transform(x.to(device, non_blocking=True))
        y = y.to(device, non_blocking=True)
        with precision.autocast():
            logits = model(x).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        top1 += _topk_correct(logits, y, 1)
        top5 += _topk_correct(logits, y, 5)
        seen += y.shape[0]
    seen = max(seen, 1)
    return {"test_loss": (loss_sum / seen).item(), "test_acc": top1.item() / seen,
            "test_top5": top5.item() / seen}
