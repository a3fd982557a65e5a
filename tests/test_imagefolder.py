"""Image folders: class lists checked before training, unreadable files named or skipped, and
loader workers that outlive a stop signal sent to the whole process group."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

from alexnet_mp import checkpoint as ckpt
from alexnet_mp.config import DataConfig
from alexnet_mp.data import build_data
from alexnet_mp.errors import UserError
from alexnet_mp.loader import make_loader, set_epoch

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("ant", "bee", "cat")
BAD = "train/bee/1.jpg"  # the file the unreadable-image tests break


def write_folder(root: Path, classes: tuple[str, ...] = CLASSES, per_class: int = 4,
                 val_classes: tuple[str, ...] | None = None) -> Path:
    """train/ and val/ of real 40x40 PNG and JPEG files (odd indices JPEG), random pixels."""
    g = torch.Generator().manual_seed(0)
    for part, names, n in (("train", classes, per_class),
                           ("val", classes if val_classes is None else val_classes, 2)):
        for name in names:
            (root / part / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = torch.randint(0, 256, (40, 40, 3), generator=g, dtype=torch.uint8)
                ext = "jpg" if i % 2 else "png"
                Image.fromarray(pixels.numpy()).save(root / part / name / f"{i}.{ext}")
    return root


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return write_folder(tmp_path / "images")


def corrupt(path: Path) -> None:
    path.write_bytes(b"these bytes are no image format at all\n" * 20)


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def data_of(root: Path):
    # augment: random crops, flips and lighting, drawn per sample by SeededTransform
    return build_data(DataConfig(name="imagefolder", root=str(root), image_size=32,
                                 augment=True), num_classes=len(CLASSES), in_channels=3, seed=0)


def loader_of(dataset, *, num_workers: int, bad_images: str, batch_size: int = 4):
    loader = make_loader(dataset, batch_size=batch_size, shuffle=True, seed=3,
                         num_workers=num_workers, pin_memory=False, bad_images=bad_images)
    set_epoch(loader, 1)
    return loader


@pytest.mark.parametrize("val_classes, named", [
    (("ant", "cat"), "missing from val/: bee"),
    (("ant", "bee", "cat", "dog", "eel", "fox", "gnu", "hen"),
     "extra in val/: dog, eel, fox and 2 more"),
    (("ant", "bee", "dog"), "missing from val/: cat; extra in val/: dog"),
])
def test_train_and_val_must_hold_the_same_classes(tmp_path, val_classes, named):
    root = write_folder(tmp_path / "images", val_classes=val_classes)
    with pytest.raises(UserError) as err:
        data_of(root)
    text = str(err.value)
    assert "\n" not in text
    assert named in text
    assert str(root / "val") in text and "remove" in text

    # Following the fix half-way (an empty folder for a missing class) is still one line
    # naming that class, torchvision's own check; the whole fix makes the set load.
    for extra in set(val_classes) - set(CLASSES):
        shutil.rmtree(root / "val" / extra)
    missing = sorted(set(CLASSES) - set(val_classes))
    for name in missing:
        (root / "val" / name).mkdir()
    if missing:
        with pytest.raises(UserError, match=f"no valid file for the classes {missing[0]}"):
            data_of(root)
        for name in missing:
            write_folder(tmp_path / "donor", classes=(name,))
            shutil.rmtree(root / "val" / name)
            shutil.copytree(tmp_path / "donor" / "val" / name, root / "val" / name)
    assert len(data_of(root).test) == 2 * len(CLASSES)


BREAKS = {"corrupt": (corrupt, BAD), "truncated_jpeg": (truncate, BAD),
          "truncated_png": (truncate, "train/cat/2.png")}


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("how", sorted(BREAKS))
def test_an_unreadable_file_is_recorded_and_named_in_one_line(folder, how, num_workers):
    """The loader itself never raises (the ranks decide together, at a log window's end): it
    records the file, whichever process read it, and data.bad_images=stop's line names it."""
    from alexnet_mp.badimages import stop_error

    breaker, name = BREAKS[how]
    breaker(folder / name)
    data = data_of(folder)
    loader = loader_of(data.train, num_workers=num_workers, bad_images="stop")
    list(loader)
    assert [p for p, _ in loader.bad_files] == [str(folder / name)]
    text = str(stop_error(loader.bad_files))
    # One line: a worker's exception would arrive re-wrapped, with "Caught ... in DataLoader
    # worker process" and the worker's traceback in its text.
    assert "\n" not in text and "worker" not in text
    assert str(folder / name) in text and "data.bad_images=skip" in text


def test_an_unreadable_validation_file_is_recorded(folder):
    corrupt(folder / "val" / "cat" / "1.jpg")
    data = data_of(folder)
    loader = make_loader(data.test, batch_size=4, shuffle=False, seed=0, num_workers=0,
                         pin_memory=False)
    ys = torch.cat([y for _, y in loader])
    assert ys.shape[0] == len(data.test) and (ys == -1).sum() == 1
    assert [p for p, _ in loader.bad_files] == [str(folder / "val" / "cat" / "1.jpg")]


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("how", sorted(BREAKS))
def test_skip_replaces_only_the_unreadable_file_with_a_stand_in(folder, how, num_workers):
    """Every batch keeps its size (so shares read by other ranks stay equal), the unreadable
    file's place holds a black image labelled -1, and every other sample is as before."""
    breaker, name = BREAKS[how]
    good = data_of(folder)  # built before the damage: the expected samples
    breaker(folder / name)
    data = data_of(folder)
    loader = loader_of(data.train, num_workers=num_workers, bad_images="skip")
    bad_index = [p for p, _ in data.train.base.samples].index(str(folder / name))
    order = list(loader.sampler)
    assert bad_index in order

    batches = list(loader)
    assert len(batches) == len(loader) == 3
    good.train.epoch = 1  # the loader's epoch, for the same augmentation draws
    for k, (x, y) in enumerate(batches):
        members = order[4 * k: 4 * k + 4]
        assert x.shape[0] == 4
        for j, i in enumerate(members):
            if i == bad_index:
                # black, shifted per channel at most by PCA lighting: one value a channel
                assert y[j] == -1 and torch.equal(x[j].amax(dim=(1, 2)), x[j].amin(dim=(1, 2)))
            else:
                assert y[j] == good.train[i][1] and torch.equal(x[j], good.train[i][0])
    assert len(loader.bad_files) == 1
    path, reason = loader.bad_files[0]
    assert path == str(folder / name) and reason and "\n" not in reason


def test_skip_keeps_resumed_batches_the_same(folder):
    corrupt(folder / BAD)
    data = data_of(folder)
    loader = loader_of(data.train, num_workers=0, bad_images="skip")
    full = [y for _, y in loader]
    for skip in (1, 2):
        set_epoch(loader, 1, skip)
        assert [y.tolist() for _, y in loader] == [y.tolist() for y in full[skip:]]


def test_a_batch_of_unreadable_images_trains_nothing(folder):
    """Every image of a batch unreadable: all stand-ins, and the training loss over no counted
    example is 0 with no gradient (not 0/0, which would count as a non-finite step)."""
    import torch.nn.functional as F

    for name in ("0.png", "1.jpg", "2.png", "3.jpg"):
        corrupt(folder / "train" / "ant" / name)
    data = data_of(folder)
    loader = make_loader(data.train, batch_size=4, shuffle=False, seed=0, num_workers=0,
                         pin_memory=False, bad_images="skip")
    x, y = next(iter(loader))
    assert y.tolist() == [-1] * 4 and len(loader.bad_files) == 4
    logits = torch.randn(4, 3, requires_grad=True)
    seen = (y != -1).sum().float()
    loss = F.cross_entropy(logits, y, ignore_index=-1, reduction="sum") / seen.clamp(min=1)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros(4, 3))


