"""The (replica x column) mesh: validation, groups and timeouts, and every layout on real gloo
ranks taking the same SGD steps as the grouped model on one device.

Each world size is spawned once (a module fixture) and runs every check; the tests read its
results. Equivalence is to 1e-5 relative per parameter tensor after the steps (float sums in a
different order are all that differ: about 1e-7 per step).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import one_process_layout
from ranks import free_port, run_ranks

from alexnet_mp import models
from alexnet_mp.config import ModelConfig
from alexnet_mp.errors import UserError
from alexnet_mp.loader import make_loader, set_epoch
from alexnet_mp.models.columns import Arch
from alexnet_mp.parallel.build import build_model
from alexnet_mp.parallel.hybrid import HybridAlexNet
from alexnet_mp.parallel.layout import Layout, mesh_layout, parallel_dims, setup_layout

SEED = 5
BATCH = 8  # the global batch
STEPS = 3
TOLERANCE = 1e-5
CFG = ModelConfig(name="alexnet_columns", num_classes=7, in_channels=3, dropout=0.0, width=0.125,
                  init="kaiming")
D2L = dataclasses.replace(CFG, name="alexnet_d2l", init="xavier_relu")
# Four ranks run the overlap path (own half first, the rest as it arrives), two ranks the plain
# gather, so both paths of every layout are covered.
OVERLAP = dataclasses.replace(CFG, overlap=True)
CPU = torch.device("cpu")


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(BATCH, 3, 67, 67, generator=g), torch.randint(0, 7, (BATCH,), generator=g)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, weight_decay=5e-4)


def _trained_errors(layout: Layout, cfg: ModelConfig) -> dict[str, float]:
    """STEPS SGD steps on this rank's share of each global batch, as a training loop takes them
    (``layout.local_batch``, ``layout.data_shard``, ``layout.loss_targets``), against the grouped
    form (or d2l's net) taking them on the whole batch on one device.

    A share is every ``data_shards``-th example from ``data_shard`` on, as the distributed
    sampler cuts it (``test_a_share_is_every_nth_example_of_the_global_batch``), so that with
    dropout on each example meets the mask row it meets on one device."""
    model = build_model(cfg, 67, layout, SEED)
    reference_cfg = cfg if cfg.name == "alexnet_d2l" else dataclasses.replace(
        cfg, name="alexnet_grouped")
    reference = models.build_model(reference_cfg, 67, CPU, SEED)
    opt, ref_opt = _sgd(model), _sgd(reference)
    layout.local_batch(BATCH)  # checks that the batch divides
    mine = slice(layout.data_shard, None, layout.data_shards)
    # The hybrid model's logits are every share's, stacked in rank order.
    order = torch.arange(BATCH).view(-1, layout.data_shards).t().reshape(-1)
    errors: dict[str, float] = {}
    for step in range(STEPS):
        x, y = _batch(step)
        opt.zero_grad()
        logits = model(x[mine])
        F.cross_entropy(logits, layout.loss_targets(y[mine])).backward()
        opt.step()
        ref_opt.zero_grad()
        ref_logits = reference(x)
        F.cross_entropy(ref_logits, y).backward()
        ref_opt.step()
        errors[f"logits step {step}"] = _rel(logits.detach(), ref_logits.detach()[
            order if layout.layout == "hybrid" else mine])
    rows = model.slices() if hasattr(model, "slices") else {}
    ref = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        errors[name] = _rel(p.detach(), ref[name].detach()[rows.get(name, slice(None))])
    return errors


def _dropout(layout: Layout) -> dict:
    """This rank's fc6 dropout mask, and whether it is its slice of the mask the grouped form
    draws with this replica's dropout stream."""
    cfg = dataclasses.replace(CFG, dropout=0.5)
    model = build_model(cfg, 67, layout, SEED)
    own = model.slices()["fc6.weight"]
    mask = model.drop6(torch.ones(3, own.stop - own.start))
    grouped = models.build_model(dataclasses.replace(cfg, name="alexnet_grouped"), 67, CPU, SEED,
                                 replica=layout.replica)
    whole = grouped.drop6(torch.ones(3, grouped.full_rows["fc6"]))
    return {"mask": mask, "matches_replica_stream": torch.equal(mask, whole[:, own])}


def _timeout(group: dist.ProcessGroup) -> float:
    return group._get_backend(CPU).options._timeout.total_seconds()


def _facts(layout: Layout) -> dict:
    return {"rank": layout.rank, "column": layout.column, "replica": layout.replica,
            "columns": layout.columns, "replicas": layout.replicas, "name": layout.name,
            "column_ranks": dist.get_process_group_ranks(layout.column_group),
            "replica_ranks": dist.get_process_group_ranks(layout.replica_group),
            "step_ranks": dist.get_process_group_ranks(layout.step_group),
            "group_is_column_group": layout.group is layout.column_group,
            "mesh": (layout.mesh.mesh_dim_names, tuple(layout.mesh.shape)),
            "mesh_column_group": layout.mesh.get_group("column") is layout.column_group,
            "timeouts": [_timeout(g) for g in (layout.column_group, layout.replica_group,
                                               layout.step_group)],
            "data": (layout.data_shards, layout.data_shard, layout.local_batch(BATCH))}


def _four_ranks(rank: int, world: int) -> dict:
    layout = mesh_layout(parallel_dims("alexnet_columns", world), device=CPU, timeout_s=7)
    out = {"facts": _facts(layout), "dropout": _dropout(layout),
           "columns_x_replicas": _trained_errors(layout, OVERLAP)}
    try:
        layout.local_batch(7)
    except UserError as exc:
        out["uneven_batch"] = str(exc)
    hybrid = mesh_layout(parallel_dims("alexnet_columns", world, layout="hybrid"), device=CPU,
                         timeout_s=7)
    out["hybrid_facts"] = _facts(hybrid)
    out["hybrid"] = _trained_errors(hybrid, OVERLAP)
    out["hybrid_dropout"] = _trained_errors(hybrid, dataclasses.replace(OVERLAP, dropout=0.5))
    return out


def _two_ranks(rank: int, world: int, port: int) -> dict:
    # Start again through setup_layout itself: rendezvous, default-group timeout and all.
    dist.destroy_process_group()
    layout = setup_layout("alexnet_d2l", rank=rank, world_size=world, local_world_size=world,
                          device="cpu", timeout_s=9, save_timeout_s=99, attempt=1,
                          master_addr="127.0.0.1", master_port=port, startup_timeout_s=60)
    out = {"facts": _facts(layout), "world_timeout": _timeout(dist.group.WORLD),
           "d2l": _trained_errors(layout, D2L)}
    try:
        layout.agree(UserError("bad input on rank 1") if rank == 1 else None)
    except UserError as exc:
        out["agree"] = str(exc)
    hybrid = mesh_layout(parallel_dims("alexnet_columns", world, layout="hybrid"), device=CPU,
                         timeout_s=9)
    out["hybrid_facts"] = _facts(hybrid)
    out["hybrid"] = _trained_errors(hybrid, dataclasses.replace(CFG, overlap=False))
    out["hybrid_dropout"] = _trained_errors(hybrid, dataclasses.replace(CFG, overlap=False,
                                                                        dropout=0.5))
    return out


@pytest.fixture(scope="module")
def four(tmp_path_factory) -> list[dict]:
    return run_ranks(_four_ranks, 4, tmp_path_factory.mktemp("four"))


@pytest.fixture(scope="module")
def two(tmp_path_factory) -> list[dict]:
    return run_ranks(_two_ranks, 2, tmp_path_factory.mktemp("two"), free_port())


def _assert_close(errors: dict[str, float], what: str) -> None:
    bad = {n: e for n, e in errors.items() if e > TOLERANCE}
    assert not bad, f"{what}: differs from one device beyond {TOLERANCE}: {bad}"


# -- validation, before any process exists ---------------------------------------------------

@pytest.mark.parametrize("model, world, columns, layout, fix", [
    ("alexnet_columns", 3, None, "columns", "parallel.columns=1"),
    ("alexnet_columns", 1, 2, "columns", "parallel.columns=1"),
    ("alexnet_columns", 4, 3, "columns", "parallel.columns=1 or 2"),
    ("alexnet_columns", 1, None, "hybrid", "parallel.layout=columns"),
    ("alexnet_d2l", 2, None, "hybrid", "model.name=alexnet_columns"),
    ("alexnet_columns", 4, 2, "hybrid", "remove parallel.columns"),
    ("alexnet_d2l", 2, 2, "columns", "parallel.columns=1"),
    ("alexnet_grouped", 4, 2, "columns", "parallel.columns=1"),
])
def test_a_layout_that_cannot_work_is_one_line_naming_the_fix(model, world, columns, layout, fix):
    with pytest.raises(UserError) as info:
        setup_layout(model, world_size=world, local_world_size=world, columns=columns,
                     layout=layout, device="cpu")
    message = str(info.value)
    assert fix in message and "\n" not in message, message


def test_mps_with_several_ranks_is_refused():
    with pytest.raises(UserError, match="run.device=cpu"):
        parallel_dims("alexnet_columns", 2, device=torch.device("mps"))


def test_automatic_columns_and_replicas():
    assert parallel_dims("alexnet_columns", 1).columns == 1
    assert (parallel_dims("alexnet_columns", 4).columns,
            parallel_dims("alexnet_columns", 4).replicas) == (2, 2)
    assert parallel_dims("alexnet_d2l", 4).replicas == 4
    assert parallel_dims("alexnet_grouped", 2).columns == 1
    hybrid = parallel_dims("alexnet_columns", 4, layout="hybrid")
    assert (hybrid.columns, hybrid.replicas, hybrid.data_shards) == (4, 1, 4)


def test_one_process_is_the_whole_model_with_nothing_to_gather():
    layout = one_process_layout("alexnet_columns")
    assert (layout.column, layout.columns, layout.replicas, layout.mesh) == (None, 1, 1, None)
    assert layout.name == "single device" and layout.local_batch(BATCH) == BATCH
    y = torch.arange(3)
    assert layout.loss_targets(y) is y


def test_hybrid_fc_rows_must_split_evenly():
    with torch.device("meta"), pytest.raises(UserError, match="world size that does"):
        HybridAlexNet(Arch(num_classes=7, in_channels=3, image_size=67, width=0.125), 0, 3,
                      None, torch.Generator())


# -- four ranks: 2 replicas x 2 columns, and hybrid over 4 ------------------------------------

@pytest.mark.slow
def test_mesh_names_every_rank_and_group(four):
    for rank, r in enumerate(four):
        f = r["facts"]
        replica, column = divmod(rank, 2)
        assert (f["rank"], f["replica"], f["column"]) == (rank, replica, column)
        assert f["column_ranks"] == [2 * replica, 2 * replica + 1]
        assert f["replica_ranks"] == [column, column + 2]
        assert f["step_ranks"] == [0, 1, 2, 3]
        assert f["group_is_column_group"] and f["mesh_column_group"]
        assert f["mesh"] == (("replica", "column"), (2, 2))
        assert f["name"] == "2 columns x 2 replicas"
        # Groups used inside a step carry run.timeout_s.
        assert f["timeouts"] == [7.0, 7.0, 7.0]
        assert f["data"] == (2, replica, 4)
        assert "train.batch_size=7" in r["uneven_batch"]


@pytest.mark.slow
def test_columns_x_replicas_take_the_one_device_steps(four):
    for rank, r in enumerate(four):
        _assert_close(r["columns_x_replicas"], f"rank {rank}")


@pytest.mark.slow
def test_dropout_masks_agree_within_a_replica_and_differ_between(four):
    for r in four:
        assert r["dropout"]["matches_replica_stream"]
    masks = [r["dropout"]["mask"] for r in four]
    assert not torch.equal(masks[0], masks[2]) and not torch.equal(masks[1], masks[3])


@pytest.mark.slow
def test_hybrid_over_four_ranks_takes_the_one_device_steps(four):
    for rank, r in enumerate(four):
        f = r["hybrid_facts"]
        assert (f["column"], f["columns"], f["replicas"], f["data"]) == (rank, 4, 1, (4, rank, 2))
        _assert_close(r["hybrid"], f"rank {rank}")


# -- two ranks, through setup_layout: d2l data parallel, hybrid over 2 ------------------------

@pytest.mark.slow
def test_setup_layout_gives_the_default_group_the_save_timeout(two):
    for rank, r in enumerate(two):
        assert r["world_timeout"] == 99.0
        assert r["facts"]["timeouts"] == [9.0, 9.0, 9.0]
        assert r["facts"]["column"] is None and r["facts"]["replica"] == rank
        assert r["facts"]["name"] == "data parallel, 2 replicas"
    assert two[0]["agree"] == "rank 1: bad input on rank 1"
    assert two[1]["agree"] == "bad input on rank 1"


@pytest.mark.slow
def test_d2l_data_parallel_takes_the_one_device_steps(two):
    for rank, r in enumerate(two):
        _assert_close(r["d2l"], f"rank {rank}")


@pytest.mark.slow
def test_hybrid_over_two_ranks_takes_the_one_device_steps(two):
    for rank, r in enumerate(two):
        _assert_close(r["hybrid"], f"rank {rank}")


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_hybrid_with_dropout_takes_the_one_device_steps(world, request):
    """The masks are drawn for the global batch as the grouped form draws them and reordered to
    the gathered shares, so dropout changes nothing about the equality."""
    for rank, r in enumerate(request.getfixturevalue({2: "two", 4: "four"}[world])):
        _assert_close(r["hybrid_dropout"], f"rank {rank} of {world}")


@pytest.mark.parametrize("shares", [2, 4])
def test_a_share_is_every_nth_example_of_the_global_batch(shares):
    """The order the hybrid layout's dropout assumes: the loader of share r of n gives, from each
    global batch of the one-device loader, the examples r, r + n, r + 2n, ..."""
    dataset = torch.utils.data.TensorDataset(torch.arange(40), torch.zeros(40, dtype=torch.long))
    loaders = [make_loader(dataset, batch_size=BATCH // (shares if r is not None else 1),
                           shuffle=True, seed=SEED, num_workers=0, pin_memory=False,
                           replicas=shares if r is not None else 1, replica=r or 0)
               for r in (None, *range(shares))]
    for loader in loaders:
        set_epoch(loader, 1)
    whole, *parts = ([x for x, _ in loader] for loader in loaders)
    for step, batch in enumerate(whole):
        for r in range(shares):
            assert torch.equal(parts[r][step], batch[r::shares]), (step, r)
