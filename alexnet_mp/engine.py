"""One SGD loop and one evaluation for every layout.

The loop never asks where the model lives: every layout's model returns full logits on every
rank. A steady step never waits for the device: the step's figures (loss, correct and seen
counts, and whether it was finite) stay on the device, and the host reads them, with the ranks'
stop requests, once per log window (:class:`Window`). A non-finite step is skipped on the device
(:mod:`alexnet_mp.guard`, :func:`alexnet_mp.optim.step_unless`) and reported at the window's end.
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

from alexnet_mp.errors import (
    PeerLostError,
    UserError,
    collective_failed,
    count,
    first_line,
)
from alexnet_mp.guard import StepGuard, StepSync
from alexnet_mp.optim import step_unless
from alexnet_mp.prefetch import on_device

# Label of an example that is not one: loader padding that evens out replicas' shares, and the
# stand-in for an unreadable image. Losses and counts leave it out.
IGNORE = -1


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


@dataclass
class LoopOptions:
    max_steps: int | None = None  # stop once the run has taken this many steps in all
    log_every: int = 20  # steps between step records, host reads and stop agreement
    flush_every: int = 0  # further steps at which the figures must be read (checkpoints)
    show_bar: bool = False
    nonfinite: str = "stop"  # a non-finite step: "stop" the run, or "skip" it
    max_skipped: int = 10  # with "skip": stop after this many skipped steps in a row


class Precision:
    """Autocast and (for fp16 on CUDA) a gradient scaler, or plain fp32.

    ``amp="auto"``: bf16 on a CUDA device that has it, exact fp32 everywhere else.
    """

    def __init__(self, amp: str, device: torch.device, group=None) -> None:
        if amp == "auto":
            amp = ("bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported()
                   else "none")
        if amp == "fp16" and device.type != "cuda":
            raise UserError(f"train.amp=fp16 needs CUDA (this run is on {device.type}); use "
                            "train.amp=bf16 or none")
        self.amp = amp
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

    def step(self, optimizer: torch.optim.Optimizer, found_inf: torch.Tensor | None) -> None:
        """Step unless ``found_inf`` (a device tensor) is set; the host reads nothing.

        With fp16's gradient scaler the scaler decides from the gradients alone, as torch's
        does: a non-finite loss gives non-finite gradients, so that step is skipped too, but the
        steps after a failing one in the same log window are not held back."""
        if self.scaler is None:
            step_unless(optimizer, found_inf)
        else:  # the scaler skips steps with inf gradients itself and lowers its scale
            self.scaler.step(optimizer)
            self.scaler.update()


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _topk_correct(logits: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == y[:, None]).any(dim=1).sum()


class Window:
    """The steps since the host last looked, kept on the device.

    Each step adds a row (loss x seen, correct, seen, not finite); a step is skipped on the
    device when it is not finite, or once the run must stop (``nonfinite="stop"`` after one
    such step, ``"skip"`` after ``max_skipped`` in a row), so that no step after the failing one
    moves the parameters either. :meth:`read` sums the rows, the ranks' stop requests and their
    counts of unreadable images over the ranks in one all-reduce, reads them in one host sync,
    and replays the rows on the host in order: the state's sums, the skipped records and the
    error come out exactly as if each step had been read at once.
    """

    def __init__(self, state: TrainState, sync: StepSync, guard: StepGuard | None,
                 options: LoopOptions, device: torch.device) -> None:
        self.state, self.sync, self.guard, self.options = state, sync, guard, options
        self.rows: list[torch.Tensor] = []
        self.first_step = state.global_step  # global step before the window's first row
        self.in_row = torch.full((), float(state.skipped_in_row), device=device)
        self.halted = torch.zeros((), device=device)

    def found_inf(self, bad: torch.Tensor) -> torch.Tensor:
        """The flag the optimizer takes for a step whose own verdict is ``bad`` (0/1)."""
        o = self.options
        if o.nonfinite == "skip":
            self.in_row = (self.in_row + 1) * bad
            ends = (self.in_row >= o.max_skipped).float()
        else:
            ends = bad
        skip = torch.maximum(bad, self.halted)
        self.halted = torch.maximum(self.halted, ends)
        return skip

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, seen: torch.Tensor,
            bad: torch.Tensor) -> None:
        correct = (logits.detach().argmax(dim=1) == y).sum().float()
        self.rows.append(torch.stack([loss.detach().float() * seen, correct, seen,
                                      bad.float()]))

    def read(self, new_bad_images: int, on_log: Callable[[dict], None]) -> tuple[float, int]:
        """Reads and replays the window; returns (the last step's loss, the ranks' unreadable
        images since the last read). Raises :class:`NonFiniteError` where a step failed."""
        state, o = self.state, self.options
        rows = torch.stack(self.rows)  # read only after a step, so never empty
        stop = self.guard.stop_counts() if self.guard is not None else [0.0, 0.0, 0.0]
        extra = torch.tensor([*stop, float(new_bad_images)], device=rows.device)
        values = self.sync.sum(rows, everyone=extra).tolist()  # the window's one host sync
        n = rows.shape[0]
        if self.guard is not None:
            self.guard.agree_stop(values[4 * n: 4 * n + 3])
        bad_images = int(values[-1])
        step_loss = float("nan")
        for i in range(n):
            loss_sum, correct, seen, bad = values[4 * i: 4 * i + 4]
            step = self.first_step + i + 1
            if bad > 0:
                state.skipped_in_row += 1
                if o.nonfinite != "skip" or state.skipped_in_row >= o.max_skipped:
                    in_row = state.skipped_in_row
                    why = (f"{count(in_row, 'step')} in a row {'was' if in_row == 1 else 'were'}"
                           if o.nonfinite == "skip" else "the loss or a gradient became")
                    raise NonFiniteError(
                        f"{why} NaN or infinite at step {step} (epoch {state.epoch + 1}); no such "
                        "step was applied and the last good checkpoint is kept: lower train.lr "
                        "(a resumed run may change it) or check the data", loss_at_step=step)
                step_loss = float("nan")
                on_log({"kind": "skipped", "epoch": state.epoch + 1, "step": step})
            else:
                state.skipped_in_row = 0
                state.loss_sum += loss_sum
                state.correct += int(correct)
                state.seen += int(seen)
                step_loss = loss_sum / max(seen, 1)
        self.rows.clear()
        self.first_step = state.global_step
        return step_loss, bad_images


def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    transform: nn.Module, state: TrainState, precision: Precision, *,
                    options: LoopOptions | None = None, sync: StepSync | None = None,
                    guard: StepGuard | None = None,
                    on_log: Callable[[dict], None] = lambda r: None,
                    on_read: Callable[[TrainState, int], None] = lambda s, n: None) -> dict:
    """Train from batch ``state.step`` of epoch ``state.epoch`` to its end, ``max_steps``, or
    until the ranks agree to stop (at a log window's end).

    A step whose loss or gradients are not finite on some rank is never applied: the run stops
    with :class:`NonFiniteError` or, with ``nonfinite="skip"``, goes on to the next batch (until
    ``max_skipped`` such steps in a row). The figures are read every ``log_every`` and
    ``flush_every`` steps and at the end; ``on_read(state, bad_images)`` is called after each
    read, with the count of unreadable images the ranks' loaders hold, not yet reported. Step
    records are logged every ``log_every`` steps and at the epoch's end only, so an interrupted
    and resumed run logs the same records as a straight one. Returns the epoch's loss and
    accuracy (over the whole epoch so far, resumed part included) and images/s over the batches
    run here.
    """
    o = options or LoopOptions()
    sync = sync or StepSync()
    model.train()
    device = precision.device
    if state.step == 0:
        state.loss_sum, state.correct, state.seen = 0.0, 0, 0
    window = Window(state, sync, guard, o, device)
    seen_here = 0
    window_start, window_seen = time.perf_counter(), 0
    epoch_start = window_start
    total = state.step + len(loader)
    bar = tqdm(total=total, initial=state.step, desc=f"epoch {state.epoch + 1}",
               disable=not o.show_bar, dynamic_ncols=True, leave=False, mininterval=1.0)
    for x, y in on_device(loader, device):
        x = transform(x)
        y = sync.targets(y)
        with precision.autocast():
            logits = model(x)
        seen = (y != IGNORE).sum().float()
        # The sum over the counted rows divided by their number is cross_entropy's mean bit for
        # bit, and a batch of stand-ins alone gives 0 with no gradient instead of 0/0.
        loss = F.cross_entropy(logits.float(), y, ignore_index=IGNORE,
                               reduction="sum") / seen.clamp(min=1)
        optimizer.zero_grad(set_to_none=True)
        try:
            precision.backward(loss)
        except RuntimeError as exc:
            # Only a collective's failure is a lost peer; any other error keeps its traceback.
            if collective_failed(exc):
                raise PeerLostError("a collective of the backward pass failed: "
                                    f"{first_line(exc)}") from exc
            raise
        # With a gradient scaler, inf gradients are routine: the scaler skips those steps.
        bad = (guard.found_inf(loss, model, grads=precision.scaler is None)
               if guard is not None else torch.zeros((), device=device))
        window.add(loss, logits, y, seen, bad)
        precision.step(optimizer, window.found_inf(bad))
        n = y.shape[0]
        seen_here += n
        window_seen += n
        state.step += 1
        state.global_step += 1
        bar.update(1)
        at_end = state.step == total or (o.max_steps is not None
                                          and state.global_step >= o.max_steps)
        logs = state.global_step % o.log_every == 0 or state.step == total
        flushes = bool(o.flush_every) and state.global_step % o.flush_every == 0
        if not (logs or flushes or at_end):
            continue
        step_loss, bad_images = window.read(loader_bad_images(loader), on_log)
        if logs:
            now = time.perf_counter()
            record = {"kind": "step", "epoch": state.epoch + 1, "step": state.global_step,
                      "loss": step_loss, "lr": optimizer.param_groups[0]["lr"],
                      "images_per_s": window_seen / max(now - window_start, 1e-9)}
            window_start, window_seen = now, 0
            bar.set_postfix(loss=f"{record['loss']:.3f}",
                            acc=f"{state.correct / max(state.seen, 1):.3f}",
                            img_s=f"{record['images_per_s']:.0f}")
            on_log(record)
        on_read(state, bad_images)
        if at_end or (guard is not None and guard.stopping):
            break
    bar.close()
    sync_device(device)
    elapsed = time.perf_counter() - epoch_start
    return {"train_loss": state.loss_sum / max(state.seen, 1),
            "train_acc": state.correct / max(state.seen, 1),
            "images_per_s": seen_here / max(elapsed, 1e-9), "images": state.seen}


def loader_bad_images(loader: object) -> int:
    """How many unreadable images ``loader`` has met and not yet handed over (0 if it cannot
    meet any)."""
    return len(getattr(loader, "bad_files", ()))


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
             sync: StepSync | None = None, *, ten_crop: bool = False,
             crop_size: int | None = None, mirror: bool = True, poll_every: int = 20,
             show_bar: bool = False) -> dict | None:
    """Top-1, top-5 and loss over every test example (each rank runs every batch in lockstep).

    Samples labelled -1 (:data:`IGNORE`: a sampler's padding, so that replicas run as many
    batches, or an unreadable image's stand-in) are left out; the figures are summed over the
    replicas (``sync``), so each example counts exactly once.

    With a ``guard``, a stop request (SIGTERM, Ctrl-C) abandons the evaluation within
    ``poll_every`` batches and returns None: a long evaluation must not outlast a scheduler's
    grace period.

    ``ten_crop``: ``transform`` must give images larger than the model's input (256 for the
    paper's 227); each is judged by its softmax averaged over :func:`ten_crop_log_probs`'s ten
    crops of side ``crop_size`` (five without ``mirror``), and the loss is that average's
    cross-entropy.
    """
    if ten_crop and crop_size is None:
        raise ValueError("ten_crop needs crop_size, the side of the model's input")
    sync = sync or StepSync()
    model.eval()
    device = precision.device
    loss_sum = torch.zeros((), device=device)
    top1 = torch.zeros((), device=device, dtype=torch.long)
    top5 = torch.zeros((), device=device, dtype=torch.long)
    seen = torch.zeros((), device=device, dtype=torch.long)
    bar = tqdm(total=len(loader), desc="evaluating", disable=not show_bar, dynamic_ncols=True,
               leave=False, mininterval=1.0)
    for i, (x, y) in enumerate(on_device(loader, device)):
        x = transform(x)
        y = sync.targets(y)
        if ten_crop:
            logits = ten_crop_log_probs(model, x, crop_size, precision.autocast, mirror=mirror)
            loss_sum += F.nll_loss(logits, y, reduction="sum", ignore_index=IGNORE)
        else:
            with precision.autocast():
                logits = model(x).float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum", ignore_index=IGNORE)
        top1 += _topk_correct(logits, y, 1)
        top5 += _topk_correct(logits, y, 5)
        seen += (y != IGNORE).sum()
        bar.update(1)
        if guard is not None and (i + 1) % poll_every == 0 and guard.poll():
            bar.close()
            return None
    bar.close()
    loss, top1, top5, seen = sync.sum(torch.stack([loss_sum, top1.float(), top5.float(),
                                                   seen.float()])).tolist()
    return {"test_loss": loss / max(seen, 1), "test_acc": top1 / max(seen, 1),
            "test_top5": top5 / max(seen, 1), "test_images": int(seen)}
