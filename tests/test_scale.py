"""Past two ranks, through the real entry point: columns x replicas across two "machines"
(two torchrun agents joined by a c10d rendezvous on 127.0.0.1), the hybrid layout, checkpoints
moving between 4, 2 and 1 ranks, and evaluation that counts every example once.

The reference is always one device running the grouped form on the same global batch, with
dropout 0 so that no random draw differs between layouts; the hybrid layout, which draws its
masks as the grouped form does, is also compared with dropout on.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_cli, small_overrides
from ranks import free_port

from alexnet_mp import canonical
from alexnet_mp import checkpoint as ckpt

pytestmark = pytest.mark.slow  # every test starts torchrun ranks

SCRIPT = str(ROOT / "launch" / "train.py")
# After a few SGD steps the layouts agree to float32 rounding (sums in another order).
TOLERANCE = 1e-4
COLUMNS = {"model.name": "alexnet_columns", "model.dropout": 0.0, "train.batch_size": 8}


def final(run: Path) -> dict[str, torch.Tensor]:
    return ckpt.load(run / "checkpoints" / "last.pt")["model"]


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        err = ((a[name] - b[name]).abs().max() / b[name].abs().max().clamp_min(1e-12)).item()
        assert err < TOLERANCE, f"{name}: relative error {err}"


def train(args: list[str], ranks: int = 1) -> None:
    proc = run_cli(args, torchrun=ranks if ranks > 1 else None, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def two_machines(args: list[str], timeout: float = 300) -> None:
    """What two hosts with two GPUs each run, here as two agents on one host."""
    endpoint = f"127.0.0.1:{free_port()}"
    agents = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=2",
         f"--node_rank={node}", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}",
         "--rdzv-id=alexnet-test", SCRIPT, *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT) for node in (0, 1)]
    outs = [a.communicate(timeout=timeout) for a in agents]
    assert [a.returncode for a in agents] == [0, 0], [o[1][-2000:] for o in outs]
    assert "2 columns x 2 replicas" in outs[0][0] + outs[1][0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The grouped form on one device: 6 steps of global batch 8."""
    from conftest import write_idx_mnist

    tmp = tmp_path_factory.mktemp("scale")
    root = write_idx_mnist(tmp / "data")
    run = tmp / "one"
    train(small_overrides(root, run, **COLUMNS, **{"train.max_steps": 6}))
    return root, tmp, final(run)


def test_two_machines_of_two_ranks_equal_one_device(reference):
    root, tmp, expected = reference
    run = tmp / "two-machines"
    two_machines(small_overrides(root, run, **COLUMNS, **{"train.max_steps": 6}))
    assert_close(final(run), expected)
    # rank 0 wrote one canonical file: the grouped form's names and shapes
    assert final(run)["conv2.weight"].shape == expected["conv2.weight"].shape


@pytest.mark.parametrize("ranks", [2, 4])
def test_hybrid_trains_through_the_loop_and_equals_one_device(reference, ranks):
    root, tmp, expected = reference
    run = tmp / f"hybrid-{ranks}"
    train(small_overrides(root, run, **COLUMNS, **{"train.max_steps": 6,
                                                   "parallel.layout": "hybrid"}), ranks)
    assert_close(final(run), expected)


@pytest.fixture(scope="module")
def dropout_reference(reference):
    """The same 6 steps on one device with the paper's dropout."""
    root, tmp, _ = reference
    run = tmp / "one-dropout"
    train(small_overrides(root, run, **{**COLUMNS, "model.dropout": 0.5, "train.max_steps": 6}))
    return root, tmp, final(run)


@pytest.mark.parametrize("ranks", [2, 4])
def test_hybrid_with_dropout_equals_one_device(dropout_reference, ranks):
    root, tmp, expected = dropout_reference
    run = tmp / f"hybrid-dropout-{ranks}"
    train(small_overrides(root, run, **{**COLUMNS, "model.dropout": 0.5, "train.max_steps": 6,
                                        "parallel.layout": "hybrid"}), ranks)
    assert_close(final(run), expected)


