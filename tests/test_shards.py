"""Prepared shards: the same examples as their folder, damage named in one line, a resumable
conversion, unreadable files reported once, exact resume, the batched transform, replica shares.

Images are stored as JPEG (quality 90, chroma halved), so shard pixels equal the folder's only
within JPEG tolerance: on these test images, whose backgrounds are white noise (what JPEG keeps
worst), a mean absolute difference under 10 of 255 per image and every pixel within 80; two
different images of the set differ by far more (checked). Labels and class names are equal.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import one_process_layout, run_cli, write_shapes_folder

from alexnet_mp import checkpoint as ckpt
from alexnet_mp.config import DataConfig, load_config
from alexnet_mp.data import BatchTransform, build_data
from alexnet_mp.device_decode import ShardSample, collate_samples, crop, decode
from alexnet_mp.errors import UserError
from alexnet_mp.lighting import EIGVAL, EIGVEC
from alexnet_mp.loader import make_loader, set_epoch
from alexnet_mp.prepare import prepare
from alexnet_mp.run import Trainer
from alexnet_mp.shardset import MANIFEST, ShardDataset, ShardView

SIZE = 67  # the input; the image-folder path scales to round(67 * 256 / 227) = 76 first
SCALED = 76
MEAN_TOL, MAX_TOL = 10.0, 80


def _prepare(folder: Path, out: Path, **kw) -> dict:
    kw = {"per_shard": 5, "short_side": SCALED, "workers": 0, "show_bar": False,
          "say": lambda s: None, **kw}
    return prepare(folder, out, **kw)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("shards")
    folder = write_shapes_folder(tmp / "folder", per_class=8)
    _prepare(folder, tmp / "out")
    return folder, tmp / "out"


def data_cfg(name: str, root: Path, **kw) -> DataConfig:
    return DataConfig(name=name, root=str(root), image_size=SIZE, **kw)


def _sets(cfg: DataConfig, seed: int = 0):
    return build_data(cfg, num_classes=3, in_channels=3, seed=seed)


def close_pixels(a: torch.Tensor, b: torch.Tensor) -> bool:
    diff = (a.float() - b.float()).abs()
    return a.shape == b.shape and bool(diff.mean() < MEAN_TOL and diff.max() <= MAX_TOL)


def test_a_folder_and_its_shards_give_the_same_examples(prepared):
    folder, out = prepared
    images = _sets(data_cfg("imagefolder", folder))
    shards = _sets(data_cfg("shards", out))
    assert shards.names == images.names == ["cross", "disc", "square"]
    assert (len(shards.train), len(shards.test)) == (len(images.train), len(images.test)) == (24, 6)
    for i in range(len(images.test)):
        want, label = images.test[i]
        got, shard_label = shards.test[i]
        assert shard_label == label
        assert close_pixels(got.image, want)
        assert not close_pixels(got.image, images.test[(i + 1) % len(images.test)][0])


def test_augmented_training_examples_are_the_same_draws(prepared):
    """Crop offsets, mirror and lighting come from the same seeded draws as the folder's."""
    folder, out = prepared
    images = _sets(data_cfg("imagefolder", folder, augment=True), seed=3)
    shards = _sets(data_cfg("shards", out, augment=True), seed=3)
    norm = BatchTransform(SIZE, (0.0,) * 3, (1.0,) * 3)
    flips = 0
    for epoch in (0, 1):
        images.train.epoch = shards.train.epoch = epoch
        for i in range(len(images.train)):
            want, label = images.train[i]
            sample, shard_label = shards.train[i]
            flips += sample.flip
            assert shard_label == label and sample.rgb is not None
            got = norm(collate_samples([sample]))[0]
            assert close_pixels(got * 255, want * 255)
    assert 0 < flips < 48, "every draw mirrored alike: the flip is not tested"


