"""The epoch loop: epochs of training steps, each followed by its evaluation, schedule and log.

Every rank runs it in lockstep; rank 0 alone prints, draws the bar and writes files. An epoch
ends in this order: checkpoint, evaluation, schedule step, metrics, checkpoint again; so a
failure or a stop during evaluation loses no training, and a run resumed from the first of those
checkpoints evaluates that epoch before it goes on. The per-step engine is
:mod:`alexnet_mp.engine`.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from alexnet_mp.badimages import count_everywhere, settle
from alexnet_mp.engine import LoopOptions, TrainState, evaluate, train_one_epoch
from alexnet_mp.errors import count
from alexnet_mp.guard import StepGuard
from alexnet_mp.host_memory import release_freed_memory
from alexnet_mp.loader import set_epoch
from alexnet_mp.pipeline import test_views
from alexnet_mp.schedule import step_schedule

if TYPE_CHECKING:
    from alexnet_mp.run import Trainer


def fit(t: Trainer, guard: StepGuard) -> dict:
    """Train the epochs left; the last figures, with ``exit_code`` when stopped on request."""
    cfg, layout, state = t.cfg, t.layout, t.state
    t.say(f"{cfg.model.name} ({layout.name}, {layout.world_size} rank(s), "
          f"{layout.device.type}) on {cfg.data.name}: {len(t.train.loader.dataset)} "
          f"train / {len(t.test.loader.dataset)} test images at "
          f"{cfg.data.image_size}px{test_views(cfg)}; run folder {t.folder.path}", flush=True)
    every, max_steps = cfg.run.checkpoint_every, cfg.train.max_steps
    result: dict = {}
    start = time.perf_counter()

    pending_bad = 0  # unreadable training images met and not yet reported, all ranks

    def on_read(state: TrainState, bad_images: int) -> None:
        nonlocal pending_bad
        pending_bad = bad_images
        if bad_images and cfg.data.bad_images == "stop":
            report_bad_files(t, "train", bad_images)
        if every and state.global_step % every == 0 and state.step < len_epoch:
            t.save()

    while state.epoch < cfg.train.epochs:
        if max_steps is not None and state.global_step >= max_steps:
            break
        set_epoch(t.train.loader, state.epoch, state.step)
        len_epoch = state.step + len(t.train.loader)
        step_before = state.global_step
        options = LoopOptions(max_steps=max_steps, log_every=cfg.run.log_every,
                              flush_every=every, show_bar=layout.is_main and cfg.run.progress,
                              nonfinite=cfg.train.nonfinite, max_skipped=cfg.train.max_skipped)
        stats = train_one_epoch(t.model, t.train.loader, t.optimizer, t.train.transform, state,
                                t.precision, options=options, sync=layout.step_sync(),
                                guard=guard, on_log=t.folder.write, on_read=on_read)
        report_bad_files(t, "train", pending_bad)
        pending_bad = 0
        if guard.stopping:
            # A checkpoint_every save at this very step already holds this state.
            return stopped(t, guard, saved=t.checkpoints.saved_step == state.global_step)
        epoch = state.epoch + 1
        partial = state.step < len_epoch
        if state.global_step > step_before:
            t.save()  # before evaluating: an evaluation that fails loses no training
        # A CPU rank's heap keeps what training steps free (run.keep_host_memory); blocks of
        # evaluation's and checkpointing's other sizes would make it grow at every epoch's
        # end. Freed pages go back before each phase, costing the next one a step of faults.
        release_freed_memory()
        result = measure(t, guard)
        if result is None:
            return stopped(t, guard, saved=True)
        result = {**stats, **result}
        best = False
        if not partial:
            state.epoch, state.step = epoch, 0
            step_schedule(t.scheduler, result["test_acc"])
            # Only whole epochs compete for best.pt: a cut-short one is not comparable.
            best = result["test_acc"] > state.best_acc
            if best:
                state.best_acc = result["test_acc"]
        record = {"kind": "epoch", "epoch": epoch, "step": state.global_step,
                  "partial": partial, "lr": t.optimizer.param_groups[0]["lr"],
                  "elapsed_s": time.perf_counter() - start, **result}
        # A cut-short epoch's record comes after its checkpoint, so a resumed run drops it.
        t.folder.write(record)
        t.folder.plot()
        if not partial:
            t.save(best=best)
        release_freed_memory()
        t.say(f"epoch {epoch}/{cfg.train.epochs}{' (stopped early)' if partial else ''}: "
              f"train loss {result['train_loss']:.4f} acc {result['train_acc']:.4f} | "
              f"test acc {result['test_acc']:.4f} top-5 {result['test_top5']:.4f} | "
              f"{result['images_per_s']:.0f} img/s | "
              f"{time.perf_counter() - start:.0f} s", flush=True)
        if guard.poll():
            return stopped(t, guard, saved=True)
    t.checkpoints.finish()  # "done" only once the last checkpoint is on disk
    if result:
        t.say(f"done: test accuracy {result['test_acc']:.4f} after "
              f"{count(state.global_step, 'step')} in "
              f"{time.perf_counter() - start:.0f} s; run folder {t.folder.path}", flush=True)
    else:  # a finished run run again
        by_steps = max_steps is not None and state.global_step >= max_steps
        limit = (f"train.max_steps={max_steps}" if by_steps
                 else f"train.epochs={cfg.train.epochs}")
        t.say(f"done: nothing left to train at step {state.global_step} "
              f"({count(state.epoch, 'epoch')} done), which {limit} allows; raise it "
              f"to train on; run folder {t.folder.path}", flush=True)
    return result


def evaluate_only(t: Trainer, guard: StepGuard) -> dict:
    """``train.eval_only``: the resumed model's figures on the test split, logged."""
    result = measure(t, guard)
    if result is None:
        return {"stopped": guard.signal.name, "exit_code": guard.exit_code}
    t.say(f"evaluation: top-1 {result['test_acc']:.4f}  top-5 {result['test_top5']:.4f}"
          f"  loss {result['test_loss']:.4f}", flush=True)
    t.folder.write({"kind": "eval", "step": t.state.global_step, **result})
    return result


