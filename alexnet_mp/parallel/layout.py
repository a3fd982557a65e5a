"""One object answers "which rank, which column, which replica, which device, which group".

The ranks form a 2-D mesh with named dimensions (``replica``, ``column``): rank
``replica * columns + column``, so that the ranks of one replica, which exchange activations
every layer, are neighbours (the same node under torchrun). Exchanges run on the column group,
gradient averaging on the replica group, the per-step guard on a group over the whole world.
Those three carry ``timeout_s``; the default group, used for startup agreement and for waiting
while rank 0 writes a checkpoint, carries ``save_timeout_s``, since a large checkpoint on a slow
disk takes far longer than any training step.

Every setting is checked in one place, :func:`parallel_dims`, before any process group exists.
The launcher reads torchrun's environment and passes the numbers in; nothing here reads it.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from alexnet_mp.errors import UserError, peer_errors
from alexnet_mp.guard import StepSync
from alexnet_mp.parallel.plans import LAYOUTS, PLANS, SPLITTABLE, ParallelDims, Plan
from alexnet_mp.parallel.startup import LaunchEnv, start_default_group

__all__ = ["LAYOUTS", "SPLITTABLE", "Layout", "ParallelDims", "mesh_layout", "parallel_dims",
           "pick_device", "setup_layout"]

MESH_DIMS = ("replica", "column")


def parallel_dims(model_name: str, world_size: int, *, columns: int | None = None,
                  layout: str = "columns", device: torch.device | None = None,
                  local_world_size: int = 1) -> ParallelDims:
    """The one check of every parallel setting; a problem is one line naming what to change.

    ``columns`` None means automatic: the paper's two columns for alexnet_columns on more than
    one rank, the whole model on every rank otherwise. ``layout`` names the plan
    (:mod:`alexnet_mp.parallel.plans`), which checks what only it knows.
    """
    device = device if device is not None else torch.device("cpu")
    if layout not in LAYOUTS:
        raise UserError(f"parallel.layout={layout} is unknown; choose one of: "
                        f"{', '.join(LAYOUTS)}")
    if columns is not None and columns not in (1, 2):
        raise UserError(f"parallel.columns={columns} is not supported: a replica holds the model "
                        "whole (1) or as the paper's two columns (2); set parallel.columns=1 or 2")
    if device.type == "mps" and world_size > 1:
        raise UserError("MPS runs one process only; use --nproc_per_node=1 or run.device=cpu")
    if device.type == "cuda" and local_world_size > torch.cuda.device_count():
        raise UserError(f"{local_world_size} ranks on this node but only "
                        f"{torch.cuda.device_count()} CUDA device(s); lower --nproc_per_node or "
                        "set run.device=cpu")
    return PLANS[layout].dims(model_name, world_size, columns)


@dataclass
class Layout:
    """This rank's place in the world: the checked dims (and through them the plan), its
    coordinates on the mesh, its device and its process groups. The world's shape lives in
    ``dims`` alone; ``world_size``, ``columns``, ``replicas`` and ``layout`` read it."""

    dims: ParallelDims = field(default_factory=ParallelDims)
    rank: int = 0
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    column: int | None = None  # None: the whole model lives here
    replica: int = 0
    mesh: DeviceMesh | None = None  # ("replica", "column"); None on one process
    column_group: dist.ProcessGroup | None = None  # exchanges (hybrid: also the trunk's grads)
    replica_group: dist.ProcessGroup | None = None  # averaging gradients between replicas
    step_group: dist.ProcessGroup | None = None  # the per-step guard over the whole world

    @property
    def world_size(self) -> int:
        return self.dims.world_size

    @property
    def columns(self) -> int:
        """Ranks per replica, one column each (hybrid: every rank, FC rows split)."""
        return self.dims.columns

    @property
    def replicas(self) -> int:
        return self.dims.replicas

    @property
    def layout(self) -> str:
        """``parallel.layout``: the plan's name in PLANS."""
        return self.dims.layout

    @property
    def plan(self) -> Plan:
        """What this layout builds, reads and reports (:mod:`alexnet_mp.parallel.plans`)."""
        return self.dims.plan

    @property
    def group(self) -> dist.ProcessGroup | None:
        """The column group, under the name the checkpoint gathers have always used."""
        return self.column_group

    @property
    def world(self) -> dist.ProcessGroup | None:
        """The default group (``save_timeout_s``): startup agreement and checkpoint waits."""
        return dist.group.WORLD if self.distributed else None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def data_shards(self) -> int:
        """How many different shares of each global batch the ranks take (1: all the same)."""
        return self.dims.data_shards

    @property
    def data_shard(self) -> int:
        """Which share this rank takes (its replica's, or its own)."""
        return self.plan.data_shard(self)

    @property
    def name(self) -> str:
        return self.plan.describe(self)

    def local_batch(self, global_batch: int) -> int:
        """This rank's share of a global batch of ``global_batch`` examples."""
        shards = self.data_shards
        if global_batch % shards:
            raise UserError(f"train.batch_size={global_batch} does not divide over {shards} "
                            f"data shares ({self.name}); use a multiple of {shards}")
        return global_batch // shards

    def loss_targets(self, y: torch.Tensor) -> torch.Tensor:
        """The labels that go with the model's logits (gathered where the model returns the
        whole batch's logits from every rank's share)."""
        return self.plan.loss_targets(self, y)

    @property
    def counts_figures(self) -> bool:
        """Whether this rank's training figures count when they are summed over every rank:
        the columns of one replica (and every rank of the hybrid layout) hold the same logits
        and labels, so the first column speaks for them."""
        return self.column is None or self.column == 0

    def step_sync(self) -> StepSync:
        """The training loop's view of this layout: whom a step agrees with, whose figures
        count, the labels of the logits."""
        return StepSync(group=self.step_group if self.distributed else None,
                        counts=self.counts_figures, targets=self.loss_targets)

    def agree(self, error: UserError | None) -> None:
        """Every rank calls this; if any rank failed, all raise the first failing rank's error.

        Without it a rank that hit bad input would exit while its peer hangs in a collective.
        """
        if not self.distributed:
            if error is not None:
                raise error
            return
        messages: list[str | None] = [None] * self.world_size
        with peer_errors("agreeing with the other ranks"):
            dist.all_gather_object(messages, None if error is None else str(error))
        for rank, message in enumerate(messages):
            if message is not None:
                raise UserError(message if rank == self.rank else f"rank {rank}: {message}")

    def barrier(self) -> None:
        """Wait for every rank on the default group (``save_timeout_s``)."""
        if self.distributed:
            with peer_errors("waiting for the other ranks"):
                dist.barrier()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def pick_device(preference: str, local_rank: int) -> torch.device:
    if preference in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    if preference == "cuda":
        raise UserError("run.device=cuda but no CUDA device is visible; use run.device=auto or cpu")
    if preference in ("auto", "mps") and torch.backends.mps.is_available():
        return torch.device("mps")
    if preference == "mps":
        raise UserError("run.device=mps but MPS is not available; use run.device=auto or cpu")
    return torch.device("cpu")


