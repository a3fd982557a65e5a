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
from conftest import ROOT, one_process_layout, run_cli, small_overrides, wait_for
from ranks import free_port

from alexnet_mp import canonical, checkpoint_folder
from alexnet_mp import checkpoint as ckpt
from alexnet_mp.config import load_config
from alexnet_mp.engine import NonFiniteError
from alexnet_mp.errors import UserError
from alexnet_mp.run import Trainer

SCRIPT = str(ROOT / "launch" / "train.py")


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


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_both_at_the_same_step(idx_root, tmp_path):
    # The run is endless: it used to be 72 steps, which a busy machine could finish before the
    # signal arrived, and then no rank had anything to stop (the flaky failure).
    run = tmp_path / "r"
    procs = _ranks(small_overrides(idx_root, run, **{"model.name": "alexnet_columns",
                                                      "train.epochs": 100000}))
    try:
        wait_for(lambda: _logged_steps(run) >= 2, what="training to start")
        procs[1].send_signal(signal.SIGTERM)
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "stopped on request (SIGTERM) at step" in outs[0][0]
    step = ckpt.load(run / "checkpoints" / "last.pt")["train"]["global_step"]
    assert f"at step {step};" in outs[0][0]


@pytest.mark.slow
def test_sigusr1_prints_every_threads_stack_and_the_run_goes_on(idx_root, tmp_path):
    run = tmp_path / "r"
    proc = subprocess.Popen([sys.executable, SCRIPT,
                             *small_overrides(idx_root, run, **{"train.epochs": 100000})],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: _logged_steps(run) >= 2, what="training to start")
        proc.send_signal(signal.SIGUSR1)  # its default action would end the process
        steps = _logged_steps(run)
        wait_for(lambda: _logged_steps(run) > steps, what="training to go on")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "Current thread" in err and "(most recent call first)" in err, err
    assert "stopped on request (SIGTERM) at step" in out


@pytest.mark.slow
def test_a_stalled_peer_ends_the_survivor_within_the_timeout(idx_root, tmp_path):
    run = tmp_path / "r"
    procs = _ranks(small_overrides(idx_root, run, **{"model.name": "alexnet_columns",
                                                      "train.epochs": 50, "run.timeout_s": 4}))
    try:
        wait_for(lambda: _logged_steps(run) >= 2, what="training to start")
        procs[1].send_signal(signal.SIGSTOP)
        start = time.monotonic()
        out, err = procs[0].communicate(timeout=900)
        elapsed = time.monotonic() - start
        assert procs[0].returncode == 3, err
        line = [x for x in err.splitlines() if x.startswith("error: ")]
        assert line and "rank 0: the other rank stopped answering at step" in line[0], err
        # run.timeout_s=4 ended the wait, as gloo's words say; without it the survivor would
        # wait the default 600 s, far past this bound however busy the machine.
        assert "Timed out waiting 4000ms" in line[0], line[0]
        assert elapsed < 300, elapsed
    finally:
        procs[1].kill()
        procs[1].communicate()


@pytest.mark.slow
def test_nan_stops_before_the_bad_step_and_sets_its_cause_aside(idx_root, tmp_path):
    run = tmp_path / "r"
    extra = {"train.epochs": 3, "run.checkpoint_every": 1}
    first = run_cli(small_overrides(idx_root, run, **extra, **{"train.max_steps": 3}))
    assert first.returncode == 0, first.stderr
    proc = run_cli(small_overrides(idx_root, run, **extra, **{"train.lr": 1e12}))
    assert proc.returncode == 2
    line = [x for x in proc.stderr.splitlines() if x.startswith("error: ")][0]
    assert "NaN or infinite at step" in line
    bad_step = int(line.split("at step ")[1].split()[0])
    assert bad_step >= 5
    # The weights that gave the bad step came from the update before it: set aside.
    assert (f"1 checkpoint holding the weights that gave it (step-{bad_step - 1:08d}.pt) was "
            "renamed *.nonfinite; a rerun resumes from step-" in line)
    assert (run / "checkpoints" / f"step-{bad_step - 1:08d}.pt.nonfinite").is_file()
    newest = ckpt.load(run / "checkpoints" / "last.pt")
    assert newest["train"]["global_step"] == bad_step - 2
    assert all(torch.isfinite(t).all() for t in newest["model"].values())