@pytest.mark.slow
def test_a_damaged_shard_is_one_line_naming_the_file(prepared, tmp_path):
    out = tmp_path / "out"
    _prepare(prepared[0], out)
    shard = out / "train" / "shard-00001.bin"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    proc = run_cli(["model.name=alexnet_grouped", "model.width=0.125", "model.in_channels=3",
                    "model.num_classes=3", "data.name=shards", f"data.root={out}",
                    f"data.image_size={SIZE}", "data.num_workers=2", "train.batch_size=8",
                    f"run.dir={tmp_path / 'run'}", "run.progress=false", "run.threads=1"])
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert str(shard) in lines[0] and "crc32" in lines[0] and "prepare_data.py" in lines[0]


@pytest.mark.parametrize("damage", ["truncated", "missing", "index", "manifest"])
def test_damage_found_before_training_is_one_line_naming_the_file(prepared, tmp_path, damage):
    out = tmp_path / "out"
    _prepare(prepared[0], out)
    target = {"truncated": out / "val" / "shard-00000.bin",
              "missing": out / "val" / "shard-00001.bin",
              "index": out / "val" / "index.bin", "manifest": out / MANIFEST}[damage]
    if damage == "missing":
        target.unlink()
    else:
        target.write_bytes(target.read_bytes()[:-7])
    with pytest.raises(UserError) as err:
        _sets(data_cfg("shards", out))
    text = str(err.value)
    assert "\n" not in text and str(target) in text and "prepare_data.py" in text, text


@pytest.mark.slow
def test_an_interrupted_conversion_resumes_to_the_same_result(prepared, tmp_path):
    folder, good = prepared
    out = tmp_path / "out"
    first = _prepare(folder, out)
    # What an interruption leaves: a shard cut short, one never entered in the manifest, a
    # half-written temporary file, and a manifest not marked complete.
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["complete"] = False
    manifest["splits"]["train"]["shards"][2] = None
    (out / MANIFEST).write_text(json.dumps(manifest))
    truncated = out / "train" / "shard-00001.bin"
    truncated.write_bytes(truncated.read_bytes()[:100])
    (out / "train" / ".shard-00003.bin.tmp").write_bytes(b"half")
    with pytest.raises(UserError, match="did not finish"):
        ShardDataset(out, "train")
    lines = []
    again = _prepare(folder, out, workers=2, say=lines.append)
    shards = again["splits"]["train"]["shards"]
    assert [s["kept"] for s in shards] == [True, False, False, True, True]
    assert "5 intact shard(s) kept" in lines[0]  # train's 0, 3, 4 and both of val's
    for split in ("train", "val"):
        assert ([s["sha256"] for s in again["splits"][split]["shards"]]
                == [s["sha256"] for s in first["splits"][split]["shards"]])
        assert again["splits"][split]["index_sha256"] == first["splits"][split]["index_sha256"]
    assert not list((out / "train").glob(".*.tmp"))
    assert ShardDataset(out, "train").index.tolist() == ShardDataset(good, "train").index.tolist()


def test_unreadable_files_are_reported_once_and_left_out(tmp_path, capsys):
    folder = write_shapes_folder(tmp_path / "folder", per_class=4)
    (folder / "train" / "disc" / "broken.png").write_bytes(b"not a png")
    (folder / "val" / "cross" / "cut.png").write_bytes(
        (folder / "val" / "cross" / "0000.png").read_bytes()[:60])
    manifest = prepare(folder, tmp_path / "out", per_shard=5, short_side=SCALED, workers=0,
                       show_bar=False)
    said = capsys.readouterr().out + capsys.readouterr().err
    for bad in ("train/disc/broken.png", "val/cross/cut.png"):
        assert said.count(bad) == 1, said
    assert sorted(rel for rel, _ in manifest["unreadable"]) == ["train/disc/broken.png",
                                                                "val/cross/cut.png"]
    assert "2 unreadable file(s) left out" in said
    data = _sets(data_cfg("shards", tmp_path / "out"))
    assert (len(data.train), len(data.test)) == (12, 3)  # the readable ones
    # A re-run keeps the shards and does not name the files again; the manifest still does.
    again = prepare(folder, tmp_path / "out", per_shard=5, short_side=SCALED, workers=0,
                    show_bar=False)
    said = capsys.readouterr().out
    assert "broken.png" not in said.replace("listed in", "")
    assert len(again["unreadable"]) == 2


