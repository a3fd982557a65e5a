"""What a training run will hold in memory, worked out before anything is allocated.

A rank holds its parameters, their gradients, the optimizer's momentum, the gradient buckets of
whatever is replicated (data parallel, the hybrid trunk), and the tensors its forward saves for
backward. The model this rank would build (its column, its FC rows, or the whole net) is built on
the meta device, where tensors have shapes and no storage, and one training forward at this rank's
batch runs there with the exchanges replaced by concatenations of the same shapes; a hook on
autograd's saved tensors adds up what backward would keep. Nothing is allocated but a dropout
mask's random numbers (the batch times 4096).

The figure leaves out what is hard to know in advance (the allocator's slack, a convolution's
workspace, the data loader), so a run is refused only when the estimate alone exceeds what the
device has free: a run refused here could not have finished, and one let through may still run
out, which :func:`out_of_memory` then says in one line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from alexnet_mp.config import Config
from alexnet_mp.errors import UserError
from alexnet_mp.parallel.layout import Layout

GiB = 1 << 30
# Share of the free memory the estimate may take; the rest is for what it leaves out. One
# training step of the paper's net at batch 32 on the CPU peaked at 1.1 GiB for an estimate
# of 0.9 GiB.
USABLE = 0.8


class OutOfMemory(UserError):
    """A device ran out of memory during training. Said by the rank it happened on, which may not
    be rank 0."""

    every_rank = True


@dataclass(frozen=True)
class Estimate:
    """Bytes one rank needs, by kind."""

    parameters: int
    gradients: int
    momentum: int
    buckets: int  # the gradient all-reduce's copy of replicated parameters' gradients
    activations: int  # what the forward saves for backward, at this rank's batch
    parameter_count: int
    largest_layer: tuple[str, int]  # the layer with the most parameters here, and its count

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.momentum + self.buckets + self.activations


class _MetaExchange:
    """Stands in for the exchanges on the meta device: the gathered tensor's shape, no traffic."""

    def __init__(self, column: int, columns: int) -> None:
        self.column, self.columns = column, columns

    def into(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return layer(torch.cat([x] * self.columns, dim=1))

    def logits(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        return torch.cat([x, x.new_zeros(x.shape[0], sum(sizes) - x.shape[1])], dim=1)

    def gather_batch(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x] * self.columns, dim=0)


def _rank_model(cfg: Config, layout: Layout) -> tuple[nn.Module, set[str]]:
    """This rank's model on the meta device, uninitialised, and the names of its replicated
    parameters (those whose gradients are all-reduced)."""
    exchange = None if layout.column is None else _MetaExchange(layout.column, layout.columns)
    model = layout.plan.meta_model(cfg.model, cfg.data.image_size, layout, exchange)
    return model, layout.plan.synced_parameters(model, layout)[0]


def _saved_bytes(model: nn.Module, batch: int, cfg: Config) -> int:
    """Bytes of the tensors one training forward at ``batch`` saves for backward (meta device)."""
    params = {id(p) for p in model.parameters()}
    seen: set[int] = set()
    kept: list[torch.Tensor] = []  # keeps ids unique while counting
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        base = t._base if t._base is not None else t  # a linear layer saves its weight's view
        if id(base) not in params and id(t) not in seen:
            seen.add(id(t))
            kept.append(t)
            total += t.numel() * t.element_size()
        return t

    x = torch.empty(batch, cfg.model.in_channels, cfg.data.image_size, cfg.data.image_size,
                    device="meta")
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return total


def estimate(cfg: Config, layout: Layout) -> Estimate:
    """What this rank of ``layout`` needs to train ``cfg`` (nothing is allocated)."""
    model, replicated = _rank_model(cfg, layout)
    named = dict(model.named_parameters())
    count = sum(p.numel() for p in named.values())
    layers: dict[str, int] = {}
    for name, p in named.items():
        layers[name.rsplit(".", 1)[0]] = layers.get(name.rsplit(".", 1)[0], 0) + p.numel()
    largest = max(layers.items(), key=lambda kv: kv[1])
    param_bytes = 4 * count  # float32 (autocast keeps float32 parameters)
    training = not cfg.train.eval_only
    activations = _saved_bytes(model, layout.local_batch(cfg.train.batch_size), cfg)
    if cfg.train.amp != "none" and layout.device.type == "cuda":
        activations //= 2  # saved in 16 bits under autocast
    return Estimate(
        parameters=param_bytes,
        gradients=param_bytes if training else 0,
        momentum=param_bytes if training and cfg.train.momentum > 0 else 0,
        buckets=4 * sum(named[n].numel() for n in replicated) if training else 0,
        activations=activations,
        parameter_count=count,
        largest_layer=largest,
    )


def free_memory(device: torch.device) -> int | None:
    """Bytes free for this rank: the GPU's free memory, or the machine's available RAM (None
    where neither can be read)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB / 10 else f"{n / (1 << 20):.0f} MiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} G" if n >= 1e9 else f"{n / 1e6:.1f} M"


def check_fits(cfg: Config, layout: Layout, free: int | None = None) -> Estimate | None:
    """Refuse, in one line with the numbers and what to change, a run whose estimate exceeds the
    memory free for it. ``free``: bytes free (default: read from the device). On the CPU, the
    ranks on this machine share its memory."""
    try:
        need = estimate(cfg, layout)
    except (RuntimeError, ValueError):
        return None  # a size the model cannot take: building it says so in its own words
    free = free_memory(layout.device) if free is None else free
    if free is None:
        return need
    sharing = layout.local_world_size if layout.device.type == "cpu" else 1
    if need.total * sharing <= USABLE * free:
        return need
    where = (f"{layout.device}" if layout.device.type == "cuda"
             else f"this machine's RAM, shared by {sharing} ranks" if sharing > 1
             else "this machine's RAM")
    name, biggest = need.largest_layer
    fixes = [f"data.image_size (now {cfg.data.image_size})",
             f"train.batch_size (now {cfg.train.batch_size})",
             f"model.width (now {cfg.model.width:g})"]
    weights = need.total - need.activations
    if need.activations > weights:  # the batch dominates: its size first
        fixes[0], fixes[1] = fixes[1], fixes[0]
    more = ("or run more ranks" if cfg.model.name == "alexnet_d2l"
            else "or split the model over more ranks (parallel.layout=hybrid)")
    raise UserError(
        f"this run needs about {_gib(need.total)} per rank: {_count(need.parameter_count)} "
        f"parameters ({name} alone {_count(biggest)}), {_gib(weights)} with their gradients and "
        f"momentum, and {_gib(need.activations)} of activations for a batch of "
        f"{layout.local_batch(cfg.train.batch_size)}; {where} has {_gib(free)} free: lower "
        f"{', '.join(fixes)}, {more}")


def out_of_memory(cfg: Config, layout: Layout, step: int, epoch: int) -> OutOfMemory:
    """The one line for a device that ran out of memory at ``step``."""
    error = OutOfMemory(
        f"rank {layout.rank}: {layout.device} ran out of memory at step {step} (epoch {epoch}); "
        f"lower train.batch_size (now {cfg.train.batch_size}), data.image_size (now "
        f"{cfg.data.image_size}) or model.width (now {cfg.model.width:g}), or use "
        f"{'train.amp=bf16 or ' if cfg.train.amp == 'none' else ''}more ranks")
    # Its peers may be waiting in a collective: leave without tearing the group down.
    error.broken_group = layout.distributed
    return error

