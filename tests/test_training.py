"""The loop, the run folder and exact resume, on one device in this process."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import one_process_layout, small_overrides

from alexnet_mp import checkpoint as ckpt
from alexnet_mp.config import load_config
from alexnet_mp.errors import UserError
from alexnet_mp.run import Trainer


def train(idx_root, run_dir, **extra) -> Trainer:
    cfg = load_config(None, small_overrides(idx_root, run_dir, **extra))
    trainer = Trainer(cfg, one_process_layout(cfg.model.name))
    trainer.run()
    return trainer


def params(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.named_parameters()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


@pytest.mark.slow
@pytest.mark.parametrize("model", ["alexnet_d2l", "alexnet_columns"])
def test_two_epochs_equal_one_plus_resume_plus_one(idx_root, tmp_path, model):
    straight = train(idx_root, tmp_path / "a", **{"model.name": model, "train.epochs": 2})
    train(idx_root, tmp_path / "b", **{"model.name": model, "train.epochs": 1})
    resumed = train(idx_root, tmp_path / "b", **{"model.name": model, "train.epochs": 2})
    assert resumed.state.epoch == 2 and resumed.state.global_step == 12
    assert_same(params(straight), params(resumed))
    # Momentum is part of the state too: the next step would differ without it.
    for p, q in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(straight.optimizer.state[p]["momentum_buffer"],
                           resumed.optimizer.state[q]["momentum_buffer"])


@pytest.mark.parametrize("model", ["alexnet_d2l", "alexnet_columns"])
def test_mid_epoch_resume_is_exact(idx_root, tmp_path, model):
    straight = train(idx_root, tmp_path / "a", **{"model.name": model})
    stopped = train(idx_root, tmp_path / "b", **{"model.name": model, "train.max_steps": 4})
    assert stopped.state.step == 4 and stopped.state.epoch == 0
    resumed = train(idx_root, tmp_path / "b", **{"model.name": model})
    assert resumed.state.global_step == 6
    assert_same(params(straight), params(resumed))


def test_run_folder_holds_config_metrics_curves_and_checkpoints(idx_root, tmp_path):
    run = tmp_path / "run"
    trainer = train(idx_root, run, **{"train.epochs": 2, "run.checkpoint_every": 2})
    saved = load_config(run / "config.yaml")
    assert saved.train.epochs == 2 and saved.model.width == 0.125
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert {"train_loss", "train_acc", "test_acc", "test_top5", "images_per_s"} <= epochs[0].keys()
    assert any(r["kind"] == "step" for r in records)
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    files = ckpt.step_files(run / "checkpoints")
    assert len(files) == 2  # run.keep_checkpoints prunes the older ones
    last = ckpt.load(run / "checkpoints" / "last.pt")
    assert last["train"]["global_step"] == trainer.state.global_step == 12
    assert (run / "checkpoints" / "best.pt").is_file()
    # The checkpoint carries the resolved config and the canonical (grouped) tensors.
    assert last["config"]["model"]["width"] == 0.125
    assert last["model"]["conv2.weight"].shape[0] == 2 * trainer.model.arch.per_column[1]


def test_training_learns_the_fixture(idx_root, tmp_path):
    trainer = train(idx_root, tmp_path / "r", **{"train.epochs": 8, "model.dropout": 0.0,
                                              "model.init": "kaiming"})
    final = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    first, last = final[0]["loss"], final[-1]["train_loss"]
    assert last < first / 2
    assert trainer.state.best_acc >= 0.5


def test_foreign_checkpoint_is_refused_in_one_line(idx_root, tmp_path):
    d2l = train(idx_root, tmp_path / "d2l", **{"model.name": "alexnet_d2l",
                                               "train.max_steps": 1})
    last = d2l.out / "checkpoints" / "last.pt"
    with pytest.raises(UserError, match="holds alexnet_d2l, but this run builds alexnet_columns"):
        train(idx_root, tmp_path / "x", **{"train.resume": str(last)})
    cols = train(idx_root, tmp_path / "c", **{"train.max_steps": 1})
    with pytest.raises(UserError, match=r"'conv1.weight' is \(12, 1, 11, 11\) there"):
        train(idx_root, tmp_path / "y", **{"train.resume": str(cols.out / "checkpoints" /
                                                                "last.pt"), "model.width": 0.25})


def test_resume_none_never_overwrites(idx_root, tmp_path):
    train(idx_root, tmp_path / "r", **{"train.max_steps": 2})
    before = {p.name: p.read_bytes() for p in ckpt.step_files(tmp_path / "r" / "checkpoints")}
    with pytest.raises(UserError, match="would overwrite"):
        train(idx_root, tmp_path / "r", **{"train.resume": "none"})
    after = {p.name: p.read_bytes() for p in ckpt.step_files(tmp_path / "r" / "checkpoints")}
    assert before == after


def test_eval_only_reproduces_the_last_epochs_test_accuracy(idx_root, tmp_path):
    run = tmp_path / "r"
    trained = train(idx_root, run, **{"train.epochs": 2, "model.init": "kaiming"})
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    last_epoch = [r for r in records if r["kind"] == "epoch"][-1]
    cfg = load_config(None, small_overrides(idx_root, run, **{"train.epochs": 2,
                                                              "model.init": "kaiming",
                                                              "train.eval_only": True}))
    result = Trainer(cfg, one_process_layout(cfg.model.name)).run()
    assert result["test_acc"] == last_epoch["test_acc"]
    assert result["test_loss"] == pytest.approx(last_epoch["test_loss"], rel=1e-6)
    assert trained.state.global_step == 12


def test_a_matplotlib_that_does_not_import_costs_the_figure_not_the_run(
        idx_root, tmp_path, monkeypatch, capsys):
    """matplotlib is imported when rank 0 first draws, mid-run: failing there ends nothing."""
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises
    run = tmp_path / "run"
    train(idx_root, run)
    assert ckpt.load(run / "checkpoints" / "last.pt")["train"]["epoch"] == 1
    assert not (run / "curves.png").exists()
    assert "matplotlib does not import" in capsys.readouterr().err
