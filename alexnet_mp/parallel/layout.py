"""One object answers "which rank, which column, which device, which group" (STYLE.md §1).

The launcher reads torchrun's environment and passes the numbers in; nothing here reads it.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.rendezvous import rendezvous

from alexnet_mp.errors import UserError

SPLITTABLE = ("alexnet_columns",)


@dataclass
class Layout:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    column: int | None = None  # None: the whole model lives here
    columns: int = 1
    group: dist.ProcessGroup | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def name(self) -> str:
        return "column split" if self.column is not None else "single device"

    def agree(self, error: UserError | None) -> None:
        """Every rank calls this; if any rank failed, all raise the first failing rank's error.

        Without it a rank that hit bad input would exit while its peer hangs in a collective.
        """
        if not self.distributed:
            if error is not None:
                raise error
            return
        messages: list[str | None] = [None] * self.world_size
        dist.all_gather_object(messages, None if error is None else str(error))
        for rank, message in enumerate(messages):
            if message is not None:
                raise UserError(message if rank == self.rank else f"rank {rank}: {message}")

    def barrier(self) -> None:
        if self.distributed:
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
                 local_world_size: int = 1, device: str = "auto", threads: int | None = None,
                 timeout_s: float = 600.0, attempt: int = 0) -> Layout:
    """Check that the model fits the world size, pick the device and start the process group.

    ``attempt`` is torchrun's restart count: each attempt's group keys live under their own
    prefix in the rendezvous store, which outlives a restart, so that a restarted rank never
    reads the address of the worker it replaces.
    """
    if world_size not in (1, 2):
        raise UserError(f"world size {world_size} is not supported: run 1 rank (one device) or "
                        "2 ranks (one column each), e.g. torchrun --nproc_per_node=2")
    if world_size == 2 and model_name not in SPLITTABLE:
        raise UserError(f"model.name={model_name} runs on one device and cannot be split over 2 "
                        "ranks; use model.name=alexnet_columns or --nproc_per_node=1")
    dev = pick_device(device, local_rank)
    if dev.type == "mps" and world_size > 1:
        raise UserError("MPS runs one process only; use --nproc_per_node=1 or run.device=cpu")
    if dev.type == "cuda":
        if local_world_size > torch.cuda.device_count():
            raise UserError(f"{local_world_size} ranks on this node but only "
                            f"{torch.cuda.device_count()} CUDA device(s); lower --nproc_per_node "
                            "or set run.device=cpu")
        torch.cuda.set_device(dev)
    else:
        # Ranks sharing a CPU must not oversubscribe its cores, or they fight and both slow down.
        torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // local_world_size))
    layout = Layout(rank=rank, world_size=world_size, local_rank=local_rank,
                    local_world_size=local_world_size, device=dev)
    if world_size > 1:
        backend = "nccl" if dev.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        store, _, _ = next(rendezvous("env://", rank=rank, world_size=world_size,
                                      timeout=timeout))
        dist.init_process_group(backend, store=dist.PrefixStore(f"alexnet_mp/{attempt}", store),
                                rank=rank, world_size=world_size, timeout=timeout,
                                device_id=dev if dev.type == "cuda" else None)
        layout.column, layout.columns, layout.group = rank, world_size, dist.group.WORLD
    return layout