def _trainer(idx_root, run, **extra) -> Trainer:
    cfg = load_config(None, small_overrides(idx_root, run, **extra))
    return Trainer(cfg, one_process_layout(cfg.model.name))


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


def test_every_checkpoint_damaged_counts_files_not_links_and_a_rerun_says_it_starts_over(
        idx_root, tmp_path, capsys):
    run = tmp_path / "r"
    folder = run / "checkpoints"
    _trainer(idx_root, run, **{"run.checkpoint_every": 4, "train.max_steps": 6}).run()
    files = ckpt.step_files(folder)  # steps 6 and 4; last.pt and best.pt link to step 6
    assert len(files) == 2 and os.path.samefile(folder / "best.pt", files[0])
    for path in files:
        path.write_bytes(path.read_bytes()[:1000])  # damages the links' file too
    with pytest.raises(UserError) as failed:
        _trainer(idx_root, run, **{"train.max_steps": 6})
    assert (f"no usable checkpoint in '{folder}': all 2 are damaged (renamed *.damaged and kept "
            "for inspection); the same command now starts from the beginning") in str(failed.value)
    assert sorted(p.name for p in folder.iterdir()) == [
        "step-00000004.pt.damaged", "step-00000006.pt.damaged"]
    skipped = [x for x in capsys.readouterr().err.splitlines() if "skipping" in x]
    assert len(skipped) == 2 and all(x.endswith("it is set aside and an older one tried")
                                     for x in skipped), skipped
    rerun = _trainer(idx_root, run, **{"train.max_steps": 6})
    assert rerun.resumed_from is None
    assert (f"warning: starting from the beginning: every checkpoint in '{folder}' was set aside "
            "(2 *.damaged, kept for inspection)") in capsys.readouterr().err
    rerun.close()


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_one(tmp_path):
    path = tmp_path / "step-00000001.pt"
    ckpt.save_atomic({"format": ckpt.FORMAT, "model": {"w": torch.ones(3)}}, path)
    writer = subprocess.Popen([sys.executable, "-c", (
        "import sys, torch\n"
        "from alexnet_mp import checkpoint as c\n"
        "big = {'format': c.FORMAT, 'model': {'w': torch.zeros(64, 1024, 1024)}}\n"
        "while True: c.save_atomic(big, __import__('pathlib').Path(sys.argv[1]))\n"), str(path)])
    tmp = path.with_name(f".{path.name}.tmp")
    wait_for(lambda: tmp.exists() and tmp.stat().st_size > 1 << 20, what="the write to start")
    writer.kill()
    writer.wait()
    state = ckpt.load(path)  # the old file, whole, never a half-written one
    assert torch.equal(state["model"]["w"], torch.ones(3))
    assert ckpt.step_files(tmp_path) == [path]  # the torn temporary file is never a candidate


def test_non_finite_parameters_are_never_saved(idx_root, tmp_path):
    run = tmp_path / "r"
    trainer = _trainer(idx_root, run, **{"train.max_steps": 2})
    trainer.run()
    with torch.no_grad():
        trainer.model.fc8.bias[0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"parameters became NaN or infinite \(fc8.bias\)"):
        trainer.save()
    assert [p.name for p in ckpt.step_files(run / "checkpoints")] == ["step-00000002.pt"]
    assert not list((run / "checkpoints").glob(".*.tmp"))


