"""The two things every rank must agree on: is a step finite everywhere, and has any rank been
asked to stop?

Neither answer may cost the host a wait for the device at every step:

- Finiteness is decided on the device. :meth:`StepGuard.found_inf` gives a 0/1 tensor, agreed
  over the ranks by an all-reduce that stays on the device, which the optimizer takes as its
  ``found_inf`` (torch's fused optimizers skip a step whose ``found_inf`` is set, the path a
  gradient scaler uses): a non-finite step is never applied, and nobody reads the flag.
- Stop requests travel with the training figures, once per log window
  (:class:`alexnet_mp.engine.Window`), as counts of each signal (:meth:`stop_counts`), so one
  sum-all-reduce carries both.

Stop requests are SIGTERM (schedulers and torchrun), SIGINT (Ctrl-C) and SIGHUP (a closed
terminal). Each is turned into a request to stop at the end of the log window; a second Ctrl-C
interrupts at once.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn

from alexnet_mp.errors import peer_errors

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# The exit status a stopped run ends with. SIGTERM is how schedulers and torchrun ask a job to
# end, and a job that saved and ended has done what was asked: 0, so torchrun does not restart
# it. Ctrl-C and a hang-up end with the shell's convention, 128 + the signal's number.
EXIT_CODES = {signal.SIGTERM: 0, signal.SIGINT: 128 + signal.SIGINT,
              signal.SIGHUP: 128 + signal.SIGHUP}
# When ranks got different signals, the one with the highest number wins on every rank (SIGTERM
# over SIGINT over SIGHUP), so all end with the same status.
_BY_PRIORITY = sorted(STOP_SIGNALS, reverse=True)


class StepGuard:
    def __init__(self, distributed: bool, group: dist.ProcessGroup | None = None,
                 device: torch.device | None = None) -> None:
        self.distributed, self.group, self.device = distributed, group, device
        self.stop_requested = False  # set by the signal handler on this rank
        self.signal: signal.Signals | None = None  # the first stop signal this rank received
        self.stopping = False  # agreed by every rank
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        """Turn the stop signals into a request to stop (main thread only; Python delivers
        signals there)."""
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

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signal, 0) if self.signal is not None else 0

    # -- stop requests, agreed at the log window's cadence ------------------------------------
    def stop_counts(self) -> list[float]:
        """This rank's stop request as one count per signal, to be summed over the ranks."""
        return [float(self.signal == sig) for sig in _BY_PRIORITY]

    def agree_stop(self, counts: list[float]) -> bool:
        """Take the ranks' summed :meth:`stop_counts`; sets ``stopping`` (and the signal every
        rank ends with) if any rank was asked to stop."""
        for sig, count in zip(_BY_PRIORITY, counts):
            if count > 0:
                self.stopping, self.signal = True, sig
                break
        return self.stopping

    def poll(self) -> bool:
        """Outside the training steps (evaluation, epoch ends): has any rank been asked to stop?
        One host read, with an all-reduce when distributed."""
        counts = torch.tensor(self.stop_counts(), device=self.device)
        if self.distributed:
            with peer_errors("agreeing on a stop request between ranks"):
                dist.all_reduce(counts, group=self.group)
        return self.agree_stop(counts.tolist())

    # -- finite steps, decided on the device ----------------------------------------------------
    def found_inf(self, loss: torch.Tensor, model: nn.Module, grads: bool = True) -> torch.Tensor:
        """1.0 when the loss or (with ``grads``) a gradient is not finite on some rank, else 0.0:
        a float tensor on the device that no one reads on the host."""
        finite = torch.isfinite(loss.detach())
        if grads:
            gs = [p.grad for p in model.parameters() if p.grad is not None]
            if gs:
                # The norms' sum is non-finite exactly when one gradient element is.
                finite = finite & torch.isfinite(torch.stack(torch._foreach_norm(gs)).sum())
        bad = (~finite).float().reshape(1)
        if self.distributed:
            # A functional collective, waited for here so that a lost peer surfaces inside
            # peer_errors: on NCCL the wait is the device stream's, never the host's.
            with peer_errors("agreeing on a finite step between ranks"):
                bad = funcol.all_reduce(bad, "max", self.group).wait()
        return bad.reshape(())


@dataclass
class StepSync:
    """What the loop needs from the layout, and nothing else of it.

    ``group``: every rank of the step (None on one process). ``counts``: whether this rank's
    figures count in the sum over ``group``; ranks that compute the same figures (the columns
    of one replica, every rank of the hybrid layout, which all hold the whole batch's logits)
    let one of them speak, so a plain sum over the whole group sums the replicas.
    ``targets`` maps this rank's labels to those of the logits the model returns (a layout that
    gathers the batch gathers its labels).
    """

    group: dist.ProcessGroup | None = None
    counts: bool = True
    targets: Callable[[torch.Tensor], torch.Tensor] = lambda y: y

    def sum(self, t: torch.Tensor, everyone: torch.Tensor | None = None) -> torch.Tensor:
        """``t`` summed over the counting ranks, followed by ``everyone`` (1-D) summed over every
        rank, in one all-reduce; on one process, the two as they are."""
        if self.group is None:
            return t if everyone is None else torch.cat([t.flatten(), everyone])
        mine = t if self.counts else torch.zeros_like(t)
        if everyone is not None:
            mine = torch.cat([mine.flatten(), everyone])
        with peer_errors("summing the figures over the ranks"):
            return funcol.all_reduce(mine, "sum", self.group).wait()
