"""Typed configuration: YAML (safe_load) plus dotted ``section.key=value`` overrides.

Every problem becomes a :class:`UserError` whose one line names the key and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from alexnet_mp.errors import UserError

MODELS = ("alexnet_d2l", "alexnet_columns", "alexnet_grouped")
DATASETS = ("mnist_sample", "mnist", "fashion_mnist", "cifar10", "imagefolder", "shards", "fake")


@dataclass
class ModelConfig:
    # alexnet_columns: the paper's net, split into columns when two ranks run it and in its
    # grouped single-device form otherwise; alexnet_grouped forces the grouped form.
    name: str = "alexnet_columns"
    num_classes: int = 10
    in_channels: int = 1
    dropout: float = 0.5
    # Scales every layer's width (kernels and FC neurons); 1.0 is the paper. Tests use small ones.
    width: float = 1.0
    # paper: N(0, 0.01) and the paper's biases; xavier: Glorot uniform as d2l; xavier_relu: the
    # same with the ReLU gain sqrt(2); kaiming: He normal on the fan-in. auto: xavier_relu for
    # alexnet_d2l, kaiming for the columns (the fastest off the initial plateau, see README).
    init: str = "auto"
    # Overlap each exchange with the column's own half of the next layer (async collectives).
    # null: on for CUDA, off on CPU, where gloo shares the cores and the halved layers cost more
    # than the wait they hide (docs/performance.md).
    overlap: bool | None = None


@dataclass
class DataConfig:
    name: str = "mnist_sample"
    root: str = "data"
    image_size: int = 224
    download: bool = False
    num_workers: int = 0
    # Paper augmentation: random crops of a 256/227-scaled image, flips, PCA lighting.
    augment: bool = False
    # With augment: mirror images at random. Off for digits, text and anything a mirror changes.
    hflip: bool = True
    fake_size: int = 1024  # images in the `fake` data set (train; test gets a quarter)
    train_limit: int | None = None  # use only the first N training examples (smoke runs, tests)
    test_limit: int | None = None
    # An image file that cannot be read (imagefolder): stop naming it, or skip it (counted in
    # metrics.jsonl and named on the console once per epoch).
    bad_images: str = "stop"
    # JSON of the training set's own RGB principal components for PCA lighting (written by
    # launch/pca_lighting.py); null: the published ImageNet figures (lighting.EIGVAL, EIGVEC).
    lighting_file: str | None = None


@dataclass
class TrainConfig:
    epochs: int = 10
    max_steps: int | None = None  # stop after this many optimizer steps in all (smoke runs)
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    resume: str = "auto"  # auto | none | path to a checkpoint
    schedule: str = "none"  # none | step | plateau
    step_size: int = 30  # epochs between divisions (schedule=step)
    gamma: float = 0.1
    patience: int = 5  # epochs without validation improvement (schedule=plateau)
    # auto: bf16 autocast on a CUDA device that has it, exact fp32 elsewhere (CPU runs stay
    # exact); none | bf16 | fp16 (fp16 only on CUDA, with a gradient scaler).
    amp: str = "auto"
    channels_last: bool = False
    eval_only: bool = False
    # Judge the epoch-end evaluation as the paper reports: softmax averaged over ten crops (four
    # corners and the centre of the image scaled to 256/227 of the input, and their flips).
    ten_crop: bool = False
    nonfinite: str = "stop"  # a NaN/inf loss or gradient: stop the run, or skip that batch
    max_skipped: int = 10  # with nonfinite=skip: stop after this many skipped steps in a row
    # false: no weight decay on biases, as the paper's original code had it.
    bias_decay: bool = True
    # torch: v <- m v + g + wd w; w <- w - lr v. paper: v <- m v - wd lr w - lr g; w <- w + v
    # (the rate inside the velocity, which differs from torch's after a rate change).
    momentum_form: str = "torch"
    # torch.compile the model (every layout; a one-line warning where the device cannot).
    compile: bool = False


@dataclass
class RunConfig:
    dir: str | None = None  # default runs/<config file name>-<model.name>
    log_every: int = 20
    checkpoint_every: int = 0  # optimizer steps between checkpoints; 0: at epoch ends only
    keep_checkpoints: int = 2
    # Rank 0 writes each checkpoint on a background thread from a host copy taken at the step,
    # so training goes on while the file is written; false writes it before the next step.
    async_checkpoint: bool = True
    device: str = "auto"  # auto | cpu | cuda | mps
    threads: int | None = None  # CPU threads per rank; default: cores / local ranks
    # CPU ranks keep the memory a step frees for the next step instead of handing large blocks
    # back to the OS, whose fresh pages fault on first touch (glibc only; see host_memory.py).
    keep_host_memory: bool = True
    # How long a rank waits for a peer inside a training or evaluation step before it reports
    # the peer lost. Waits for rank 0's checkpoint writes use save_timeout_s instead.
    timeout_s: float = 600.0
    save_timeout_s: float = 1800.0
    # How long a rank waits at start for every rank to join before it says how many came.
    startup_timeout_s: float = 300.0
    progress: bool = True
    # CUDA: let cuDNN time its algorithms for each new shape and keep the fastest (the input
    # size is fixed, so it times once). Off: cuDNN's heuristics, for runs that must repeat
    # exactly on one GPU.
    cudnn_benchmark: bool = True
    # TensorBoard event files beside metrics.jsonl, with the same scalars (pip install -e
    # '.[tensorboard]').
    tensorboard: bool = False


@dataclass
class ParallelConfig:
    # Ranks per replica holding one column each: 1 or 2. null: 2 for alexnet_columns on more than
    # one rank, else 1. The world size W gives W / columns replicas (data parallel between them).
    columns: int | None = None
    # columns: columns x replicas. hybrid: the convolution trunk data-parallel over every rank,
    # the FC layers split over every rank (Krizhevsky 2014, "one weird trick").
    layout: str = "columns"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    name: str = "default"  # the config file's stem; names the default run folder

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


CHOICES: dict[str, tuple[str, ...]] = {
    "model.name": MODELS,
    "model.init": ("auto", "paper", "xavier", "xavier_relu", "kaiming"),
    "data.name": DATASETS,
    "train.schedule": ("none", "step", "plateau"),
    "train.amp": ("auto", "none", "bf16", "fp16"),
    "train.nonfinite": ("stop", "skip"),
    "train.momentum_form": ("torch", "paper"),
    "data.bad_images": ("stop", "skip"),
    "run.device": ("auto", "cpu", "cuda", "mps"),
}
POSITIVE = (
    "model.num_classes", "model.in_channels", "model.width", "data.image_size", "data.fake_size",
    "train.epochs", "train.batch_size", "train.lr", "train.step_size", "run.log_every",
    "run.timeout_s", "run.save_timeout_s", "run.startup_timeout_s", "train.max_steps",
    "train.max_skipped", "run.threads", "data.train_limit", "data.test_limit",
)
NON_NEGATIVE = ("train.momentum", "train.weight_decay", "data.num_workers", "run.checkpoint_every",
                "train.patience")


def _sections() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config) if f.name != "name"}


def _field_types(section_cls: type) -> dict[str, Any]:
    return typing.get_type_hints(section_cls)


def _suggest(word: str, options: list[str]) -> str:
    near = difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    return f" (did you mean '{near[0]}'?)" if near else f" (valid: {', '.join(sorted(options))})"


# PyYAML follows YAML 1.1, where a float needs a dot: `1e-3` and `5e-4` load as strings. People
# write them anyway (YAML 1.2 and JSON read them as numbers), so float keys accept that form.
_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against the annotation; ints and numbers written as text (``1e-3``) pass
    as floats, nothing else converts."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str) and _FLOAT.match(value.strip()):
        return float(value)
    if hint is float and isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"config key '{key}' must be a finite number, got {value!r}")
    if hint is bool and not isinstance(value, bool):
        raise UserError(f"config key '{key}' must be true or false, got {value!r}")
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise UserError(f"config key '{key}' must be an integer, got {value!r}")
    if hint is float and not isinstance(value, float):
        raise UserError(f"config key '{key}' must be a number, got {value!r}")
    if hint is str and not isinstance(value, str):
        # YAML reads `resume: none` as a string but `dir: 123` as an int; paths may be numbers.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise UserError(f"config key '{key}' must be a string, got {value!r}")
    return value


def _apply(cfg: Config, key: str, value: Any) -> None:
    parts = key.split(".")
    sections = _sections()
    if len(parts) != 2:
        flat = [f"{s}.{k}" for s, cls in sections.items() for k in _field_types(cls)]
        raise UserError(f"config key '{key}' must look like section.key{_suggest(key, flat)}")
    section, name = parts
    if section not in sections:
        raise UserError(f"unknown config section '{section}'{_suggest(section, list(sections))}")
    hints = _field_types(sections[section])
    if name not in hints:
        options = [f"{section}.{k}" for k in hints]
        raise UserError(f"unknown config key '{key}'{_suggest(key, options)}")
    setattr(getattr(cfg, section), name, _coerce(key, value, hints[name]))


def _choices() -> dict[str, tuple[str, ...]]:
    # The layouts are the plans' names; imported here because the plans import the models,
    # which import this module.
    from alexnet_mp.parallel.plans import LAYOUTS

    return {**CHOICES, "parallel.layout": LAYOUTS}


def _validate(cfg: Config) -> None:
    for key, allowed in _choices().items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise UserError(f"config key '{key}' is '{value}'; choose one of: {', '.join(allowed)}")
    for key in POSITIVE + NON_NEGATIVE:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value is None:
            continue
        if key in POSITIVE and value <= 0:
            raise UserError(f"config key '{key}' must be positive, got {value}")
        if key in NON_NEGATIVE and value < 0:
            raise UserError(f"config key '{key}' must not be negative, got {value}")
    if not 0.0 <= cfg.model.dropout < 1.0:
        raise UserError(f"config key 'model.dropout' must be in [0, 1), got {cfg.model.dropout}")
    if cfg.run.keep_checkpoints < 2:
        raise UserError("config key 'run.keep_checkpoints' must be at least 2, so that a torn "
                        "newest checkpoint always leaves an older one")
    if cfg.model.num_classes < 2:
        raise UserError(f"config key 'model.num_classes' must be at least 2, got "
                        f"{cfg.model.num_classes}")


def _refuse_duplicates(text: str, source: Path) -> None:
    """safe_load keeps the last of two equal keys without a word; the node tree still has both.

    ``yaml.compose`` builds only that tree (no Python objects), so this reads nothing unsafely.
    """
    stack = [yaml.compose(text, Loader=yaml.SafeLoader)]
    while stack:
        node = stack.pop()
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for key, value in node.value:
                name = str(key.value)
                if name in seen:
                    where = "section" if isinstance(value, yaml.MappingNode) else "key"
                    raise UserError(f"config file '{source}' has the {where} '{name}' twice (lines "
                                    f"{seen[name] + 1} and {key.start_mark.line + 1}); keep one")
                seen[name] = key.start_mark.line
                stack.append(value)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)


def parse_override(text: str) -> tuple[str, Any]:
    """``section.key=value`` with the value read as YAML (so 0.1 is a float, true a bool)."""
    if "=" not in text:
        raise UserError(f"override '{text}' must look like section.key=value (e.g. train.lr=0.01)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and value.lower() in ("null", "~"):
        value = None
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                default_path: str | Path | None = None) -> Config:
    """Build the config: dataclass defaults, then the YAML file, then the overrides, validated.

    ``path`` None means ``default_path`` (the project's ``configs/default.yaml``) when given.
    """
    cfg = Config()
    source = path if path is not None else default_path
    if source is not None:
        source = Path(source)
        if source.is_dir():
            raise UserError(f"config '{source}' is a folder; pass --config with a YAML file, "
                            "e.g. configs/default.yaml")
        if not source.is_file():
            raise UserError(f"config file '{source}' does not exist; pass --config with a file "
                            "from configs/")
        try:
            text = source.read_text()
            _refuse_duplicates(text, source)
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            first = str(exc).splitlines()[0]
            raise UserError(f"config file '{source}' is not plain YAML ({first}); only plain "
                            "mappings, numbers and strings are read (yaml.safe_load)") from None
        data = data or {}
        if not isinstance(data, dict):
            raise UserError(f"config file '{source}' must hold a mapping of sections")
        for section, body in data.items():
            if section == "name":
                continue
            if not isinstance(body, dict):
                if section in _sections():
                    raise UserError(f"config section '{section}' in '{source}' must be a mapping")
                raise UserError(f"unknown config section '{section}' in '{source}'"
                                f"{_suggest(str(section), list(_sections()))}")
            for key, value in body.items():
                _apply(cfg, f"{section}.{key}", value)
        cfg.name = str(data.get("name", source.stem))
    for text in overrides:
        _apply(cfg, *parse_override(text))
    _validate(cfg)
    return cfg


def run_dir(cfg: Config) -> Path:
    """``run.dir``, or ``runs/<config name>-<model>`` so that models never share checkpoints."""
    return Path(cfg.run.dir) if cfg.run.dir else Path("runs") / f"{cfg.name}-{cfg.model.name}"


def dump_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# What a resumed run may change. A key that changes the data order, the tensors' shapes or what a
# step or an epoch means is fixed by the run that wrote the checkpoint; the others may change,
# with a warning that lists them. The layout (parallel.*, model.name within its family) may change
# freely: checkpoints are layout-free and train.batch_size is the global batch.
FIXED_ON_RESUME = (
    "model.num_classes", "model.in_channels", "model.width", "data.name", "data.image_size",
    "data.augment", "data.hflip", "data.fake_size", "data.train_limit", "data.test_limit",
    "train.batch_size", "train.seed", "train.schedule", "train.step_size", "train.gamma",
    "train.patience",
    # A saved momentum buffer is a sum of gradients (torch) or of steps (paper, -lr times the
    # other): the other form would misread it.
    "train.momentum_form",
)
SILENT_ON_RESUME = ("name", "run.dir", "train.resume", "model.name")


def _flat(tree: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for section, body in tree.items():
        if isinstance(body, dict):
            out.update({f"{section}.{k}": v for k, v in body.items()})
        else:
            out[section] = body
    return out


def resume_changes(saved: dict[str, Any], cfg: Config) -> tuple[list[str], list[str]]:
    """Keys whose value differs from the checkpoint's config, as ``key: old -> new``: (those
    that may not change on resume, those that may). Keys the checkpoint predates are skipped."""
    old, new = _flat(saved), _flat(cfg.to_dict())
    fixed, free = [], []
    for key, value in new.items():
        if key not in old or old[key] == value or key in SILENT_ON_RESUME:
            continue
        (fixed if key in FIXED_ON_RESUME else free).append(f"{key}: {old[key]!r} -> {value!r}")
    return fixed, free