def test_lowering_the_rate_after_a_blow_up_resumes_from_good_weights(idx_root, tmp_path):
    """A rate so large that one finite step makes the weights enormous: the guard (which checks
    the loss and gradients) lets that step through and the next loss is NaN. The checkpoint
    written between them holds the damage; it must not be what "lower the rate and resume"
    resumes from."""
    run = tmp_path / "r"
    base = {"run.checkpoint_every": 1, "train.epochs": 2}
    _trainer(idx_root, run, **base, **{"train.max_steps": 4}).run()
    with pytest.raises(NonFiniteError, match="renamed"):
        _trainer(idx_root, run, **base, **{"train.lr": 1e30}).run()
    newest = ckpt.load(run / "checkpoints" / "last.pt")
    assert newest["train"]["global_step"] == 4
    assert all(torch.isfinite(t).all() for t in newest["model"].values())
    # The README's advice: lower the rate and run again; it resumes from the last good one.
    resumed = _trainer(idx_root, run, **base, **{"train.lr": 0.01})
    assert resumed.state.global_step == 4
    resumed.run()
    assert resumed.state.global_step == 12
    final = ckpt.load(run / "checkpoints" / "last.pt")["model"]
    assert all(torch.isfinite(t).all() for t in final.values())


@pytest.mark.parametrize("start", ["scratch", "resumed"])
def test_a_run_diverged_under_skip_recovers_with_a_lower_rate_and_no_file_touched(
        idx_root, tmp_path, start):
    """train.nonfinite=skip and a rate that blows the weights up at once: the steps after it are
    skipped, but the epoch-end checkpoints (and best.pt, a hard link to one) hold the finite,
    enormous weights that gave every NaN. They are set aside with their links, the line says
    where a rerun starts, and the rerun with train.lr=0.01 starts there and trains to the end."""
    run = tmp_path / "r"
    folder = run / "checkpoints"
    base = {"train.epochs": 3}
    if start == "resumed":
        _trainer(idx_root, run, **base, **{"train.max_steps": 6}).run()  # a good epoch
    with pytest.raises(NonFiniteError) as failed:
        _trainer(idx_root, run, **base, **{"train.lr": 1e12, "train.nonfinite": "skip",
                                           "train.max_skipped": 8}).run()
    line = str(failed.value)
    assert "8 steps in a row were NaN or infinite" in line
    poisoned = "step-00000006.pt" if start == "scratch" else "step-00000012.pt"
    assert f"1 checkpoint holding the weights that gave it ({poisoned}) was renamed" in line
    assert (folder / f"{poisoned}.nonfinite").is_file()
    assert not (folder / "best.pt").exists() or not os.path.samefile(
        folder / "best.pt", folder / f"{poisoned}.nonfinite")
    if start == "scratch":
        assert line.endswith("; a rerun starts from the beginning (no good checkpoint is left)")
        assert ckpt.candidates(folder) == []
    else:
        assert line.endswith("; a rerun resumes from step-00000006.pt (step 6)")
    rerun = _trainer(idx_root, run, **base, **{"train.lr": 0.01, "train.nonfinite": "skip",
                                               "train.max_skipped": 8})
    if start == "scratch":
        assert rerun.resumed_from is None
    else:
        assert rerun.resumed_from == folder / "step-00000006.pt"
    rerun.run()
    assert rerun.state.global_step == 18 and rerun.state.epoch == 3
    final = ckpt.load(folder / "last.pt")["model"]
    assert all(torch.isfinite(t).all() for t in final.values())


def test_a_skip_streak_saved_before_a_resume_is_set_aside_too(idx_root, tmp_path):
    """A diverging run ends (train.max_steps, or a stop) in the middle of a streak of skipped
    steps, so its last checkpoints hold the weights that gave them. The next run, with a lower
    rate, meets NaN from its first step: those checkpoints, though older than it, go aside, and
    the one after that resumes from the last good weights."""
    run = tmp_path / "r"
    folder = run / "checkpoints"
    base = {"train.epochs": 3, "run.checkpoint_every": 2, "train.nonfinite": "skip"}
    _trainer(idx_root, run, **base, **{"train.max_steps": 6}).run()
    _trainer(idx_root, run, **base, **{"train.max_steps": 12, "train.lr": 1e12,
                                       "train.max_skipped": 100}).run()
    assert ckpt.load(folder / "last.pt")["train"]["skipped_in_row"] == 5  # steps 8 to 12
    lower = {"train.lr": 0.01, "train.max_skipped": 3}
    with pytest.raises(NonFiniteError) as failed:
        _trainer(idx_root, run, **base, **lower).run()
    # Pruning kept steps 10 and 12; best.pt still holds epoch 1's step 6.
    assert ("2 checkpoints holding the weights that gave it (step-00000010.pt, "
            "step-00000012.pt) were renamed *.nonfinite; a rerun resumes from best.pt (step 6)"
            ) in str(failed.value)
    rerun = _trainer(idx_root, run, **base, **lower)
    assert rerun.resumed_from == folder / "best.pt"
    rerun.run()
    assert rerun.state.global_step == 18


