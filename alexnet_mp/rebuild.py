"""A checkpoint's model and config rebuilt for any layout, from the file alone.

Its stored config (the model section and ``data.image_size``) builds the model; its ``data``
record (class names, mean and std, channels) says how to read an image. The stored ``run`` and
``parallel`` sections, ``train.amp``, ``train.channels_last``, ``train.compile`` and the
training-only augmentation keys describe how and where it was trained, not where it is used now,
so they start from their defaults; the command line may set any key.

Every rank reads the checkpoint itself, before any process group exists: the model it holds
decides the layout (two columns or none). Its path must therefore be the same on every node.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from alexnet_mp import canonical
from alexnet_mp import checkpoint as ckpt
from alexnet_mp.config import MODELS, Config, load_config
from alexnet_mp.data import STATS
from alexnet_mp.errors import UserError
from alexnet_mp.models import model_family
from alexnet_mp.parallel.build import build_model
from alexnet_mp.parallel.layout import Layout

FAMILIES = tuple(sorted({model_family(name) for name in MODELS}))
# Stored keys that describe the training machine or training-only transforms: evaluation starts
# them from their defaults (a lighting file or a GPU-only precision need not exist here).
TRAINING_ONLY = ("train.amp", "train.channels_last", "train.compile", "data.augment",
                 "data.lighting_file")
# The sections a model is rebuilt from; run and parallel are the new machine's business.
KEPT_SECTIONS = ("model", "data", "train")


@dataclass(frozen=True)
class DataInfo:
    """How the checkpoint's model reads an image, and what its outputs are called."""

    name: str  # the data set it was trained on
    classes: list[str]  # index = label
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int
    in_channels: int
    stored: bool = True  # False: an older checkpoint; numbered classes and the set's defaults


@dataclass
class Loaded:
    """A checkpoint's model on this rank's place in ``layout``, in eval mode."""

    path: Path
    config: Config  # the stored config, with this machine's run/parallel and the overrides
    info: DataInfo
    layout: Layout
    model: nn.Module
    step: int
    epoch: int  # whole epochs done (the checkpoint's epoch in progress, 0-based)
    notes: list[str] = field(default_factory=list)  # what the caller should tell the user


def _config(path: Path, saved: dict[str, Any], overrides: Sequence[str],
            notes: list[str]) -> Config:
    """The stored config's model, data and train sections, then ``overrides``, validated.

    Values go through ``load_config``'s own overrides as JSON, a subset of YAML that reads back
    to the same value, so a stored config is checked exactly as a config file would be.
    """
    defaults = Config()
    kept, unknown = [], []
    for section in KEPT_SECTIONS:
        known = {f.name for f in dataclasses.fields(getattr(defaults, section))}
        for key, value in (saved.get(section) or {}).items():
            dotted = f"{section}.{key}"
            if dotted in TRAINING_ONLY:
                continue
            if key not in known:
                if section == "model":  # it shaped the weights: guessing would mislead
                    raise ckpt.CheckpointError(
                        f"checkpoint '{path}' was written with {dotted}, which this version of "
                        "alexnet_mp does not know; use the version that wrote it")
                unknown.append(dotted)
                continue
            kept.append(f"{dotted}={json.dumps(value)}")
    if unknown:
        notes.append(f"ignoring config keys this version does not know: {', '.join(unknown)}")
    try:
        load_config(None, kept)
    except UserError as exc:
        raise ckpt.CheckpointError(f"checkpoint '{path}' holds a config this version cannot use "
                                   f"({exc})") from None
    return load_config(None, [*kept, *overrides])


def _data_info(path: Path, state: dict[str, Any], cfg: Config, notes: list[str]) -> DataInfo:
    saved = state.get("data")
    if isinstance(saved, dict) and {"classes", "mean", "std", "in_channels"} <= saved.keys():
        return DataInfo(str(saved.get("name", cfg.data.name)), [str(c) for c in saved["classes"]],
                        tuple(float(m) for m in saved["mean"]),
                        tuple(float(s) for s in saved["std"]), cfg.data.image_size,
                        int(saved["in_channels"]))
    # The data set it trained on, even when --data names another one for this evaluation.
    name = str((state["config"].get("data") or {}).get("name", cfg.data.name))
    channels, classes = cfg.model.in_channels, cfg.model.num_classes
    mean, std = STATS.get(name, (None,) * 4)[2:]
    if mean is None or len(mean) != channels:  # what build_data gives data sets without stats
        mean, std = (0.5,) * channels, (0.25,) * channels
    notes.append(f"'{path}' predates stored class names and normalisation: classes are shown as "
                 f"numbers 0-{classes - 1}, and images are normalised with {name}'s usual mean "
                 "and std")
    return DataInfo(name, [str(i) for i in range(classes)], tuple(mean), tuple(std),
                    cfg.data.image_size, channels, stored=False)


def read_checkpoint(path: str | Path, overrides: Sequence[str] = ()
                    ) -> tuple[dict[str, Any], Config, DataInfo, list[str]]:
    """The verified state, the config to rebuild its model with, its data record and notes.

    A missing, corrupt, foreign or unsafe file, or one holding a model this version cannot
    build, is a one-line :class:`~alexnet_mp.checkpoint.CheckpointError`.
    """
    path = Path(path)
    if not path.is_file():
        raise ckpt.CheckpointError(f"checkpoint '{path}' does not exist or is not a file; pass a "
                                   ".pt file written by launch/train.py (RUN_DIR/checkpoints/"
                                   "last.pt, best.pt or step-N.pt)")
    state = ckpt.load(path, remedy="pass an older checkpoint as the checkpoint argument (such "
                                   "as another step-N.pt beside it)")
    family = state.get("model_name")
    if family not in FAMILIES:
        raise ckpt.CheckpointError(f"checkpoint '{path}' holds a model '{family}' that this "
                                   f"version cannot build (it builds {', '.join(FAMILIES)}); use "
                                   "the version of alexnet_mp that wrote it")
    if not isinstance(state.get("config"), dict) or not isinstance(
            state["config"].get("model"), dict):
        raise ckpt.CheckpointError(f"checkpoint '{path}' holds no config, so its model cannot be "
                                   "rebuilt; it was not written by launch/train.py")
    notes: list[str] = []
    cfg = _config(path, state["config"], overrides, notes)
    return state, cfg, _data_info(path, state, cfg, notes), notes


def load(path: str | Path, open_layout: Callable[[Config], Layout],
         overrides: Sequence[str] = ()) -> Loaded:
    """The checkpoint's model for this rank, ready to evaluate, from the file alone.

    ``open_layout(config)`` gives this process's place (one device, or a column of the
    torchrun job); it is called once the checkpoint says which model it holds. Each rank builds
    only its own rows (``parallel.build.build_model``) and copies them from the canonical
    state; a checkpoint that does not fit is one line on every rank.
    """
    state, cfg, info, notes = read_checkpoint(path, overrides)
    layout = open_layout(cfg)
    error, model = None, None
    try:
        model = build_model(cfg.model, cfg.data.image_size, layout, cfg.train.seed)
        ckpt.check_fits(state, model_family(cfg.model.name), canonical.canonical_shapes(model),
                        path)
        canonical.restore_model(state, model)
        if cfg.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
    except UserError as exc:
        error = exc
    layout.agree(error)
    model.eval()
    train = state.get("train") or {}
    return Loaded(Path(path), cfg, info, layout, model, int(train.get("global_step", 0)),
                  int(train.get("epoch", 0)), notes)
