"""PCA lighting from a training set's own colours, TensorBoard event files, torch.compile."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, one_process_layout, small_overrides
from PIL import Image

from alexnet_mp.config import load_config
from alexnet_mp.data import _transforms
from alexnet_mp.errors import UserError
from alexnet_mp.lighting import Lighting, read_lighting
from alexnet_mp.metrics import read_log
from alexnet_mp.parallel import build
from alexnet_mp.pca import rgb_pca
from alexnet_mp.run import Trainer

# Pixels c + t d + noise: covariance S^2 d d^T + N^2 I, so the components are d (variance
# S^2 + N^2) and any two directions orthogonal to it (variance N^2 each).
D = torch.tensor([0.6, 0.7, -0.2], dtype=torch.float64)
D = D / D.norm()
C, S, N = torch.tensor([0.5, 0.45, 0.55], dtype=torch.float64), 0.1, 0.02


def colour_folder(root: Path, per_class: int = 4, side: int = 32) -> Path:
    """An image folder (2 classes) whose pixels scatter along the colour direction D."""
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", per_class), ("val", 1)):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                t = torch.randn(side, side, 1, generator=g, dtype=torch.float64) * S
                noise = torch.randn(side, side, 3, generator=g, dtype=torch.float64) * N
                x = (C + t * D + noise).clamp(0, 1)
                Image.fromarray((x * 255).round().to(torch.uint8).numpy()).save(
                    root / split / c / f"{i}.png")
    return root


def pixels(root: Path) -> np.ndarray:
    """Every training pixel, read back with PIL alone, in [0, 1]."""
    files = sorted((root / "train").rglob("*.png"))
    return np.concatenate([np.asarray(Image.open(f), dtype=np.float64).reshape(-1, 3) / 255
                           for f in files])


def image_cfg(root: Path, *extra: str):
    return load_config(None, ["data.name=imagefolder", f"data.root={root}",
                              "model.in_channels=3", "model.num_classes=2", *extra])


def test_pca_of_a_known_colour_direction(tmp_path):
    root = colour_folder(tmp_path / "img")
    pca = rgb_pca(image_cfg(root).data)
    assert pca.images == 8 and pca.pixels == 8 * 32 * 32
    val = torch.tensor(pca.eigval, dtype=torch.float64)
    vec = torch.tensor(pca.eigvec, dtype=torch.float64)
    # The model the pixels were drawn from (sampling error ~2 % with 8,192 pixels).
    assert abs(vec[:, 0] @ D) > 0.999
    assert val[0] == pytest.approx(S**2 + N**2, rel=0.06)
    assert val[1:].tolist() == pytest.approx([N**2, N**2], rel=0.15)
    # The exact covariance of the pixels as stored (numpy, population form).
    cov = np.cov(pixels(root).T, bias=True)
    want_val, want_vec = np.linalg.eigh(cov)
    assert val.tolist() == pytest.approx(want_val[::-1].tolist(), rel=1e-9)
    assert abs(float(vec[:, 0] @ torch.from_numpy(want_vec[:, -1]))) == pytest.approx(1, abs=1e-9)
    assert torch.allclose(vec.T @ vec, torch.eye(3, dtype=torch.float64), atol=1e-12)
    assert pca.mean == pytest.approx(pixels(root).mean(axis=0).tolist(), rel=1e-12)


def test_pca_reads_a_seeded_sample_of_a_large_set(tmp_path):
    root = colour_folder(tmp_path / "img")
    a = rgb_pca(image_cfg(root).data, images=3, seed=1)
    b = rgb_pca(image_cfg(root).data, images=3, seed=1)
    assert a.images == 3 and a.pixels == 3 * 32 * 32 and a.eigval == b.eigval


@pytest.mark.slow
def test_pca_command_writes_the_file_training_reads(tmp_path):
    root = colour_folder(tmp_path / "img")
    out = tmp_path / "rgb.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "pca_lighting.py"), "--out", str(out),
         "data.name=imagefolder", f"data.root={root}", "model.in_channels=3",
         "model.num_classes=2"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert f"data.lighting_file={out}" in done.stdout
    saved = json.loads(out.read_text())
    assert saved["images"] == 8 and len(saved["eigvec"]) == 3
    # The training transform of an augmented image folder lights with these components.
    train_tf, _ = _transforms(image_cfg(root, "data.augment=true",
                                        f"data.lighting_file={out}").data)
    lighting = [t for t in train_tf.transforms if isinstance(t, Lighting)]
    assert len(lighting) == 1
    assert torch.equal(lighting[0].eigval, torch.tensor(saved["eigval"], dtype=torch.float32))
    assert torch.equal(lighting[0].eigvec, torch.tensor(saved["eigvec"], dtype=torch.float32))
    # Without the key: the published ImageNet figures, as before.
    default, _ = _transforms(image_cfg(root, "data.augment=true").data)
    assert [t for t in default.transforms if isinstance(t, Lighting)][0].eigval[0] == 0.2175


@pytest.mark.parametrize("content, words", [
    (None, "does not exist"),
    ("{not json", "is not readable JSON"),
    ('{"eigval": [1, 2]}', "lacks 'eigval'"),
    ('{"eigval": [1, 2], "eigvec": [[1, 0], [0, 1]]}', "not (3,) and (3, 3)"),
    ('{"eigval": [1, -2, 3], "eigvec": [[1, 0, 0], [0, 1, 0], [0, 0, 1]]}', "negative"),
])
def test_a_bad_lighting_file_is_one_line(tmp_path, content, words):
    path = tmp_path / "l.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError) as info:
        read_lighting(path)
    assert words in str(info.value) and "\n" not in str(info.value)
    assert "launch/pca_lighting.py" in str(info.value)


def test_pca_refuses_grey_images(idx_root):
    cfg = load_config(None, ["data.name=mnist", f"data.root={idx_root}"])
    with pytest.raises(UserError, match="PCA lighting needs RGB images"):
        rgb_pca(cfg.data, in_channels=cfg.model.in_channels)


# -- TensorBoard ------------------------------------------------------------------------------

def trainer(idx_root, run, **extra) -> Trainer:
    cfg = load_config(None, small_overrides(idx_root, run, **extra))
    return Trainer(cfg, one_process_layout(cfg.model.name))


def test_missing_tensorboard_is_one_line_before_training(idx_root, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # what `import tensorboard` meets
    with pytest.raises(UserError) as info:
        trainer(idx_root, tmp_path / "r", **{"run.tensorboard": True})
    text = str(info.value)
    assert "pip install -e '.[tensorboard]'" in text and "\n" not in text
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator").EventAccumulator(str(folder))
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]}


def jsonl_scalars(path: Path) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for r in read_log(path):
        for key, value in r.items():
            if key not in ("kind", "step", "epoch") and isinstance(value, (int, float)) \
                    and not isinstance(value, bool):
                out.setdefault(f"{r['kind']}/{key}", []).append((r["step"], float(value)))
    return out


def test_tensorboard_holds_the_metrics_of_a_resumed_run(idx_root, tmp_path):
    pytest.importorskip("tensorboard")
    run = tmp_path / "r"
    extra = {"run.tensorboard": True, "train.epochs": 2}
    # Stopped mid-epoch: its cut-short epoch record comes after the checkpoint, and the resumed
    # run drops it from metrics.jsonl; the event files must drop it too.
    trainer(idx_root, run, **extra, **{"train.max_steps": 4}).run()
    assert any(r.get("partial") for r in read_log(run / "metrics.jsonl"))
    trainer(idx_root, run, **extra).run()
    assert not any(r.get("partial") for r in read_log(run / "metrics.jsonl"))
    assert len(list(run.glob("events.out.tfevents.*"))) == 1
    want, got = jsonl_scalars(run / "metrics.jsonl"), tensorboard_scalars(run)
    assert {"step/loss", "step/lr", "epoch/train_loss", "epoch/test_acc"} <= want.keys()
    assert got.keys() == want.keys()
    for tag in want:
        assert [s for s, _ in got[tag]] == [s for s, _ in want[tag]], tag
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in want[tag]], rel=1e-6)


# -- torch.compile ----------------------------------------------------------------------------

def step_losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_log(run / "metrics.jsonl") if r["kind"] == "step"]


@pytest.fixture
def fresh_dynamo():
    yield
    torch._dynamo.reset()


def test_compiled_model_trains_and_saves_as_eager(idx_root, tmp_path, monkeypatch, fresh_dynamo):
    """The compile step through the trainer, with aot_eager: the same graphs as inductor
    captures (forward and backward), without its minute of C++ compilation on this CPU."""
    monkeypatch.setattr(build, "COMPILE_BACKEND", "aot_eager")
    extra = {"model.name": "alexnet_columns", "run.log_every": 1}
    eager = trainer(idx_root, tmp_path / "e", **extra)
    eager.run()
    compiled = trainer(idx_root, tmp_path / "c", **extra, **{"train.compile": True})
    assert compiled.model._compiled_call_impl is not None
    compiled.run()
    assert step_losses(tmp_path / "c") == step_losses(tmp_path / "e")
    assert [n for n, _ in compiled.model.named_parameters()] == \
        [n for n, _ in eager.model.named_parameters()]  # checkpoints see no wrapper


def test_compile_without_a_compiler_says_so_and_runs_eager(idx_root, tmp_path, monkeypatch,
                                                          capsys):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(build.shutil, "which", lambda name: None)
    t = trainer(idx_root, tmp_path / "r", **{"train.compile": True, "train.max_steps": 1})
    lines = [x for x in capsys.readouterr().err.splitlines() if "train.compile" in x]
    assert lines == ["warning: train.compile=true is not used: inductor compiles C++ on the CPU "
                     "and no C++ compiler was found (set CXX)"]
    assert t.model._compiled_call_impl is None
    t.run()


@pytest.mark.skipif(not os.environ.get("ALEXNET_MP_INDUCTOR"),
                    reason="inductor compiles for about a minute per model on 2 cores; set "
                           "ALEXNET_MP_INDUCTOR=1 to run")
@pytest.mark.parametrize("model", ["alexnet_columns", "alexnet_d2l"])
def test_inductor_gives_eager_losses(idx_root, tmp_path, model, fresh_dynamo):
    extra = {"model.name": model, "run.log_every": 1}  # dropout 0.5: masks must match too
    trainer(idx_root, tmp_path / "e", **extra).run()
    trainer(idx_root, tmp_path / "c", **extra, **{"train.compile": True}).run()
    assert step_losses(tmp_path / "c") == pytest.approx(step_losses(tmp_path / "e"), rel=1e-5)
