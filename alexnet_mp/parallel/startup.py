"""Where this process stands in a launch, and the bounded wait for every rank to join.

torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT`` itself; a launcher such as ``srun`` leaves them to the user, so they are checked
here, each bad value one line naming the variable and its fix. The launcher hands the variables
in (:func:`launch_env`); nothing here reads the environment.

Joining: rank 0 hosts the rendezvous store (under torchrun, the agent hosts it), every rank adds
one to a counter in it, and the rank that makes the count whole says so. Every wait, for the
store and for the count, is bounded by ``run.startup_timeout_s``, and a rank that gives up says
how many ranks had joined, instead of waiting the default group's long timeout and printing
torch's store error.
"""

from __future__ import annotations

import datetime
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from alexnet_mp.errors import PeerLostError, UserError, first_line

# srun's spelling of each variable, for the fix a message suggests.
SLURM = {"RANK": "$SLURM_PROCID", "WORLD_SIZE": "$SLURM_NTASKS", "LOCAL_RANK": "$SLURM_LOCALID",
         "LOCAL_WORLD_SIZE": "$SLURM_NTASKS_PER_NODE"}
JOINED, COMPLETE = "startup/joined", "startup/complete"
# The first rank to give up writes how many had joined, so that all say the same number, and
# rank 0, whose process holds the store, waits a moment for the others to read it.
GAVE_UP, SEEN = "startup/gave_up", "startup/seen"
GRACE_S = 5.0


class LaunchEnvError(UserError):
    """A launch variable is missing or wrong. No process group exists yet to agree through, so
    the process that found it says it, whatever its rank."""

    every_rank = True


class StartupTimeout(PeerLostError):
    """Not every rank joined within ``run.startup_timeout_s``; said by every rank that waited."""

    every_rank = True


@dataclass(frozen=True)
class LaunchEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    attempt: int = 0  # torchrun's restart count
    master_addr: str | None = None
    master_port: int | None = None
    agent_store: bool = False  # torchrun's agent hosts the store at MASTER_ADDR:MASTER_PORT


def _integer(env: Mapping[str, str], name: str, default: int | None, low: int,
             what: str) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        if default is None:
            hint = f" (srun: {name}={SLURM[name]})" if name in SLURM else ""
            raise LaunchEnvError(f"{name} is not set; set it to {what}{hint}, or launch with "
                                 "torchrun, which sets it")
        return default
    try:
        value = int(raw)
    except ValueError:
        raise LaunchEnvError(f"{name}={raw!r} is not an integer; set it to {what}") from None
    if value < low:
        raise LaunchEnvError(f"{name}={value} must be at least {low}; set it to {what}")
    return value


def launch_env(env: Mapping[str, str]) -> LaunchEnv:
    """The launch variables in ``env`` (the process environment), checked; absent ones mean one
    process. A problem is a :class:`LaunchEnvError` naming the variable and its fix."""
    world = _integer(env, "WORLD_SIZE", 1, 1, "the number of processes (ranks), 1 or more")
    if world == 1 and "RANK" not in env:
        rank = 0
    else:
        rank = _integer(env, "RANK", None if world > 1 else 0, 0,
                        f"this process's rank, 0 to {world - 1}")
    if rank >= world:
        raise LaunchEnvError(f"RANK={rank} is not below WORLD_SIZE={world}; ranks run from 0 to "
                             f"{world - 1}: set RANK to this process's rank and WORLD_SIZE to "
                             "the number of processes")
    local_world = _integer(env, "LOCAL_WORLD_SIZE", world, 1,
                           "the number of ranks on this machine")
    if local_world > world:
        raise LaunchEnvError(f"LOCAL_WORLD_SIZE={local_world} is more than WORLD_SIZE={world}; "
                             "set it to the number of ranks on this machine")
    local_rank = _integer(env, "LOCAL_RANK", None if world > 1 else 0, 0,
                          f"this process's rank on its machine, 0 to {local_world - 1}")
    if local_rank >= local_world:
        raise LaunchEnvError(f"LOCAL_RANK={local_rank} is not below LOCAL_WORLD_SIZE="
                             f"{local_world}; set LOCAL_RANK to this process's rank on its "
                             f"machine, 0 to {local_world - 1}")
    attempt = _integer(env, "TORCHELASTIC_RESTART_COUNT", 0, 0, "torchrun's restart count")
    if world == 1:
        return LaunchEnv(local_world_size=local_world, attempt=attempt)
    addr = env.get("MASTER_ADDR", "").strip()
    if not addr:
        raise LaunchEnvError("MASTER_ADDR is not set; set it to the host name or address of "
                             "rank 0's machine, the same for every rank")
    port = _integer(env, "MASTER_PORT", None, 1, "a free TCP port on rank 0's machine, 1 to "
                    "65535, the same for every rank")
    if port > 65535:
        raise LaunchEnvError(f"MASTER_PORT={port} is not a TCP port; set it to a free port on "
                             "rank 0's machine, 1 to 65535, the same for every rank")
    return LaunchEnv(rank, world, local_rank, local_world, attempt, addr, port,
                     env.get("TORCHELASTIC_USE_AGENT_STORE") == "True")


