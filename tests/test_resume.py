"""Exact resume under the conditions users meet: LR schedules, signals, torchrun restarts.

Each test compares an interrupted-and-resumed run with a straight one: the parameters must be
bit-identical and the metrics log must hold the same records (timing fields aside).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, one_process_layout, run_cli, small_overrides, wait_for

from alexnet_mp import checkpoint as ckpt
from alexnet_mp.config import load_config
from alexnet_mp.errors import UserError
from alexnet_mp.run import Trainer

SCRIPT = str(ROOT / "launch" / "train.py")
TIMING = ("images_per_s", "elapsed_s")
# Six steps an epoch on the fixture. step: the rate halves every epoch; plateau (patience 0):
# it is divided whenever test accuracy fails to improve, which the 16-image test set does often.
SCHEDULES = {
    "none": {},
    "step": {"train.schedule": "step", "train.step_size": 1, "train.gamma": 0.5},
    "plateau": {"train.schedule": "plateau", "train.patience": 0, "train.gamma": 0.5},
}


def trainer(idx_root, run, **extra) -> Trainer:
    cfg = load_config(None, small_overrides(idx_root, run, **extra))
    return Trainer(cfg, one_process_layout(cfg.model.name))


def final_model(run: Path) -> dict[str, torch.Tensor]:
    return ckpt.load(run / "checkpoints" / "last.pt")["model"]


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


def records(run: Path) -> list[dict]:
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        out.append({k: v for k, v in r.items() if k not in TIMING})
    return out


def rates(run: Path) -> list[float]:
    return [r["lr"] for r in records(run) if r["kind"] == "epoch"]


@pytest.mark.parametrize(("schedule", "background"),
                         [(s, True) for s in sorted(SCHEDULES)] + [("step", False)],
                         ids=[*sorted(SCHEDULES), "step-sync"])
def test_resume_with_a_schedule_equals_a_straight_run(idx_root, tmp_path, schedule, background):
    """Checkpoints written in the background (the default) and synchronously alike."""
    extra = {"train.epochs": 4, "run.async_checkpoint": background, **SCHEDULES[schedule]}
    straight = trainer(idx_root, tmp_path / "straight", **extra)
    straight.run()
    # Interrupted in epoch 3, after a decay; the resumed part crosses the later ones.
    trainer(idx_root, tmp_path / "resumed", **extra, **{"train.max_steps": 15}).run()
    resumed = trainer(idx_root, tmp_path / "resumed", **extra)
    assert resumed.state.global_step == 15
    in_force = rates(tmp_path / "straight")[1]  # set at the end of epoch 2
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(in_force)
    if schedule != "none":
        assert in_force < 0.02, "no decay before the interruption: nothing is tested"
        assert len(set(rates(tmp_path / "straight"))) >= 3, "no decay after the interruption"
    resumed.run()
    assert_identical(final_model(tmp_path / "straight"), final_model(tmp_path / "resumed"))
    assert records(tmp_path / "resumed") == records(tmp_path / "straight")


def test_an_evaluation_failure_loses_no_training(idx_root, tmp_path, monkeypatch):
    """The epoch is saved before it is evaluated; the resumed run evaluates it and goes on."""
    extra = {"train.epochs": 3, **SCHEDULES["plateau"]}
    trainer(idx_root, tmp_path / "straight", **extra).run()
    import alexnet_mp.fit as run_module

    real, calls = run_module.evaluate, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("the test set's disk went away")
        return real(*args, **kwargs)

    monkeypatch.setattr(run_module, "evaluate", failing)
    with pytest.raises(OSError):
        trainer(idx_root, tmp_path / "resumed", **extra).run()
    monkeypatch.setattr(run_module, "evaluate", real)
    resumed = trainer(idx_root, tmp_path / "resumed", **extra)
    assert (resumed.state.epoch, resumed.state.step, resumed.state.global_step) == (1, 6, 12)
    resumed.run()
    assert_identical(final_model(tmp_path / "straight"), final_model(tmp_path / "resumed"))
    assert records(tmp_path / "resumed") == records(tmp_path / "straight")


def _spawn(args: list[str], **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, SCRIPT, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def _newest_step(run: Path) -> int:
    files = ckpt.step_files(run / "checkpoints")
    return int(files[0].name[5:13]) if files else -1


def _forever(idx_root, run, **extra) -> list[str]:
    """A run that cannot finish before the test stops it, so no signal races its end."""
    return small_overrides(idx_root, run, **{"train.epochs": 100000, **extra})


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_process_group_with_loader_workers_saves_and_resumes_exactly(
        idx_root, tmp_path, sig):
    """Schedulers signal every process of the job, loader workers included; Ctrl-C in a
    terminal sends SIGINT to the whole foreground group."""
    extra = {"data.num_workers": 2, **SCHEDULES["step"]}
    run = tmp_path / "stopped"
    proc = _spawn(_forever(idx_root, run, **extra), start_new_session=True)
    try:
        wait_for(lambda: _newest_step(run) >= 6, what="the first epoch")
        os.killpg(proc.pid, sig)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == (0 if sig == signal.SIGTERM else 130), err
    assert "DataLoader worker" not in err and "Traceback" not in err, err
    assert f"stopped on request ({sig.name}) at step" in out
    stopped_at = ckpt.load(run / "checkpoints" / "last.pt")["train"]["global_step"]
    assert stopped_at >= 6
    # Resumed to a few steps past an epoch boundary, and straight to the same step.
    target = {"train.max_steps": stopped_at + 8}
    resumed = run_cli(_forever(idx_root, run, **extra, **target))
    assert resumed.returncode == 0, resumed.stderr
    straight = run_cli(_forever(idx_root, tmp_path / "straight", **extra, **target))
    assert straight.returncode == 0, straight.stderr
    assert_identical(final_model(run), final_model(tmp_path / "straight"))
    assert records(run) == records(tmp_path / "straight")


def test_eval_only_without_a_checkpoint_is_refused(idx_root, tmp_path):
    with pytest.raises(UserError, match="needs a trained model"):
        trainer(idx_root, tmp_path / "r", **{"train.eval_only": True})


def test_only_last_and_best_left_are_resumed_not_overwritten(idx_root, tmp_path):
    run = tmp_path / "r"
    trainer(idx_root, run, **{"train.epochs": 2}).run()
    for f in ckpt.step_files(run / "checkpoints"):
        f.unlink()
    with pytest.raises(UserError, match="would overwrite"):
        trainer(idx_root, run, **{"train.epochs": 2, "train.resume": "none"})
    resumed = trainer(idx_root, run, **{"train.epochs": 3})
    assert resumed.resumed_from == run / "checkpoints" / "last.pt"
    assert resumed.state.global_step == 12


def test_a_changed_batch_size_or_seed_is_refused_and_lr_is_allowed(idx_root, tmp_path, capsys):
    run = tmp_path / "r"
    trainer(idx_root, run, **{"train.max_steps": 3, **SCHEDULES["step"]}).run()
    for key, value in (("train.batch_size", 4), ("train.seed", 1), ("data.image_size", 71),
                       ("data.train_limit", 40)):
        with pytest.raises(UserError, match=f"different {key}") as err:
            trainer(idx_root, run, **{key: value, **SCHEDULES["step"]})
        assert "\n" not in str(err.value)
    assert load_config(run / "config.yaml").train.batch_size == 8  # not overwritten
    capsys.readouterr()
    # A lower rate: the schedule's position is kept (the rate is scaled, not reset).
    resumed = trainer(idx_root, run, **{"train.lr": 0.01, "train.epochs": 3,
                                        **SCHEDULES["step"]})
    assert "train.lr: 0.02 -> 0.01" in capsys.readouterr().err
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(0.01)
    resumed.run()
    assert rates(run) == pytest.approx([0.005, 0.0025, 0.00125])
    history = [json.loads(x) for x in (run / "history.jsonl").read_text().splitlines()]
    starts = [h for h in history if h["event"] == "start"]
    assert len(starts) == 2 and starts[1]["changed"][0].startswith("train.epochs")
    assert starts[0]["config"]["train"]["lr"] == 0.02
    assert load_config(run / "config.yaml").train.lr == 0.01


def _workers_of(agent: subprocess.Popen) -> dict[int, int]:
    """RANK -> pid of torchrun's worker processes (its children; loader workers are theirs)."""
    pids = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) != agent.pid:
                continue
            env = dict(e.split(b"=", 1) for e in (proc / "environ").read_bytes().split(b"\0")
                       if b"=" in e)
            pids[int(env[b"RANK"])] = int(proc.name)
        except (OSError, KeyError, ValueError, IndexError):
            continue
    return pids