def test_bad_input_is_one_line(tmp_path):
    (tmp_path / "only" / "train" / "a").mkdir(parents=True)
    with pytest.raises(UserError, match="has no val/ folder"):
        _prepare(tmp_path / "only", tmp_path / "out")
    folder = write_shapes_folder(tmp_path / "folder", per_class=1)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError, match="cannot write to OUT"):
        _prepare(folder, blocker / "out")


def _trainer(out: Path, run: Path, **extra) -> Trainer:
    values = {"model.name": "alexnet_grouped", "model.width": 0.125, "model.init": "xavier",
              "model.in_channels": 3, "model.num_classes": 3, "data.name": "shards",
              "data.root": str(out), "data.image_size": SIZE, "data.augment": True,
              "train.batch_size": 8, "train.epochs": 2, "train.lr": 0.02, "run.dir": str(run),
              "run.progress": False, "run.log_every": 1, "run.threads": 1, **extra}
    cfg = load_config(None, [f"{k}={v}" for k, v in values.items()])
    return Trainer(cfg, one_process_layout(cfg.model.name))


def test_resume_on_shards_is_exact(prepared, tmp_path):
    _, out = prepared
    _trainer(out, tmp_path / "straight").run()
    # Three steps an epoch: stopped after the first step of the second epoch.
    _trainer(out, tmp_path / "resumed", **{"train.max_steps": 4}).run()
    resumed = _trainer(out, tmp_path / "resumed")
    assert (resumed.state.epoch, resumed.state.step) == (1, 1)
    resumed.run()
    a = ckpt.load(tmp_path / "straight" / "checkpoints" / "last.pt")["model"]
    b = ckpt.load(tmp_path / "resumed" / "checkpoints" / "last.pt")["model"]
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _reference(sample: ShardSample, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    img = crop(decode(sample.data), sample.box).float() / 255
    if sample.flip:
        img = img.flip(-1)
    if sample.rgb is not None:
        img = (img + torch.tensor(sample.rgb).view(3, 1, 1)).clamp(0, 1)
    return (img - mean.view(3, 1, 1)) / std.view(3, 1, 1)


@pytest.mark.parametrize("in_loader", [False, True], ids=["bytes", "decoded-in-loader"])
def test_the_batched_transform_equals_a_per_image_reference(prepared, in_loader):
    _, out = prepared
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    view = ShardView(SIZE, random=True, hflip=True, lighting=(EIGVAL, EIGVEC), decode=False)
    data = ShardDataset(out, "train", view)
    torch.manual_seed(0)
    samples = [data[i][0] for i in range(len(data))]
    assert {s.flip for s in samples} == {False, True}
    assert len({s.box[:2] for s in samples}) > 1
    want = torch.stack([_reference(s, torch.tensor(mean), torch.tensor(std)) for s in samples])
    if in_loader:
        for s in samples:
            s.image, s.data = crop(decode(s.data), s.box).contiguous(), None
    got = BatchTransform(SIZE, mean, std)(collate_samples(samples).to("cpu"))
    assert got.shape == (len(data), 3, SIZE, SIZE)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_replica_shares_partition_the_records(prepared):
    _, out = prepared
    read: list[list[int]] = [[], []]
    seen = []
    for replica in (0, 1):
        data = ShardDataset(out, "train", ShardView(SIZE))
        real = data.read
        data.read = lambda i, real=real, mine=read[replica]: (mine.append(i), real(i))[1]
        loader = make_loader(data, batch_size=4, shuffle=True, seed=0, num_workers=0,
                             pin_memory=False, replicas=2, replica=replica)
        set_epoch(loader, 1)
        labels = torch.cat([y for _, y in loader])
        assert labels.tolist() == [data.targets[i] for i in read[replica]]
        seen.append(set(read[replica]))
    assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(range(24))


def test_a_shards_checkpoint_evaluates_with_ten_crops_and_predicts(prepared, tmp_path):
    from alexnet_mp import inference

    folder, out = prepared
    _trainer(out, tmp_path / "run", **{"train.epochs": 1}).run()
    path = tmp_path / "run" / "checkpoints" / "last.pt"
    loaded = inference.load(path, lambda cfg: one_process_layout(cfg.model.name))
    assert loaded.info.name == "shards" and loaded.info.classes == ["cross", "disc", "square"]
    for ten in (False, True):
        result = inference.evaluate_checkpoint(loaded, ten_crop=ten)
        assert result["images"] == 6 and result["split"] == "val" and result["ten_crop"] == ten
    image = folder / "val" / "disc" / "0000.png"
    predicted = inference.predict(loaded, [image], top=3, ten_crop=True)
    assert [t["class"] for t in predicted[0]["top"]] != []
    assert sorted(t["class"] for t in predicted[0]["top"]) == ["cross", "disc", "square"]


def test_a_loader_worker_pickles_no_open_file(prepared):
    import pickle

    _, out = prepared
    data = ShardDataset(out, "val", ShardView(SIZE))
    data[0]
    assert data._fds
    clone = pickle.loads(pickle.dumps(data))
    assert clone._fds == {} and torch.equal(clone[0][0].image, data[0][0].image)


def test_loader_workers_hand_over_the_same_batches(prepared):
    """Bytes from two worker processes, transformed in this one, equal the in-process path."""
    _, out = prepared
    data = build_data(data_cfg("shards", out, augment=True), num_classes=3, in_channels=3,
                      seed=1, device="cuda")  # only decides that the loader hands over bytes
    transform = BatchTransform(SIZE, data.mean, data.std)
    batches = []
    for workers in (0, 2):
        loader = make_loader(data.train, batch_size=8, shuffle=True, seed=1,
                             num_workers=workers, pin_memory=False)
        set_epoch(loader, 2)
        batches.append(torch.cat([transform(x.to("cpu")) for x, _ in loader]))
    assert batches[0].shape == (24, 3, SIZE, SIZE)
    assert torch.equal(batches[0], batches[1])


def test_a_full_disk_is_one_line_and_the_rerun_finishes(prepared, tmp_path, monkeypatch):
    import errno

    import alexnet_mp.prepare as prep

    folder, good = prepared
    real, writes = prep._fsync_write, []

    def full_after_two(path, chunks):
        writes.append(path)
        if len(writes) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, chunks)

    monkeypatch.setattr(prep, "_fsync_write", full_after_two)
    with pytest.raises(UserError) as err:
        _prepare(folder, tmp_path / "out")
    assert "no space left" in str(err.value) and "\n" not in str(err.value)
    monkeypatch.setattr(prep, "_fsync_write", real)
    again = _prepare(folder, tmp_path / "out", per_shard=5)
    assert again["complete"]
    assert ShardDataset(tmp_path / "out", "val").index.tolist() == ShardDataset(
        good, "val").index.tolist()


