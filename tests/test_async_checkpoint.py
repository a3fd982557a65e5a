"""Checkpoints written in the background (run.async_checkpoint): a copy that the next steps
cannot change, one write in flight, its failure on the training thread, and a kill mid-write."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import ROOT, one_process_layout, small_overrides, wait_for

from alexnet_mp import checkpoint as ckpt
from alexnet_mp.checkpoint_manager import host_copy
from alexnet_mp.checkpoint_writer import BackgroundWriter
from alexnet_mp.config import load_config
from alexnet_mp.run import Trainer

SCRIPT = str(ROOT / "launch" / "train.py")


def _trainer(idx_root, run, **extra) -> Trainer:
    cfg = load_config(None, small_overrides(idx_root, run, **extra))
    return Trainer(cfg, one_process_layout(cfg.model.name))


def test_the_host_copy_is_the_state_of_its_step_and_reuses_the_last_copy():
    live = {"model": {"w": torch.ones(4, 3)}, "rng": [torch.zeros(2, dtype=torch.uint8)],
            "train": {"step": 3}}
    first = host_copy(live)
    live["model"]["w"].add_(1)  # the next optimizer step changes the live parameter in place
    live["train"]["step"] = 4
    assert torch.equal(first["model"]["w"], torch.ones(4, 3)) and first["train"]["step"] == 3
    buffer = first["model"]["w"].data_ptr()
    second = host_copy(live, first)
    assert second["model"]["w"].data_ptr() == buffer  # refilled, not allocated again
    assert torch.equal(second["model"]["w"], torch.full((4, 3), 2.0))
    assert second["model"]["w"].data_ptr() != live["model"]["w"].data_ptr()


def test_a_failed_write_is_raised_once_on_the_waiting_thread():
    writer = BackgroundWriter()

    def fail() -> None:
        raise ckpt.SaveError("could not write checkpoint 'x' (No space left on device)")

    writer.submit(fail)
    with pytest.raises(ckpt.SaveError, match="No space left on device"):
        writer.wait()
    writer.wait()  # said once
    assert not writer.busy


def test_a_failed_background_write_stops_training_at_the_next_save_in_one_line(
        idx_root, tmp_path, monkeypatch):
    run = tmp_path / "r"
    real = ckpt.save_atomic

    def full_at_step_4(state, path):
        if path.name == "step-00000004.pt":
            raise ckpt.SaveError(f"could not write checkpoint '{path}' (No space left on "
                                 "device); the earlier checkpoints are intact")
        real(state, path)

    monkeypatch.setattr(ckpt, "save_atomic", full_at_step_4)
    trainer = _trainer(idx_root, run, **{"run.checkpoint_every": 2, "train.max_steps": 8,
                                         "train.epochs": 5})
    steps = []
    monkeypatch.setattr(trainer.checkpoints, "finish", _recording(trainer, steps))
    with pytest.raises(ckpt.SaveError, match="step-00000004.pt' \\(No space left on device\\)"):
        trainer.run()
    # Training went on past the failed save; the next save (step 6) said it, and wrote nothing.
    assert steps[-1] == 6 and trainer.state.global_step == 6
    folder = run / "checkpoints"
    assert [p.name for p in ckpt.step_files(folder)] == ["step-00000002.pt"]
    assert os.path.samefile(folder / "last.pt", folder / "step-00000002.pt")
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_one_write_in_flight_the_next_save_waits_and_training_goes_on_meanwhile(
        idx_root, tmp_path, monkeypatch):
    """The write of step 4 is held until the loop next waits for it: the loop must have
    trained past step 4 by then, and no other write may start while it is held."""
    real = ckpt.save_atomic
    release = threading.Event()
    events: list[tuple[str, str, int]] = []
    in_flight = []

    def held_save(state, path):
        in_flight.append(path.name)
        events.append(("start", path.name, trainer.state.global_step))
        assert len(in_flight) == 1, f"two writes in flight: {in_flight}"
        if path.name == "step-00000004.pt":
            assert release.wait(timeout=120), "nothing waited for the write in flight"
        real(state, path)
        events.append(("end", path.name, trainer.state.global_step))
        in_flight.remove(path.name)

    monkeypatch.setattr(ckpt, "save_atomic", held_save)
    trainer = _trainer(idx_root, tmp_path / "r", **{"run.checkpoint_every": 2,
                                                     "train.max_steps": 8, "train.epochs": 5})
    writer = trainer.checkpoints.writer
    real_submit, real_wait = writer.submit, writer.wait
    submitted, waited_at = [], []

    def submit(write) -> None:
        real_submit(write)
        submitted.append(trainer.state.global_step)

    def wait() -> None:
        # A write that has ended stays "busy" until waited for: only step 4's is released here.
        if writer.busy and submitted[-1:] == [4] and not release.is_set():
            waited_at.append(trainer.state.global_step)
            release.set()
        real_wait()

    monkeypatch.setattr(writer, "submit", submit)
    monkeypatch.setattr(writer, "wait", wait)
    trainer.run()
    assert waited_at and waited_at[0] > 4, (waited_at, events)
    order = [(kind, name) for kind, name, _ in events]
    assert order.index(("end", "step-00000004.pt")) < order.index(("start", "step-00000006.pt"))
    assert ("end", "step-00000008.pt") in order  # the run's end waited for its last write
    assert ckpt.load(tmp_path / "r" / "checkpoints" / "last.pt")["train"]["global_step"] == 8


def _recording(trainer: Trainer, steps: list[int]):
    real = trainer.checkpoints.finish

    def finish() -> None:
        steps.append(trainer.state.global_step)
        real()

    return finish


def _logged(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines()
            if '"kind": "step"' in line]


@pytest.mark.parametrize("background", [True, False], ids=["async", "sync"])
def test_a_kill_during_a_write_resumes_from_the_previous_checkpoint(
        idx_root, tmp_path, background):
    """The save of step 4 writes into a FIFO where its temporary file goes: the write is in
    flight for as long as the test reads nothing more from it, whatever the machine's speed.
    In the background the loop goes on meanwhile; a synchronous save holds it."""
    run = tmp_path / "r"
    folder = run / "checkpoints"
    folder.mkdir(parents=True)
    fifo = folder / ".step-00000004.pt.tmp"
    os.mkfifo(fifo)
    args = small_overrides(idx_root, run, **{"run.checkpoint_every": 2, "train.epochs": 5,
                                             "run.log_every": 1,
                                             "run.async_checkpoint": background})
    proc = subprocess.Popen([sys.executable, SCRIPT, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    partial = bytearray()
    try:
        fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)

        def read_some() -> bool:
            try:
                partial.extend(os.read(fd, 1 << 16))
            except BlockingIOError:
                pass
            return len(partial) >= 1 << 20

        wait_for(read_some, timeout=240, what="the save of step 4 to start writing")
        if background:  # the writer is now stuck with a full pipe; the loop goes on
            wait_for(lambda: 5 in _logged(run), what="training to go on past the save")
        assert (folder / "step-00000002.pt").is_file()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
        os.close(fd)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    # What the killed write left, as a regular file would hold it: the first bytes of step 4.
    fifo.unlink()
    fifo.write_bytes(bytes(partial))
    assert [p.name for p in ckpt.step_files(folder)] == ["step-00000002.pt"]
    rerun = subprocess.run([sys.executable, SCRIPT, *args, "train.max_steps=6"],
                           capture_output=True, text=True, timeout=240)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "removed 1 unfinished checkpoint file (.step-00000004.pt.tmp" in rerun.stderr
    assert f"resumed from {folder / 'step-00000002.pt'} " in rerun.stdout
    assert [p.name for p in ckpt.step_files(folder)] == ["step-00000006.pt", "step-00000004.pt"]
    assert ckpt.load(folder / "last.pt")["train"]["global_step"] == 6
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]