def _starts(run: Path) -> list[dict]:
    path = run / "history.jsonl"
    if not path.is_file():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["event"] == "start"]


@pytest.mark.slow
@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_torchrun_restarts_a_killed_rank_and_sigterm_to_torchrun_resumes_exactly(
        idx_root, tmp_path, schedule):
    """Two ranks, loader workers: SIGKILL one rank after a decay, torchrun --max-restarts=1
    restarts both from the newest checkpoint; then SIGTERM to torchrun (which signals each
    worker's process group, loader workers included) saves; a resumed run and a straight run
    to the same step are bit-identical, and so are their metrics logs."""
    extra = {"model.name": "alexnet_columns", "run.checkpoint_every": 4,
             "data.num_workers": 2, **SCHEDULES[schedule]}
    run = tmp_path / "killed"
    agent = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "--max-restarts=1", SCRIPT, *_forever(idx_root, run, **extra)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: _newest_step(run) >= 8, what="a checkpoint in epoch 2")
        os.kill(_workers_of(agent)[1], signal.SIGKILL)
        wait_for(lambda: len(_starts(run)) >= 2, what="torchrun's restart")
        restarted_at = _starts(run)[1]["step"]
        assert restarted_at >= 8
        wait_for(lambda: _newest_step(run) > restarted_at, what="a checkpoint after the restart")
        agent.send_signal(signal.SIGTERM)
        out, err = agent.communicate(timeout=120)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.communicate()
    assert f"resumed from {run / 'checkpoints'}" in out, err[-3000:]
    assert "stopped on request (SIGTERM) at step" in out, err[-3000:]
    assert "DataLoader worker" not in err, err[-3000:]
    stopped_at = ckpt.load(run / "checkpoints" / "last.pt")["train"]["global_step"]
    target = {"train.max_steps": stopped_at + 7}
    resumed = run_cli(_forever(idx_root, run, **extra, **target), torchrun=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = run_cli(_forever(idx_root, tmp_path / "straight", **extra, **target), torchrun=2)
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert_identical(final_model(run), final_model(tmp_path / "straight"))
    assert records(run) == records(tmp_path / "straight")
