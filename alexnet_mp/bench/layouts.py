"""The layouts the bench compares, which of them a world size can run, and the mesh each one
takes there (through the training path's own check)."""

from __future__ import annotations

from alexnet_mp.errors import UserError
from alexnet_mp.models.columns import COLUMNS
from alexnet_mp.parallel.layout import Layout, ParallelDims, parallel_dims
from alexnet_mp.parallel.plans import HYBRID

ONE_DEVICE = ("d2l", "grouped")
COLUMN_SPLIT = ("split", "split_overlap")
DDP = "ddp"
HYBRID_ARM = HYBRID.name  # the arm is the training path's hybrid plan, under its name
LAYOUTS = (*ONE_DEVICE, *COLUMN_SPLIT, DDP, HYBRID_ARM)


def layouts_for(world: int) -> list[str]:
    """The bench layouts ``world`` ranks can run, in report order."""
    if world == 1:
        return list(ONE_DEVICE)
    split = list(COLUMN_SPLIT) if world % COLUMNS == 0 else []
    return [*ONE_DEVICE, *split, DDP, HYBRID_ARM]


def bench_dims(name: str, world: int) -> ParallelDims:
    """The mesh a bench layout uses on ``world`` ranks, through the training path's own check."""
    if name in ONE_DEVICE:
        return ParallelDims(1, 1, "columns")
    if name in COLUMN_SPLIT:
        return parallel_dims("alexnet_columns", world, columns=COLUMNS)
    if name == DDP:
        return parallel_dims("alexnet_grouped", world, columns=1)
    if name == HYBRID_ARM:
        return parallel_dims("alexnet_columns", world, layout=HYBRID.name)
    raise UserError(f"unknown bench layout '{name}'; choose from {', '.join(LAYOUTS)}")


def mesh_name(name: str, dims: ParallelDims) -> str:
    """The name the training path gives this mesh (``Layout.name``)."""
    if name in ONE_DEVICE:
        return Layout().name
    whole = dims.plan.whole_model(dims)
    return Layout(dims=dims, column=None if whole else 0).name


def check_layouts(layouts: list[str], world: int) -> None:
    """Every requested layout exists and runs on ``world`` ranks; else one line saying which."""
    unknown = [n for n in layouts if n not in LAYOUTS]
    if unknown:
        raise UserError(f"unknown bench layout(s) {', '.join(unknown)}; choose from "
                        f"{', '.join(LAYOUTS)}")
    possible = layouts_for(world)
    unfit = [n for n in layouts if n not in possible]
    if unfit:
        raise UserError(f"bench layout(s) {', '.join(unfit)} cannot run on {world} rank(s); "
                        f"with {world} choose from {', '.join(possible)}, or change "
                        "--nproc_per_node (split needs an even number of ranks, ddp and hybrid "
                        "at least 2)")
