"""Krizhevsky 2014, "One weird trick": data-parallel convolutions, model-parallel FC layers.

Each rank runs the whole convolution trunk (the grouped form's conv1–conv5) on its share of the
batch; the trunk's features are gathered so that every rank holds the whole batch's; each rank then
computes its rows of fc6–fc8 for the whole batch, exchanging as the columns do. The trunk's
gradients are summed over ranks (data parallel); the FC layers' stay where they are (model
parallel). Parameters carry the grouped form's names, so canonical init and checkpoints apply.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from alexnet_mp.models.columns import Arch, ColumnAlexNet
from alexnet_mp.parallel.exchange import ColumnExchange, Meter, _timed, gather_batch

TRUNK = ("conv1", "conv2", "conv3", "conv4", "conv5")


class HybridAlexNet(nn.Module):
    def __init__(self, arch: Arch, rank: int, world: int, group: dist.ProcessGroup | None,
                 generator: torch.Generator, meter: Meter | None = None) -> None:
        super().__init__()
        self.group, self.meter = group, meter
        exchange = ColumnExchange(rank, world, group, overlap=False, meter=meter)
        trunk = ColumnAlexNet(arch, None, generator=generator)
        head = ColumnAlexNet(arch, rank, exchange, generator)
        for name in TRUNK:
            setattr(self, name, getattr(trunk, name))
        self.lrn, self.pool = trunk.lrn, trunk.pool
        self.fc6, self.fc7, self.fc8 = head.fc6, head.fc7, head.fc8
        self.drop6, self.drop7 = head.drop6, head.drop7
        self.exchange, self.generator = exchange, generator
        self.class_split = head.row_split["fc8"]
        head_rows = head.slices()
        self._rows = {n: head_rows[n] for n in head_rows if n.startswith("fc")}

    def slices(self) -> dict[str, slice]:
        """Whole trunk tensors, this rank's rows of the FC layers."""
        return {n: self._rows.get(n, slice(None)) for n, _ in self.named_parameters()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` is this rank's share of the batch; returns the whole batch's logits."""
        x = self.pool(self.lrn(F.relu(self.conv1(x))))
        x = self.pool(self.lrn(F.relu(self.conv2(x))))
        x = F.relu(self.conv3(x))
        x = F.relu(self.conv4(x))
        x = self.pool(F.relu(self.conv5(x))).flatten(1)
        x = gather_batch(x, self.group, self.meter)  # every rank: the whole batch's features
        x = self.drop6(F.relu(self.fc6(x)))
        x = self.drop7(F.relu(self.exchange.into(self.fc7, x)))
        x = self.exchange.into(self.fc8, x)
        return self.exchange.logits(x, self.class_split)

    def sync_trunk_grads(self) -> None:
        """Sum the replicated trunk's gradients over ranks (the loss already averages the batch)."""
        grads = [p.grad for n, p in self.named_parameters() if n.split(".")[0] in TRUNK]
        flat = torch.cat([g.flatten() for g in grads])
        world = dist.get_world_size(self.group)
        received = 2 * (world - 1) * flat.numel() * flat.element_size() // world  # ring
        with _timed(self.meter, received):
            dist.all_reduce(flat, group=self.group)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
