"""A whole training run: build, resume, train epochs, evaluate, checkpoint, log.

Every rank runs all of it in lockstep; rank 0 alone prints, draws the bar and writes files.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from alexnet_mp import checkpoint as ckpt
from alexnet_mp.config import Config, dump_config, run_dir
from alexnet_mp.data import BatchTransform, build_data, make_loader, set_epoch
from alexnet_mp.engine import Precision, TrainState, evaluate, train_one_epoch
from alexnet_mp.errors import UserError
from alexnet_mp.guard import StepGuard
from alexnet_mp.metrics import MetricsLog, plot_curves
from alexnet_mp.models import build_model, model_family
from alexnet_mp.parallel.layout import Layout


class PeerLostError(UserError):
    """Another rank died or stalled past run.timeout_s; restarting resumes from a checkpoint."""

    exit_code = 3
    broken_group = True  # its process group cannot be torn down cleanly


def make_scheduler(cfg: Config, optimizer: torch.optim.Optimizer):
    t = cfg.train
    if t.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, t.step_size, t.gamma)
    if t.schedule == "plateau":
        # The paper: divide by 10 when the validation error stops improving.
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, "max", t.gamma, t.patience)
    return None


class Trainer:
    """Holds what a run builds so that checkpoints can save and restore all of it."""

    def __init__(self, cfg: Config, layout: Layout) -> None:
        self.cfg, self.layout = cfg, layout
        self.out = run_dir(cfg)
        self.ckdir = self.out / "checkpoints"
        self.say = print if layout.is_main else (lambda *a, **k: None)
        error = None
        try:
            self._build()
        except UserError as exc:
            error = exc
        layout.agree(error)

    def warn(self, text: str) -> None:
        if self.layout.is_main:
            print(f"warning: {text}", file=sys.stderr, flush=True)

    def _prepare_folder(self) -> None:
        if not self.layout.is_main:
            return
        try:
            self.ckdir.mkdir(parents=True, exist_ok=True)
            probe = self.out / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise UserError(f"run folder '{self.out}' is not writable ({exc.strerror}); set "
                            "run.dir to a folder you can write") from None

    def _build(self) -> None:
        cfg, layout = self.cfg, self.layout
        self._prepare_folder()
        self.precision = Precision(cfg.train.amp, layout.device)
        data = build_data(cfg.data, num_classes=cfg.model.num_classes,
                          in_channels=cfg.model.in_channels, seed=cfg.train.seed)
        pin = layout.device.type == "cuda"
        common = dict(batch_size=cfg.train.batch_size, seed=cfg.train.seed,
                      num_workers=cfg.data.num_workers, pin_memory=pin)
        self.train_loader = make_loader(data.train, shuffle=True, **common)
        self.test_loader = make_loader(data.test, shuffle=False, **common)
        self.transform = BatchTransform(cfg.data.image_size, data.mean, data.std,
                                        cfg.train.channels_last).to(layout.device)
        self.model = build_model(cfg.model, cfg.data.image_size, layout, cfg.train.seed)
        if cfg.train.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=cfg.train.lr,
                                         momentum=cfg.train.momentum,
                                         weight_decay=cfg.train.weight_decay)
        self.scheduler = make_scheduler(cfg, self.optimizer)
        self.state = TrainState()
        self._resume()

    # -- checkpoints -------------------------------------------------------------------------
    def _resume(self) -> None:
        resume = self.cfg.train.resume
        if resume == "none":
            if ckpt.step_files(self.ckdir):
                raise UserError(f"'{self.ckdir}' already holds checkpoints and train.resume=none "
                                "would overwrite them; use train.resume=auto or another run.dir")
            return
        if resume == "auto":
            found = ckpt.newest_good(self.ckdir, self.warn)
            if found is None:
                return
            path, saved = found
        else:
            path, saved = Path(resume), ckpt.load(resume)
        ckpt.check_fits(saved, model_family(self.cfg.model.name),
                        ckpt.canonical_shapes(self.model), path)
        ckpt.restore(saved, self.model, self.optimizer)
        if self.scheduler is not None and saved.get("scheduler"):
            self.scheduler.load_state_dict(saved["scheduler"])
        if self.precision.scaler is not None and saved.get("scaler"):
            self.precision.scaler.load_state_dict(saved["scaler"])
        self.state = TrainState(**saved["train"])
        rng = saved["rng"]
        torch.set_rng_state(rng["torch"])
        if hasattr(self.model, "generator") and "dropout" in rng:
            self.model.generator.set_state(rng["dropout"])
        if self.layout.device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], self.layout.device)
        self.say(f"resumed from {path} (epoch {self.state.epoch + 1}, batch {self.state.step}, "
                 f"step {self.state.global_step})", flush=True)

    def save(self, best: bool = False) -> None:
        """Every rank joins the gathers; rank 0 writes one canonical file."""
        model = ckpt.model_state(self.model, self.layout)
        momentum = ckpt.momentum_state(self.model, self.optimizer, self.layout)
        if not self.layout.is_main:
            return
        rng: dict[str, Any] = {"torch": torch.get_rng_state()}
        if hasattr(self.model, "generator"):
            rng["dropout"] = self.model.generator.get_state()
        if self.layout.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.layout.device)
        state = {"format": ckpt.FORMAT, "model_name": model_family(self.cfg.model.name),
                 "model": model, "momentum": momentum, "train": self.state.to_dict(),
                 "scheduler": self.scheduler.state_dict() if self.scheduler else None,
                 "scaler": self.precision.scaler.state_dict() if self.precision.scaler else None,
                 "rng": rng, "config": self.cfg.to_dict()}
        path = self.ckdir / f"step-{self.state.global_step:08d}.pt"
        ckpt.save_atomic(state, path)
        ckpt.link_atomic(path, self.ckdir / "last.pt")
        if best:
            ckpt.link_atomic(path, self.ckdir / "best.pt")
        ckpt.prune(self.ckdir, self.cfg.run.keep_checkpoints)

    # -- the run -----------------------------------------------------------------------------
    def run(self) -> dict:
        try:
            return self._run()
        except (dist.DistBackendError, dist.DistError, RuntimeError) as exc:
            text = str(exc)
            if not self.layout.distributed or not any(
                    w in text for w in ("gloo", "Gloo", "NCCL", "imed out", "onnection", "peer")):
                raise
            first = text.strip().splitlines()[0][:160]
            raise PeerLostError(
                f"rank {self.layout.rank}: the other rank stopped answering at step "
                f"{self.state.global_step + 1} (epoch {self.state.epoch + 1}) ({first}); the "
                f"newest checkpoint is in {self.ckdir}: restart the same command to resume, or "
                "run torchrun with --max-restarts") from None

    def _run(self) -> dict:
        cfg, layout = self.cfg, self.layout
        log = MetricsLog(self.out / "metrics.jsonl", enabled=layout.is_main)
        if layout.is_main:
            dump_config(cfg, self.out / "config.yaml")
        if cfg.train.eval_only:
            result = evaluate(self.model, self.test_loader, self.transform, self.precision)
            self.say(f"evaluation: top-1 {result['test_acc']:.4f}  top-5 {result['test_top5']:.4f}"
                     f"  loss {result['test_loss']:.4f}", flush=True)
            log.write({"kind": "eval", "step": self.state.global_step, **result})
            return result
        self.say(f"{cfg.model.name} ({layout.name}, {layout.world_size} rank(s), "
                 f"{layout.device.type}) on {cfg.data.name}: {len(self.train_loader.dataset)} "
                 f"train / {len(self.test_loader.dataset)} test images at "
                 f"{cfg.data.image_size}px; run folder {self.out}", flush=True)
        every = cfg.run.checkpoint_every
        max_steps = cfg.train.max_steps
        guard = StepGuard(layout.distributed, layout.group)
        guard.install()
        result: dict = {}
        start = time.perf_counter()

        def after_step(state: TrainState) -> None:
            if every and state.global_step % every == 0 and state.step < len_epoch:
                self.save()

        while self.state.epoch < cfg.train.epochs:
            if max_steps is not None and self.state.global_step >= max_steps:
                break
            set_epoch(self.train_loader, self.state.epoch, self.state.step)
            len_epoch = self.state.step + len(self.train_loader)
            stats = train_one_epoch(
                self.model, self.train_loader, self.optimizer, self.transform, self.state,
                self.precision, max_steps=max_steps, log_every=cfg.run.log_every,
                show_bar=layout.is_main and cfg.run.progress, on_log=log.write,
                guard=guard, skip_nonfinite=cfg.train.nonfinite == "skip", after_step=after_step)
            if guard.stopping:
                self.save()
                log.write({"kind": "stopped", "epoch": self.state.epoch + 1,
                           "step": self.state.global_step})
                self.say(f"stopped on request (SIGTERM) at step {self.state.global_step}; "
                         f"checkpoint written to {self.ckdir}: run the same command to resume",
                         flush=True)
                return {"stopped": True, **stats}
            result = {**stats, **evaluate(self.model, self.test_loader, self.transform,
                                          self.precision)}
            partial = self.state.step < len_epoch
            epoch = self.state.epoch + 1
            if not partial:
                self.state.epoch, self.state.step = epoch, 0
                if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                    self.scheduler.step(result["test_acc"])
                elif self.scheduler is not None:
                    self.scheduler.step()
            best = result["test_acc"] > self.state.best_acc
            if best:
                self.state.best_acc = result["test_acc"]
            self.save(best=best)
            record = {"kind": "epoch", "epoch": epoch, "step": self.state.global_step,
                      "partial": partial, "lr": self.optimizer.param_groups[0]["lr"],
                      "elapsed_s": time.perf_counter() - start, **result}
            log.write(record)
            if layout.is_main:
                plot_curves(log.path, self.out / "curves.png")
            self.say(f"epoch {epoch}/{cfg.train.epochs}{' (stopped early)' if partial else ''}: "
                     f"train loss {result['train_loss']:.4f} acc {result['train_acc']:.4f} | "
                     f"test acc {result['test_acc']:.4f} top-5 {result['test_top5']:.4f} | "
                     f"{result['images_per_s']:.0f} img/s | "
                     f"{time.perf_counter() - start:.0f} s", flush=True)
        if result:
            self.say(f"done: test accuracy {result['test_acc']:.4f} after "
                     f"{self.state.global_step} steps in {time.perf_counter() - start:.0f} s; "
                     f"run folder {self.out}", flush=True)
        return result
