"""A whole training run: build, resume, train epochs, evaluate, checkpoint, log.

Every rank runs all of it in lockstep; rank 0 alone prints, draws the bar and writes files.
An epoch ends in this order: checkpoint, evaluation, schedule step, metrics, checkpoint again;
so a failure or a stop during evaluation loses no training, and a run resumed from the first
of those checkpoints evaluates that epoch before it goes on.
"""

from __future__ import annotations

import datetime
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from alexnet_mp import checkpoint as ckpt
from alexnet_mp import runfolder
from alexnet_mp.badimages import count_everywhere, settle
from alexnet_mp.config import Config, dump_config, resume_changes, run_dir
from alexnet_mp.data import BatchTransform, build_data
from alexnet_mp.engine import (
    LoopOptions,
    NonFiniteError,
    Precision,
    TrainState,
    evaluate,
    train_one_epoch,
)
from alexnet_mp.errors import PeerLostError, UserError, count, lost_peer_line, peer_errors
from alexnet_mp.guard import StepGuard
from alexnet_mp.host_memory import release_freed_memory
from alexnet_mp.inference import scaled_size, test_views, whole_scaled_images
from alexnet_mp.loader import make_loader, set_epoch
from alexnet_mp.memory_estimate import check_fits, out_of_memory
from alexnet_mp.metrics import MetricsLog, append_json, plot_curves
from alexnet_mp.models import dropout_seed, model_family
from alexnet_mp.optim import build_optimizer, set_hyperparameters
from alexnet_mp.parallel.build import build_model, compile_model
from alexnet_mp.parallel.layout import Layout

Plateau = torch.optim.lr_scheduler.ReduceLROnPlateau


def make_scheduler(cfg: Config, optimizer: torch.optim.Optimizer):
    t = cfg.train
    if t.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, t.step_size, t.gamma)
    if t.schedule == "plateau":
        # The paper: divide by 10 when the validation error stops improving.
        return Plateau(optimizer, "max", t.gamma, t.patience)
    return None


