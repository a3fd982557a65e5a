"""What a step moves and computes, from the architecture and the shapes alone: the bytes each
rank receives per step in each layout (exchange and all-reduce), the FLOPs of a step (with
torch's counter, corrected for grouped convolutions), and the matmul probe they are held
against."""

from __future__ import annotations

import time
from typing import NamedTuple

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from alexnet_mp.bench.layouts import (
    COLUMN_SPLIT,
    DDP,
    HYBRID_ARM,
    ONE_DEVICE,
    bench_dims,
    layouts_for,
    mesh_name,
)
from alexnet_mp.bench.work import Work, arch_for
from alexnet_mp.config import Config
from alexnet_mp.engine import sync_device as _sync
from alexnet_mp.errors import UserError
from alexnet_mp.models.columns import COLUMNS, Arch, ColumnAlexNet, even_split, sides
from alexnet_mp.parallel.hybrid import HEAD

FLOAT_BYTES = 4


class Traffic(NamedTuple):
    """Bytes one rank receives per step."""

    exchange: int  # activations (and their gradients) between the ranks of a replica
    allreduce: int  # gradients between replicas (hybrid: the trunk's, between every rank)

    @property
    def total(self) -> int:
        return self.exchange + self.allreduce


def param_counts(arch: Arch, column: int | None = None) -> dict[str, int]:
    with torch.device("meta"):
        model = ColumnAlexNet(arch, column)
    return {k: p.numel() for k, p in model.named_parameters()}


def ring_bytes(numel: int, ranks: int) -> int:
    """What each rank receives in a ring all-reduce of ``numel`` floats: 2 (R-1)/R of them.

    The bench's count from the model's synced gradients
    (:func:`~alexnet_mp.bench.traffic.allreduce_bytes`) divides the same way.
    """
    return FLOAT_BYTES * 2 * (ranks - 1) * numel // ranks


def analytic_traffic(name: str, cfg: Config, world: int, rank: int = 0) -> Traffic:
    """Bytes rank ``rank`` of ``world`` receives per step in layout ``name``, from the
    architecture alone. Labels gathered for the hybrid loss (8 bytes an example) are left out,
    as the meter leaves them out.

    Columns x replicas (C = 2 columns, R = W/2 replicas, n = global batch / R per replica):
    X1–X4 forward (all-gather) and backward (reduce-scatter) and X5 forward only,
    ``4·n·(C-1)·(2·(c2·s2² + c5·s3² + f + f) + ⌈classes/2⌉)``, plus the ring all-reduce of the
    column's parameters over the R replicas. DDP: the ring all-reduce of every parameter over W.
    Hybrid: the trunk features gathered along the batch (forward and backward), the inputs of
    fc7 and fc8 (each rank's 2f/W rows, forward and backward), the logits (forward), and the ring
    all-reduce of the trunk's parameters over W.
    """
    if name in ONE_DEVICE:
        return Traffic(0, 0)
    dims = bench_dims(name, world)
    arch = arch_for(cfg)
    c1, c2, c3, c4, c5, f = arch.per_column
    _, _, s2, s3 = sides(cfg.data.image_size)
    n = cfg.train.batch_size
    if name in COLUMN_SPLIT:
        local, others = n // dims.replicas, dims.columns - 1
        per_exchange = c2 * s2 * s2 + c5 * s3 * s3 + f + f
        exchange = FLOAT_BYTES * local * others * (2 * per_exchange + max(arch.class_split))
        column = rank % dims.columns
        return Traffic(exchange, ring_bytes(sum(param_counts(arch, column).values()),
                                            dims.replicas))
    if name == DDP:
        return Traffic(0, ring_bytes(sum(param_counts(arch).values()), world))
    if name == HYBRID_ARM:
        others = world - 1
        trunk_features = COLUMNS * c5 * s3 * s3
        fc_rows = even_split(COLUMNS * f, world)[rank]  # the layout refuses uneven splits
        classes = max(even_split(arch.num_classes, world))
        floats = (2 * (n // world) * others * trunk_features  # the trunk's features
                  + 2 * 2 * n * others * fc_rows  # fc7's and fc8's inputs
                  + n * others * classes)  # the logits
        trunk = sum(v for k, v in param_counts(arch).items() if k.split(".")[0] not in HEAD)
        return Traffic(FLOAT_BYTES * floats, ring_bytes(trunk, world))
    raise ValueError(name)


def analytic_bytes(name: str, cfg: Config, world: int, rank: int = 0) -> int:
    """Both kinds of :func:`analytic_traffic` together."""
    return analytic_traffic(name, cfg, world, rank).total


def analytic_table(cfg: Config, worlds: list[int]) -> str:
    """Per-rank bytes per step of every multi-rank layout at each world size, from the formula
    alone (nothing runs): the figures a projection to larger machines starts from."""
    arch = arch_for(cfg)
    params = sum(param_counts(arch).values())
    lines = [f"{params:,} parameters; image {cfg.data.image_size} px, global batch "
             f"{cfg.train.batch_size}, {arch.num_classes} classes, width {arch.width}; "
             "MB = 10^6 bytes, received per rank per step (rank 0)", "",
             "| ranks | layout | mesh | exchange MB | all-reduce MB | total MB |",
             "|" + " --- |" * 6]
    for world in worlds:
        for name in ("split", DDP, HYBRID_ARM):
            if name not in layouts_for(world):
                continue
            try:
                dims = bench_dims(name, world)
                t = analytic_traffic(name, cfg, world)
            except UserError:
                continue
            lines.append(f"| {world} | {name} | {mesh_name(name, dims)} | "
                         f"{t.exchange / 1e6:.2f} | {t.allreduce / 1e6:.2f} | "
                         f"{t.total / 1e6:.2f} |")
    return "\n".join(lines)


def matmul_probe(device: torch.device, seconds: float = 0.5, n: int = 1024) -> float:
    """FLOP/s of a square fp32 matmul on this device with the current threads."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    for _ in range(3):
        a @ b
    _sync(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    _sync(device)
    return 2 * n ** 3 * count / (time.perf_counter() - start)


def grouped_conv_backward_flop(grad_out_shape, x_shape, w_shape, bias, stride, padding,
                               dilation, transposed, output_padding, groups, output_mask,
                               out_shape, **kwargs) -> int:
    """torch's formula, with the weight gradient of a grouped conv divided by its groups.

    torch.utils.flop_counter counts that term as if the conv were ungrouped (twice the work for
    the columns' groups=2 convs), which would credit the grouped form with FLOPs it never does.
    """
    def t(shape):
        return [shape[1], shape[0], *shape[2:]]

    flops = 0
    if output_mask[0]:  # grad_input: a transposed conv of grad_out with the weight
        flops += flop_counter.conv_flop_count(grad_out_shape, w_shape, x_shape, not transposed)
    if output_mask[1]:  # grad_weight: input against grad_out, within each group only
        pair = (t(grad_out_shape), t(x_shape)) if transposed else (t(x_shape), t(grad_out_shape))
        flops += flop_counter.conv_flop_count(*pair, t(w_shape)) // groups
    return flops


def count_flops(work: Work, x: torch.Tensor, y: torch.Tensor) -> int:
    fixed = {torch.ops.aten.convolution_backward: grouped_conv_backward_flop}
    with FlopCounterMode(display=False, custom_mapping=fixed) as counter:
        work.step(x, y)
    work.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops()
