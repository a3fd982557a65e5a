"""Gradients across replicas: each column's gradients averaged over the replicas that hold it.

torch's composable ``replicate`` is DDP without the wrapper: it buckets the gradients and
all-reduces each bucket as soon as backward has filled it, overlapping the traffic with the rest
of backward, over the mesh's ``replica`` dimension. The model stays the same object, with the
same parameter names and attributes, so checkpoints and the training loop see no difference.
The all-reduces run inside autograd: the caller wraps ``backward()`` in ``peer_errors``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.distributed as dist
from torch import nn
from torch.distributed._composable.replicate import replicate

from alexnet_mp.parallel.exchange import Meter
from alexnet_mp.parallel.hybrid import HybridAlexNet, sum_trunk_grads
from alexnet_mp.parallel.layout import Layout


def averaging_hook(meter: Meter) -> Callable:
    """DDP's averaging all-reduce, counting the bytes a ring receives (for the benchmark)."""

    # Unannotated on purpose: DDP rejects a hook whose annotations are not the GradBucket and
    # Future classes themselves, and postponed annotations are strings.
    def hook(group, bucket):
        buf = bucket.buffer()
        world = group.size()
        meter.bytes += 2 * (world - 1) * buf.numel() * buf.element_size() // world
        buf.div_(world)
        work = dist.all_reduce(buf, group=group, async_op=True)
        return work.get_future().then(lambda fut: fut.value()[0])

    return hook


def parallelize(model: nn.Module, layout: Layout, meter: Meter | None = None) -> nn.Module:
    """Give ``model`` the gradient sync its layout needs, in place; returns the same object.

    columns x replicas (either model, any column count): every parameter's gradient averaged
    over the ``replica`` mesh dimension. hybrid: the trunk's gradients summed over every rank.
    One replica on its own needs nothing: its columns' gradients come through the exchanges.
    """
    if not layout.distributed:
        return model
    if layout.layout == "hybrid":
        if not isinstance(model, HybridAlexNet):
            raise TypeError("parallel.layout=hybrid needs a HybridAlexNet")
        return sum_trunk_grads(model, layout.mesh["column"], meter=meter)
    if layout.replicas > 1:
        replicate(model, device_mesh=layout.mesh["replica"])
        if meter is not None:
            model.register_comm_hook(layout.replica_group, averaging_hook(meter))
    return model
