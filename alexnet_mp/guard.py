"""Once a step, every rank agrees on two things before the optimizer moves: is the step finite
everywhere, and has any rank been asked to stop?

Both answers travel in one two-element all-reduce, so a NaN on one column or a signal to one
rank stops all of them at the same step. The price is one small host sync per step.

Stop requests are SIGTERM (schedulers and torchrun), SIGINT (Ctrl-C) and SIGHUP (a closed
terminal). Each is turned into a request to stop after the current step; a second Ctrl-C
interrupts at once.
"""

from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist
from torch import nn

from alexnet_mp.errors import peer_errors

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# The exit status a stopped run ends with. SIGTERM is how schedulers and torchrun ask a job to
# end, and a job that saved and ended has done what was asked: 0, so torchrun does not restart
# it. Ctrl-C and a hang-up end with the shell's convention, 128 + the signal's number.
EXIT_CODES = {signal.SIGTERM: 0, signal.SIGINT: 128 + signal.SIGINT,
              signal.SIGHUP: 128 + signal.SIGHUP}


class StepGuard:
    def __init__(self, distributed: bool, group: dist.ProcessGroup | None = None,
                 device: torch.device | None = None) -> None:
        self.distributed, self.group, self.device = distributed, group, device
        self.stop_requested = False  # set by the signal handler on this rank
        self.signal: signal.Signals | None = None  # the first stop signal this rank received
        self.stopping = False  # agreed by every rank
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        """Turn the stop signals into a request to stop after the current step (main thread
        only; Python delivers signals there)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._request_stop)

    def uninstall(self) -> None:
        """Give the signals back to whoever held them (a test runner, an interactive shell)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _request_stop(self, signum, frame) -> None:
        if self.stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: the user does not want to wait
        self.stop_requested = True
        self.signal = self.signal or signal.Signals(signum)

    def _stop_flag(self) -> float:
        # The signal's number travels, not just "stop": every rank then ends with the same code.
        return float(self.signal) if self.signal is not None else 0.0

    def _agreed_stop(self, value: float) -> None:
        if value > 0:
            self.stopping = True
            self.signal = signal.Signals(int(value))

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signal, 0) if self.signal is not None else 0

    def _agree(self, flags: torch.Tensor) -> list[float]:
        if self.distributed:
            with peer_errors("the per-step agreement between ranks"):
                dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        return flags.tolist()

    def check(self, loss: torch.Tensor, model: nn.Module, grads: bool = True) -> bool:
        """True when the step is finite on every rank; sets ``stopping`` if any rank must stop."""
        finite = torch.isfinite(loss.detach())
        if grads:
            gs = [p.grad for p in model.parameters() if p.grad is not None]
            if gs:
                finite = finite & torch.isfinite(torch.stack(torch._foreach_norm(gs)).sum())
        flags = torch.stack([(~finite).float(),
                             torch.tensor(self._stop_flag(), device=loss.device)])
        bad, stop = self._agree(flags)
        self._agreed_stop(stop)
        return bad == 0

    def poll(self) -> bool:
        """Outside a training step (evaluation, epoch ends): has any rank been asked to stop?"""
        flags = torch.tensor([0.0, self._stop_flag()], device=self.device)
        self._agreed_stop(self._agree(flags)[1])
        return self.stopping