def test_fewer_larger_shards_replace_the_old_ones(prepared, tmp_path):
    folder, _ = prepared
    out = tmp_path / "out"
    _prepare(folder, out)
    assert len(list((out / "train").glob("shard-*.bin"))) == 5
    _prepare(folder, out, per_shard=100)
    assert sorted(p.name for p in (out / "train").glob("shard-*")) == ["shard-00000.bin",
                                                                      "shard-00000.idx"]
    assert len(ShardDataset(out, "train")) == 24


@pytest.mark.slow
def test_the_input_path_bench_measures_every_arm_on_imagenet_sized_photos(tmp_path):
    from PIL import Image

    from alexnet_mp.bench.inputs import ARMS, input_path_bench, input_path_markdown
    from alexnet_mp.config import Config

    result = input_path_bench(Config(), tmp_path, files=16, rounds=1, batch=8, min_seconds=0,
                              say=lambda s: None)
    sizes = {Image.open(p).size for p in (tmp_path / "photos" / "train").rglob("*.jpg")}
    assert sizes <= {(500, 375), (375, 500)} and (500, 375) in sizes
    assert result["images"] == 16 and all(len(result["rounds"][arm]) == 1 for arm in ARMS)
    assert all(v > 0 for v in result["median"].values())
    assert result["storage"]["raw_over_jpeg"] > 1
    assert "bytes only" in input_path_markdown(result)
