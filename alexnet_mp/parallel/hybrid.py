"""Krizhevsky 2014, "One weird trick": data-parallel convolutions, model-parallel FC layers.

Each of the W ranks runs the whole convolution trunk (the grouped form's conv1–conv5) on its own
share of the global batch; the trunk's features are gathered so that every rank holds the whole
batch's; each rank then computes its W-th of fc6–fc8's rows for the whole batch, exchanging as
the columns do, and every rank ends with the whole batch's logits (so the loss needs the whole
batch's labels: ``Layout.loss_targets``). Parameters carry the grouped form's names, so canonical
initialisation and checkpoints apply.

Gradients: the FC rows are each held once, so theirs stay where they are. Every rank's trunk
only saw its share of the batch, but the feature gather's backward already hands it the whole
loss's gradient for that share, so the trunk's gradient is the **sum** over ranks, not the mean:
:func:`sum_trunk_grads` puts torch's ``replicate`` (DDP's bucketed all-reduce, overlapped with
backward) on the trunk alone, with a summing comm hook instead of DDP's averaging one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed._composable.replicate import replicate
from torch.distributed.device_mesh import DeviceMesh

from alexnet_mp.errors import UserError
from alexnet_mp.models.columns import (
    COLUMNS,
    Arch,
    ColumnDropout,
    conv_features,
    conv_layers,
    even_split,
    trunk_size,
)
from alexnet_mp.parallel.exchange import ColumnExchange

TRUNK = ("conv1", "conv2", "conv3", "conv4", "conv5")
HEAD = ("fc6", "fc7", "fc8")


def _local(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return layer(x)


class HybridAlexNet(nn.Module):
    """Rank ``rank`` of ``world``: the whole trunk, and rows ``rank`` of ``world`` of fc6–fc8.

    ``row_split[layer]`` says how many canonical rows each rank contributes when the state is
    gathered (a trunk layer's come from rank 0 alone, since every rank holds the same ones);
    ``slices()`` says which rows this rank holds.
    """

    def __init__(self, arch: Arch, rank: int, world: int, group: dist.ProcessGroup | None,
                 generator: torch.Generator, overlap: bool = False) -> None:
        super().__init__()
        c1, c2, c3, c4, c5, f = arch.per_column
        if (COLUMNS * f) % world:
            raise UserError(f"parallel.layout=hybrid splits fc6 and fc7 ({COLUMNS * f} neurons) "
                            f"evenly over the ranks, and {world} ranks do not divide them; use a "
                            "world size that does (2, 4, 8) or parallel.layout=columns")
        if arch.num_classes < world:
            raise UserError(f"model.num_classes={arch.num_classes} is fewer than the {world} "
                            "ranks that split fc8 in parallel.layout=hybrid; use fewer ranks or "
                            "parallel.layout=columns")
        self.arch, self.column, self.generator = arch, rank, generator
        self.exchange = ColumnExchange(rank, world, group, overlap)
        for name, module in conv_layers(arch, COLUMNS).items():
            setattr(self, name, module)
        self.full_rows = {"conv1": COLUMNS * c1, "conv2": COLUMNS * c2, "conv3": COLUMNS * c3,
                          "conv4": COLUMNS * c4, "conv5": COLUMNS * c5, "fc6": COLUMNS * f,
                          "fc7": COLUMNS * f, "fc8": arch.num_classes}
        self.row_split = {name: [self.full_rows[name]] + [0] * (world - 1) for name in TRUNK}
        self._rows = {name: slice(0, self.full_rows[name]) for name in TRUNK}
        for name in HEAD:
            sizes = even_split(self.full_rows[name], world)
            self.row_split[name] = sizes
            self._rows[name] = slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))
        side = trunk_size(arch.image_size)
        own = {name: self.row_split[name][rank] for name in HEAD}
        self.fc6 = nn.Linear(COLUMNS * c5 * side * side, own["fc6"])
        self.fc7 = nn.Linear(COLUMNS * f, own["fc7"])
        self.fc8 = nn.Linear(COLUMNS * f, own["fc8"])
        # Masks over the whole batch and all 4096 neurons, drawn alike on every rank, each rank
        # keeping its rows: the same neurons drop as in the grouped form on the global batch.
        # The gathered batch stacks the ranks' strided shares, so the mask's rows are reordered
        # to match (``shares``).
        self.drop6 = ColumnDropout(arch.dropout, COLUMNS * f, self._rows["fc6"], generator,
                                   shares=world)
        self.drop7 = ColumnDropout(arch.dropout, COLUMNS * f, self._rows["fc7"], generator,
                                   shares=world)

    def slices(self) -> dict[str, slice]:
        """Whole trunk tensors, this rank's rows of the FC layers."""
        return {f"{layer}.{kind}": rows for layer, rows in self._rows.items()
                for kind in ("weight", "bias")}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` is this rank's share of the batch; returns the whole batch's logits."""
        x = conv_features(self, x, _local)  # both columns of the trunk are here
        x = self.exchange.gather_batch(x)
        x = self.drop6(F.relu(self.fc6(x)))
        x = self.drop7(F.relu(self.exchange.into(self.fc7, x)))
        x = self.exchange.into(self.fc8, x)
        return self.exchange.logits(x, self.row_split["fc8"])


def summing_hook() -> Callable:
    """A DDP comm hook that sums each bucket over the group (DDP's default averages)."""

    # Unannotated on purpose: DDP rejects a hook whose annotations are not the GradBucket and
    # Future classes themselves, and postponed annotations are strings.
    def hook(group, bucket):
        work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
        return work.get_future().then(lambda fut: fut.value()[0])

    return hook


def sum_trunk_grads(model: HybridAlexNet, mesh: DeviceMesh | None = None,
                    group: dist.ProcessGroup | None = None) -> HybridAlexNet:
    """Sum the trunk's gradients over the ranks during backward, in place (``model`` stays the
    same object, its parameters keep their names). Give the 1-D ``mesh`` or the ``group``."""
    kwargs: dict[str, Any] = {"device_mesh": mesh} if mesh is not None else {
        "process_group": group if group is not None else dist.group.WORLD}
    replicate(model, ignored_modules=[getattr(model, name) for name in HEAD], **kwargs)
    model.register_comm_hook(mesh.get_group() if mesh is not None else kwargs["process_group"],
                             summing_hook())
    return model