def setup_layout(model_name: str, *, rank: int = 0, world_size: int = 1, local_rank: int = 0,
                 local_world_size: int = 1, device: str = "auto",
                 timeout_s: float = 600.0, save_timeout_s: float = 1800.0, attempt: int = 0,
                 columns: int | None = None, layout: str = "columns",
                 master_addr: str | None = None,
                 master_port: int | None = None, agent_store: bool = False,
                 startup_timeout_s: float = 300.0) -> Layout:
    """Check the settings against the world size, pick the device, start the process groups.
    Threads and the C heap are the process's: its entry point sets them (:mod:`alexnet_mp.cli`).

    ``attempt`` is torchrun's restart count: with the agent's store (``agent_store``), which
    outlives a restart, each attempt's group keys live under their own prefix, so that a
    restarted rank never reads the address of the worker it replaces.
    ``master_addr``/``master_port``: rank 0's rendezvous (``agent_store``: torchrun's agent
    hosts it); waiting there for every rank is bounded by ``startup_timeout_s``
    (:func:`alexnet_mp.parallel.startup.join`).
    """
    dev = pick_device(device, local_rank)
    dims = parallel_dims(model_name, world_size, columns=columns, layout=layout, device=dev,
                         local_world_size=local_world_size)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size == 1:
        return Layout(dims=dims, device=dev)
    launch = LaunchEnv(rank, world_size, local_rank, local_world_size, attempt, master_addr,
                       master_port, agent_store)
    start_default_group(launch, dev, startup_timeout_s=startup_timeout_s,
                        timeout_s=save_timeout_s)
    return mesh_layout(dims, device=dev, timeout_s=timeout_s, local_rank=local_rank,
                       local_world_size=local_world_size)


def mesh_layout(dims: ParallelDims, *, device: torch.device, timeout_s: float,
                local_rank: int = 0, local_world_size: int = 1) -> Layout:
    """The layout of ``dims`` on the default group, which must already be started.

    Creates the column, replica and step groups with ``timeout_s`` (every rank creates every
    group, as torch requires) and names them as a 2-D DeviceMesh.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != dims.world_size:
        raise ValueError(f"the default group has {world} ranks, the layout {dims.world_size}")
    columns, replicas = dims.columns, dims.replicas
    timeout = datetime.timedelta(seconds=timeout_s)
    with peer_errors("creating the process groups"):
        column_group, _ = dist.new_subgroups_by_enumeration(
            [list(range(r * columns, (r + 1) * columns)) for r in range(replicas)],
            timeout=timeout)
        replica_group, _ = dist.new_subgroups_by_enumeration(
            [list(range(c, world, columns)) for c in range(columns)], timeout=timeout)
        step_group = dist.new_group(list(range(world)), timeout=timeout)
    mesh = DeviceMesh.from_group([replica_group, column_group], device.type,
                                 mesh=torch.arange(world).view(replicas, columns),
                                 mesh_dim_names=MESH_DIMS)
    replica, column = mesh.get_local_rank("replica"), mesh.get_local_rank("column")
    whole = dims.plan.whole_model(dims)
    return Layout(dims=dims, rank=rank, local_rank=local_rank,
                  local_world_size=local_world_size, device=device,
                  column=None if whole else column, replica=replica, mesh=mesh,
                  column_group=column_group, replica_group=replica_group, step_group=step_group)
