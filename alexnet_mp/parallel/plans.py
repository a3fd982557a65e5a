"""Each ``parallel.layout`` as one plan object, registered once in :data:`PLANS`.

A plan answers everything that depends on its layout: which world sizes and models it takes
(:meth:`dims`, one line naming what to change), the model for a rank with its exchange and
gradient sync (:meth:`build`), which share of each batch a rank reads, which labels its logits
go with, which gradients cross the ranks, and the name the start line gives it. The rest of the
code asks ``layout.plan`` and never compares layout names.

- ``columns``: C columns × R replicas, with C = 1 or 2: one device (1 × 1), the column split
  (2 × 1), 2 columns × R replicas, data parallel (1 × R). A replica's columns exchange
  activations; every parameter's gradient is averaged over the replicas that hold it.
- ``hybrid``: the convolution trunk data-parallel over every rank, fc6–fc8 split over them
  (:mod:`alexnet_mp.parallel.hybrid`); the trunk's gradients are summed over every rank.

Gradient averaging is torch's composable ``replicate``: DDP without the wrapper, bucketing the
gradients and all-reducing each bucket as soon as backward has filled it, over the mesh's
``replica`` dimension. The model stays the same object, with the same parameter names, so
checkpoints and the training loop see no difference. The all-reduces run inside autograd: the
caller wraps ``backward()`` in ``peer_errors``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn
from torch.distributed._composable.replicate import replicate

from alexnet_mp import models
from alexnet_mp.config import ModelConfig
from alexnet_mp.errors import UserError
from alexnet_mp.parallel.exchange import ColumnExchange, gather_labels
from alexnet_mp.parallel.hybrid import HEAD, HybridAlexNet, sum_trunk_grads

if TYPE_CHECKING:
    from alexnet_mp.models.columns import Exchange
    from alexnet_mp.parallel.layout import Layout

SPLITTABLE = ("alexnet_columns",)


class Plan(Protocol):
    """What a layout answers for the rest of the code."""

    name: str  # its parallel.layout value
    splits_batch: bool  # ranks read different shares and every rank gets the whole batch's logits

    def dims(self, model_name: str, world_size: int, columns: int | None) -> ParallelDims:
        """The dims for this world size and model, or one UserError line naming what to change
        (after :func:`alexnet_mp.parallel.layout.parallel_dims`' checks common to every plan)."""
        ...

    def whole_model(self, dims: ParallelDims) -> bool:
        """Whether each rank holds the model whole (no column of its own)."""
        ...

    def data_shards(self, dims: ParallelDims) -> int:
        """Into how many different shares each global batch is cut."""
        ...

    def data_shard(self, layout: Layout) -> int:
        """Which share this rank reads."""
        ...

    def loss_targets(self, layout: Layout, y: torch.Tensor) -> torch.Tensor:
        """The labels that go with the model's logits, from this rank's labels ``y``."""
        ...

    def describe(self, layout: Layout) -> str:
        """The layout's name in the start line and the bench's reports."""
        ...

    def build(self, cfg: ModelConfig, image_size: int, layout: Layout, seed: int) -> nn.Module:
        """This rank's model on ``layout.device``, with its exchange and gradient sync."""
        ...

    def meta_model(self, cfg: ModelConfig, image_size: int, layout: Layout,
                   exchange: Exchange | None) -> nn.Module:
        """This rank's model on the meta device, uninitialised, with ``exchange`` (one that
        gives the gathered shapes) if it holds a column."""
        ...

    def synced_parameters(self, model: nn.Module, layout: Layout) -> tuple[set[str], int]:
        """The names of the parameters whose gradients are all-reduced, and over how many
        ranks (1: none are)."""
        ...


@dataclass(frozen=True)
class ParallelDims:
    """How the world is cut, validated (after torchtitan's ``ParallelDims``)."""

    world_size: int = 1
    columns: int = 1  # ranks sharing one replica's model: 2 for the paper's columns
    layout: str = "columns"  # the plan's name in PLANS

    @property
    def plan(self) -> Plan:
        return PLANS[self.layout]

    @property
    def replicas(self) -> int:
        return self.world_size // self.columns

    @property
    def data_shards(self) -> int:
        """Into how many different shares each global batch is cut."""
        return self.plan.data_shards(self)


def overlap_of(cfg: ModelConfig, layout: Layout) -> bool:
    """``model.overlap`` null: on with CUDA (NCCL has its own stream), off on the CPU, where gloo
    computes on the same cores and two half layers cost more than the one they replace."""
    return cfg.overlap if cfg.overlap is not None else layout.device.type == "cuda"


class ColumnsPlan:
    """C columns × R replicas (C = 1: the whole model on every rank)."""

    name = "columns"
    splits_batch = False  # every rank of a replica reads the same examples

    def dims(self, model_name: str, world_size: int, columns: int | None) -> ParallelDims:
        """``columns`` None: the paper's two columns for a splittable model on more than one
        rank, the whole model on every rank otherwise."""
        if columns is None:
            columns = 2 if model_name in SPLITTABLE and world_size > 1 else 1
        if columns == 2 and model_name not in SPLITTABLE:
            raise UserError(f"model.name={model_name} cannot be split into columns; set "
                            "parallel.columns=1 (the whole model on every rank, data parallel) "
                            "or model.name=alexnet_columns")
        if world_size % columns:
            raise UserError(f"{world_size} rank(s) cannot hold two columns per replica; run an "
                            "even number of ranks (torchrun --nproc_per_node=2, 4, ...) or set "
                            "parallel.columns=1 (data parallel only)")
        return ParallelDims(world_size, columns, self.name)

    def whole_model(self, dims: ParallelDims) -> bool:
        return dims.columns == 1

    def data_shards(self, dims: ParallelDims) -> int:
        return dims.replicas

    def data_shard(self, layout: Layout) -> int:
        """The replica's share: its columns read the same examples."""
        return layout.replica

    def loss_targets(self, layout: Layout, y: torch.Tensor) -> torch.Tensor:
        """The model's logits are for this rank's own examples."""
        return y

    def describe(self, layout: Layout) -> str:
        if layout.column is None:
            return ("single device" if layout.replicas == 1
                    else f"data parallel, {layout.replicas} replicas")
        if layout.replicas == 1:
            return "column split"
        return f"{layout.columns} columns x {layout.replicas} replicas"

    def build(self, cfg: ModelConfig, image_size: int, layout: Layout, seed: int) -> nn.Module:
        """This rank's column (or the whole model), then every parameter's gradient averaged
        over the ``replica`` mesh dimension. One replica on its own needs no sync: its columns'
        gradients come through the exchanges."""
        exchange = None
        if layout.column is not None:
            exchange = ColumnExchange(layout.column, layout.columns, layout.column_group,
                                      overlap_of(cfg, layout))
        model = models.build_model(cfg, image_size, layout.device, seed, exchange=exchange,
                                   replica=layout.replica)
        if layout.distributed and layout.replicas > 1:
            replicate(model, device_mesh=layout.mesh["replica"])
        return model

    def meta_model(self, cfg: ModelConfig, image_size: int, layout: Layout,
                   exchange: Exchange | None) -> nn.Module:
        return models.meta_model(cfg, image_size, layout.column,
                                 exchange if layout.column is not None else None)

    def synced_parameters(self, model: nn.Module, layout: Layout) -> tuple[set[str], int]:
        if not layout.distributed or layout.replicas == 1:
            return set(), 1
        return {name for name, _ in model.named_parameters()}, layout.replicas


class HybridPlan:
    """Data-parallel trunk, model-parallel fc6–fc8 over every rank (one weird trick).

    On one process (a layout built by hand; the check refuses one rank) it is the grouped
    form on one device, as :class:`ColumnsPlan` builds it.
    """

    name = "hybrid"
    splits_batch = True  # each rank reads its own share; the model returns the whole batch's

    def dims(self, model_name: str, world_size: int, columns: int | None) -> ParallelDims:
        if world_size < 2:
            raise UserError("parallel.layout=hybrid splits the FC layers over several ranks, but "
                            "this is 1 rank; run torchrun --nproc_per_node=2 (or more) or set "
                            "parallel.layout=columns")
        if model_name not in SPLITTABLE:
            raise UserError(f"parallel.layout=hybrid needs model.name=alexnet_columns (the "
                            f"paper's net), not {model_name}; set model.name=alexnet_columns or "
                            "parallel.layout=columns")
        if columns is not None:
            raise UserError(f"parallel.columns={columns} does not apply to parallel.layout="
                            "hybrid, which splits the FC layers over all ranks; remove "
                            "parallel.columns (set it to null)")
        return ParallelDims(world_size, world_size, self.name)

    def whole_model(self, dims: ParallelDims) -> bool:
        return False

    def data_shards(self, dims: ParallelDims) -> int:
        return dims.world_size

    def data_shard(self, layout: Layout) -> int:
        """Every rank its own share."""
        return layout.rank

    def loss_targets(self, layout: Layout, y: torch.Tensor) -> torch.Tensor:
        """The model returns the whole batch's logits from every rank's share, so the labels
        are gathered likewise."""
        if not layout.distributed:
            return y
        return gather_labels(y, layout.column_group)

    def describe(self, layout: Layout) -> str:
        return f"hybrid over {layout.world_size} ranks"

    def build(self, cfg: ModelConfig, image_size: int, layout: Layout, seed: int) -> nn.Module:
        """The whole trunk and this rank's FC rows; the trunk's gradients summed over every
        rank."""
        if not layout.distributed:
            return COLUMNS.build(cfg, image_size, layout, seed)
        models.require_image_size(cfg, image_size)
        arch = models.arch_of(cfg, image_size)
        overlap = overlap_of(cfg, layout)
        model = models.materialize(
            lambda g: HybridAlexNet(arch, layout.column, layout.columns, layout.column_group, g,
                                    overlap),
            cfg, image_size, layout.device, seed)
        return sum_trunk_grads(model, layout.mesh["column"])

    def meta_model(self, cfg: ModelConfig, image_size: int, layout: Layout,
                   exchange: Exchange | None) -> nn.Module:
        if not layout.distributed:
            return COLUMNS.meta_model(cfg, image_size, layout, exchange)
        models.require_image_size(cfg, image_size)
        with torch.device("meta"):
            model = HybridAlexNet(models.arch_of(cfg, image_size), layout.rank,
                                  layout.world_size, None, torch.Generator())
        model.exchange = exchange
        return model

    def synced_parameters(self, model: nn.Module, layout: Layout) -> tuple[set[str], int]:
        if not layout.distributed:
            return COLUMNS.synced_parameters(model, layout)
        return ({name for name, _ in model.named_parameters()
                 if name.split(".")[0] not in HEAD}, layout.world_size)


COLUMNS, HYBRID = ColumnsPlan(), HybridPlan()
PLANS: dict[str, Plan] = {plan.name: plan for plan in (COLUMNS, HYBRID)}
LAYOUTS = tuple(PLANS)
