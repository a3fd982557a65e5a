"""Every millisecond of a training step, attributed to a layer, an exchange or a phase.

A few extra steps run under ``torch.profiler`` with ``record_function`` ranges: one per phase of
the step (forward, backward, guard, optimizer) and one per named layer's forward, opened by
module hooks and by a wrapper around the exchange's ``into`` (the overlapped exchange applies
conv3 and fc6–fc8 with ``F.conv2d``/``F.linear`` on weight slices, never calling the module).

Forward: each operator is charged to the innermost layer range around it; collectives (and the
waits on them) to the exchanges; what lies in no range (ReLU, dropout, flatten, the loss,
Python between layers) to "other".

Backward: the autograd engine runs one node per forward operator, and the profiler gives a node
the *sequence number* of the forward operator that created it. A node's time is charged to the
layer its forward operator ran in: ConvolutionBackward0 to its conv, the LRN's backward to
LRN. Nodes of the exchanges' gathers (the reduce-scatter of X1–X4) are the backward exchanges;
AccumulateGrad nodes (and the replicas' all-reduce hooks they fire) have their own line; what
the engine does between nodes is "other".

On CUDA the times are the kernels' (``device_time_total``), on the CPU the operators' own.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.autograd import DeviceType
from torch.autograd.profiler import record_function

LAYER_NAMES = {"conv1": "conv1", "conv2": "conv2", "conv3": "conv3", "conv4": "conv4",
               "conv5": "conv5", "fc6": "fc6", "fc7": "fc7", "fc8": "fc8", "lrn": "LRN",
               "pool": "pooling"}
MATMUL_LIKE = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")
PHASES = ("forward", "backward", "guard", "optimizer")
EXCHANGE_FWD, EXCHANGE_BWD = "exchanges (forward)", "exchanges (backward)"
ACCUMULATE = "gradient accumulation (and replicas' all-reduce hooks)"
OTHER = "other (ReLU, dropout, flatten, loss, Python between layers)"
ENGINE = "autograd engine between nodes"
IMBALANCE = "rank imbalance (waiting for the peer inside the exchanges)"
ORDER = (*dict.fromkeys(LAYER_NAMES.values()), EXCHANGE_FWD, EXCHANGE_BWD, IMBALANCE, OTHER,
         ENGINE, ACCUMULATE, "guard", "optimizer")
_COLLECTIVE = re.compile(r"gather|scatter|all_?reduce|c10d|gloo|nccl|wait_tensor|broadcast|"
                         r"barrier", re.IGNORECASE)
_NODE = "autograd::engine::evaluate_function: "


def _d2l_names(model: nn.Module) -> dict[str, str]:
    """d2l's Sequential: its convs and linears by order, pools and the rest by kind."""
    names, convs, linears = {}, 0, 0
    for key, m in model.named_children():
        if isinstance(m, nn.Conv2d):
            convs += 1
            names[key] = f"conv{convs}"
        elif isinstance(m, nn.Linear):
            linears += 1
            names[key] = f"fc{5 + linears}"
        elif isinstance(m, nn.MaxPool2d):
            names[key] = "pooling"
    return names


class LayerRanges:
    """Opens a ``layer::NAME`` range around each named layer's forward and records each
    matmul-like layer's FLOPs from the shapes it saw (forward: 2 per multiply-add; backward:
    twice that, or once for a layer whose input needs no gradient, the first one)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.flops: dict[str, tuple[int, int]] = {}
        self._handles: list[Any] = []
        children = dict(model.named_children())
        names = {k: v for k, v in LAYER_NAMES.items() if k in children}
        if not names:
            names = _d2l_names(model)
        self.names = {children[k]: v for k, v in names.items()}
        self._open: dict[int, list[Any]] = defaultdict(list)
        self._exchange = getattr(model, "exchange", None)

    def __enter__(self) -> LayerRanges:
        for module, name in self.names.items():
            self._handles.append(module.register_forward_pre_hook(self._pre(name)))
            self._handles.append(module.register_forward_hook(self._post(module, name)))
        if self._exchange is not None:
            into = self._exchange.into

            def wrapped(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
                name = self.names.get(layer, "other")
                with record_function(f"layer::{name}"):
                    y = into(layer, x)
                self._count(layer, name, x, y)
                return y

            self._exchange.into = wrapped
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._exchange is not None and "into" in vars(self._exchange):
            del self._exchange.into

    def _pre(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            rf = record_function(f"layer::{name}")
            rf.__enter__()
            self._open[id(module)].append(rf)
        return hook

    def _post(self, module: nn.Module, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            self._open[id(module)].pop().__exit__(None, None, None)
            if args and isinstance(out, torch.Tensor):
                self._count(module, name, args[0], out)
        return hook

    def _count(self, layer: nn.Module, name: str, x: torch.Tensor, y: torch.Tensor) -> None:
        weight = getattr(layer, "weight", None)
        if name not in MATMUL_LIKE or weight is None:
            return
        per_output = weight.numel() // weight.shape[0]  # multiply-adds per output element
        forward = 2 * y.numel() * per_output
        # Set, not added: the overlapped path and the plain one may both report a layer.
        self.flops[name] = (forward, forward * (2 if x.requires_grad else 1))


def _duration(event: Any, device: bool) -> float:
    """Seconds of ``event``: its kernels' on CUDA, its own span on the CPU."""
    if device:
        return getattr(event, "device_time_total", 0.0) / 1e6
    return event.time_range.elapsed_us() / 1e6


def _descendants(event: Any) -> Iterator[Any]:
    stack = list(event.cpu_children)
    while stack:
        e = stack.pop()
        yield e
        stack.extend(e.cpu_children)


