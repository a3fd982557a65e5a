"""The checkpoints folder: which file a resume chooses, what is kept, what is set aside.

Only the rank that writes checkpoints, holding the run folder's lock, changes anything here.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch

from alexnet_mp.checkpoint import (
    STEP_FILE,
    CheckpointError,
    candidates,
    link_atomic,
    load,
    set_aside_files,
    step_files,
)
from alexnet_mp.errors import count


def _identity(path: Path) -> tuple[int, int] | None:
    """The file behind ``path``: last.pt and best.pt are hard links to numbered checkpoints."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def newest_good(folder: Path, warn, rename: bool = True) -> tuple[Path, dict[str, Any]] | None:
    """The first of :func:`candidates` that verifies and holds finite parameters.

    A damaged one is named through ``warn`` and renamed ``*.damaged``: it stays for inspection,
    but is never tried again and never counts as one of the checkpoints that pruning keeps.
    Only the rank that writes checkpoints may call this. With ``rename=False`` nothing is
    renamed or said: the checkpoint a resume would choose, found without touching a file.
    """
    bad: list[Path] = []
    tried: set[tuple[int, int]] = set()
    while True:
        # Asked again after each rename: setting a file aside moves or removes its links.
        path = next((p for p in candidates(folder)
                     if _identity(p) is not None and _identity(p) not in tried), None)
        if path is None:
            break
        tried.add(_identity(path))
        try:
            state = load(path, remedy="it is set aside and an older one tried")
            broken = [n for n, t in state["model"].items() if not torch.isfinite(t).all()]
            if broken:
                raise CheckpointError(f"checkpoint '{path}' holds non-finite parameters "
                                      f"({broken[0]})")
            return path, state
        except CheckpointError as exc:
            bad.append(path)
            if rename:
                warn(f"skipping {exc}")
                with contextlib.suppress(OSError):
                    set_aside(path, "damaged")
    if bad and rename:
        which = "the only one is" if len(bad) == 1 else f"all {len(bad)} are"
        raise CheckpointError(f"no usable checkpoint in '{folder}': {which} damaged (renamed "
                              "*.damaged and kept for inspection); the same command now starts "
                              "from the beginning, or put a good copy back as step-N.pt there "
                              "to resume from it")
    return None


def set_aside(path: Path, suffix: str) -> None:
    """Rename ``path`` out of the candidates (``*.<suffix>``), with the links to it: last.pt
    then points at the newest numbered checkpoint left (or is removed), and best.pt is removed
    (no other file is known to be the best), so that neither resumes from it."""
    folder = path.parent
    links = [folder / n for n in ("last.pt", "best.pt")
             if (folder / n).is_file() and folder / n != path
             and os.path.samefile(folder / n, path)]
    path.replace(path.with_name(f"{path.name}.{suffix}"))
    for link in links:
        left = step_files(folder)
        if link.name == "last.pt" and left:
            link_atomic(left[0], link)
        else:
            link.unlink(missing_ok=True)


def set_aside_from(folder: Path, first_step: int, suffix: str) -> list[Path]:
    """Set aside (:func:`set_aside`) every numbered checkpoint of ``first_step`` or later; the
    paths as they were, oldest first."""
    late = [p for p in step_files(folder) if int(STEP_FILE.match(p.name)[1]) >= first_step]
    for path in sorted(late):
        set_aside(path, suffix)
    return sorted(late)


def poisoned_line(folder: Path, moved: list[Path], resume: str) -> str:
    """The end of a non-finite error's line: what was set aside, and where a rerun starts, found
    as resume will find it."""
    text = ""
    if moved:
        names = ", ".join(p.name for p in moved[:2]) + (", ..." if len(moved) > 2 else "")
        text = (f"; {count(len(moved), 'checkpoint')} holding the weights that gave it ({names}) "
                f"{'was' if len(moved) == 1 else 'were'} renamed *.nonfinite")
    found = newest_good(folder, lambda text: None, rename=False)
    where = (f"resumes from {found[0].name} (step {found[1]['train']['global_step']})" if found
             else "starts from the beginning (no good checkpoint is left)")
    rerun = "a rerun" if resume == "auto" else "a rerun with train.resume=auto"
    return f"{text}; {rerun} {where}"


def fresh_start_note(folder: Path) -> str:
    """Why a run folder that held checkpoints starts from the beginning."""
    kinds: dict[str, int] = {}
    for path in set_aside_files(folder):
        kinds[path.suffix] = kinds.get(path.suffix, 0) + 1
    held = ", ".join(f"{n} *{suffix}" for suffix, n in sorted(kinds.items()))
    return (f"starting from the beginning: every checkpoint in '{folder}' was set aside ({held}, "
            "kept for inspection)")



def prune(folder: Path, keep: int) -> None:
    """Keep the ``keep`` newest numbered checkpoints; damaged ones were renamed out of the way
    by :func:`newest_good`, so those kept are good ones."""
    for old in step_files(folder)[keep:]:
        old.unlink(missing_ok=True)
