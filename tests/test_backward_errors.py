"""Only a collective's failure counts as a lost peer: an error raised in a backward pass keeps
its own type and traceback, on one device and on two ranks, while the rank left waiting for
it reports the lost peer."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from ranks import run_ranks
from torch.utils.data import TensorDataset

from alexnet_mp.config import ModelConfig, TrainConfig
from alexnet_mp.data import BatchTransform
from alexnet_mp.engine import LoopOptions, Precision, TrainState, train_one_epoch
from alexnet_mp.errors import collective_failed
from alexnet_mp.guard import StepGuard
from alexnet_mp.loader import make_loader
from alexnet_mp.optim import build_optimizer
from alexnet_mp.parallel.build import build_model
from alexnet_mp.parallel.layout import Layout, mesh_layout, parallel_dims

CFG = ModelConfig(name="alexnet_columns", num_classes=5, in_channels=1, dropout=0.0,
                  width=0.125, init="kaiming")
CPU = torch.device("cpu")


class Broken(RuntimeError):
    pass


def _raise(module, grad_output):
    raise Broken("a bug in a layer's backward")


def _train(layout: Layout, cfg: ModelConfig, broken: bool) -> None:
    model = build_model(cfg, 67, layout, 0)
    if broken:  # the first thing the backward pass runs, before any of its collectives
        model.register_full_backward_pre_hook(_raise)
    data = TensorDataset(torch.randint(0, 256, (8, 1, 67, 67), dtype=torch.uint8),
                         torch.arange(8) % 5)
    loader = make_loader(data, batch_size=4, shuffle=False, seed=0, num_workers=0,
                         pin_memory=False)
    train_one_epoch(model, loader, build_optimizer(model, TrainConfig()),
                    BatchTransform(67, (0.5,), (0.25,)), TrainState(), Precision("none", CPU),
                    options=LoopOptions(), sync=layout.step_sync(),
                    guard=StepGuard(layout.distributed, layout.step_group, CPU))


def test_an_error_in_the_backward_pass_on_one_device_keeps_its_type():
    with pytest.raises(Broken, match="a bug in a layer's backward"):
        _train(Layout(), dataclasses.replace(CFG, name="alexnet_grouped"), broken=True)


def _two_ranks(rank: int, world: int) -> str:
    layout = mesh_layout(parallel_dims("alexnet_columns", world), device=CPU, timeout_s=30)
    try:
        _train(layout, CFG, broken=rank == 1)
    except Exception as exc:  # the type is what the test reads
        return type(exc).__name__
    return "finished"


@pytest.mark.slow
def test_an_error_in_one_ranks_backward_keeps_its_type_and_the_other_reports_a_lost_peer(
        tmp_path):
    assert run_ranks(_two_ranks, 2, tmp_path) == ["PeerLostError", "Broken"]


def test_what_counts_as_a_collective_failure():
    gloo = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection "
                        "closed by peer [127.0.0.1]:41234")
    assert collective_failed(gloo)
    assert collective_failed(RuntimeError("NCCL error in: ProcessGroupNCCL.cpp:1234, remote "
                                          "process exited or there was a network error"))
    assert not collective_failed(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not collective_failed(torch.OutOfMemoryError("CUDA out of memory."))
    assert not collective_failed(ValueError("gloo/"))