def test_checkpoints_move_between_4_2_and_1_ranks_with_an_odd_class_count(tmp_path):
    """7 classes: fc8's two columns hold 4 and 3 rows. 4 ranks -> 2 -> 1 -> 4, two steps each,
    equal a straight run of eight steps on one device."""
    base = {**COLUMNS, "data.name": "fake", "data.fake_size": 64, "model.num_classes": 7,
            "model.in_channels": 3, "data.image_size": 67}
    data = tmp_path / "unused"
    straight = tmp_path / "straight"
    train(small_overrides(data, straight, **base, **{"train.max_steps": 8}))
    hops = [(4, 2), (2, 4), (1, 6), (4, 8)]
    previous = None
    for ranks, steps in hops:
        run = tmp_path / f"hop-{ranks}-{steps}"
        extra = {"train.max_steps": steps}
        if previous is not None:
            extra["train.resume"] = str(previous / "checkpoints" / "last.pt")
        train(small_overrides(data, run, **base, **extra), ranks)
        state = ckpt.load(run / "checkpoints" / "last.pt")
        assert state["train"]["global_step"] == steps
        assert state["model"]["fc8.weight"].shape[0] == 7
        previous = run
    assert_close(final(previous), final(straight))


def test_evaluation_on_four_ranks_counts_every_example_once(tmp_path):
    """13 test images over 2 replicas of 2 columns (batches of 4): the sampler pads, the figures
    must not count the padding."""
    from conftest import write_idx_mnist

    root = write_idx_mnist(tmp_path / "data", n_test=13)
    run = tmp_path / "r"
    train(small_overrides(root, run, **COLUMNS, **{"train.max_steps": 4}))
    checkpoint = str(run / "checkpoints" / "last.pt")
    results = []
    for ranks in (1, 4):
        out = tmp_path / f"eval-{ranks}"
        train(small_overrides(root, out, **{**COLUMNS, "train.batch_size": 4,
                                            "train.eval_only": True, "train.resume": checkpoint}),
              ranks)
        lines = (out / "metrics.jsonl").read_text().splitlines()
        results.append(json.loads(lines[-1]))
    one, four = results
    assert one["test_images"] == four["test_images"] == 13
    assert four["test_acc"] == one["test_acc"] and four["test_top5"] == one["test_top5"]
    assert four["test_loss"] == pytest.approx(one["test_loss"], rel=1e-5)


def test_a_split_model_that_cannot_describe_its_rows_is_an_error():
    from torch import nn

    from alexnet_mp.parallel.layout import Layout, ParallelDims

    split = Layout(dims=ParallelDims(2, 2), column=1)
    with pytest.raises(TypeError, match="does not describe its rows"):
        canonical.model_state(nn.Linear(4, 2), split)
    assert canonical.model_state(nn.Linear(4, 2), Layout())["weight"].shape == (2, 4)


def test_data_parallel_resume_with_dropout_is_exact(tmp_path):
    """d2l's net on 2 replicas, dropout on: each replica's RNG comes back from the checkpoint,
    so a resumed run draws the same masks as a straight one."""
    from conftest import write_idx_mnist

    root = write_idx_mnist(tmp_path / "data")
    extra = {"model.name": "alexnet_d2l", "model.dropout": 0.5}
    train(small_overrides(root, tmp_path / "straight", **extra, **{"train.max_steps": 5}), 2)
    train(small_overrides(root, tmp_path / "resumed", **extra, **{"train.max_steps": 2}), 2)
    train(small_overrides(root, tmp_path / "resumed", **extra, **{"train.max_steps": 5}), 2)
    a, b = final(tmp_path / "straight"), final(tmp_path / "resumed")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    rng = ckpt.load(tmp_path / "resumed" / "checkpoints" / "last.pt")["rng"]["replicas"]
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])