def test_a_checkpoint_with_non_finite_weights_is_skipped_on_resume(idx_root, tmp_path, capsys):
    run = tmp_path / "r"
    _trainer(idx_root, run, **{"run.checkpoint_every": 2, "train.max_steps": 4}).run()
    newest = ckpt.step_files(run / "checkpoints")[0]
    state = ckpt.load(newest)
    state["model"]["fc8.bias"][0] = float("inf")
    ckpt.save_atomic(state, newest)  # a valid file, as an older version would have written
    resumed = _trainer(idx_root, run)
    assert resumed.state.global_step == 2
    assert "non-finite parameters (fc8.bias)" in capsys.readouterr().err


def test_skipping_stops_after_max_skipped_steps_in_a_row(idx_root, tmp_path):
    with pytest.raises(NonFiniteError, match="3 steps in a row were NaN or infinite"):
        _trainer(idx_root, tmp_path / "s", **{"train.lr": 1e30, "train.nonfinite": "skip",
                                              "train.max_skipped": 3}).run()
    assert ckpt.step_files(tmp_path / "s" / "checkpoints") == []
    log = [json.loads(x) for x in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["kind"] == "skipped"] == [2, 3]  # the third one stops


def test_pruning_keeps_good_checkpoints_not_damaged_ones(idx_root, tmp_path):
    run = tmp_path / "r"
    folder = run / "checkpoints"
    _trainer(idx_root, run, **{"run.checkpoint_every": 2, "train.max_steps": 6}).run()
    assert [p.name for p in ckpt.step_files(folder)] == ["step-00000006.pt", "step-00000004.pt"]
    damaged = folder / "step-00000006.pt"
    damaged.write_bytes(damaged.read_bytes()[:1000])
    # The resumed run saves at step 5 first: pruning must keep 5 and the good 4.
    _trainer(idx_root, run, **{"run.checkpoint_every": 1, "train.max_steps": 5}).run()
    assert [p.name for p in ckpt.step_files(folder)] == ["step-00000005.pt", "step-00000004.pt"]
    assert (folder / "step-00000006.pt.damaged").is_file()
    assert checkpoint_folder.newest_good(folder, print)[0].name == "step-00000005.pt"


def _rank_process(rank: int, world: int, port: int, args: list[str], patch) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    patch(rank)
    sys.path.insert(0, str(ROOT))
    from alexnet_mp.cli.train import main

    sys.exit(main(args))


def _slow_saves_on_rank_0(rank: int) -> None:
    """A slow disk: rank 0's checkpoint writes take three times run.timeout_s."""
    if rank == 0:
        real = ckpt.save_atomic

        def slow(state, path):
            time.sleep(6)
            real(state, path)

        ckpt.save_atomic = slow


def _a_bug_on_rank_0(rank: int) -> None:
    """A programming error whose text happens to mention a connection and a peer."""
    if rank == 0:
        import alexnet_mp.fit as run_module

        def broken(*args, **kwargs):
            raise RuntimeError("Connection lost between the layer and its peer table")

        run_module.train_one_epoch = broken


def _two_ranks(args: list[str], patch) -> list[int]:
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_rank_process, args=(r, 2, port, args, patch)) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
        if p.is_alive():
            p.kill()
    return [p.exitcode for p in procs]


@pytest.mark.slow
def test_a_rank_busy_saving_is_not_a_lost_peer(idx_root, tmp_path):
    """run.timeout_s bounds the waits inside a step; rank 0's slow checkpoint write is waited
    for under run.save_timeout_s."""
    args = small_overrides(idx_root, tmp_path / "r", **{
        "model.name": "alexnet_columns", "train.max_steps": 4, "run.checkpoint_every": 2,
        "run.timeout_s": 2})
    assert _two_ranks(args, _slow_saves_on_rank_0) == [0, 0]
    assert ckpt.load(tmp_path / "r" / "checkpoints" / "last.pt")["train"]["global_step"] == 4


