"""A run's memory, estimated before anything is allocated: the paper's parameter count from
shapes alone, a size that cannot fit refused in one line without allocating it, --print-shapes at
any size, and running out of memory mid-run reported as one line naming the step."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, one_process_layout, small_overrides

from alexnet_mp.config import load_config
from alexnet_mp.memory_estimate import GiB, OutOfMemory, check_fits, estimate, free_memory
from alexnet_mp.parallel.layout import Layout, ParallelDims
from alexnet_mp.run import Trainer

PAPER = ["model.name=alexnet_columns", "model.num_classes=1000", "model.in_channels=3",
         "data.image_size=227", "train.batch_size=128"]
PAPER_PARAMETERS = 60_965_224
# A generous bound on a process that imported torch and described a model; the run it refuses
# would have needed over a hundred GiB.
SMALL_RSS = 1.5 * GiB


def _paper(*extra: str):
    return load_config(None, [*PAPER, *extra])


def test_the_estimate_counts_the_papers_parameters_in_every_layout():
    cfg = _paper()
    one = estimate(cfg, Layout())
    assert one.parameter_count == PAPER_PARAMETERS
    assert one.parameters == one.gradients == one.momentum == 4 * PAPER_PARAMETERS
    assert one.largest_layer == ("fc6", 9216 * 4096 + 4096)
    columns = [estimate(cfg, Layout(dims=ParallelDims(2, 2), column=c)) for c in (0, 1)]
    assert sum(e.parameter_count for e in columns) == PAPER_PARAMETERS
    assert all(e.buckets == 0 for e in columns)  # one replica: nothing is all-reduced
    hybrid = [estimate(cfg, Layout(dims=ParallelDims(4, 4, "hybrid"), rank=r, column=r))
              for r in range(4)]
    trunk = hybrid[0].buckets // 4  # every rank holds the whole trunk, all-reduced
    assert sum(e.parameter_count for e in hybrid) - 3 * trunk == PAPER_PARAMETERS
    # Activations: a column saves about half of what the whole model does, at the same batch.
    assert 0.4 < columns[0].activations / one.activations < 0.75


def test_activations_follow_the_batch_and_nothing_is_allocated():
    before = _paper("train.batch_size=64")
    after = _paper("train.batch_size=128")
    a, b = estimate(before, Layout()), estimate(after, Layout())
    assert a.parameters == b.parameters and b.activations == pytest.approx(2 * a.activations,
                                                                           rel=0.01)
    huge = estimate(_paper("data.image_size=2048"), Layout())  # meta tensors only
    assert huge.parameter_count > 4e9 and huge.total > 100 * GiB


def test_a_run_that_does_not_fit_is_one_line_with_the_numbers():
    cfg = _paper("data.image_size=2048")
    with pytest.raises(Exception) as info:
        check_fits(cfg, Layout(), free=20 * GiB)
    message = str(info.value)
    assert "\n" not in message
    for words in ("GiB per rank", "4.05 G parameters (fc6 alone 4.03 G)", "20.0 GiB free",
                  "data.image_size (now 2048)", "train.batch_size (now 128)",
                  "model.width (now 1)", "parallel.layout=hybrid"):
        assert words in message, message


def test_ranks_on_one_machine_share_its_memory():
    cfg = _paper()
    need = estimate(cfg, Layout()).total
    assert check_fits(cfg, Layout(), free=2 * need) is not None
    with pytest.raises(Exception, match="shared by 4 ranks"):
        check_fits(cfg, Layout(local_world_size=4), free=2 * need)


def test_a_small_run_never_trips(idx_root, tmp_path):
    cfg = load_config(None, small_overrides(idx_root, tmp_path / "run"))
    assert estimate(cfg, Layout()).total < 64 << 20
    assert check_fits(cfg, Layout(), free=256 << 20) is not None
    assert free_memory(torch.device("cpu")) > 0


def _run_measured(args: list[str], timeout: float = 240) -> tuple[int, str, str, int]:
    """launch/train.py ``args``: (exit code, stdout, stderr, peak RSS in bytes) of that process
    alone (wait4), with a generous timeout."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([sys.executable, str(ROOT / "launch" / "train.py"), *args],
                                stdout=out, stderr=err, cwd=ROOT)
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                os.wait4(proc.pid, 0)
                raise AssertionError(f"launch/train.py {args} ran past {timeout} s")
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return proc.returncode, out.read().decode(), err.read().decode(), usage.ru_maxrss * 1024


def test_image_size_2048_is_refused_at_once_without_allocating(idx_root, tmp_path):
    overrides = small_overrides(idx_root, tmp_path / "run", **{
        "model.width": 1.0, "data.image_size": 2048, "train.batch_size": 128})
    need = estimate(load_config(None, overrides), Layout()).total
    if need < free_memory(torch.device("cpu")):
        pytest.skip("this machine has room for a 2048-pixel run")
    code, _, err, rss = _run_measured(overrides)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: this run needs about ") and "fc6 alone 4.03 G" in lines[0]
    assert "data.image_size (now 2048)" in lines[0] and "free: lower" in lines[0]
    assert rss < SMALL_RSS, f"peak RSS {rss / GiB:.2f} GiB"
    assert not (tmp_path / "run").exists()  # refused before the run folder was made


def test_print_shapes_at_2048_allocates_nothing(tmp_path):
    code, out, err, rss = _run_measured(["--print-shapes", "data.image_size=2048",
                                         "model.name=alexnet_columns", "model.width=1"])
    assert code == 0, err
    assert "conv1 output shape:\t(1, 96, 510, 510)" in out
    assert "pool output shape:\t(1, 256, 62, 62)" in out and "fc6 output shape:\t(1, 4096)" in out
    assert rss < SMALL_RSS, f"peak RSS {rss / GiB:.2f} GiB"


def _out_of_memory_at_call(n: int):
    calls = []

    def hook(*_):
        calls.append(1)
        if len(calls) == n:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    return hook


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_running_out_of_memory_mid_run_is_one_line_naming_the_step(where, idx_root, tmp_path):
    cfg = load_config(None, small_overrides(idx_root, tmp_path / "run",
                                            **{"train.max_steps": 4}))
    trainer = Trainer(cfg, one_process_layout(cfg.model.name))
    if where == "forward":
        trainer.model.conv2.register_forward_hook(_out_of_memory_at_call(2))
    else:
        trainer.model.conv2.register_full_backward_hook(_out_of_memory_at_call(3))
    with pytest.raises(OutOfMemory) as info:
        trainer.run()
    message = str(info.value)
    step = 2 if where == "forward" else 3
    assert "\n" not in message
    assert f"ran out of memory at step {step} (epoch 1)" in message, message
    assert "lower train.batch_size (now 8), data.image_size (now 67)" in message
    assert info.value.exit_code == 2 and not info.value.broken_group


def test_check_is_made_before_the_run_folder(idx_root, tmp_path, monkeypatch):
    """The trainer asks before it allocates or writes anything."""
    import alexnet_mp.run as run

    def refuse(cfg, layout):
        raise run.UserError("refused")

    monkeypatch.setattr(run, "check_fits", refuse)
    cfg = load_config(None, small_overrides(idx_root, tmp_path / "run"))
    with pytest.raises(run.UserError, match="refused"):
        Trainer(cfg, one_process_layout(cfg.model.name))
    assert not Path(tmp_path / "run").exists()
