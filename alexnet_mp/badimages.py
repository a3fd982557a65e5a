"""Unreadable images met by any rank: counted, named once, and turned into the run's decision.

Each rank's loader records the files it met (:class:`alexnet_mp.loader.CheckedLoader`); the
training loop sums the counts with its figures, so the ranks learn of a bad file together at a
log window's end and only then exchange names, which a healthy epoch never does.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from alexnet_mp.errors import UserError, peer_errors


def count_everywhere(loader: Any, group: dist.ProcessGroup | None) -> int:
    """The files every rank's ``loader`` has recorded (a collective over ``group``)."""
    count = torch.tensor(float(len(getattr(loader, "bad_files", ()))))
    if group is not None:
        with peer_errors("counting unreadable images over the ranks"):
            dist.all_reduce(count, group=group)
    return int(count.item())


def take_everywhere(loader: Any, group: dist.ProcessGroup | None,
                    count: int) -> list[tuple[str, str]]:
    """Every rank's recorded files, each once (the columns of one replica read the same ones),
    cleared from the loaders. ``count`` is the ranks' agreed total: at 0 nobody exchanges."""
    mine = list(getattr(loader, "bad_files", ()))
    if count and group is not None:
        everyone: list[Any] = [None] * dist.get_world_size(group)
        with peer_errors("naming unreadable images over the ranks"):
            dist.all_gather_object(everyone, mine, group=group)
        mine = list(dict.fromkeys(tuple(f) for files in everyone for f in files))
    getattr(loader, "bad_files", []).clear()
    return mine


def stop_error(bad: list[tuple[str, str]]) -> UserError:
    """``data.bad_images=stop``: one line naming the first file."""
    path, reason = bad[0]
    more = f" ({len(bad) - 1} more unreadable)" if len(bad) > 1 else ""
    return UserError(f"cannot read image {path}: {reason}{more}; remove or replace the file, or "
                     "set data.bad_images=skip to go on without it")


def settle(loader: Any, group: dist.ProcessGroup | None, count: int,
           bad_images: str) -> list[tuple[str, str]]:
    """Every rank's recorded files (:func:`take_everywhere`); with ``bad_images="stop"`` and any
    file, the one-line error of :func:`stop_error` instead."""
    bad = take_everywhere(loader, group, count)
    if bad and bad_images == "stop":
        raise stop_error(bad)
    return bad