def attribute(events: list[Any], steps: int, device: bool = False) -> dict[str, dict[str, float]]:
    """Per line of :data:`ORDER`: seconds per step under "forward" and "backward" (layers,
    exchanges) or "step" (guard, optimizer), from the profiler's ``events()`` of ``steps`` steps
    whose phases ran inside :func:`phase` ranges."""
    table: dict[str, dict[str, float]] = defaultdict(dict)
    owner_of: dict[int, str] = {}

    def charge(line: str, column: str, seconds: float) -> None:
        table[line][column] = table[line].get(column, 0.0) + seconds / steps

    def walk(event: Any, owner: str | None) -> float:
        """Charges ``event``'s forward time; returns the seconds charged."""
        name = event.name
        if name.startswith("layer::"):
            owner = name[len("layer::"):]
            inside = sum(walk(child, owner) for child in event.cpu_children)
            rest = max(0.0, _duration(event, device) - inside) if not device else 0.0
            charge(owner, "forward", rest)
            return inside + rest
        seconds = _duration(event, device)
        if _COLLECTIVE.search(name):
            charge(EXCHANGE_FWD, "forward", seconds)
            return seconds
        line = owner or OTHER
        for e in (event, *_descendants(event)):
            if e.sequence_nr >= 0:
                owner_of.setdefault(e.sequence_nr, line)
        charge(line, "forward", seconds)
        return seconds

    # On CUDA the profiler mirrors each range on the GPU's timeline; the CPU's are the ones
    # with the operator tree under them.
    events = [e for e in events if getattr(e, "device_type", DeviceType.CPU) == DeviceType.CPU]
    totals = defaultdict(float)
    for event in events:
        if event.name.startswith("step::") and event.cpu_parent is None:
            totals[event.name[len("step::"):]] += _duration(event, device)
    for event in events:
        if event.name == "step::forward" and event.cpu_parent is None:
            charged = sum(walk(child, None) for child in event.cpu_children)
            if not device:
                charge(OTHER, "forward", max(0.0, _duration(event, device) - charged))
    backward = 0.0
    for event in events:
        if not event.name.startswith(_NODE):
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith(_NODE):
            parent = parent.cpu_parent
        if parent is not None:  # a node inside a node is already counted
            continue
        node = event.name[len(_NODE):]
        seconds = _duration(event, device)
        backward += seconds
        if _COLLECTIVE.search(node):
            line = EXCHANGE_BWD
        elif "AccumulateGrad" in node:
            line = ACCUMULATE
        else:
            line = owner_of.get(event.sequence_nr, ENGINE)
        charge(line, "backward", seconds)
    if not device:
        charge(ENGINE, "backward", max(0.0, totals["backward"] - backward))
    for name in ("guard", "optimizer"):
        charge(name, "step", totals[name])
    return {line: dict(table[line]) for line in ORDER if line in table}


@contextmanager
def phase(name: str) -> Iterator[None]:
    with record_function(f"step::{name}"):
        yield


EXPLAIN = (
    "Milliseconds per step on each rank, forward + backward (guard and optimizer: their whole "
    "phase), over a few profiled steps run after the timed ones (the profiler's own overhead "
    "is in them: on the many small operators, and on a CPU whose heap keeps freed memory "
    "(run.keep_host_memory) on the large elementwise ones too, whose fresh tensors fault again "
    "under the profiler (its own records probably split the blocks the heap kept); so "
    "memory-bound lines such as the LRN read high, and the profiled step is longer than the "
    "timed one). Backward time is charged to the layer whose forward operator created each "
    "autograd node (the profiler's sequence numbers). "
    "Rank imbalance is the time a rank spent inside an exchange beyond what the last rank to "
    "arrive spent in the same collective: waiting for its peer. Share of probe: the layer's "
    "FLOPs (forward + backward) per second of its time, against the matmul probe on that rank.")


def _ms(v: float) -> str:
    return f"{1e3 * v:.1f}"


def markdown(table: dict[str, Any]) -> str:
    """``table`` as the bench stores it: per rank, line -> seconds by phase; per rank the
    matmul-like layers' (forward, backward) FLOPs and the probe's FLOP/s."""
    ranks = table["ranks"]
    head = ["line"] + [f"rank {r} ms (fwd + bwd)" for r in range(len(ranks))]
    head += ["GFLOP/step (rank 0)"] + [f"rank {r} of probe" for r in range(len(ranks))]
    rows = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines = [line for line in ORDER if any(line in t for t in ranks)]
    totals = [0.0] * len(ranks)
    for line in lines:
        cells = [line]
        for r, t in enumerate(ranks):
            v = t.get(line, {})
            totals[r] += sum(v.values())
            if "step" in v:
                cells.append(_ms(v["step"]))
            elif v:
                cells.append(f"{_ms(v.get('forward', 0.0))} + {_ms(v.get('backward', 0.0))}")
            else:
                cells.append("–")
        flops = table["flops"][0].get(line)
        cells.append(f"{sum(flops) / 1e9:.2f}" if flops else "")
        for r, t in enumerate(ranks):
            f = table["flops"][r].get(line)
            v = t.get(line, {})
            seconds = v.get("forward", 0.0) + v.get("backward", 0.0)
            probe = table["probe_flops_per_rank"][r]
            cells.append(f"{100 * sum(f) / seconds / probe:.0f} %" if f and seconds and probe
                         else "")
        rows.append("| " + " | ".join(cells) + " |")
    rows.append("| **total (profiled step)** | " + " | ".join(_ms(t) for t in totals)
                + " |" + " |" * (1 + len(ranks)))
    return "\n".join(rows)
