"""Layout-free checkpoints: the grouped form's state, whichever layout trained it (README).

A split run gathers every column's rows to all ranks and rank 0 writes one file; any layout
loads it by cutting out its rows. Files are written atomically (temporary file, fsync, rename),
carry a SHA-256 of their contents, and are read with ``weights_only=True`` only.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from alexnet_mp.errors import UserError, count
from alexnet_mp.parallel.exchange import gather_rows
from alexnet_mp.parallel.layout import Layout

FORMAT = "alexnet_mp/2"
# Format 1 held the momentum buffers alone, not the learning rate: still readable (see restore).
READABLE = ("alexnet_mp/1", FORMAT)
STEP_FILE = re.compile(r"^step-(\d{8})\.pt$")
# The temporary files save_atomic and link_atomic write beside their targets.
TEMPORARY = re.compile(r"^\.(step-\d{8}\.pt|last\.pt|best\.pt)\.tmp$")


class CheckpointError(UserError):
    """A checkpoint that cannot be used: corrupt, foreign or unsafe."""


class SaveError(UserError):
    """A checkpoint could not be written; the earlier ones are untouched."""


def _row_slices(model: nn.Module) -> dict[str, slice]:
    return model.slices() if hasattr(model, "slices") else {}


def canonical_shapes(model: nn.Module) -> dict[str, torch.Size]:
    """Shapes of the grouped form's tensors, whichever part of them this rank holds."""
    full = getattr(model, "full_rows", None)
    return {name: torch.Size((full[name.split(".")[0]], *p.shape[1:])) if full else p.shape
            for name, p in model.named_parameters()}


ROW_CONTRACT = ("slices", "row_split", "full_rows", "column")


def holds_rows(model: nn.Module, layout: Layout) -> bool:
    """Whether this rank holds only some rows of the canonical tensors.

    A model split over ranks must describe its rows (``slices()``, ``row_split``, ``full_rows``,
    ``column``): without them its tensors would be saved as they are, one column written as if
    it were the model. That is a programming error, raised as such, never a silent save.
    """
    if layout.column is None:
        return False
    missing = [name for name in ROW_CONTRACT if not hasattr(model, name)]
    if missing:
        raise TypeError(f"{type(model).__name__} runs split ({layout.name}) but does not "
                        f"describe its rows ({', '.join(missing)} missing); the checkpoint code "
                        "cannot tell which rows this rank holds")
    return model.column is not None


def _canonical(model: nn.Module, tensors: dict[str, torch.Tensor], layout: Layout
               ) -> dict[str, torch.Tensor]:
    """Whole (grouped-form) tensors on the CPU from this rank's rows of ``tensors``."""
    if not holds_rows(model, layout):
        return {k: v.detach().cpu() for k, v in tensors.items()}
    out = {}
    for name, t in tensors.items():
        layer = name.split(".")[0]
        out[name] = gather_rows(t.detach(), model.row_split[layer], layout.group).cpu()
    return out


def model_state(model: nn.Module, layout: Layout) -> dict[str, torch.Tensor]:
    return _canonical(model, dict(model.named_parameters()), layout)


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, layout: Layout
                    ) -> dict[str, Any]:
    """The whole optimizer state in canonical form: param groups (learning rate, momentum, ...)
    with parameters named instead of numbered, and per-parameter tensors as whole tensors.

    ``optimizer.state_dict()`` numbers parameters by position and holds this rank's rows only, so
    it cannot move between layouts; this form can.
    """
    names = {p: name for name, p in model.named_parameters()}
    groups = [{**{k: v for k, v in g.items() if k != "params"},
               "params": [names[p] for p in g["params"]]} for g in optimizer.param_groups]
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    plain: dict[str, dict[str, Any]] = {}
    for p, name in names.items():
        for key, value in optimizer.state.get(p, {}).items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                tensors.setdefault(key, {})[name] = value
            else:  # scalars such as Adam's step are the same on every rank
                plain.setdefault(name, {})[key] = value
    state: dict[str, dict[str, Any]] = {name: dict(v) for name, v in plain.items()}
    for key, by_name in tensors.items():
        for name, t in _canonical(model, by_name, layout).items():
            state.setdefault(name, {})[key] = t
    return {"param_groups": groups, "state": state}


def restore_optimizer(saved: dict[str, Any], model: nn.Module,
                      optimizer: torch.optim.Optimizer) -> None:
    """Load :func:`optimizer_state`'s form into this rank's optimizer, by name and by rows."""
    rows = _row_slices(model)
    params = dict(model.named_parameters())
    by_name = {name: i for i, g in enumerate(saved["param_groups"]) for name in g["params"]}
    for group in optimizer.param_groups:
        names = [n for n, p in params.items() if any(p is q for q in group["params"])]
        source = saved["param_groups"][by_name[names[0]]] if names else None
        if source is not None:
            group.update({k: v for k, v in source.items() if k != "params"})
    for name, entries in saved["state"].items():
        p = params[name]
        optimizer.state[p] = {
            k: (v[rows.get(name, slice(None))].to(p.device).clone()
                if isinstance(v, torch.Tensor) and v.dim() > 0 else v)
            for k, v in entries.items()}


def nonfinite_parameters(model: nn.Module) -> list[str]:
    """Names of this rank's parameters that hold a NaN or an infinity."""
    return [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]


def estimated_size(model: nn.Module) -> int:
    """Bytes of one checkpoint: the canonical parameters and as much again of momentum."""
    full = canonical_shapes(model)
    return sum(2 * math.prod(shape) * 4 for shape in full.values()) + (1 << 20)


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


def restore_model(state: dict[str, Any], model: nn.Module) -> None:
    """Load the canonical parameters into this rank's part of the model, by rows."""
    rows = _row_slices(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(state["model"][name][rows.get(name, slice(None))])


def restore(state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load canonical model and optimizer state into this rank's part of the model, by rows."""
    restore_model(state, model)
    rows = _row_slices(model)
    if "optimizer" in state:
        restore_optimizer(state["optimizer"], model, optimizer)
        return
    for name, p in model.named_parameters():  # format 1: momentum only
        m = state["momentum"].get(name)
        if m is not None:
            optimizer.state[p]["momentum_buffer"] = m[rows.get(name, slice(None))].to(
                p.device).clone()


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


def prune(folder: Path, keep: int) -> None:
    """Keep the ``keep`` newest numbered checkpoints; damaged ones were renamed out of the way
    by :func:`newest_good`, so those kept are good ones."""
    for old in step_files(folder)[keep:]:
        old.unlink(missing_ok=True)
