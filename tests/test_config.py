"""Config: YAML plus overrides, typed, and every mistake named in one line."""

from __future__ import annotations

import re

import pytest
from conftest import ROOT

from alexnet_mp.config import load_config
from alexnet_mp.errors import UserError

DEFAULT = ROOT / "configs" / "default.yaml"


def test_default_is_the_two_column_model_on_the_offline_sample():
    cfg = load_config(None, default_path=DEFAULT)
    assert cfg.model.name == "alexnet_columns"
    assert cfg.data.name == "mnist_sample"
    assert cfg.name == "default"


def test_overrides_are_typed_by_yaml_and_win_over_the_file():
    cfg = load_config(None, ["train.lr=0.02", "train.max_steps=7", "run.progress=false",
                             "train.momentum=0", "run.dir=/tmp/x"], default_path=DEFAULT)
    assert cfg.train.lr == 0.02 and isinstance(cfg.train.lr, float)
    assert cfg.train.max_steps == 7
    assert cfg.run.progress is False
    assert cfg.train.momentum == 0.0 and isinstance(cfg.train.momentum, float)
    assert cfg.run.dir == "/tmp/x"


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.name == path.stem


@pytest.mark.parametrize("override, words", [
    ("train.lrr=0.1", ["train.lrr", "did you mean 'train.lr'"]),
    ("trian.lr=0.1", ["trian", "did you mean 'train'"]),
    ("train.batch_size=abc", ["train.batch_size", "integer"]),
    ("train.batch_size=0", ["train.batch_size", "positive"]),
    ("train.lr=-1", ["train.lr", "positive"]),
    ("model.name=vgg", ["model.name", "alexnet_columns"]),
    ("data.name=imagenet22k", ["data.name", "mnist_sample"]),
    ("run.progress=maybe", ["run.progress", "true or false"]),
    ("lr=0.1", ["section.key"]),
    ("train.lr", ["section.key=value"]),
    ("model.dropout=1.5", ["model.dropout"]),
    ("run.keep_checkpoints=1", ["run.keep_checkpoints", "at least 2"]),
    ("run.startup_timeout_s=0", ["run.startup_timeout_s", "positive"]),
])
def test_bad_overrides_name_the_key_and_the_fix(override, words):
    with pytest.raises(UserError) as err:
        load_config(None, [override], default_path=DEFAULT)
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_yaml_with_python_tags_is_refused(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("train: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(UserError, match="not plain YAML"):
        load_config(evil)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_unknown_key_in_file_is_named_with_its_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epocs: 3\n")
    with pytest.raises(UserError, match="did you mean 'train.epochs'"):
        load_config(bad)


def test_numbers_in_scientific_notation_parse(tmp_path):
    cfg = load_config(None, ["train.lr=1e-3", "train.weight_decay=5E-4"])
    assert cfg.train.lr == 0.001 and cfg.train.weight_decay == 0.0005
    path = tmp_path / "sci.yaml"
    path.write_text("train:\n  lr: 1e-3\n  weight_decay: 5e-4\n  momentum: .9\n")
    cfg = load_config(path)
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.momentum) == (0.001, 0.0005, 0.9)
    with pytest.raises(UserError, match="'train.lr' must be a number, got 'fast'"):
        load_config(None, ["train.lr=fast"])
    with pytest.raises(UserError, match="'train.lr' must be a finite number"):
        load_config(None, ["train.lr=.inf"])


@pytest.mark.parametrize("text, words", [
    ("train:\n  lr: 0.1\n  lr: 0.2\n", "has the key 'lr' twice (lines 2 and 3)"),
    ("train:\n  lr: 0.1\nrun:\n  log_every: 5\ntrain:\n  epochs: 2\n",
     "has the section 'train' twice (lines 1 and 5)"),
])
def test_duplicate_keys_and_sections_are_refused(tmp_path, text, words):
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=re.escape(words)):
        load_config(path)


def test_the_resume_key_lists_name_real_keys():
    """A renamed key must not silently fall out of the keys fixed on resume."""
    from alexnet_mp.config import FIXED_ON_RESUME, SILENT_ON_RESUME, Config, _flat

    keys = set(_flat(Config().to_dict()))
    assert set(FIXED_ON_RESUME) <= keys and set(SILENT_ON_RESUME) <= keys