@pytest.mark.slow
def test_a_bug_is_reported_as_a_bug_not_as_a_lost_peer(idx_root, tmp_path):
    """Rank 0 fails with a RuntimeError that mentions a connection: a traceback and exit 1 there;
    rank 1, whose peer is really gone, reports the lost peer (exit 3)."""
    args = small_overrides(idx_root, tmp_path / "r", **{"model.name": "alexnet_columns",
                                                        "run.timeout_s": 60})
    assert _two_ranks(args, _a_bug_on_rank_0) == [1, 3]


def test_a_second_ctrl_c_interrupts_at_once():
    from alexnet_mp.guard import StepGuard

    # Whatever held SIGINT before gets it back: Python's handler in a terminal, SIG_IGN where the
    # suite was started as a background job (a shell without job control ignores SIGINT there).
    before = signal.getsignal(signal.SIGINT)
    guard = StepGuard(distributed=False)
    guard.install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert guard.stop_requested and guard.exit_code == 130  # first: stop after the step
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        guard.uninstall()
    assert signal.getsignal(signal.SIGINT) is before


def test_an_epoch_cut_short_never_becomes_best(idx_root, tmp_path):
    run = tmp_path / "r"
    folder = run / "checkpoints"
    _trainer(idx_root, run, **{"train.epochs": 2, "train.max_steps": 6}).run()
    best = folder / "best.pt"
    epoch_one = ckpt.step_files(folder)[0]
    assert os.path.samefile(best, epoch_one)
    # Forget the best accuracy, so that any evaluation would look better than it.
    state = ckpt.load(epoch_one)
    state["train"]["best_acc"] = -1.0
    ckpt.save_atomic(state, epoch_one)
    cut = _trainer(idx_root, run, **{"train.epochs": 2, "train.max_steps": 9})
    cut.run()
    assert cut.state.step == 3
    assert ckpt.load(best)["train"]["global_step"] == 6


BLOCKING_SAVE = """
import os, signal, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
real, marker, step = os.fsync, Path(sys.argv[2]), sys.argv[3]


def fsync(fd):
    # The save of checkpoint `step` hangs once its temporary file is whole, as on a slow disk,
    # and says when the first Ctrl-C has been taken as a stop request.
    if os.readlink(f"/proc/self/fd/{fd}").endswith(f".step-{step}.pt.tmp"):
        marker.write_text("writing")
        while True:
            guard = getattr(signal.getsignal(signal.SIGINT), "__self__", None)
            if guard is not None and guard.stop_requested:
                marker.write_text("stop requested")
            time.sleep(0.05)
    real(fd)


os.fsync = fsync
from alexnet_mp.cli.train import main
sys.exit(main(sys.argv[4:]))
"""


