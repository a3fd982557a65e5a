"""One layout's work on one rank, as the timing loop sees it: the model from the training path's
own builder, its loss, optimizer and step; the variant it runs as; the meter on its exchanges
and the bytes its gradient all-reduce moves; and the batches it takes."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from alexnet_mp.bench.layouts import DDP, ONE_DEVICE
from alexnet_mp.bench.lrn import use_reference_lrn
from alexnet_mp.bench.traffic import TrafficMeter, allreduce_bytes, meter_exchanges
from alexnet_mp.config import Config
from alexnet_mp.errors import UserError
from alexnet_mp.guard import StepGuard
from alexnet_mp.loader import set_epoch
from alexnet_mp.models import arch_of
from alexnet_mp.models.columns import Arch
from alexnet_mp.optim import build_optimizer, step_unless
from alexnet_mp.parallel.build import build_model
from alexnet_mp.parallel.layout import Layout
from alexnet_mp.pipeline import pipeline

VARIANT_FLAGS = ("lrn_ref", "malloc_default", "channels_last", "compile", "pinned")
VARIANT_HELP = {
    "lrn_ref": "torch's LRN (F.local_response_norm) per column instead of the fused one, for "
               "before/after",
    "malloc_default": "glibc's default heap, which hands large freed blocks back to the OS "
                      "(run.keep_host_memory=false), for before/after",
    "channels_last": "model and input in channels_last memory format",
    "compile": "torch.compile on the model (the warm-up steps absorb the compilation)",
    "pinned": "each local rank's threads pinned to its own share of the cores",
}


@dataclass(frozen=True)
class Variant:
    """What an arm changes against the run's configuration ("base": nothing)."""

    flags: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, text: str) -> Variant:
        flags = frozenset(f for f in text.split("+") if f and f != "base")
        unknown = sorted(flags - set(VARIANT_FLAGS))
        if unknown:
            raise UserError(f"unknown bench variant flag(s) {', '.join(unknown)}; join flags from "
                            f"{', '.join(VARIANT_FLAGS)} with '+', or say base")
        return cls(flags)

    @property
    def name(self) -> str:
        return "+".join(f for f in VARIANT_FLAGS if f in self.flags) or "base"

    def memory_format(self, cfg: Config) -> torch.memory_format:
        cl = cfg.train.channels_last or "channels_last" in self.flags
        return torch.channels_last if cl else torch.contiguous_format

    def prepare(self, model: nn.Module, cfg: Config) -> nn.Module:
        """The model as this variant runs it (the same object, changed in place)."""
        if "lrn_ref" in self.flags:
            use_reference_lrn(model)
        if self.memory_format(cfg) is torch.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model


@dataclass
class Work:
    """One layout's model and step on this rank, as the timing loop sees it."""

    module: nn.Module  # the model: its parameters, its exchange
    runner: nn.Module  # what the step calls: the model, or its compiled form
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # the loss
    optimizer: torch.optim.Optimizer | None
    meter: TrafficMeter  # the exchanges
    local_batch: int
    active: bool  # False on the ranks that wait during one-device layouts
    layout: Layout  # where the model runs (one device: a layout of its own)
    guard: StepGuard | None = None
    allreduce_bytes: int = 0  # received per step in the gradient all-reduce

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Forward and backward, as the training loop runs them."""
        loss = self.forward(x, y)
        loss.backward()
        return loss

    def found_inf(self, loss: torch.Tensor) -> torch.Tensor:
        """The guard's verdict on the step, waited for here so that the guard's time (its
        all-reduce) is its own and not the optimizer's."""
        bad = self.guard.found_inf(loss, self.module)
        return bad.wait() if hasattr(bad, "wait") else bad

    def apply(self, found_inf: torch.Tensor) -> None:
        """The optimizer's step, skipped on the device where ``found_inf`` is set."""
        step_unless(self.optimizer, found_inf)


def make_sgd(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """The trainer's own optimizer (fused SGD where torch has it), so the bench's optimizer
    line is the training loop's."""
    return build_optimizer(model, cfg.train)


def arch_for(cfg: Config) -> Arch:
    return arch_of(cfg.model, cfg.data.image_size)


def make_model(cfg: Config, layout: Layout, name: str, overlap: bool = False) -> nn.Module:
    """The training path's own builder: the exchange and gradient sync ``layout`` calls for."""
    model_cfg = dataclasses.replace(cfg.model, name=name, overlap=overlap)
    return build_model(model_cfg, cfg.data.image_size, layout, cfg.train.seed)


def build_work(name: str, cfg: Config, layout: Layout, variant: Variant = Variant()) -> Work:
    """Layout ``name`` on this rank; ``layout`` is its mesh from
    :func:`~alexnet_mp.bench.layouts.bench_dims`."""
    meter = TrafficMeter(layout.device)
    batch = cfg.train.batch_size
    if name in ONE_DEVICE:
        if layout.rank != 0:
            idle = nn.Identity()
            return Work(idle, idle, lambda x, y: x, None, meter, batch, False, layout)
        on = Layout(device=layout.device)
        model = make_model(cfg, on, "alexnet_d2l" if name == "d2l" else "alexnet_grouped")
    else:
        on = layout
        model_name = "alexnet_grouped" if name == DDP else "alexnet_columns"
        model = meter_exchanges(make_model(cfg, layout, model_name,
                                           overlap=name == "split_overlap"), meter)
    model = variant.prepare(model, cfg)
    runner = torch.compile(model) if "compile" in variant.flags else model

    def forward(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # The hybrid layout returns the whole batch's logits: loss_targets gathers the labels.
        return F.cross_entropy(runner(x), on.loss_targets(y))

    guard = StepGuard(on.distributed, on.step_group, on.device)
    return Work(model, runner, forward, make_sgd(model, cfg), meter, on.local_batch(batch), True,
                on, guard, allreduce_bytes(model, on))


class Batches:
    """Synthetic tensors already on the device, or the real loader and on-device transform:
    this rank's share of each global batch (``layout.data_shard`` of ``layout.data_shards``),
    as the trainer's loader reads it."""

    def __init__(self, mode: str, cfg: Config, layout: Layout, local_batch: int,
                 memory_format: torch.memory_format = torch.contiguous_format) -> None:
        device, shard = layout.device, layout.data_shard
        self.mode, self.device = mode, device
        size, c = cfg.data.image_size, cfg.model.in_channels
        g = torch.Generator().manual_seed(cfg.train.seed + shard)
        if mode == "synthetic":
            x = torch.randn(local_batch, c, size, size, generator=g)
            self.x = x.to(device).contiguous(memory_format=memory_format)
            self.y = torch.randint(0, cfg.model.num_classes, (local_batch,), generator=g).to(
                device)
            return
        feed = pipeline(cfg, layout, "train", batch_size=local_batch * layout.data_shards,
                        channels_last=memory_format is torch.channels_last)
        self.loader, self.transform = feed.loader, feed.transform
        self.epoch, self.it = 0, iter(())

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mode == "synthetic":
            return self.x, self.y
        batch = next(self.it, None)
        while batch is None or batch[0].shape[0] != self.loader.batch_size:
            set_epoch(self.loader, self.epoch)
            self.epoch += 1
            self.it = iter(self.loader)
            batch = next(self.it, None)
        x, y = batch
        return self.transform(x.to(self.device, non_blocking=True)), y.to(self.device)
