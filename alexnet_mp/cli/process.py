"""The process-wide settings a rank's entry point makes: threads, the C heap, cuDNN's autotuner,
and a stack dump on request. They belong to the whole process, so the commands set them and the
library functions they call leave them alone."""

from __future__ import annotations

import faulthandler
import os
import signal
import sys

import torch

from alexnet_mp.host_memory import keep_freed_memory


def configure_process(device: torch.device, *, threads: int | None = None,
                      local_world_size: int = 1, keep_host_memory: bool = True,
                      cudnn_benchmark: bool = True) -> None:
    """Settings for a rank on ``device``. Off CUDA: ``threads`` intra-op threads (None: the
    machine's cores shared by the ``local_world_size`` ranks on it), and with
    ``keep_host_memory`` the heap keeps what the steps free
    (:func:`alexnet_mp.host_memory.keep_freed_memory`). On CUDA: ``cudnn_benchmark``."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cudnn_benchmark
        return
    # Ranks sharing a CPU must not oversubscribe its cores, or they fight and both slow down.
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // local_world_size))
    if keep_host_memory:
        keep_freed_memory()


def dump_stacks_on_sigusr1() -> bool:
    """``kill -USR1 PID`` prints every thread's Python stack to stderr, and the process goes on:
    what a hung run is doing. Returns False where the platform has no SIGUSR1 (Windows) or the
    process no stderr."""
    # The process's own stderr: sys.stderr may be a stream without a file descriptor (a test's
    # capture), and the dump is written from the signal handler straight to a descriptor.
    stream = sys.__stderr__
    if stream is None or not hasattr(faulthandler, "register") or \
            not hasattr(signal, "SIGUSR1"):
        return False
    faulthandler.register(signal.SIGUSR1, file=stream, all_threads=True)
    return True
