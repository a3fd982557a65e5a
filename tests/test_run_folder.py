"""The run folder under real conditions: read-only and full disks, two jobs on one folder.

Disks are real: a small tmpfs mounted in a private mount namespace (``unshare -m``), so the
kernel itself answers "Read-only file system" and "No space left on device", root or not.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, one_process_layout, small_overrides

from alexnet_mp import checkpoint as ckpt

SCRIPT = str(ROOT / "launch" / "train.py")
TORCHRUN = f"{shlex.quote(sys.executable)} -m torch.distributed.run --standalone"


def _can_mount() -> bool:
    try:
        probe = subprocess.run(["unshare", "-m", "sh", "-c",
                                "mount -t tmpfs -o size=1m tmpfs /mnt && umount /mnt"],
                               capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


needs_mount = pytest.mark.skipif(not _can_mount(), reason="needs `unshare -m` and tmpfs mounts "
                                                           "(root in a mount namespace)")


def _in_small_disk(mount: Path, size: str, script: str, timeout: float = 300
                   ) -> subprocess.CompletedProcess:
    """Run ``script`` (sh) with a tmpfs of ``size`` at ``mount``, seen by that script alone."""
    mount.mkdir(parents=True, exist_ok=True)
    body = f"mount -t tmpfs -o size={size} tmpfs {shlex.quote(str(mount))} || exit 99\n{script}"
    return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", body],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _args(idx_root, run, **extra) -> str:
    return " ".join(shlex.quote(a) for a in small_overrides(idx_root, run, **extra))


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


@pytest.mark.slow
@needs_mount
def test_a_read_only_checkpoint_folder_is_named_at_start(idx_root, tmp_path):
    disk, out = tmp_path / "disk", tmp_path / "out"
    out.mkdir()
    args = _args(idx_root, disk / "run", **{"train.max_steps": 2})
    proc = _in_small_disk(disk, "64m", f"""
        {shlex.quote(sys.executable)} {SCRIPT} {args} >/dev/null 2>&1 || exit 98
        mount -o remount,ro {shlex.quote(str(disk))}
        {shlex.quote(sys.executable)} {SCRIPT} {_args(idx_root, disk / "run")} 2>{out}/err
        echo $? > {out}/rc
    """)
    assert proc.returncode == 0, proc.stderr
    err = (out / "err").read_text()
    assert (out / "rc").read_text().strip() == "2", err
    lines = _error_lines(err)
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "is not writable (Read-only file system)" in lines[0]


@pytest.mark.slow
@needs_mount
def test_too_little_room_for_checkpoints_is_named_at_start(idx_root, tmp_path):
    disk, out = tmp_path / "disk", tmp_path / "out"
    out.mkdir()
    proc = _in_small_disk(disk, "4m", f"""
        {shlex.quote(sys.executable)} {SCRIPT} {_args(idx_root, disk / "run")} 2>{out}/err
        echo $? > {out}/rc
        ls -A {shlex.quote(str(disk))} > {out}/files
    """)
    assert proc.returncode == 0, proc.stderr
    err = (out / "err").read_text()
    assert (out / "rc").read_text().strip() == "2", err
    assert "checkpoints (run.keep_checkpoints + 1) need about" in _error_lines(err)[0]
    assert (out / "files").read_text().strip() == ""  # not even the run folder and its .lock


@pytest.mark.slow
@needs_mount
@pytest.mark.parametrize("background", [True, False], ids=["async", "sync"])
def test_a_disk_that_fills_mid_run_fails_the_save_in_one_line_on_both_ranks(
        idx_root, tmp_path, background):
    """Two ranks; the disk fills after the first checkpoints: the next save fails (in the
    background or on the training thread), the temporary file goes, the earlier checkpoints stay
    whole, and rank 1 does not report a lost peer."""
    disk, out = tmp_path / "disk", tmp_path / "out"
    out.mkdir()
    run = disk / "run"
    args = _args(idx_root, run, **{"model.name": "alexnet_columns", "train.epochs": 100000,
                                   "run.checkpoint_every": 2, "run.async_checkpoint": background})
    proc = _in_small_disk(disk, "24m", f"""
        {TORCHRUN} --nproc_per_node=2 {SCRIPT} {args} >{out}/out 2>{out}/err &
        job=$!
        while [ ! -e {run}/checkpoints/step-00000004.pt ]; do sleep 0.1; done
        dd if=/dev/zero of={disk}/filler bs=1M >/dev/null 2>&1
        wait $job
        echo $? > {out}/rc
        cp -a {run}/checkpoints {out}/checkpoints
    """)
    assert proc.returncode == 0, proc.stderr
    err = (out / "err").read_text()
    assert (out / "rc").read_text().strip() != "0", err
    lines = _error_lines(err)
    assert len(lines) == 1, err
    assert "could not write checkpoint" in lines[0] and "No space left on device" in lines[0]
    # The first worker to end does so with our code 2 (torchrun then ends the other, which may
    # not have exited yet); none reports a lost peer (3) or a crash (1), none prints a traceback
    # (the one torchrun prints about its own ChildFailedError is torchrun's).
    assert "exitcode  : 2" in err, err
    assert "exitcode  : 3" not in err and "exitcode  : 1 " not in err, err
    assert "stopped answering" not in err and "[rank" not in err, err
    files = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert not [f for f in files if f.endswith(".tmp")], files
    for path in ckpt.step_files(out / "checkpoints"):
        assert torch.isfinite(ckpt.load(path)["model"]["conv1.weight"]).all()


def _children(pid: int) -> list[int]:
    out = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(proc.name))
            except (OSError, IndexError, ValueError):
                continue
    return out


@pytest.mark.slow
def test_a_second_job_on_a_busy_run_folder_gets_one_line(idx_root, tmp_path):
    """A SIGKILLed torchrun leaves its workers training; a new job must not write beside them."""
    run = tmp_path / "r"
    args = small_overrides(idx_root, run, **{"model.name": "alexnet_columns",
                                             "train.epochs": 100000})
    agent = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                              "--nproc_per_node=2", SCRIPT, *args], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 180
        while not (run / "metrics.jsonl").is_file():
            assert time.monotonic() < deadline, "training never started"
            time.sleep(0.1)
        workers = _children(agent.pid)
        agent.kill()
        agent.wait()
        second = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                                timeout=180)
        assert second.returncode == 2
        assert _error_lines(second.stderr) == [line for line in second.stderr.splitlines()
                                               if line.strip()]
        assert "is in use by another job (pid" in second.stderr
    finally:
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _in_process_trainer(data_root: Path, run: Path, **extra):
    from alexnet_mp.config import load_config
    from alexnet_mp.run import Trainer

    cfg = load_config(None, small_overrides(data_root, run, **extra))
    return Trainer(cfg, one_process_layout(cfg.model.name))


@pytest.mark.parametrize("refusal", ["no data", "eval_only without a checkpoint"])
def test_a_refusal_before_training_leaves_the_disk_as_it_was(idx_root, tmp_path, refusal):
    from alexnet_mp.errors import UserError

    parent = tmp_path / "runs"
    run = parent / "r"
    extra = ({"data.root": str(tmp_path / "nowhere"), "data.download": False}
             if refusal == "no data" else {"train.eval_only": True})
    with pytest.raises(UserError):
        _in_process_trainer(idx_root, run, **extra)
    assert not parent.exists()  # no .lock, no empty checkpoints/, no folders made for them


def test_a_refusal_in_a_used_run_folder_keeps_what_was_there(idx_root, tmp_path):
    from alexnet_mp.errors import UserError

    run = tmp_path / "r"
    (run / "checkpoints").mkdir(parents=True)
    (run / ".lock").write_text("")
    (run / "notes.txt").write_text("mine")
    with pytest.raises(UserError):
        _in_process_trainer(idx_root, run, **{"train.eval_only": True})
    assert sorted(p.name for p in run.iterdir()) == [".lock", "checkpoints", "notes.txt"]


@pytest.mark.slow
def test_rerunning_a_finished_run_says_it_is_done(idx_root, tmp_path):
    run = tmp_path / "r"
    args = small_overrides(idx_root, run, **{"train.max_steps": 1})
    first = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                           timeout=240)
    assert first.returncode == 0, first.stderr
    assert "done: test accuracy" in first.stdout and "after 1 step in" in first.stdout
    again = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                           timeout=240)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip().splitlines()[-1] == (
        "done: nothing left to train at step 1 (0 epochs done), which train.max_steps=1 "
        f"allows; raise it to train on; run folder {run}")