def measure(t: Trainer, guard: StepGuard) -> dict | None:
    """The test split's figures, or None when a stop request cut the evaluation short."""
    cfg = t.cfg
    result = evaluate(t.model, t.test.loader, t.test.transform, t.precision, guard,
                      t.layout.step_sync(), ten_crop=cfg.train.ten_crop,
                      crop_size=cfg.data.image_size, poll_every=cfg.run.log_every,
                      mirror=cfg.data.hflip)
    report_bad_files(t, "test", count_everywhere(t.test.loader, t.layout.step_sync().group))
    return result


def report_bad_files(t: Trainer, split: str, count: int) -> None:
    """Unreadable images: with data.bad_images=stop every rank stops naming the first;
    with skip they are named once an epoch and counted in the log. Each was trained and
    evaluated as a stand-in labelled -1, which no loss or figure counts."""
    if count == 0:
        return
    loader = t.test.loader if split == "test" else t.train.loader
    bad = settle(loader, t.layout.step_sync().group, count, t.cfg.data.bad_images)
    t.warn(f"skipped {len(bad)} unreadable {split} image(s) (data.bad_images=skip), "
           f"first {bad[0][0]}: {bad[0][1]}")
    t.folder.write({"kind": "bad_images", "split": split, "epoch": t.state.epoch + 1,
                    "step": t.state.global_step, "count": len(bad),
                    "files": [path for path, _ in bad]})


def stopped(t: Trainer, guard: StepGuard, saved: bool) -> dict:
    """A stop on request: the state saved (unless it already is), the stop in the history."""
    if not saved:
        t.save()
    t.checkpoints.finish()
    name = guard.signal.name if guard.signal is not None else "a stop request"
    t.folder.record_stop(name, t.state.global_step)
    t.say(f"stopped on request ({name}) at step {t.state.global_step}; checkpoint "
          f"{t.folder.checkpoints / f'step-{t.state.global_step:08d}.pt'} written: run the "
          "same command to resume", flush=True)
    return {"stopped": name, "exit_code": guard.exit_code}