def join(launch: LaunchEnv, *, startup_timeout_s: float) -> dist.Store:
    """The rendezvous store, once all ``launch.world_size`` ranks have joined it; every wait
    bounded by ``startup_timeout_s``. The store keeps that timeout: the caller sets its own."""
    rank, world = launch.rank, launch.world_size
    where = f"MASTER_ADDR={launch.master_addr} MASTER_PORT={launch.master_port}"
    limit = f"run.startup_timeout_s={startup_timeout_s:g}"
    timeout = datetime.timedelta(seconds=startup_timeout_s)
    hosting = rank == 0 and not launch.agent_store
    deadline = time.monotonic() + startup_timeout_s
    nobody = (f"rank {rank}: no rendezvous answered at {where} within {limit} s; start rank 0 "
              "with the same MASTER_ADDR and MASTER_PORT (or raise run.startup_timeout_s)")
    if not hosting and not _listening(launch.master_addr, launch.master_port, deadline):
        raise StartupTimeout(nobody)
    try:
        # wait_for_workers=False: the count below, not the store's constructor, waits for the
        # ranks, so that a timeout can say how many came.
        store = dist.TCPStore(launch.master_addr, launch.master_port, world, hosting,
                              timeout=timeout, wait_for_workers=False, multi_tenant=hosting)
    except RuntimeError as exc:
        if hosting:
            raise LaunchEnvError(f"rank 0 could not open the rendezvous at {where} "
                                 f"({first_line(exc)}); choose a free MASTER_PORT") from None
        raise StartupTimeout(nobody) from None
    # The agent's store outlives a restart, so each attempt counts under its own prefix. A
    # store that rank 0 hosts is new with every attempt, and there the restart counts can
    # differ: an agent that joins a running elastic job starts its count at 0.
    store = dist.PrefixStore(f"alexnet_mp/{launch.attempt if launch.agent_store else 0}", store)
    try:
        joined = _count(store, world, hosting, deadline)
    except RuntimeError:  # rank 0, which holds the store, went away
        joined = None
    if joined is not None and joined < world:
        raise StartupTimeout(f"rank {rank}: {joined} of {world} ranks joined within {limit} s "
                             f"at {where}; start all {world} ranks (RANK 0 to {world - 1}, each "
                             f"with WORLD_SIZE={world} and the same MASTER_ADDR and "
                             "MASTER_PORT), or raise run.startup_timeout_s")
    if joined is None:
        raise StartupTimeout(f"rank {rank}: the rendezvous at {where} went away before all "
                             f"{world} ranks joined; start all {world} ranks again")
    return store


def _listening(host: str, port: int, deadline: float) -> bool:
    """Whether anything accepts connections at ``host:port`` before ``deadline``. Asked with a
    plain socket: the store's own client logs every failed try as a C++ stack trace."""
    while True:
        try:
            socket.create_connection((host, port), timeout=1.0).close()
            return True
        except OSError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)


def _count(store: dist.Store, world: int, hosting: bool, deadline: float) -> int:
    """Join the count; returns ``world`` once every rank has joined, or how many had when the
    first rank gave up. Polled rather than a timed ``store.wait``, whose expiry torch logs as
    socket warnings that would bury the one line."""
    if store.add(JOINED, 1) == world:
        store.set(COMPLETE, "1")
    while not store.check([COMPLETE]):
        if store.check([GAVE_UP]):
            store.add(SEEN, 1)
            return int(store.get(GAVE_UP))
        if time.monotonic() > deadline:
            joined = store.add(JOINED, 0)
            if joined == world:  # the last one came just now
                continue
            store.set(GAVE_UP, str(joined))
            if hosting:
                # Gone, the store would leave the others a socket error instead of the count.
                wait_until = time.monotonic() + GRACE_S
                while store.add(SEEN, 0) < joined - 1 and time.monotonic() < wait_until:
                    time.sleep(0.1)
            return joined
        time.sleep(0.1)
    return world


def start_default_group(launch: LaunchEnv, device: torch.device, *, startup_timeout_s: float,
                        timeout_s: float) -> None:
    """Join the other ranks (bounded by ``startup_timeout_s``), then start the default process
    group on the store with ``timeout_s``."""
    if launch.master_addr is None or launch.master_port is None:
        raise ValueError("several ranks need master_addr and master_port (launch_env reads them)")
    store = join(launch, startup_timeout_s=startup_timeout_s)
    store.set_timeout(datetime.timedelta(seconds=timeout_s))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store,
                            rank=launch.rank, world_size=launch.world_size,
                            timeout=datetime.timedelta(seconds=timeout_s),
                            device_id=device if device.type == "cuda" else None)
