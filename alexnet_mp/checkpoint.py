"""The checkpoint file: what it holds, how it is written and read, and the names it goes by.

One format whatever layout trained it: the grouped form's state (:mod:`~alexnet_mp.canonical`).
Files are written atomically (temporary file, fsync, rename), carry a SHA-256 of their contents,
and are read with ``weights_only=True`` only. Which file to resume from, what to keep and what to
set aside is :mod:`~alexnet_mp.checkpoint_folder`'s business.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from alexnet_mp.errors import UserError

FORMAT = "alexnet_mp/2"
# Format 1 held the momentum buffers alone, not the learning rate: still readable (see
# canonical.restore).
READABLE = ("alexnet_mp/1", FORMAT)
STEP_FILE = re.compile(r"^step-(\d{8})\.pt$")
# The temporary files save_atomic and link_atomic write beside their targets.
TEMPORARY = re.compile(r"^\.(step-\d{8}\.pt|last\.pt|best\.pt)\.tmp$")


class CheckpointError(UserError):
    """A checkpoint that cannot be used: corrupt, foreign or unsafe."""


class SaveError(UserError):
    """A checkpoint could not be written; the earlier ones are untouched."""


def digest(obj: Any) -> str:
    """SHA-256 over tensors' bytes and everything else's repr, in a fixed order."""
    h = hashlib.sha256()

    def walk(o: Any) -> None:
        if isinstance(o, dict):
            for k in sorted(o, key=str):
                h.update(repr(k).encode())
                walk(o[k])
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v)
        elif isinstance(o, torch.Tensor):
            t = o.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(repr(o).encode())

    walk(obj)
    return h.hexdigest()


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` (plus its checksum) so that ``path`` is either the old file or the new."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Serialised in memory first: torch.save reports a failed write (a full disk) as a
        # RuntimeError without the errno, a plain write says what happened.
        buffer = io.BytesIO()
        torch.save({**state, "sha256": digest(state)}, buffer)
        with open(tmp, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise SaveError(f"could not write checkpoint '{path}' ({_reason(exc)}); the earlier "
                        "checkpoints are intact: free space or fix the folder's permissions, "
                        "then run the same command to resume") from None
    except BaseException:  # a second Ctrl-C: no checkpoint-sized file left behind
        tmp.unlink(missing_ok=True)
        raise


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip().splitlines()
    return text[0][:120] if text else type(exc).__name__


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def link_atomic(target: Path, link: Path) -> None:
    """Point ``link`` (last.pt, best.pt) at ``target`` without copying and without a gap."""
    tmp = link.with_name(f".{link.name}.tmp")
    try:
        tmp.unlink(missing_ok=True)
        try:
            os.link(target, tmp)
        except OSError:  # file systems without hard links get a copy
            shutil.copyfile(target, tmp)
        os.replace(tmp, link)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise SaveError(f"could not update '{link}' ({_reason(exc)}); '{target}' is written and "
                        "the earlier checkpoints are intact") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


RESUME_REMEDY = "use an older checkpoint or train.resume=none with a new run.dir"


def load(path: Path | str, remedy: str = RESUME_REMEDY) -> dict[str, Any]:
    """Read and verify a checkpoint; any problem is a one-line :class:`CheckpointError`.

    ``remedy`` ends the line of an unreadable file: what the caller's user can do instead.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist; check train.resume")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for many kinds of damage
        text = str(exc)
        if "GLOBAL" in text or "Unsupported global" in text:
            raise CheckpointError(f"checkpoint '{path}' was refused: it holds Python objects that "
                                  "could run code (only tensors and plain values are loaded, "
                                  "weights_only=True); do not use files from untrusted sources"
                                  ) from None
        detail = type(exc).__name__ if "Weights only" in text else text.strip().split("\n")[0]
        raise CheckpointError(f"checkpoint '{path}' is unreadable or truncated ({detail[:120]}); "
                              f"{remedy}") from None
    if not isinstance(state, dict) or state.get("format") not in READABLE:
        raise CheckpointError(f"'{path}' is not an alexnet_mp checkpoint (no format "
                              f"'{FORMAT}'); pass a file written by launch/train.py")
    expected = state.pop("sha256", None)
    if expected != digest(state):
        raise CheckpointError(f"checkpoint '{path}' is corrupt: its SHA-256 does not match its "
                              "contents; use an older checkpoint")
    return state


def check_fits(state: dict[str, Any], model_name: str, shapes: dict[str, torch.Size],
               path: Path | str) -> None:
    """A checkpoint of another model or size fails here, naming the first key that differs."""
    if state["model_name"] != model_name:
        raise CheckpointError(f"checkpoint '{path}' holds {state['model_name']}, but this run "
                              f"builds {model_name}; set model.name={state['model_name']} or use "
                              "another run.dir")
    saved = state["model"]
    for name, shape in shapes.items():
        if name not in saved:
            raise CheckpointError(f"checkpoint '{path}' lacks '{name}'; it is not from this model")
        if tuple(saved[name].shape) != tuple(shape):
            raise CheckpointError(
                f"checkpoint '{path}' does not fit: '{name}' is {tuple(saved[name].shape)} there "
                f"but {tuple(shape)} here (model.num_classes, model.in_channels, model.width and "
                "data.image_size must match the run that wrote it)")


def step_files(folder: Path) -> list[Path]:
    """The numbered checkpoints in ``folder``, newest first."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if STEP_FILE.match(p.name)), reverse=True)


def candidates(folder: Path) -> list[Path]:
    """Every file the run folder calls a checkpoint, in the order resume tries them: numbered
    ones newest first, then last.pt and best.pt (all that is left if the numbered ones were
    deleted)."""
    named = [folder / n for n in ("last.pt", "best.pt") if (folder / n).is_file()]
    return step_files(folder) + named


def set_aside_files(folder: Path) -> list[Path]:
    """Checkpoints renamed out of the candidates (``*.damaged``, ``*.nonfinite``)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.suffix in (".damaged", ".nonfinite") and p.name.endswith(".pt" + p.suffix))


def remove_temporaries(folder: Path) -> list[tuple[str, int]]:
    """Remove the temporary files an interrupted save left in ``folder`` (a SIGKILL, or a
    power cut, gives save_atomic no chance to); their names and sizes. Only the writer of
    ``folder``, holding the run folder's lock, may call this: a live save's file has these
    names too."""
    removed = []
    if not folder.is_dir():
        return removed
    for path in sorted(folder.iterdir()):
        if TEMPORARY.match(path.name) and path.is_file() and not path.is_symlink():
            size = path.stat().st_size
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append((path.name, size))
    return removed


def newest_line(folder: Path) -> str:
    """Where the same command resumes, said without reading any checkpoint (a Ctrl-C must not
    wait for one to load): the newest file the run folder calls a checkpoint."""
    found = candidates(folder)
    if not found:
        return (f"no checkpoint was written to '{folder}' yet, so the same command starts from "
                "the beginning")
    return f"the newest checkpoint is '{found[0]}': run the same command to resume from it"

