"""One SGD loop and one evaluation for every layout.

The loop never asks where the model lives: every layout's model returns full logits on every
rank. Running sums stay on the device and are read every ``log_every`` steps; the only other
host sync is the guard's one flag per step (finite everywhere? asked to stop?).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms import v2
from tqdm import tqdm

from alexnet_mp.errors import UserError, peer_errors
from alexnet_mp.guard import StepGuard


@dataclass
class TrainState:
    epoch: int = 0  # the epoch in progress (0-based)
    step: int = 0  # batches of that epoch already done
    global_step: int = 0
    best_acc: float = -1.0
    # The epoch's running training figures, so that an epoch resumed part-way reports the same
    # loss and accuracy as one run straight through.
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    skipped_in_row: int = 0  # steps in a row not applied because they were not finite

    def to_dict(self) -> dict:
        return asdict(self)


class NonFiniteError(UserError):
    """The loss turned NaN or infinite; the last good checkpoint is kept."""

    def __init__(self, message: str, loss_at_step: int | None = None) -> None:
        super().__init__(message)
        self.loss_at_step = loss_at_step  # set when a step's loss or gradients were not finite


class Precision:
    """Autocast and (for fp16 on CUDA) a gradient scaler, or plain fp32."""

    def __init__(self, amp: str, device: torch.device, group=None) -> None:
        if amp == "fp16" and device.type != "cuda":
            raise UserError(f"train.amp=fp16 needs CUDA (this run is on {device.type}); use "
                            "train.amp=bf16 or none")
        self.device = device
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        self.scaler = None
        if amp == "fp16" and group is not None:
            # Each rank holds other parameters (columns, FC rows): a scaler deciding from its
            # own gradients alone would skip a step on one rank and take it on the other. The
            # sharded scaler agrees on "found inf" over the group, so all skip or step together.
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            self.scaler = ShardedGradScaler("cuda", process_group=group)
        elif amp == "fp16":
            self.scaler = torch.amp.GradScaler("cuda")

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
                    max_skipped: int = 10,
                    on_log: Callable[[dict], None] = lambda r: None,
                    after_step: Callable[[TrainState], None] = lambda s: None,
                    targets: Callable[[torch.Tensor], torch.Tensor] = lambda y: y,
                    reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> dict:
    """Train from batch ``state.step`` of epoch ``state.epoch`` to its end, ``max_steps``, or
    until the guard says every rank is stopping.

    A step whose loss or gradients are not finite on some rank is never applied: the run stops
    with :class:`NonFiniteError` or, with ``skip_nonfinite``, goes on to the next batch (until
    ``max_skipped`` such steps in a row). ``targets`` maps this rank's labels to those of the
    logits the model returns (a layout that gathers the batch gathers its labels); ``reduce``
    sums the step's figures over replicas, which each see their own share. Step records
    are logged every ``log_every`` steps and at the epoch's end only, so an interrupted and
    resumed run logs the same records as a straight one. Returns the epoch's loss and accuracy
    (over the whole epoch so far, resumed part included) and images/s over the batches run
    here.
    """
    model.train()
    device = precision.device
    if state.step == 0:
        state.loss_sum, state.correct, state.seen = 0.0, 0, 0
    seen_here = 0
    window_start, window_seen = time.perf_counter(), 0
    epoch_start = window_start
    total = state.step + len(loader)
    bar = tqdm(total=total, initial=state.step, desc=f"epoch {state.epoch + 1}",
               disable=not show_bar, dynamic_ncols=True, leave=False, mininterval=1.0)
    for x, y in loader:
        x = transform(x.to(device, non_blocking=True))
        y = targets(y.to(device, non_blocking=True))
        with precision.autocast():
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        # torch's own collectives (the exchanges' reduce-scatter, the replicas' all-reduce) run
        # inside autograd, so a lost peer surfaces here.
        with peer_errors("the backward pass"):
            precision.backward(loss)
        n = y.shape[0]
        # With a gradient scaler, inf gradients are routine: the scaler skips those steps.
        if guard is not None and not guard.check(loss, model, grads=precision.scaler is None):
            state.skipped_in_row += 1
            if not skip_nonfinite or state.skipped_in_row >= max_skipped:
                why = (f"{state.skipped_in_row} steps in a row were" if skip_nonfinite
                       else "the loss or a gradient became")
                raise NonFiniteError(
                    f"{why} NaN or infinite at step {state.global_step + 1} (epoch "
                    f"{state.epoch + 1}); no such step was applied and the last good checkpoint "
                    "is kept: lower train.lr (a resumed run may change it) or check the data",
                    loss_at_step=state.global_step + 1)
            optimizer.zero_grad(set_to_none=True)
            step_loss = float("nan")
            on_log({"kind": "skipped", "epoch": state.epoch + 1, "step": state.global_step + 1})
        else:
            state.skipped_in_row = 0
            # Read after the guard's sync and before the optimizer's kernels: no extra wait.
            figures = reduce(torch.stack([
                loss.detach().float() * n, (logits.detach().argmax(dim=1) == y).sum().float(),
                torch.tensor(float(n), device=loss.device)]))
            batch_loss, batch_correct, batch_seen = figures.tolist()
            precision.step(optimizer)
            state.loss_sum += batch_loss
            state.correct += int(batch_correct)
            state.seen += int(batch_seen)
            step_loss = batch_loss / max(batch_seen, 1)
        seen_here += n
        window_seen += n
        state.step += 1
        state.global_step += 1
        bar.update(1)
        last = (state.step == total or (max_steps is not None and state.global_step >= max_steps)
                or (guard is not None and guard.stopping))
        if state.global_step % log_every == 0 or state.step == total:
            now = time.perf_counter()
            record = {"kind": "step", "epoch": state.epoch + 1, "step": state.global_step,
                      "loss": step_loss, "lr": optimizer.param_groups[0]["lr"],
                      "images_per_s": window_seen / max(now - window_start, 1e-9)}
            window_start, window_seen = now, 0
            bar.set_postfix(loss=f"{record['loss']:.3f}",
                            acc=f"{state.correct / max(state.seen, 1):.3f}",
                            img_s=f"{record['images_per_s']:.0f}")
            on_log(record)
        after_step(state)
        if last:
            break
    bar.close()
    sync_device(device)
    elapsed = time.perf_counter() - epoch_start
    return {"train_loss": state.loss_sum / max(state.seen, 1),
            "train_acc": state.correct / max(state.seen, 1),
            "images_per_s": seen_here / max(elapsed, 1e-9), "images": state.seen}


def ten_crop_log_probs(model: nn.Module, x: torch.Tensor, crop_size: int,
                       autocast: Callable[[], contextlib.AbstractContextManager]
                       = contextlib.nullcontext, mirror: bool = True) -> torch.Tensor:
    """Log of the softmax averaged over ten views of each image in ``x``: the four corner crops
    and the centre crop of side ``crop_size``, and their horizontal flips (paper §4.1). Without
    ``mirror`` (a model trained with data.hflip=false never saw a mirrored image) the five
    crops alone.

    One forward pass per view, so memory stays that of a single view; the average is taken in
    log space (logsumexp), so a class whose probability underflows in every view still has a
    finite loss.
    """
    # Each patch is mirrored, not the image: torchvision's ten_crop flips the image and cuts
    # its centre again, which for an odd margin (256 - 227 = 29) is a pixel off the mirrored
    # centre patch.
    five = v2.functional.five_crop(x, [crop_size, crop_size])
    views = (*five, *(view.flip(-1) for view in five)) if mirror else five
    log_probs = []
    for view in views:
        with autocast():
            logits = model(view).float()
        log_probs.append(F.log_softmax(logits, dim=1))
    return torch.logsumexp(torch.stack(log_probs), dim=0) - math.log(len(views))


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, transform: nn.Module,
             precision: Precision, guard: StepGuard | None = None,
             targets: Callable[[torch.Tensor], torch.Tensor] = lambda y: y,
             reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t, *,
             ten_crop: bool = False, crop_size: int | None = None, mirror: bool = True,
             show_bar: bool = False) -> dict | None:
    """Top-1, top-5 and loss over every test example (each rank runs every batch in lockstep).

    Samples labelled -1 are padding (a sampler's, so that replicas run as many batches, or
    :mod:`alexnet_mp.parallel.shards`', so that their shares have as many rows) and are left
    out; ``reduce`` sums the figures over replicas, so each example counts exactly once.

    With a ``guard``, a stop request (SIGTERM, Ctrl-C) abandons the evaluation after the batch in
    flight and returns None: a long evaluation must not outlast a scheduler's grace period.

    ``ten_crop``: ``transform`` must give images larger than the model's input (256 for the
    paper's 227); each is judged by its softmax averaged over :func:`ten_crop_log_probs`'s ten crops
    of side ``crop_size`` (five without ``mirror``), and the loss is that average's cross-entropy.
    """
    if ten_crop and crop_size is None:
        raise ValueError("ten_crop needs crop_size, the side of the model's input")
    model.eval()
    device = precision.device
    loss_sum = torch.zeros((), device=device)
    top1 = torch.zeros((), device=device, dtype=torch.long)
    top5 = torch.zeros((), device=device, dtype=torch.long)
    seen = torch.zeros((), device=device, dtype=torch.long)
    bar = tqdm(loader, desc="evaluating", disable=not show_bar, dynamic_ncols=True, leave=False,
               mininterval=1.0)
    for x, y in bar:
        x = transform(x.to(device, non_blocking=True))
        y = targets(y.to(device, non_blocking=True))
        if ten_crop:
            logits = ten_crop_log_probs(model, x, crop_size, precision.autocast, mirror)
            loss_sum += F.nll_loss(logits, y, reduction="sum", ignore_index=-1)
        else:
            with precision.autocast():
                logits = model(x).float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum", ignore_index=-1)
        top1 += _topk_correct(logits, y, 1)
        top5 += _topk_correct(logits, y, 5)
        seen += (y >= 0).sum()
        if guard is not None and guard.poll():
            bar.close()
            return None
    bar.close()
    loss, top1, top5, seen = reduce(torch.stack([loss_sum, top1.float(), top5.float(),
                                                 seen.float()])).tolist()
    return {"test_loss": loss / max(seen, 1), "test_acc": top1 / max(seen, 1),
            "test_top5": top5 / max(seen, 1), "test_images": int(seen)}
