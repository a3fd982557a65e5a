"""A whole training run: its parts built, resumed from the chosen checkpoint, then trained.

The rooms it uses: :mod:`~alexnet_mp.runfolder` (lock, config, log, history),
:mod:`~alexnet_mp.pipeline` (data), :mod:`~alexnet_mp.checkpoint_manager` (save and resume),
:mod:`~alexnet_mp.schedule` (the LR schedule) and :mod:`~alexnet_mp.fit` (the epoch loop).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from alexnet_mp import canonical, fit
from alexnet_mp.checkpoint_manager import CheckpointManager
from alexnet_mp.config import Config, run_dir
from alexnet_mp.engine import NonFiniteError, Precision, TrainState
from alexnet_mp.errors import PeerLostError, UserError, lost_peer_line, peer_errors
from alexnet_mp.guard import StepGuard
from alexnet_mp.memory_estimate import check_fits, out_of_memory
from alexnet_mp.optim import build_optimizer
from alexnet_mp.parallel.build import build_model, compile_model
from alexnet_mp.parallel.layout import Layout
from alexnet_mp.pipeline import pipeline
from alexnet_mp.runfolder import RunFolder, check_room
from alexnet_mp.schedule import make_scheduler


class Trainer:
    """Holds what a run builds, so that checkpoints can save and restore all of it."""

    def __init__(self, cfg: Config, layout: Layout,
                 restarts: tuple[int, int] | None = None) -> None:
        """``restarts``: torchrun's (--max-restarts, restarts so far), None without torchrun."""
        self.cfg, self.layout, self.restarts = cfg, layout, restarts
        self.folder = RunFolder(run_dir(cfg), layout.is_main)
        self.out = self.folder.path
        self.say = print if layout.is_main else (lambda *a, **k: None)
        self.resumed_from: Path | None = None
        self.state = TrainState()
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
        self.folder.close(tidy)

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
        self.folder.open(cfg.run.tensorboard, self.warn)
        self.precision = Precision(cfg.train.amp, layout.device,
                                   layout.step_group if layout.distributed else None)
        # train.batch_size is the global batch: replicas (or hybrid ranks) each take a share.
        self.train = pipeline(cfg, layout, "train", batch_size=cfg.train.batch_size,
                              channels_last=cfg.train.channels_last)
        data = self.train.data
        # The epoch-end test; with train.ten_crop its crops are cut on the device.
        self.test = pipeline(cfg, layout, "test", batch_size=cfg.train.batch_size, data=data,
                             channels_last=cfg.train.channels_last, ten_crop=cfg.train.ten_crop)
        self.model = build_model(cfg.model, cfg.data.image_size, layout, cfg.train.seed)
        if cfg.train.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if cfg.train.compile:
            why_not = compile_model(self.model, layout)
            if why_not:
                self.warn(f"train.compile=true is not used: {why_not}")
        if layout.is_main:
            check_room(self.folder.checkpoints, canonical.estimated_size(self.model),
                       cfg.run.keep_checkpoints)
        self.optimizer = build_optimizer(self.model, cfg.train)
        self.scheduler = make_scheduler(cfg, self.optimizer)
        # A checkpoint carries what inference needs without the data set at hand.
        data_info = {"name": cfg.data.name, "classes": data.names,
                     "mean": list(data.mean), "std": list(data.std),
                     "image_size": cfg.data.image_size, "in_channels": data.channels}
        self.checkpoints = CheckpointManager(
            self.folder.checkpoints, cfg, layout, model=self.model, optimizer=self.optimizer,
            scheduler=self.scheduler, precision=self.precision, log=self.folder.log,
            data_info=data_info, warn=self.warn, agree=self._agree)

    def _resume(self) -> None:
        path, saved = self.checkpoints.fetch()
        if saved is None:
            if self.cfg.train.eval_only:
                raise UserError(f"train.eval_only=true needs a trained model, but "
                                f"'{self.folder.checkpoints}' holds no checkpoint; set "
                                "train.resume=PATH to a checkpoint")
            self.folder.record_start(self.cfg, self.state.global_step, None, [], self.layout)
            return
        self.state = self.checkpoints.restore(path, saved)
        self.resumed_from = path
        before = self.folder.record_start(
            self.cfg, self.state.global_step, path,
            self.checkpoints.changes if saved.get("config") else [], self.layout)
        where = (f"resumed from {path} (epoch {self.state.epoch + 1}, batch {self.state.step}, "
                 f"step {self.state.global_step})")
        if before is not None and before != self.layout.world_size:
            # An elastic job re-formed with another number of nodes: the checkpoint is
            # layout-free and the global batch the same, so training goes on where it was.
            self.say(f"world size {before} → {self.layout.world_size} at step "
                     f"{self.state.global_step} ({self.layout.name}; {where})", flush=True)
        else:
            self.say(where, flush=True)

    def save(self, best: bool = False) -> None:
        """A checkpoint of this moment, from every rank (see :class:`CheckpointManager`)."""
        self.checkpoints.save(self.state, best)

    def run(self) -> dict:
        """Train (or evaluate); returns the last figures, with ``exit_code`` when stopped."""
        guard = StepGuard(self.layout.distributed, self.layout.step_group, self.layout.device)
        guard.install()
        try:
            return (fit.evaluate_only if self.cfg.train.eval_only else fit.fit)(self, guard)
        except NonFiniteError as exc:
            if exc.loss_at_step is None:
                raise
            where = self.checkpoints.set_aside_poisoned(exc.loss_at_step,
                                                        self.state.skipped_in_row)
            raise NonFiniteError(f"{exc}{where}") from None
        except torch.OutOfMemoryError:
            raise out_of_memory(self.cfg, self.layout, self.state.global_step + 1,
                                self.state.epoch + 1) from None
        except PeerLostError as exc:
            if isinstance(exc.__cause__, torch.OutOfMemoryError):  # inside a collective's wrap
                raise out_of_memory(self.cfg, self.layout, self.state.global_step + 1,
                                    self.state.epoch + 1) from None
            raise PeerLostError(lost_peer_line(
                self.layout.rank, self.layout.world_size, self.state.global_step + 1,
                self.state.epoch + 1, str(exc), str(self.folder.checkpoints),
                self.restarts)) from None
        except KeyboardInterrupt:
            self.checkpoints.abandon()  # a second Ctrl-C does not wait for a slow disk
            raise
        finally:
            guard.uninstall()
            # The lock is released only once the write in flight has ended.
            self.checkpoints.close()
            self.close()