def _ctrl_c_twice_during_a_save(idx_root, run: Path, step: int) -> subprocess.CompletedProcess:
    """Ctrl-C pressed twice (to the whole process group, as a terminal sends it) while the save
    of step ``step`` is writing: the first asks to stop, the second interrupts."""
    marker = run.parent / "writing"
    args = small_overrides(idx_root, run, **{"run.checkpoint_every": 2, "train.epochs": 5})
    proc = subprocess.Popen([sys.executable, "-c", BLOCKING_SAVE, str(ROOT), str(marker),
                             f"{step:08d}", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for(marker.exists, timeout=240, what="the save to start")
        os.killpg(proc.pid, signal.SIGINT)
        wait_for(lambda: marker.read_text() == "stop requested", what="the first Ctrl-C")
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize("step", [4, 2])
def test_a_second_ctrl_c_during_a_save_names_the_true_newest_checkpoint(idx_root, tmp_path,
                                                                        step):
    run = tmp_path / "r"
    proc = _ctrl_c_twice_during_a_save(idx_root, run, step)
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    folder = run / "checkpoints"
    if step == 4:
        assert last == (f"interrupted; the newest checkpoint is '{folder / 'step-00000002.pt'}': "
                        "run the same command to resume from it")
    else:
        assert last == (f"interrupted; no checkpoint was written to '{folder}' yet, so the same "
                        "command starts from the beginning")
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_what_a_killed_save_left_is_removed_at_start_and_nothing_else(idx_root, tmp_path,
                                                                     capsys):
    run = tmp_path / "r"
    folder = run / "checkpoints"
    folder.mkdir(parents=True)
    ours = [".step-00000004.pt.tmp", ".last.pt.tmp", ".best.pt.tmp"]
    others = ["step-00000004.pt.tmp", ".notes.tmp", ".step-4.pt.tmp", "keep.txt"]
    for name in ours + others:
        (folder / name).write_bytes(b"x" * (1 << 20))
    # Another job holding the folder: nothing is touched, its save may be in flight.
    from alexnet_mp.runfolder import RunFolderLock

    holder = RunFolderLock(run)
    holder.acquire()
    with pytest.raises(UserError, match="in use by another job"):
        _trainer(idx_root, run, **{"train.max_steps": 1})
    assert all((folder / name).is_file() for name in ours)
    holder.release()
    capsys.readouterr()
    trainer = _trainer(idx_root, run, **{"train.max_steps": 1})
    trainer.close()
    assert sorted(p.name for p in folder.iterdir()) == sorted(others)
    err = capsys.readouterr().err
    assert "removed 3 unfinished checkpoint files (.best.pt.tmp, ...; 3.0 MiB)" in err


def _rank_1_dies_at_its_first_save(rank: int) -> None:
    """Rank 1 is killed (as by the OOM killer) as the first checkpoint's agreement begins."""
    if rank == 1:
        def die(model):
            os._exit(9)

        canonical.nonfinite_parameters = die


@pytest.mark.slow
def test_a_peer_lost_mid_run_is_not_reported_as_a_start_up_failure(idx_root, tmp_path, capfd):
    args = small_overrides(idx_root, tmp_path / "r", **{
        "model.name": "alexnet_columns", "train.max_steps": 4, "run.checkpoint_every": 2,
        "run.timeout_s": 30, "run.save_timeout_s": 30})
    assert _two_ranks(args, _rank_1_dies_at_its_first_save) == [3, 9]
    line = [x for x in capfd.readouterr().err.splitlines() if x.startswith("error: rank 0")]
    assert line and "rank 0: the other rank stopped answering at step 3" in line[0], line
    assert "agreeing with the other ranks failed" in line[0] and "startup" not in line[0]
    assert line[0].endswith("restart the same command to resume")  # not under torchrun


def test_the_lost_peer_line_names_the_ranks_and_the_restarts_left():
    from alexnet_mp.errors import lost_peer_line

    def line(world: int, restarts) -> str:
        return lost_peer_line(0, world, 7, 2, "the backward pass failed: x", "run/checkpoints",
                              restarts)

    assert line(2, None).startswith("rank 0: the other rank stopped answering at step 7 (epoch "
                                    "2) (the backward pass failed: x); the newest checkpoint is "
                                    "in run/checkpoints: ")
    assert "a peer rank stopped answering" in line(4, None) and "other rank" not in line(4, None)
    assert line(2, (0, 0)).endswith("restart the same command to resume, or run torchrun with "
                                    "--max-restarts")
    assert line(2, (3, 1)).endswith("torchrun restarts the job and it resumes (2 restarts of "
                                    "--max-restarts=3 left)")
    assert line(2, (3, 2)).endswith("(1 restart of --max-restarts=3 left)")
    assert line(2, (3, 3)).endswith("torchrun's --max-restarts=3 are used up; restart the same "
                                    "command to resume")


def test_torchrun_tells_its_workers_the_restarts(monkeypatch):
    sys.path.insert(0, str(ROOT))
    from alexnet_mp.cli.common import restarts_from_env

    monkeypatch.delenv("TORCHELASTIC_MAX_RESTARTS", raising=False)
    assert restarts_from_env() is None
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert restarts_from_env() == (3, 1)


def test_plurals_are_counted():
    from alexnet_mp.errors import count

    assert [count(n, "step") for n in (0, 1, 2)] == ["0 steps", "1 step", "2 steps"]