def _tensor_loader(num_workers: int):
    data = TensorDataset(torch.arange(40, dtype=torch.float32).view(40, 1), torch.arange(40))
    return make_loader(data, batch_size=2, shuffle=False, seed=0, num_workers=num_workers,
                       pin_memory=False)


def test_loader_workers_survive_a_stop_signal_from_another_process():
    loader = _tensor_loader(num_workers=2)
    it = iter(loader)
    seen = next(it)[1].tolist()
    workers = list(it._workers)
    pids = [str(w.pid) for w in workers]
    # From another process, as SLURM or a terminal sends it (the loader's own process sends
    # SIGTERM only to end its workers).
    send = ("import os, signal, sys\n"
            "for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):\n"
            "    for pid in sys.argv[1:]:\n"
            "        os.kill(int(pid), sig)\n")
    subprocess.run([sys.executable, "-c", send, *pids], check=True, timeout=60)
    # 19 batches are still to come and at most 4 are prefetched, so both workers must go on
    # working after the signals reached them; a dead worker fails the DataLoader's next fetch.
    for _, y in it:
        seen += y.tolist()
    assert seen == list(range(40))
    for w in workers:  # the loader's shutdown has asked them to exit: 0, not killed by a signal
        w.join(timeout=60)
    assert [w.exitcode for w in workers] == [0, 0]


GROUP_SCRIPT = textwrap.dedent("""
    import signal, sys
    import torch
    from torch.utils.data import TensorDataset
    from alexnet_mp.loader import make_loader

    got = []
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: got.append(signum))
    data = TensorDataset(torch.arange(40, dtype=torch.float32).view(40, 1), torch.arange(40))
    loader = make_loader(data, batch_size=2, shuffle=False, seed=0, num_workers=2,
                         pin_memory=False)
    it = iter(loader)
    # The workers have just been started: the signals reach them while they still set up.
    print("ready", flush=True)
    sys.stdin.readline()  # the test has signalled the whole group
    seen = [v for _ in range(11) for v in next(it)[1].tolist()]
    print(seen, sorted(got), flush=True)
    # `it` stays referenced at exit, as it does when a traceback holds it: multiprocessing
    # then terminates the daemonic workers and joins them without a timeout.
""")


