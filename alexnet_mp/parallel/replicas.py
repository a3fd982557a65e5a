"""Gradients across replicas: each column's gradients averaged over the replicas that hold it.

torch's composable ``replicate`` is DDP without the wrapper: it buckets the gradients and
all-reduces each bucket as soon as backward has filled it, overlapping the traffic with the rest
of backward, over the mesh's ``replica`` dimension. The model stays the same object, with the
same parameter names and attributes, so checkpoints and the training loop see no difference.
The all-reduces run inside autograd: the caller wraps ``backward()`` in ``peer_errors``.
"""

from __future__ import annotations

from torch import nn
from torch.distributed._composable.replicate import replicate

from alexnet_mp.parallel.hybrid import HEAD, HybridAlexNet, sum_trunk_grads
from alexnet_mp.parallel.layout import Layout


def parallelize(model: nn.Module, layout: Layout) -> nn.Module:
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
        return sum_trunk_grads(model, layout.mesh["column"])
    if layout.replicas > 1:
        replicate(model, device_mesh=layout.mesh["replica"])
    return model


def synced_parameters(model: nn.Module, layout: Layout) -> tuple[set[str], int]:
    """The names of the parameters whose gradients :func:`parallelize` all-reduces, and over how
    many ranks (1: none are)."""
    if not layout.distributed:
        return set(), 1
    names = {name for name, _ in model.named_parameters()}
    if layout.layout == "hybrid":
        return {n for n in names if n.split(".")[0] not in HEAD}, layout.world_size
    if layout.replicas > 1:
        return names, layout.replicas
    return set(), 1
