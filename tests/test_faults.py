"""Faults with real processes: SIGTERM, SIGKILL under torchrun, a stalled peer, NaN, torn files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_cli, small_overrides
from ranks import free_port

from alexnet_mp import checkpoint as ckpt
from alexnet_mp.config import load_config
from alexnet_mp.parallel.layout import setup_layout
from alexnet_mp.run import Trainer

SCRIPT = str(ROOT / "launch" / "train.py")


def _wait_for(predicate, timeout: float = 120, what: str = "") -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _logged_steps(run: Path) -> int:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return 0
    return sum(1 for line in path.read_text().splitlines() if '"kind": "step"' in line)


def _ranks(args: list[str], world: int = 2, **popen) -> list[subprocess.Popen]:
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        procs.append(subprocess.Popen([sys.executable, SCRIPT, *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      **popen))
    return procs


def _final(run: Path) -> dict[str, torch.Tensor]:
    return ckpt.load(run / "checkpoints" / "last.pt")["model"]


def _assert_equal(a, b, tol: float = 0.0) -> None:
    for name in a:
        err = (a[name] - b[name]).abs().max().item()
        assert err <= tol * max(1.0, b[name].abs().max().item()), f"{name}: {err}"


def test_sigterm_checkpoints_the_current_step_and_resume_is_exact(idx_root, tmp_path):
    args = lambda run: small_overrides(idx_root, tmp_path / run, **{"train.epochs": 12})  # noqa
    proc = subprocess.Popen([sys.executable, SCRIPT, *args("stopped")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: _logged_steps(tmp_path / "stopped") >= 2, what="training to start")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "stopped on request (SIGTERM) at step" in out
    stopped_at = ckpt.load(tmp_path / "stopped" / "checkpoints" / "last.pt")["train"]
    assert 0 < stopped_at["global_step"] < 72
    resumed = run_cli(args("stopped"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    straight = run_cli(args("straight"))
    assert straight.returncode == 0, straight.stderr
    _assert_equal(_final(tmp_path / "stopped"), _final(tmp_path / "straight"))


def test_sigterm_to_one_rank_stops_both_at_the_same_step(idx_root, tmp_path):
    run = tmp_path / "r"
    procs = _ranks(small_overrides(idx_root, run, **{"model.name": "alexnet_columns",
                                                      "train.epochs": 12}))
    _wait_for(lambda: _logged_steps(run) >= 2, what="training to start")
    procs[1].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=90) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "stopped on request" in outs[0][0]
    state = ckpt.load(run / "checkpoints" / "last.pt")
    assert 0 < state["train"]["global_step"] < 72


def test_a_stalled_peer_ends_the_survivor_within_the_timeout(idx_root, tmp_path):
    run = tmp_path / "r"
    procs = _ranks(small_overrides(idx_root, run, **{"model.name": "alexnet_columns",
                                                      "train.epochs": 50, "run.timeout_s": 4}))
    try:
        _wait_for(lambda: _logged_steps(run) >= 2, what="training to start")
        procs[1].send_signal(signal.SIGSTOP)
        start = time.monotonic()
        out, err = procs[0].communicate(timeout=60)
        assert time.monotonic() - start < 4 + 20
        assert procs[0].returncode == 3, err
        line = [x for x in err.splitlines() if x.startswith("error: ")]
        assert line and "rank 0: the other rank stopped answering at step" in line[0], err
    finally:
        procs[1].kill()
        procs[1].communicate()


def test_nan_stops_before_the_bad_step_and_keeps_good_checkpoints(idx_root, tmp_path):
    run = tmp_path / "r"
    proc = run_cli(small_overrides(idx_root, run, **{"train.lr": 1e12, "train.epochs": 3,
                                                     "run.checkpoint_every": 1}))
    assert proc.returncode == 2
    line = [x for x in proc.stderr.splitlines() if x.startswith("error: ")][0]
    assert "NaN or infinite at step" in line
    bad_step = int(line.split("at step ")[1].split()[0])
    newest = ckpt.load(run / "checkpoints" / "last.pt")
    assert newest["train"]["global_step"] == bad_step - 1
    assert all(torch.isfinite(t).all() for t in newest["model"].values())
    # Skipping instead: the run goes on past the bad batches and logs them.
    skipped = run_cli(small_overrides(idx_root, tmp_path / "s", **{
        "train.lr": 1e12, "train.epochs": 1, "train.nonfinite": "skip"}))
    assert skipped.returncode == 0, skipped.stderr
    assert '"kind": "skipped"' in (tmp_path / "s" / "metrics.jsonl").read_text()


def _trainer(idx_root, run, **extra) -> Trainer:
    cfg = load_config(None, small_overrides(idx_root, run, **extra))
    return Trainer(cfg, setup_layout(cfg.model.name, threads=1))


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_resume_skips_a_damaged_newest_checkpoint(idx_root, tmp_path, damage, capsys):
    run = tmp_path / "r"
    _trainer(idx_root, run, **{"run.checkpoint_every": 2, "run.keep_checkpoints": 3}).run()
    files = ckpt.step_files(run / "checkpoints")  # steps 6, 4, 2: newest first
    newest, previous = files[0], files[1]
    data = bytearray(newest.read_bytes())
    if damage == "truncate":
        newest.write_bytes(bytes(data[: len(data) // 3]))
    else:
        for i in range(len(data) // 2, len(data) // 2 + 32):
            data[i] ^= 0x55
        newest.write_bytes(bytes(data))
    resumed = _trainer(idx_root, run, **{"run.checkpoint_every": 2, "run.keep_checkpoints": 3})
    assert resumed.state.global_step == ckpt.load(previous)["train"]["global_step"] == 4
    assert newest.name in capsys.readouterr().err


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_one(tmp_path):
    path = tmp_path / "step-00000001.pt"
    ckpt.save_atomic({"format": ckpt.FORMAT, "model": {"w": torch.ones(3)}}, path)
    writer = subprocess.Popen([sys.executable, "-c", (
        "import sys, torch\n"
        "from alexnet_mp import checkpoint as c\n"
        "big = {'format': c.FORMAT, 'model': {'w': torch.zeros(64, 1024, 1024)}}\n"
        "while True: c.save_atomic(big, __import__('pathlib').Path(sys.argv[1]))\n"), str(path)])
    tmp = path.with_name(f".{path.name}.tmp")
    _wait_for(lambda: tmp.exists() and tmp.stat().st_size > 1 << 20, what="the write to start")
    writer.kill()
    writer.wait()
    state = ckpt.load(path)  # the old file, whole, never a half-written one
    assert torch.equal(state["model"]["w"], torch.ones(3))
    assert ckpt.step_files(tmp_path) == [path]  # the torn temporary file is never a candidate


def _worker_pids(run: Path) -> dict[int, int]:
    pids = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            if b"torch.distributed.run" in cmd or not any(str(run).encode() in c for c in cmd):
                continue
            env = dict(e.split(b"=", 1) for e in (proc / "environ").read_bytes().split(b"\0")
                       if b"=" in e)
            pids[int(env[b"RANK"])] = int(proc.name)
        except (OSError, KeyError, ValueError):
            continue
    return pids


def test_a_rank_killed_mid_epoch_comes_back_under_torchrun(idx_root, tmp_path):
    extra = {"model.name": "alexnet_columns", "train.epochs": 8, "run.checkpoint_every": 3}
    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--max-restarts=1", SCRIPT, *small_overrides(idx_root, run, **extra)]
    agent = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: len(ckpt.step_files(run / "checkpoints")) >= 1, what="a checkpoint")
    pids = _worker_pids(run)
    os.kill(pids[1], signal.SIGKILL)
    out, err = agent.communicate(timeout=240)
    Path("/tmp/agent_err.log").write_text(err)
    assert agent.returncode == 0, err[-3000:]
    assert "resumed from" in out
    straight = run_cli(small_overrides(idx_root, tmp_path / "straight", **extra), torchrun=2)
    assert straight.returncode == 0, straight.stderr[-2000:]
    _assert_equal(_final(run), _final(tmp_path / "straight"))
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["kind"] == "epoch" and records[-1]["epoch"] == 8
