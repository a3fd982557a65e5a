"""The exception types that reach the user as a single line, and the one that marks a lost peer."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class UserError(Exception):
    """Bad input the user can fix: printed as one line, exit code 2, no traceback."""

    exit_code = 2


class PeerLostError(UserError):
    """A collective failed: another rank died or stalled past run.timeout_s.

    Raised by :func:`peer_errors` around our own collectives, so that the trainer classifies a
    failure by where it happened (a collective) rather than by the words of its message; gloo
    raises a plain RuntimeError for a dead or silent peer.
    """

    exit_code = 3
    broken_group = True  # its process group cannot be torn down cleanly


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (its type's name if it has none), at most 160
    characters: enough to name a failure in a one-line error."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]


@contextlib.contextmanager
def peer_errors(what: str) -> Iterator[None]:
    """Turn a RuntimeError raised by a torch.distributed call inside into PeerLostError."""
    try:
        yield
    except PeerLostError:
        raise
    except RuntimeError as exc:
        first = first_line(exc)
        raise PeerLostError(f"{what} failed: {first}") from exc


def count(n: int, noun: str) -> str:
    """``n`` and ``noun``, plural unless ``n`` is 1: "1 step", "3 steps"."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def lost_peer_line(rank: int, world_size: int, step: int, epoch: int, detail: str,
                   checkpoints: str, restarts: tuple[int, int] | None = None) -> str:
    """What a rank says when a peer stopped answering, and what will resume the run.

    ``restarts``: torchrun's (--max-restarts, restarts so far), None when not under torchrun.
    """
    who = "the other rank" if world_size == 2 else "a peer rank"
    text = (f"rank {rank}: {who} stopped answering at step {step} (epoch {epoch}) ({detail}); "
            f"the newest checkpoint is in {checkpoints}: ")
    if restarts is None:
        return text + "restart the same command to resume"
    most, done = restarts
    if done < most:
        return (text + f"torchrun restarts the job and it resumes ({count(most - done, 'restart')}"
                f" of --max-restarts={most} left)")
    if most > 0:
        return text + (f"torchrun's --max-restarts={most} are used up; restart the same command "
                       "to resume")
    return text + "restart the same command to resume, or run torchrun with --max-restarts"


def collective_failed(exc: BaseException) -> bool:
    """Whether ``exc`` came out of a collective (a dead or silent peer), for failures raised
    where no :func:`peer_errors` can stand around the call alone: the collectives autograd runs
    inside a backward pass (the exchanges' reduce-scatters, the replicas' all-reduce).

    torch raises its distributed errors as ``DistError`` where it can; gloo's transport
    failures reach Python as a plain RuntimeError whose text names gloo's source, and NCCL's
    name NCCL. Anything else (an out-of-memory error, a bug in a layer's backward) is not a
    lost peer.
    """
    import torch.distributed as dist

    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        mark in text for mark in ("gloo/", "NCCL", "ProcessGroup", "c10d"))
