"""Data: torchvision reads our IDX files; the offline sample's split; same batches per seed."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from alexnet_mp.config import DataConfig
from alexnet_mp.data import BatchTransform, build_data, mnist_sample
from alexnet_mp.errors import UserError
from alexnet_mp.loader import make_loader, set_epoch


def test_torchvision_mnist_reads_the_fixture(idx_root):
    data = build_data(DataConfig(name="mnist", root=str(idx_root), image_size=67),
                      num_classes=10, in_channels=1, seed=0)
    assert len(data.train) == 48 and len(data.test) == 16
    x, y = data.train[3]
    assert x.dtype == torch.uint8 and x.shape == (1, 28, 28) and y == 3
    # Class 3's bar lies in rows 8-9, as the fixture wrote it.
    assert x[0, 8:10, 4:24].min() == 255


def test_batch_transform_resizes_and_normalises():
    t = BatchTransform(67, (0.5,), (0.25,))
    out = t(torch.full((2, 1, 28, 28), 255, dtype=torch.uint8))
    assert out.shape == (2, 1, 67, 67)
    assert torch.allclose(out, torch.full_like(out, 2.0))


@pytest.mark.slow
def test_mnist_sample_is_a_stratified_4000_1000_split_cached(tmp_path):
    train, test = mnist_sample(tmp_path)
    assert len(train) == 4000 and len(test) == 1000
    assert torch.bincount(test.tensors[1]).tolist() == [100] * 10
    assert (tmp_path / "mnist_sample" / "split-v2.pt").is_file()
    again_train, again_test = mnist_sample(tmp_path)  # from the cache
    assert torch.equal(again_test.tensors[0], test.tensors[0])
    assert torch.equal(again_train.tensors[1], train.tensors[1])


def test_same_seed_same_batches_and_mid_epoch_skip(idx_root):
    data = build_data(DataConfig(name="mnist", root=str(idx_root)), num_classes=10,
                      in_channels=1, seed=0)

    def batches(skip: int = 0, epoch: int = 1) -> list[torch.Tensor]:
        loader = make_loader(data.train, batch_size=8, shuffle=True, seed=5, num_workers=0,
                             pin_memory=False)
        set_epoch(loader, epoch, skip)
        return [y for _, y in loader]

    full = batches()
    assert [torch.equal(a, b) for a, b in zip(full, batches())] == [True] * len(full)
    assert all(torch.equal(a, b) for a, b in zip(full[2:], batches(skip=2)))
    assert len(batches(skip=2)) == len(full) - 2
    assert not all(torch.equal(a, b) for a, b in zip(full, batches(epoch=2)))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_the_bad_image_checks_leave_tensor_batches_as_they_were(idx_root, num_workers):
    data = build_data(DataConfig(name="mnist", root=str(idx_root)), num_classes=10,
                      in_channels=1, seed=0)
    loader = make_loader(data.train, batch_size=8, shuffle=True, seed=5,
                         num_workers=num_workers, pin_memory=False, bad_images="skip")
    set_epoch(loader, 1)
    plain = DataLoader(data.train, batch_size=8, sampler=loader.sampler)
    pairs = list(zip(loader, plain, strict=True))
    assert len(pairs) == len(loader) == 6
    for (x, y), (px, py) in pairs:
        assert torch.equal(x, px) and torch.equal(y, py)
    assert loader.bad_files == []


def test_missing_data_says_where_to_put_it(tmp_path):
    with pytest.raises(UserError) as err:
        build_data(DataConfig(name="mnist", root=str(tmp_path)), num_classes=10,
                   in_channels=1, seed=0)
    assert "MNIST/raw/train-images-idx3-ubyte" in str(err.value)
    assert "mnist_sample" in str(err.value)
    with pytest.raises(UserError, match="train/<class>/<image>"):
        build_data(DataConfig(name="imagefolder", root=str(tmp_path)), num_classes=10,
                   in_channels=3, seed=0)


def test_model_and_data_must_agree(idx_root):
    with pytest.raises(UserError, match="set model.in_channels=1"):
        build_data(DataConfig(name="mnist", root=str(idx_root)), num_classes=10,
                   in_channels=3, seed=0)
    with pytest.raises(UserError, match="set model.num_classes=10"):
        build_data(DataConfig(name="mnist", root=str(idx_root)), num_classes=5,
                   in_channels=1, seed=0)


def test_fake_and_imagefolder_sets(tmp_path):
    from PIL import Image

    fake = build_data(DataConfig(name="fake", image_size=70, fake_size=8), num_classes=3,
                      in_channels=3, seed=0)
    assert fake.train[0][0].shape == (3, 70, 70) and len(fake.test) == 2
    for part in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / part / cls).mkdir(parents=True)
            Image.new("RGB", (90, 80), (10, 200, 30)).save(tmp_path / part / cls / "a.png")
    folder = build_data(DataConfig(name="imagefolder", root=str(tmp_path), image_size=67,
                                   augment=True), num_classes=2, in_channels=3, seed=0)
    x, y = folder.train[1]
    assert x.shape == (3, 67, 67) and x.dtype == torch.float32 and y == 1
    assert folder.test[0][0].shape == (3, 67, 67)


def test_loader_workers_are_not_forked_from_the_training_process():
    """A rank has threads; its loader workers come from a forkserver, whatever those threads
    hold when an epoch starts its workers."""
    import multiprocessing
    import os
    import sys

    from torch.utils.data import TensorDataset

    if not sys.platform.startswith("linux"):
        pytest.skip("reads the workers' parents from /proc")
    assert "forkserver" in multiprocessing.get_all_start_methods()
    data = TensorDataset(torch.arange(40.0).view(40, 1), torch.arange(40))
    loader = make_loader(data, batch_size=4, shuffle=True, seed=0, num_workers=2,
                         pin_memory=False)
    for epoch in range(2):
        set_epoch(loader, epoch)
        it = iter(loader)
        parents = {w.pid: int(open(f"/proc/{w.pid}/stat").read().rsplit(")", 1)[1].split()[1])
                   for w in it._workers}
        assert os.getpid() not in parents.values() and len(set(parents.values())) == 1
        assert sorted(torch.cat([y for _, y in it]).tolist()) == list(range(40))
