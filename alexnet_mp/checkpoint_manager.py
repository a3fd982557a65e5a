"""Every stateful part of a run saved as one checkpoint, and restored from the one resume chooses.

The parts: the model and the optimizer (in the layout-free form, :mod:`~alexnet_mp.canonical`),
the LR schedule, the gradient scaler, the loop's :class:`~alexnet_mp.engine.TrainState`, each
replica's RNG streams, and the metrics log's length. Rank 0 alone reads and writes files; it
chooses the checkpoint and sends it to every rank, so resume needs neither a shared file system
nor agreement between ranks scanning a folder.

With ``run.async_checkpoint`` rank 0 copies the gathered state to host memory at the step and a
:class:`~alexnet_mp.checkpoint_writer.BackgroundWriter` writes, links and prunes while training
goes on. Whatever must see the folder settled (the next save, a stop, the run's end, an error, a
resume, setting files aside) waits for that write first; its failure is then the same one line
a synchronous save gives.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from alexnet_mp import canonical
from alexnet_mp import checkpoint as ckpt
from alexnet_mp import checkpoint_folder as folder
from alexnet_mp.checkpoint_writer import BackgroundWriter
from alexnet_mp.config import Config, resume_changes
from alexnet_mp.engine import NonFiniteError, Precision, TrainState
from alexnet_mp.errors import UserError, peer_errors
from alexnet_mp.metrics import MetricsLog
from alexnet_mp.models import dropout_seed, model_family
from alexnet_mp.parallel.layout import Layout
from alexnet_mp.schedule import Scheduler, resume_rates


class CheckpointManager:
    """Saves, prunes, sets aside and chooses the checkpoints of ``path``, for one run's parts.

    ``agree(error)`` makes every rank raise if any rank failed (the failing rank's line).
    """

    def __init__(self, path: Path, cfg: Config, layout: Layout, *, model: nn.Module,
                 optimizer: torch.optim.Optimizer, scheduler: Scheduler | None,
                 precision: Precision, log: MetricsLog, data_info: dict[str, Any],
                 warn: Callable[[str], None],
                 agree: Callable[[UserError | None], None]) -> None:
        self.path, self.cfg, self.layout = path, cfg, layout
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.precision, self.log, self.data_info = precision, log, data_info
        self.warn, self.agree = warn, agree
        self.changes: list[str] = []  # config keys changed since the checkpoint (rank 0)
        self.resumed_step = -1
        self.saved_step = -1  # the global step of the last checkpoint this run wrote
        self.writer = BackgroundWriter()
        self._host: dict[str, Any] = {}  # the last background save's copy, reused by the next

    # -- resume ------------------------------------------------------------------------------
    def _choose(self) -> tuple[Path, dict[str, Any]] | None:
        """Rank 0: the checkpoint to resume from, checked against this run's model and config."""
        self.wait()  # a resume in the same process reads the folder as the last save left it
        resume = self.cfg.train.resume
        if resume == "none":
            if ckpt.candidates(self.path):
                raise UserError(f"'{self.path}' already holds checkpoints and train.resume=none "
                                "would overwrite them; use train.resume=auto or another run.dir")
            return None
        if resume == "auto":
            found = folder.newest_good(self.path, self.warn)
            if found is None and ckpt.set_aside_files(self.path):
                self.warn(folder.fresh_start_note(self.path))
        else:
            found = Path(resume), ckpt.load(resume)
        if found is None:
            return None
        path, saved = found
        ckpt.check_fits(saved, model_family(self.cfg.model.name),
                        canonical.canonical_shapes(self.model), path)
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

    def fetch(self) -> tuple[Path | None, dict[str, Any] | None]:
        """The checkpoint rank 0 chose (or none), on every rank."""
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

    def restore(self, path: Path, saved: dict[str, Any]) -> TrainState:
        """Every part back as ``saved`` holds it; the loop's state to go on from."""
        canonical.restore(saved, self.model, self.optimizer)
        if saved["format"] != ckpt.FORMAT or "optimizer" not in saved:
            self.warn(f"'{path}' predates saved learning rates: the run goes on at train.lr")
        resume_rates(self.optimizer, self.model, self.scheduler, self.cfg.train,
                     saved.get("scheduler"), saved.get("config", {}).get("train", {}))
        if self.precision.scaler is not None and saved.get("scaler"):
            self.precision.scaler.load_state_dict(saved["scaler"])
        state = TrainState(**saved["train"])
        self._restore_rng(saved["rng"], state.global_step)
        if "log_records" in saved and not self.cfg.train.eval_only:
            self.log.truncate(saved["log_records"])
        self.resumed_step = state.global_step
        return state

    def _rng_state(self) -> dict[str, Any]:
        rng: dict[str, Any] = {"torch": torch.get_rng_state()}
        if hasattr(self.model, "generator"):
            rng["dropout"] = self.model.generator.get_state()
        if self.layout.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.layout.device)
        return rng

    def _restore_rng(self, saved: dict[str, Any], global_step: int) -> None:
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
        fresh = dropout_seed(self.cfg.train.seed, replica) + global_step
        torch.manual_seed(fresh)
        if hasattr(self.model, "generator"):
            self.model.generator.manual_seed(fresh)

    # -- save --------------------------------------------------------------------------------
    def save(self, state: TrainState, best: bool = False) -> None:
        """Every rank joins; rank 0 writes one canonical file; every rank learns whether it
        worked, so a failed write is one line everywhere instead of a hang or a false
        "peer lost" on the others."""
        background = self.cfg.run.async_checkpoint
        if background:
            self.finish()  # at most one write in flight; a failed one stops every rank here
        bad = canonical.nonfinite_parameters(self.model)
        self.agree(NonFiniteError(
            f"the parameters became NaN or infinite ({bad[0]}) after step "
            f"{state.global_step}; they were not saved and the last good checkpoint is kept: "
            "lower train.lr (a resumed run may change it) and run again") if bad else None)
        with peer_errors("gathering the checkpoint"):
            model = canonical.model_state(self.model, self.layout)
            optimizer = canonical.optimizer_state(self.model, self.optimizer, self.layout)
            rng = [self._rng_state()]
            if self.layout.distributed:
                rng = [None] * self.layout.world_size
                dist.all_gather_object(rng, self._rng_state())
        # The first rank of each replica speaks for it: its columns draw alike.
        replicas = {"replicas": rng[::self.layout.columns][:self.layout.replicas]}
        error = None
        if self.layout.is_main:
            contents = self._contents(state, model, optimizer, replicas)
            step = state.global_step
            if background:
                # A CPU rank's gathered tensors are its live parameters: the copy is the
                # state of this step, whatever the next steps change. finish() above has
                # waited for the write that used the last copy, so its buffers are free again,
                # and refilling pages already touched costs far less than fresh ones.
                contents = self._host = host_copy(contents, self._host)
                self.writer.submit(lambda: self._write(contents, step, best))
            else:
                try:
                    self._write(contents, step, best)
                except UserError as exc:
                    error = exc
        self.agree(error)
        self.saved_step = state.global_step

    def finish(self) -> None:
        """Every rank joins: rank 0 waits for its write in flight, and if that write failed,
        every rank raises its line."""
        if not self.cfg.run.async_checkpoint:
            return
        error = None
        if self.layout.is_main:
            try:
                self.writer.wait()
            except UserError as exc:
                error = exc
        self.agree(error)

    def wait(self) -> None:
        """This rank alone: wait for the write in flight, raising its error."""
        self.writer.wait()

    def close(self) -> None:
        """Wait for the write in flight on a path that already ends the run (an error): its own
        failure is only said, the error on its way matters more."""
        try:
            self.writer.wait()
        except UserError as exc:
            self.warn(str(exc))

    def abandon(self) -> None:
        """A second Ctrl-C: leave the write in flight, and remove its temporary files, so
        that the folder holds only whole checkpoints when the process ends."""
        if self.writer.busy:
            self.writer.abandon()
            ckpt.remove_temporaries(self.path)

    def _contents(self, train: TrainState, model: dict, optimizer: dict, rng: dict
                  ) -> dict[str, Any]:
        scaler = self.precision.scaler
        return {"format": ckpt.FORMAT, "model_name": model_family(self.cfg.model.name),
                "model": model, "optimizer": optimizer, "train": train.to_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler else None,
                "scaler": scaler.state_dict() if scaler else None,
                "rng": rng, "config": self.cfg.to_dict(), "log_records": self.log.records,
                "data": self.data_info}

    def _write(self, state: dict[str, Any], step: int, best: bool) -> None:
        path = self.path / f"step-{step:08d}.pt"
        ckpt.save_atomic(state, path)
        ckpt.link_atomic(path, self.path / "last.pt")
        if best:
            ckpt.link_atomic(path, self.path / "best.pt")
        folder.prune(self.path, self.cfg.run.keep_checkpoints)

    def set_aside_poisoned(self, bad_step: int, skipped_in_row: int) -> str:
        """The parameters that gave a non-finite loss at ``bad_step`` came from the update before
        the first step of its streak (train.nonfinite=skip applies none of the steps between),
        so every checkpoint written from that update on holds them: resuming "with a lower
        rate" would start from the damage. A single bad step never touches a checkpoint older
        than this run, so bad data at a fixed batch cannot walk resume back through the whole
        history; a streak of several, on as many batches, is the weights' doing, even when it
        began before a resume (a checkpoint saved mid-streak). The end of the error's line."""
        if not self.layout.is_main:
            return ""
        self.close()  # the write in flight may hold the damage too
        streak = max(skipped_in_row, 1)
        first_bad = bad_step - streak + 1
        start = first_bad - 1 if streak > 1 else max(first_bad - 1, self.resumed_step + 1)
        moved = folder.set_aside_from(self.path, start, "nonfinite")
        return folder.poisoned_line(self.path, moved, self.cfg.train.resume)


def host_copy(obj: Any, reuse: Any = None) -> Any:
    """``obj`` copied to host memory, sharing nothing with it; a tensor of ``reuse`` at the same
    place with the same shape and dtype is filled instead of allocating a new one."""
    if isinstance(obj, torch.Tensor):
        if (isinstance(reuse, torch.Tensor) and reuse.shape == obj.shape
                and reuse.dtype == obj.dtype and reuse.device.type == "cpu"):
            return reuse.copy_(obj.detach())
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        old = reuse if isinstance(reuse, dict) else {}
        return {k: host_copy(v, old.get(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        fits = isinstance(reuse, type(obj)) and len(reuse) == len(obj)
        old = reuse if fits else [None] * len(obj)
        return type(obj)(host_copy(v, o) for v, o in zip(obj, old))
    return copy.deepcopy(obj)
