"""A CPU rank keeps the memory its steps free (run.keep_host_memory), so that a block allocated
after a larger one was freed costs no page faults; with the setting off the C library's default
maps every large block afresh."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="the heap settings are glibc's (mallopt)")]

# The page faults a block of n floats takes when first written.
_FAULTS = """
import resource
import torch
def faults(n):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = torch.empty(n).fill_(1.0)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    del block
    return after - before
"""

# Page faults taken by a 40 MB block allocated after a 48 MB one was freed, in a fresh process
# whose layout the launcher's own code set up from the given override. Both blocks are above
# glibc's largest mmap threshold (32 MiB), so by default each is a fresh mapping.
_PROBE = _FAULTS + """
import sys
sys.path.insert(0, {root!r})
from alexnet_mp.cli.common import layout_from_env
from alexnet_mp.config import load_config
layout_from_env(load_config(None, sys.argv[1:], default_path={root!r} + "/configs/default.yaml"),
                "alexnet_columns")
faults(12_000_000)
print(faults(10_000_000))
"""

PAGES = 40_000_000 // 4096


def _printed(code: str, *args: str) -> list[int]:
    """The integers the last line of ``python -c code args...`` printed (a fresh process, whose
    heap nothing else has touched)."""
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return [int(v) for v in out.stdout.splitlines()[-1].split()]


def _faults(*overrides: str) -> int:
    return _printed(_PROBE.format(root=str(ROOT)), "run.device=cpu", *overrides)[-1]


def test_a_cpu_rank_reuses_freed_memory_without_page_faults():
    assert _faults() < PAGES // 10


def test_keep_host_memory_false_leaves_the_c_library_default():
    assert _faults("run.keep_host_memory=false") > PAGES * 9 // 10


def test_the_heap_switches_to_the_default_and_back():
    """The two settings the bench's malloc_default arms switch between, in one process: the
    default faults, the kept heap does not."""
    probe = _FAULTS + """
from alexnet_mp.bench.heap import default_heap
from alexnet_mp.host_memory import keep_freed_memory
counts = []
for keep in (True, False, True):
    assert (keep_freed_memory if keep else default_heap)()
    faults(12_000_000)
    counts.append(faults(10_000_000))
print(*counts)
"""
    kept, default, kept_again = _printed(probe)
    assert kept < PAGES // 10 and kept_again < PAGES // 10
    assert default > PAGES * 9 // 10


def test_freed_memory_the_heap_kept_goes_back_on_release():
    """What the heap keeps stays resident until release_freed_memory hands it back (between the
    training loop's phases)."""
    probe = """
import torch
from alexnet_mp.host_memory import keep_freed_memory, release_freed_memory
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
assert keep_freed_memory()
blocks = [torch.ones(10_000_000) for _ in range(5)]  # 200 MB, then freed
del blocks
kept = rss()
release_freed_memory()
print(kept - rss())
"""
    assert _printed(probe)[-1] > 150_000_000
