"""Once a step, every rank agrees on two things before the optimizer moves: is the step finite
everywhere, and has any rank been asked to stop (SIGTERM, as schedulers and torchrun send)?

Both answers travel in one two-element all-reduce, so a NaN on one column or a signal to one
rank stops all of them at the same step. The price is one small host sync per step.
"""

from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist
from torch import nn


class StepGuard:
    def __init__(self, distributed: bool, group: dist.ProcessGroup | None = None) -> None:
        self.distributed, self.group = distributed, group
        self.stop_requested = False  # set by the signal handler on this rank
        self.stopping = False  # agreed by every rank

    def install(self) -> None:
        """Turn SIGTERM into a request to stop after the current step (main thread only)."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._request_stop)

    def _request_stop(self, signum, frame) -> None:
        self.stop_requested = True

    def check(self, loss: torch.Tensor, model: nn.Module, grads: bool = True) -> bool:
        """True when the step is finite on every rank; sets ``stopping`` if any rank must stop."""
        finite = torch.isfinite(loss.detach())
        if grads:
            gs = [p.grad for p in model.parameters() if p.grad is not None]
            if gs:
                finite = finite & torch.isfinite(torch.stack(torch._foreach_norm(gs)).sum())
        flags = torch.stack([(~finite).float(),
                             torch.tensor(float(self.stop_requested), device=loss.device)])
        if self.distributed:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        bad, stop = flags.tolist()
        self.stopping = self.stopping or stop > 0
        return bad == 0
