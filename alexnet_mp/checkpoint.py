"""Layout-free checkpoints (DESIGN §4): the grouped form's state, whichever layout trained it.

A split run gathers every column's rows to all ranks and rank 0 writes one file; any layout
loads it by cutting out its rows. Files are written atomically (temporary file, fsync, rename),
carry a SHA-256 of their contents, and are read with ``weights_only=True`` only.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from alexnet_mp.errors import UserError
from alexnet_mp.parallel.exchange import gather_rows
from alexnet_mp.parallel.layout import Layout

FORMAT = "alexnet_mp/1"
STEP_FILE = re.compile(r"^step-(\d{8})\.pt$")


class CheckpointError(UserError):
    """A checkpoint that cannot be used: corrupt, foreign or unsafe."""


def _row_slices(model: nn.Module) -> dict[str, slice]:
    return model.slices() if hasattr(model, "slices") else {}


def canonical_shapes(model: nn.Module) -> dict[str, torch.Size]:
    """Shapes of the grouped form's tensors, whichever part of them this rank holds."""
    full = getattr(model, "full_rows", None)
    return {name: torch.Size((full[name.split(".")[0]], *p.shape[1:])) if full else p.shape
            for name, p in model.named_parameters()}


def _canonical(model: nn.Module, tensors: dict[str, torch.Tensor], layout: Layout
               ) -> dict[str, torch.Tensor]:
    """Whole (grouped-form) tensors on the CPU from this rank's rows of ``tensors``."""
    if getattr(model, "column", None) is None:
        return {k: v.detach().cpu() for k, v in tensors.items()}
    out = {}
    for name, t in tensors.items():
        layer = name.split(".")[0]
        out[name] = gather_rows(t.detach(), model.row_split[layer], layout.group).cpu()
    return out


def model_state(model: nn.Module, layout: Layout) -> dict[str, torch.Tensor]:
    return _canonical(model, dict(model.named_parameters()), layout)


def momentum_state(model: nn.Module, optimizer: torch.optim.Optimizer, layout: Layout
                   ) -> dict[str, torch.Tensor]:
    buffers = {name: optimizer.state[p]["momentum_buffer"]
               for name, p in model.named_parameters()
               if optimizer.state.get(p, {}).get("momentum_buffer") is not None}
    return _canonical(model, buffers, layout)


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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save({**state, "sha256": digest(state)}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def link_atomic(target: Path, link: Path) -> None:
    """Point ``link`` (last.pt, best.pt) at ``target`` without copying and without a gap."""
    tmp = link.with_name(f".{link.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(target, tmp)
    except OSError:  # file systems without hard links get a copy
        shutil.copyfile(target, tmp)
    os.replace(tmp, link)


def load(path: Path | str) -> dict[str, Any]:
    """Read and verify a checkpoint; any problem is a one-line :class:`CheckpointError`."""
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
                              "use an older checkpoint or train.resume=none with a new run.dir"
                              ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
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


def restore(state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load canonical model and momentum into this rank's part of the model, by slicing rows."""
    rows = _row_slices(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(state["model"][name][rows.get(name, slice(None))])
            m = state["momentum"].get(name)
            if m is not None:
                optimizer.state[p]["momentum_buffer"] = m[rows.get(name, slice(None))].to(
                    p.device).clone()


def step_files(folder: Path) -> list[Path]:
    """Checkpoints in ``folder``, newest first."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if STEP_FILE.match(p.name)), reverse=True)


def newest_good(folder: Path, warn) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that verifies; damaged newer ones are named through ``warn``."""
    bad = []
    for path in step_files(folder):
        try:
            return path, load(path)
        except CheckpointError as exc:
            bad.append(path)
            warn(f"skipping {exc}")
    if bad:
        raise CheckpointError(f"no usable checkpoint in '{folder}': all {len(bad)} are damaged; "
                              "move them away to start again")
    return None


def prune(folder: Path, keep: int) -> None:
    for old in step_files(folder)[keep:]:
        old.unlink(missing_ok=True)
