"""Launching without torchrun (srun sets the variables by hand): every bad launch variable is one
line naming it and its fix, and a rank that never comes stops the others after
``run.startup_timeout_s`` with one line saying how many joined."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from conftest import ROOT, small_overrides
from ranks import free_port

from alexnet_mp.parallel.startup import LaunchEnv, LaunchEnvError, launch_env

GOOD = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
LAUNCH_VARS = (*GOOD, "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_USE_AGENT_STORE")


def test_no_variables_is_one_process():
    assert launch_env({}) == LaunchEnv()


def test_srun_style_variables_are_read():
    env = launch_env(GOOD)
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (1, 2, 1, 2)
    assert (env.master_addr, env.master_port, env.agent_store) == ("127.0.0.1", 29500, False)


def _without(name: str) -> dict[str, str]:
    return {k: v for k, v in GOOD.items() if k != name}


BAD = [
    ({**GOOD, "RANK": "one"}, ["RANK='one' is not an integer", "this process's rank, 0 to 1"]),
    ({**GOOD, "RANK": "2"}, ["RANK=2 is not below WORLD_SIZE=2", "ranks run from 0 to 1"]),
    ({**GOOD, "RANK": "-1"}, ["RANK=-1 must be at least 0"]),
    (_without("RANK"), ["RANK is not set", "$SLURM_PROCID"]),
    ({**GOOD, "WORLD_SIZE": "2.0"}, ["WORLD_SIZE='2.0' is not an integer"]),
    ({**GOOD, "WORLD_SIZE": "0"}, ["WORLD_SIZE=0 must be at least 1"]),
    ({"RANK": "1"}, ["RANK=1 is not below WORLD_SIZE=1"]),
    (_without("LOCAL_RANK"), ["LOCAL_RANK is not set", "$SLURM_LOCALID"]),
    ({**GOOD, "LOCAL_RANK": ""}, ["LOCAL_RANK is not set"]),
    ({**GOOD, "LOCAL_RANK": "x"}, ["LOCAL_RANK='x' is not an integer"]),
    ({**GOOD, "LOCAL_RANK": "2"}, ["LOCAL_RANK=2 is not below LOCAL_WORLD_SIZE=2"]),
    ({**GOOD, "LOCAL_WORLD_SIZE": "3"}, ["LOCAL_WORLD_SIZE=3 is more than WORLD_SIZE=2"]),
    (_without("MASTER_ADDR"), ["MASTER_ADDR is not set", "rank 0's machine"]),
    (_without("MASTER_PORT"), ["MASTER_PORT is not set", "free TCP port"]),
    ({**GOOD, "MASTER_PORT": "http"}, ["MASTER_PORT='http' is not an integer"]),
    ({**GOOD, "MASTER_PORT": "70000"}, ["MASTER_PORT=70000 is not a TCP port"]),
]


@pytest.mark.parametrize("env, words", BAD)
def test_a_bad_variable_is_named_with_its_fix(env, words):
    with pytest.raises(LaunchEnvError) as info:
        launch_env(env)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def _train(env: dict[str, str], args: list[str]) -> subprocess.Popen:
    clean = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    return subprocess.Popen([sys.executable, str(ROOT / "launch" / "train.py"), *args],
                            env={**clean, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith("error: "), stderr
    return lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("env, words", [BAD[0], BAD[1], BAD[7]])
def test_train_py_says_a_bad_variable_in_one_line(env, words, idx_root, tmp_path):
    """On the rank that has it (rank 1 here), before any process group exists."""
    proc = _train(env, small_overrides(idx_root, tmp_path / "run"))
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 2
    line = _one_line(err)
    for word in words:
        assert word in line, line
    assert not (tmp_path / "run").exists()


def _ranks(started: list[int], world: int, args: list[str]) -> list[tuple[int, str]]:
    port = str(free_port())
    procs = [_train({"RANK": str(r), "WORLD_SIZE": str(world), "LOCAL_RANK": str(r),
                     "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                     "MASTER_PORT": port}, args) for r in started]
    # Generous: a rank gives up after run.startup_timeout_s (5 s), not the 30 minutes of
    # run.save_timeout_s it waited before.
    outs = [p.communicate(timeout=240) for p in procs]
    return [(p.returncode, err) for p, (_, err) in zip(procs, outs)]


def _startup_args(idx_root, tmp_path) -> list[str]:
    return small_overrides(idx_root, tmp_path / "run", **{"run.startup_timeout_s": 5})


@pytest.mark.slow
def test_rank_0_alone_says_how_many_ranks_joined(idx_root, tmp_path):
    [(code, err)] = _ranks([0], 2, _startup_args(idx_root, tmp_path))
    assert code == 3
    line = _one_line(err)
    assert "rank 0: 1 of 2 ranks joined within run.startup_timeout_s=5 s" in line, line
    assert "start all 2 ranks" in line and "raise run.startup_timeout_s" in line


@pytest.mark.slow
def test_two_of_three_ranks_both_say_two_joined(idx_root, tmp_path):
    results = _ranks([0, 1], 3, _startup_args(idx_root, tmp_path))
    for rank, (code, err) in enumerate(results):
        assert code == 3
        assert f"rank {rank}: 2 of 3 ranks joined" in _one_line(err)


@pytest.mark.slow
def test_a_rank_without_rank_0_says_nobody_answered(idx_root, tmp_path):
    [(code, err)] = _ranks([1], 2, _startup_args(idx_root, tmp_path))
    assert code == 3
    line = _one_line(err)
    assert "rank 1: no rendezvous answered at MASTER_ADDR=127.0.0.1" in line, line
    assert "within run.startup_timeout_s=5 s" in line and "start rank 0" in line


def test_a_port_in_use_is_named():
    import socket

    from alexnet_mp.parallel.startup import join

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        launch = LaunchEnv(rank=0, world_size=2, local_rank=0, local_world_size=2,
                           master_addr="127.0.0.1", master_port=port)
        with pytest.raises(LaunchEnvError) as info:
            join(launch, startup_timeout_s=5)
    message = str(info.value)
    assert "\n" not in message and "rank 0 could not open the rendezvous" in message
    assert f"MASTER_PORT={port}" in message and "choose a free MASTER_PORT" in message


@pytest.mark.slow
def test_ranks_started_in_any_order_join_and_train(idx_root, tmp_path):
    """Rank 1 first (it waits for rank 0's rendezvous to open), then rank 0: both train."""
    port = str(free_port())
    args = small_overrides(idx_root, tmp_path / "run", **{"train.max_steps": 1,
                                                          "run.startup_timeout_s": 120})
    env = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": port}
    late = _train({**env, "RANK": "1", "LOCAL_RANK": "1"}, args)
    time.sleep(2)  # whichever comes first, both must join
    first = _train({**env, "RANK": "0", "LOCAL_RANK": "0"}, args)
    outs = [p.communicate(timeout=240) for p in (first, late)]
    assert [first.returncode, late.returncode] == [0, 0], [err[-2000:] for _, err in outs]
    assert "data parallel, 2 replicas" in outs[0][0]
    assert outs[1][1].strip() == ""  # rank 1's wait printed nothing


@pytest.mark.parametrize("agent_store", [False, True], ids=["rank-0-store", "agent-store"])
def test_ranks_of_one_round_join_whatever_their_agents_restart_counts(agent_store):
    """An agent that joins a running elastic job starts its restart count at 0 while the
    survivor's is 1. Where rank 0 hosts the store (new each round) they must still meet; where
    an agent's store outlives restarts, each attempt counts apart, so the same two ranks do not
    make a whole count (and say how many came)."""
    import threading

    import torch.distributed as dist

    from alexnet_mp.parallel.startup import StartupTimeout, join

    port = free_port()
    # The agent's store, open before any worker as torchrun's is, and for the whole test.
    _agents = (dist.TCPStore("127.0.0.1", port, 1, True, wait_for_workers=False)
               if agent_store else None)
    results: dict[int, object] = {}

    def rank(r: int, attempt: int) -> None:
        launch = LaunchEnv(rank=r, world_size=2, local_rank=r, local_world_size=1,
                           attempt=attempt, master_addr="127.0.0.1", master_port=port,
                           agent_store=agent_store)
        try:
            results[r] = join(launch, startup_timeout_s=10 if agent_store else 60)
        except StartupTimeout as exc:
            results[r] = exc

    threads = [threading.Thread(target=rank, args=(r, attempt))
               for r, attempt in ((0, 1), (1, 0))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 2, results
    if agent_store:
        assert all(isinstance(v, StartupTimeout) for v in results.values()), results
        assert all("1 of 2 ranks joined" in str(v) for v in results.values()), results
    else:
        assert all(isinstance(v, dist.Store) for v in results.values()), results