def test_process_group_stop_signal_then_exit_with_a_live_loader(tmp_path):
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-c", GROUP_SCRIPT], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path, env=env, start_new_session=True)
    try:
        if not select.select([proc.stdout], [], [], 120)[0] or proc.stdout.readline() != "ready\n":
            proc.kill()
            pytest.fail(f"the process did not get ready: {proc.communicate()[1]}")
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            os.killpg(proc.pid, sig)
        out, err = proc.communicate("go\n", timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("the process did not exit within 120 s: a loader worker ignored the "
                    "SIGTERM that ends it at exit")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err
    signals = sorted(int(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP))
    assert out.splitlines()[-1] == f"{list(range(22))} {signals}"


@pytest.mark.slow
def test_the_small_folder_config_trains_on_a_folder_of_small_images(tmp_path):
    from conftest import ROOT, run_cli, write_shapes_folder

    root = write_shapes_folder(tmp_path / "shapes", per_class=8)
    run = tmp_path / "r"
    proc = run_cli(["--config", str(ROOT / "configs" / "small_folder.yaml"), f"data.root={root}",
                    f"run.dir={run}", "train.max_steps=3", "train.batch_size=8",
                    "data.num_workers=0", "run.progress=false", "run.threads=1"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert ckpt.load(run / "checkpoints" / "last.pt")["data"]["classes"] == [
        "cross", "disc", "square"]


@pytest.mark.parametrize("hflip", [True, False])
def test_hflip_decides_whether_augmentation_mirrors(hflip):
    from torchvision.transforms import v2

    from alexnet_mp.data import _transforms

    for name in ("imagefolder", "cifar10"):
        train_tf, _ = _transforms(DataConfig(name=name, augment=True, hflip=hflip))
        flips = [t for t in train_tf.transforms if isinstance(t, v2.RandomHorizontalFlip)]
        assert bool(flips) == hflip, name


def _sharded_run(folder: Path, run: Path, *extra: str) -> subprocess.CompletedProcess:
    """Two ranks that read different shares of each batch (``extra`` picks the layout)."""
    from conftest import run_cli

    return run_cli([f"data.root={folder}", "data.name=imagefolder", "data.image_size=67",
                    "data.num_workers=0", "model.num_classes=3", "model.in_channels=3",
                    "model.width=0.125", "model.init=xavier", "train.batch_size=4",
                    "train.epochs=1", f"run.dir={run}", "run.progress=false", "run.threads=1",
                    "run.timeout_s=60", *extra], torchrun=2)


def _first_file_of(folder: Path, replica: int, split: str = "train") -> Path:
    """The first file replica ``replica`` of 2 reads in epoch 0 of a run's loader (in a batch
    of two)."""
    from alexnet_mp.config import load_config

    data = data_of(folder)
    dataset = data.train if split == "train" else data.test
    loader = make_loader(dataset, batch_size=2, shuffle=split == "train",
                         seed=load_config(None, []).train.seed, num_workers=0,
                         pin_memory=False, replicas=2, replica=replica)
    set_epoch(loader, 0)
    samples = dataset.base.samples if split == "train" else dataset.samples  # val: no augment
    return Path(samples[next(iter(loader.sampler))][0])


@pytest.mark.parametrize("layout", [
    ("model.name=alexnet_grouped",),
    # the hybrid trunk reads shares as replicas do; loader workers raise in another process
    ("model.name=alexnet_columns", "parallel.layout=hybrid", "data.num_workers=2"),
], ids=["replicas", "hybrid-with-workers"])
@pytest.mark.slow
def test_a_bad_image_on_one_replica_stops_every_replica_with_its_name(folder, tmp_path, layout):
    """Replicas read different shares: rank 1 meets the file, rank 0 never reads it, yet rank 0
    names it, and neither waits in the step's collectives for the other (both learn of it
    with the log window's figures)."""
    bad = _first_file_of(folder, replica=1)
    corrupt(bad)
    proc = _sharded_run(folder, tmp_path / "r", *layout)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(bad) in errors[0], proc.stderr[-3000:]
    assert "data.bad_images=skip" in errors[0]
    assert "exitcode  : 2" in proc.stderr and "lost" not in proc.stderr


@pytest.mark.slow
def test_skip_on_the_hybrid_layout_trains_and_counts_every_readable_image(folder, tmp_path):
    """Hybrid ranks gather each other's trunk features, so every share must have the same rows:
    the unreadable files' stand-ins keep them equal and are not scored, and rank 0's log names
    the files every rank left out."""
    bad_train = _first_file_of(folder, replica=1)
    bad_val = _first_file_of(folder, replica=1, split="val")
    corrupt(bad_train)
    corrupt(bad_val)
    run = tmp_path / "r"
    proc = _sharded_run(folder, run, "model.name=alexnet_columns", "parallel.layout=hybrid",
                        "data.bad_images=skip")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epoch = [r for r in records if r["kind"] == "epoch"][-1]
    assert epoch["test_images"] == 2 * len(CLASSES) - 1
    named = {f for r in records if r["kind"] == "bad_images" for f in r["files"]}
    assert named == {str(bad_train), str(bad_val)}  # both read by rank 1 only