class Trainer:
    """Holds what a run builds so that checkpoints can save and restore all of it."""

    def __init__(self, cfg: Config, layout: Layout,
                 restarts: tuple[int, int] | None = None) -> None:
        """``restarts``: torchrun's (--max-restarts, restarts so far), None without torchrun."""
        self.cfg, self.layout, self.restarts = cfg, layout, restarts
        self.out = run_dir(cfg)
        self.ckdir = self.out / "checkpoints"
        self.say = print if layout.is_main else (lambda *a, **k: None)
        self.lock: runfolder.RunFolderLock | None = None
        self.resumed_from: Path | None = None
        self.resumed_step = -1
        self.changes: list[str] = []  # config keys changed since the checkpoint (rank 0)
        self.saved_step = -1  # the global step of the last checkpoint this run wrote
        error = None
        try:
            self._build()
        except UserError as exc:
            error = exc
        # A job refused before it trains leaves the disk as it found it.
        self._agree(error, tidy=True)
        error = None
        try:
            self._resume()
        except UserError as exc:
            error = exc
        except BaseException:
            self.close(tidy=True)
            raise
        self._agree(error, tidy=True)

    def warn(self, text: str) -> None:
        if self.layout.is_main:
            print(f"warning: {text}", file=sys.stderr, flush=True)

    def close(self, tidy: bool = False) -> None:
        if getattr(self, "log", None) is not None:
            self.log.close()
        if self.lock is not None:
            self.lock.release(tidy)
            self.lock = None

    def _agree(self, error: UserError | None, tidy: bool = False) -> None:
        """Every rank raises if any rank failed (the failing rank's line), none hangs."""
        try:
            with peer_errors("agreeing with the other ranks"):
                self.layout.agree(error)
        except BaseException:
            self.close(tidy)
            raise

    def _build(self) -> None:
        cfg, layout = self.cfg, self.layout
        check_fits(cfg, layout)  # before anything is allocated or written
        if layout.is_main:
            self.lock = runfolder.prepare(self.out, self.ckdir, self.warn)
        self.log = MetricsLog(self.out / "metrics.jsonl", enabled=layout.is_main,
                              tensorboard=self.out if cfg.run.tensorboard else None)
        self.precision = Precision(cfg.train.amp, layout.device,
                                   layout.step_group if layout.distributed else None)
        data = build_data(cfg.data, num_classes=cfg.model.num_classes,
                          in_channels=cfg.model.in_channels, seed=cfg.train.seed,
                          device=layout.device)
        pin = layout.device.type == "cuda"
        # train.batch_size is the global batch: replicas (or hybrid ranks) each take a share.
        common = dict(batch_size=layout.local_batch(cfg.train.batch_size), seed=cfg.train.seed,
                      num_workers=cfg.data.num_workers, pin_memory=pin,
                      replicas=layout.data_shards, replica=layout.data_shard,
                      bad_images=cfg.data.bad_images)
        # An unreadable image arrives as a stand-in labelled -1 (data.bad_images), so every
        # share keeps its size and the ranks need not agree on each batch.
        self.train_loader = make_loader(data.train, shuffle=True, **common)
        self.test_loader = make_loader(data.test, shuffle=False, mark_padding=True, **common)
        self.transform = BatchTransform(cfg.data.image_size, data.mean, data.std,
                                        cfg.train.channels_last).to(layout.device)
        self.test_transform = self.transform
        if cfg.train.ten_crop:  # the crops are cut from the scaled image on the device
            whole_scaled_images(data.test, cfg.data.image_size)
            self.test_transform = BatchTransform(scaled_size(cfg.data.image_size), data.mean,
                                                 data.std, cfg.train.channels_last
                                                 ).to(layout.device)
        # A checkpoint carries what inference needs without the data set at hand.
        self.data_info = {"name": cfg.data.name, "classes": data.names,
                          "mean": list(data.mean), "std": list(data.std),
                          "image_size": cfg.data.image_size, "in_channels": data.channels}
        self.model = build_model(cfg.model, cfg.data.image_size, layout, cfg.train.seed)
        if cfg.train.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if cfg.train.compile:
            why_not = compile_model(self.model, layout)
            if why_not:
                self.warn(f"train.compile=true is not used: {why_not}")
        if layout.is_main:
            runfolder.check_room(self.ckdir, ckpt.estimated_size(self.model),
                                 cfg.run.keep_checkpoints)
        self.optimizer = build_optimizer(self.model, cfg.train)
        self.scheduler = make_scheduler(cfg, self.optimizer)
        self.state = TrainState()

    # -- resume ------------------------------------------------------------------------------
    def _choose(self) -> tuple[Path, dict[str, Any]] | None:
        """Rank 0: the checkpoint to resume from, checked against this run's model and config."""
        resume = self.cfg.train.resume
        if resume == "none":
            if ckpt.candidates(self.ckdir):
                raise UserError(f"'{self.ckdir}' already holds checkpoints and train.resume=none "
                                "would overwrite them; use train.resume=auto or another run.dir")
            return None
        if resume == "auto":
            found = ckpt.newest_good(self.ckdir, self.warn)
            if found is None and ckpt.set_aside_files(self.ckdir):
                self.warn(ckpt.fresh_start_note(self.ckdir))
        else:
            found = Path(resume), ckpt.load(resume)
        if found is None:
            return None
        path, saved = found
        ckpt.check_fits(saved, model_family(self.cfg.model.name),
                        ckpt.canonical_shapes(self.model), path)
        fixed, free = resume_changes(saved.get("config", {}), self.cfg)
        if self.cfg.train.eval_only:  # evaluating trains nothing: only the shapes must fit
            fixed, free = [], fixed + free
        if fixed:
            raise UserError(f"checkpoint '{path}' was written with a different {fixed[0]}"
                            f"{f' (and {len(fixed) - 1} more)' if len(fixed) > 1 else ''}; such "
                            "keys fix the data order or the shapes, so resume with the same value "
                            "or start a new run.dir")
        if free:
            self.warn(f"resuming with a changed config: {'; '.join(free)}")
        self.changes = free
        return path, saved

    def _fetch(self) -> tuple[Path | None, dict[str, Any] | None]:
        """Rank 0 chooses and reads the checkpoint and sends it to every rank, so resume needs
        neither a shared file system nor agreement between ranks scanning a folder."""
        found, error = None, None
        if self.layout.is_main:
            try:
                found = self._choose()
            except UserError as exc:
                error = str(exc)
        if self.layout.distributed:
            box = [(error, found)]
            with peer_errors("sending the checkpoint to every rank"):
                dist.broadcast_object_list(box, src=0)
            error, found = box[0]
        if error is not None:
            raise UserError(error)
        return found if found is not None else (None, None)

    def _resume(self) -> None:
        path, saved = self._fetch()
        if saved is None:
            if self.cfg.train.eval_only:
                raise UserError(f"train.eval_only=true needs a trained model, but '{self.ckdir}' "
                                "holds no checkpoint; set train.resume=PATH to a checkpoint")
            self._record_start(None, saved_cfg=None)
            return
        ckpt.restore(saved, self.model, self.optimizer)
        if saved["format"] != ckpt.FORMAT or "optimizer" not in saved:
            self.warn(f"'{path}' predates saved learning rates: the run goes on at train.lr")
        if self.scheduler is not None and saved.get("scheduler"):
            self.scheduler.load_state_dict(saved["scheduler"])
        self._apply_changed_hyperparameters(saved.get("config", {}).get("train", {}))
        if self.precision.scaler is not None and saved.get("scaler"):
            self.precision.scaler.load_state_dict(saved["scaler"])
        self.state = TrainState(**saved["train"])
        self._restore_rng(saved["rng"])
        if "log_records" in saved and not self.cfg.train.eval_only:
            self.log.truncate(saved["log_records"])
        self.resumed_from, self.resumed_step = path, self.state.global_step
        self._record_start(path, saved_cfg=saved.get("config"))
        self.say(f"resumed from {path} (epoch {self.state.epoch + 1}, batch {self.state.step}, "
                 f"step {self.state.global_step})", flush=True)

    def _rng_state(self) -> dict[str, Any]:
        rng: dict[str, Any] = {"torch": torch.get_rng_state()}
        if hasattr(self.model, "generator"):
            rng["dropout"] = self.model.generator.get_state()
        if self.layout.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.layout.device)
        return rng

    def _restore_rng(self, saved: dict[str, Any]) -> None:
        """Each replica takes its own RNG states back (dropout masks differ between replicas).
        A replica the checkpoint did not have (more ranks than before) starts fresh streams
        from the seed, the replica and the step, so the run stays reproducible."""
        states = saved.get("replicas", [saved])  # format 1 kept one state
        replica = self.layout.replica
        if replica < len(states):
            rng = states[replica]
            torch.set_rng_state(rng["torch"])
            if hasattr(self.model, "generator") and "dropout" in rng:
                self.model.generator.set_state(rng["dropout"])
            if self.layout.device.type == "cuda" and "cuda" in rng:
                torch.cuda.set_rng_state(rng["cuda"], self.layout.device)
            return
        fresh = dropout_seed(self.cfg.train.seed, replica) + self.state.global_step
        torch.manual_seed(fresh)
        if hasattr(self.model, "generator"):
            self.model.generator.manual_seed(fresh)

    def _apply_changed_hyperparameters(self, saved: dict[str, Any]) -> None:
        """A resumed run that changes train.lr scales the schedule's rates by new/old, so a rate
        already divided by the schedule stays divided; momentum and weight decay are taken as
        they are now. (The checkpoint's param groups are restored first.)"""
        t = self.cfg.train
        ratio = t.lr / saved["lr"] if saved.get("lr") else 1.0
        set_hyperparameters(self.optimizer, self.model, t)
        for group in self.optimizer.param_groups:
            if ratio != 1.0:
                group["lr"] *= ratio
                if "initial_lr" in group:
                    group["initial_lr"] *= ratio
        if ratio != 1.0 and self.scheduler is not None:
            for name in ("base_lrs", "_last_lr", "min_lrs"):
                if isinstance(getattr(self.scheduler, name, None), list):
                    setattr(self.scheduler, name,
                            [v * ratio if name != "min_lrs" else v
                             for v in getattr(self.scheduler, name)])

    def _record_start(self, path: Path | None, saved_cfg: dict[str, Any] | None) -> None:
        """config.yaml is the config in force; history.jsonl keeps every start's config."""
        if not self.layout.is_main:
            return
        changes = self.changes if saved_cfg else []
        append_json(self.out / "history.jsonl", {
            "event": "eval_only" if self.cfg.train.eval_only else "start",
            "time": datetime.datetime.now().isoformat(timespec="seconds"),
            "step": self.state.global_step, "resumed_from": str(path) if path else None,
            "changed": changes, "config": self.cfg.to_dict()})
        if not self.cfg.train.eval_only:
            try:
                dump_config(self.cfg, self.out / "config.yaml")
            except OSError as exc:
                raise UserError(f"could not write '{self.out / 'config.yaml'}' "
                                f"({exc.strerror}); free space or set run.dir") from None

    # -- checkpoints -------------------------------------------------------------------------
    def save(self, best: bool = False) -> None:
        """Every rank joins; rank 0 writes one canonical file; every rank learns whether it
        worked, so a failed write is one line everywhere instead of a hang or a false
        "peer lost" on the others."""
        bad = ckpt.nonfinite_parameters(self.model)
        self._agree(NonFiniteError(
            f"the parameters became NaN or infinite ({bad[0]}) after step "
            f"{self.state.global_step}; they were not saved and the last good checkpoint is kept: "
            "lower train.lr (a resumed run may change it) and run again") if bad else None)
        with peer_errors("gathering the checkpoint"):
            model = ckpt.model_state(self.model, self.layout)
            optimizer = ckpt.optimizer_state(self.model, self.optimizer, self.layout)
            rng = [self._rng_state()]
            if self.layout.distributed:
                rng = [None] * self.layout.world_size
                dist.all_gather_object(rng, self._rng_state())
        # The first rank of each replica speaks for it: its columns draw alike.
        replicas = {"replicas": rng[::self.layout.columns][:self.layout.replicas]}
        error = None
        if self.layout.is_main:
            try:
                self._write(model, optimizer, replicas, best)
            except UserError as exc:
                error = exc
        self._agree(error)
        self.saved_step = self.state.global_step

    def _write(self, model: dict, optimizer: dict, rng: dict, best: bool) -> None:
        state = {"format": ckpt.FORMAT, "model_name": model_family(self.cfg.model.name),
                 "model": model, "optimizer": optimizer, "train": self.state.to_dict(),
                 "scheduler": self.scheduler.state_dict() if self.scheduler else None,
                 "scaler": self.precision.scaler.state_dict() if self.precision.scaler else None,
                 "rng": rng, "config": self.cfg.to_dict(), "log_records": self.log.records,
                 "data": self.data_info}
        path = self.ckdir / f"step-{self.state.global_step:08d}.pt"
        ckpt.save_atomic(state, path)
        ckpt.link_atomic(path, self.ckdir / "last.pt")
        if best:
            ckpt.link_atomic(path, self.ckdir / "best.pt")
        ckpt.prune(self.ckdir, self.cfg.run.keep_checkpoints)

    # -- the run -----------------------------------------------------------------------------
    def run(self) -> dict:
        """Train (or evaluate); returns the last figures, with ``exit_code`` when stopped."""
        guard = StepGuard(self.layout.distributed, self.layout.step_group, self.layout.device)
        guard.install()
        try:
            return self._run(guard)
        except NonFiniteError as exc:
            if exc.loss_at_step is None:
                raise
            raise NonFiniteError(f"{exc}{self._set_aside_poisoned(exc.loss_at_step)}") from None
        except torch.OutOfMemoryError:
            raise out_of_memory(self.cfg, self.layout, self.state.global_step + 1,
                                self.state.epoch + 1) from None
        except PeerLostError as exc:
            if isinstance(exc.__cause__, torch.OutOfMemoryError):  # inside a collective's wrap
                raise out_of_memory(self.cfg, self.layout, self.state.global_step + 1,
                                    self.state.epoch + 1) from None
            raise PeerLostError(lost_peer_line(
                self.layout.rank, self.layout.world_size, self.state.global_step + 1,
                self.state.epoch + 1, str(exc), str(self.ckdir), self.restarts)) from None
        finally:
            guard.uninstall()
            self.close()

    def _set_aside_poisoned(self, bad_step: int) -> str:
        """The parameters that gave a non-finite loss at ``bad_step`` came from the update before
        the first step of its streak (train.nonfinite=skip applies none of the steps between),
        so every checkpoint written from that update on holds them: resuming "with a lower
        rate" would start from the damage. A single bad step never touches a checkpoint older
        than this run, so bad data at a fixed batch cannot walk resume back through the whole
        history; a streak of several, on as many batches, is the weights' doing, even when it
        began before a resume (a checkpoint saved mid-streak)."""
        if not self.layout.is_main:
            return ""
        streak = max(self.state.skipped_in_row, 1)
        first_bad = bad_step - streak + 1
        start = first_bad - 1 if streak > 1 else max(first_bad - 1, self.resumed_step + 1)
        moved = ckpt.set_aside_from(self.ckdir, start, "nonfinite")
        return ckpt.poisoned_line(self.ckdir, moved, self.cfg.train.resume)

    def _stopped(self, guard: StepGuard, saved: bool) -> dict:
        if not saved:
            self.save()
        name = guard.signal.name if guard.signal is not None else "a stop request"
        if self.layout.is_main:
            append_json(self.out / "history.jsonl", {
                "event": "stopped", "signal": name, "step": self.state.global_step,
                "time": datetime.datetime.now().isoformat(timespec="seconds")})
        self.say(f"stopped on request ({name}) at step {self.state.global_step}; checkpoint "
                 f"{self.ckdir / f'step-{self.state.global_step:08d}.pt'} written: run the same "
                 "command to resume", flush=True)
        return {"stopped": name, "exit_code": guard.exit_code}

    def _evaluate(self, guard: StepGuard) -> dict | None:
        result = evaluate(self.model, self.test_loader, self.test_transform, self.precision,
                          guard, self.layout.step_sync(), ten_crop=self.cfg.train.ten_crop,
                          crop_size=self.cfg.data.image_size, poll_every=self.cfg.run.log_every,
                          mirror=self.cfg.data.hflip)
        self._report_bad_files(self.test_loader, count_everywhere(self.test_loader,
                                                                  self.layout.step_sync().group))
        return result

    def _report_bad_files(self, loader, count: int) -> None:
        """Unreadable images: with data.bad_images=stop every rank stops naming the first;
        with skip they are named once an epoch and counted in the log. Each was trained and
        evaluated as a stand-in labelled -1, which no loss or figure counts."""
        if count == 0:
            return
        bad = settle(loader, self.layout.step_sync().group, count, self.cfg.data.bad_images)
        split = "test" if loader is self.test_loader else "train"
        self.warn(f"skipped {len(bad)} unreadable {split} image(s) (data.bad_images=skip), "
                  f"first {bad[0][0]}: {bad[0][1]}")
        self.log.write({"kind": "bad_images", "split": split, "epoch": self.state.epoch + 1,
                        "step": self.state.global_step, "count": len(bad),
                        "files": [path for path, _ in bad]})

    def _run(self, guard: StepGuard) -> dict:
        cfg, layout = self.cfg, self.layout
        if cfg.train.eval_only:
            result = self._evaluate(guard)
            if result is None:
                return {"stopped": guard.signal.name, "exit_code": guard.exit_code}
            self.say(f"evaluation: top-1 {result['test_acc']:.4f}  top-5 {result['test_top5']:.4f}"
                     f"  loss {result['test_loss']:.4f}", flush=True)
            self.log.write({"kind": "eval", "step": self.state.global_step, **result})
            return result
        self.say(f"{cfg.model.name} ({layout.name}, {layout.world_size} rank(s), "
                 f"{layout.device.type}) on {cfg.data.name}: {len(self.train_loader.dataset)} "
                 f"train / {len(self.test_loader.dataset)} test images at "
                 f"{cfg.data.image_size}px{test_views(cfg)}; run folder {self.out}", flush=True)
        every, max_steps = cfg.run.checkpoint_every, cfg.train.max_steps
        result: dict = {}
        start = time.perf_counter()

        pending_bad = 0  # unreadable training images met and not yet reported, all ranks

        def on_read(state: TrainState, bad_images: int) -> None:
            nonlocal pending_bad
            pending_bad = bad_images
            if bad_images and cfg.data.bad_images == "stop":
                self._report_bad_files(self.train_loader, bad_images)
            if every and state.global_step % every == 0 and state.step < len_epoch:
                self.save()

        while self.state.epoch < cfg.train.epochs:
            if max_steps is not None and self.state.global_step >= max_steps:
                break
            set_epoch(self.train_loader, self.state.epoch, self.state.step)
            len_epoch = self.state.step + len(self.train_loader)
            step_before = self.state.global_step
            options = LoopOptions(max_steps=max_steps, log_every=cfg.run.log_every,
                                  flush_every=every, show_bar=layout.is_main and cfg.run.progress,
                                  nonfinite=cfg.train.nonfinite, max_skipped=cfg.train.max_skipped)
            stats = train_one_epoch(self.model, self.train_loader, self.optimizer,
                                    self.transform, self.state, self.precision, options=options,
                                    sync=layout.step_sync(), guard=guard, on_log=self.log.write,
                                    on_read=on_read)
            self._report_bad_files(self.train_loader, pending_bad)
            pending_bad = 0
            if guard.stopping:
                # A checkpoint_every save at this very step already holds this state.
                return self._stopped(guard, saved=self.saved_step == self.state.global_step)
            epoch = self.state.epoch + 1
            partial = self.state.step < len_epoch
            if self.state.global_step > step_before:
                self.save()  # before evaluating: an evaluation that fails loses no training
            # A CPU rank's heap keeps what training steps free (run.keep_host_memory); blocks of
            # evaluation's and checkpointing's other sizes would make it grow at every epoch's
            # end. Freed pages go back before each phase, costing the next one a step of faults.
            release_freed_memory()
            result = self._evaluate(guard)
            if result is None:
                return self._stopped(guard, saved=True)
            result = {**stats, **result}
            best = False
            if not partial:
                self.state.epoch, self.state.step = epoch, 0
                if isinstance(self.scheduler, Plateau):
                    self.scheduler.step(result["test_acc"])
                elif self.scheduler is not None:
                    self.scheduler.step()
                # Only whole epochs compete for best.pt: a cut-short one is not comparable.
                best = result["test_acc"] > self.state.best_acc
                if best:
                    self.state.best_acc = result["test_acc"]
            record = {"kind": "epoch", "epoch": epoch, "step": self.state.global_step,
                      "partial": partial, "lr": self.optimizer.param_groups[0]["lr"],
                      "elapsed_s": time.perf_counter() - start, **result}
            # A cut-short epoch's record comes after its checkpoint, so a resumed run drops it.
            self.log.write(record)
            if layout.is_main:
                plot_curves(self.log.path, self.out / "curves.png")
            if not partial:
                self.save(best=best)
            release_freed_memory()
            self.say(f"epoch {epoch}/{cfg.train.epochs}{' (stopped early)' if partial else ''}: "
                     f"train loss {result['train_loss']:.4f} acc {result['train_acc']:.4f} | "
                     f"test acc {result['test_acc']:.4f} top-5 {result['test_top5']:.4f} | "
                     f"{result['images_per_s']:.0f} img/s | "
                     f"{time.perf_counter() - start:.0f} s", flush=True)
            if guard.poll():
                return self._stopped(guard, saved=True)
        if result:
            self.say(f"done: test accuracy {result['test_acc']:.4f} after "
                     f"{count(self.state.global_step, 'step')} in "
                     f"{time.perf_counter() - start:.0f} s; run folder {self.out}", flush=True)
        else:  # a finished run run again
            by_steps = max_steps is not None and self.state.global_step >= max_steps
            limit = (f"train.max_steps={max_steps}" if by_steps
                     else f"train.epochs={cfg.train.epochs}")
            self.say(f"done: nothing left to train at step {self.state.global_step} "
                     f"({count(self.state.epoch, 'epoch')} done), which {limit} allows; raise it "
                     f"to train on; run folder {self.out}", flush=True)
        return result
