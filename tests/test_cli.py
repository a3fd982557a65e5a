"""launch/train.py as users run it: bad input in one line, torchrun with two columns."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, run_cli, small_overrides
from ranks import free_port

from alexnet_mp import checkpoint as ckpt

spec = importlib.util.spec_from_file_location("launch_train", ROOT / "launch" / "train.py")
launch = importlib.util.module_from_spec(spec)
spec.loader.exec_module(launch)


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and "Traceback" not in stderr
    return lines[0]


def test_bad_key_from_the_command_line_is_one_line_exit_2():
    proc = run_cli(["train.lrr=0.1"])
    assert proc.returncode == 2
    assert "did you mean 'train.lr'" in one_error_line(proc.stderr)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run folder with a checkpoint, which no bad input may overwrite."""
    from conftest import write_idx_mnist

    tmp = tmp_path_factory.mktemp("trained")
    root = write_idx_mnist(tmp / "data")
    assert launch.main(small_overrides(root, tmp / "run", **{"train.max_steps": 1})) == 0
    files = {p: p.read_bytes() for p in ckpt.step_files(tmp / "run" / "checkpoints")}
    assert files
    return tmp, root, files


def _garbage(path):
    path.write_bytes(os.urandom(4096))
    return path


def _pickled_code(path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"format": ckpt.FORMAT, "model": Evil()}, path)
    return path


def _flipped(path, source):
    data = bytearray(source.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 64):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


BAD = {
    "unknown key": (lambda t: ["model.nmae=x"], "did you mean 'model.name'"),
    "wrong type": (lambda t: ["train.epochs=two"], "must be an integer"),
    "lr not positive": (lambda t: ["train.lr=0"], "'train.lr' must be positive"),
    "batch not positive": (lambda t: ["train.batch_size=-4"], "'train.batch_size' must be"),
    "unknown model": (lambda t: ["model.name=resnet"], "choose one of"),
    "unknown data set": (lambda t: ["data.name=svhn"], "choose one of"),
    "missing data": (lambda t: ["data.root=" + str(t / "empty")], "not found: put"),
    "image too small": (lambda t: ["data.image_size=50"], "too small for alexnet_grouped"),
    "unreadable checkpoint": (lambda t: [f"train.resume={_garbage(t / 'g.pt')}"],
                              "unreadable or truncated"),
    "code in checkpoint": (lambda t: [f"train.resume={_pickled_code(t / 'e.pt')}"],
                           "was refused"),
    "missing checkpoint": (lambda t: [f"train.resume={t / 'none.pt'}"], "does not exist"),
    "fp16 on cpu": (lambda t: ["train.amp=fp16"], "needs CUDA"),
    "cuda missing": (lambda t: ["run.device=cuda"], "no CUDA device"),
    "resume none over checkpoints": (lambda t: ["train.resume=none"], "would overwrite"),
    "wrong class count": (lambda t: ["model.num_classes=7"], "set model.num_classes=10"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_exit_2_and_overwrites_nothing(case, trained, tmp_path, capsys):
    tmp, root, files = trained
    if case == "cuda missing" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    make_args, words = BAD[case]
    args = small_overrides(root, tmp / "run") + make_args(tmp_path)
    assert launch.main(args) == 2
    assert words in one_error_line(capsys.readouterr().err)
    assert {p: p.read_bytes() for p in ckpt.step_files(tmp / "run" / "checkpoints")} == files


def test_flipped_bytes_and_foreign_files_are_named(trained, tmp_path, capsys):
    tmp, root, files = trained
    source = next(iter(files))
    flipped = _flipped(tmp_path / "f.pt", source)
    assert launch.main(small_overrides(root, tmp_path / "r", **{"train.resume": flipped})) == 2
    assert "f.pt" in one_error_line(capsys.readouterr().err)
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "plain.pt")
    args = small_overrides(root, tmp_path / "r2", **{"train.resume": tmp_path / "plain.pt"})
    assert launch.main(args) == 2
    assert "not an alexnet_mp checkpoint" in one_error_line(capsys.readouterr().err)


def test_unwritable_run_folder(trained, tmp_path, capsys):
    tmp, root, _ = trained
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert launch.main(small_overrides(root, blocker / "run")) == 2
    assert "is not writable" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("world, extra, words", [
    ("3", {"model.name": "alexnet_columns"}, "3 rank(s) cannot hold two columns per replica"),
    ("2", {"model.name": "alexnet_d2l", "parallel.columns": 2}, "cannot be split into columns"),
    ("4", {"model.name": "alexnet_columns", "parallel.columns": 3},
     "parallel.columns=3 is not supported"),
    ("1", {"model.name": "alexnet_columns", "parallel.layout": "hybrid"},
     "hybrid splits the FC layers over several ranks"),
])
def test_world_sizes_the_layout_cannot_use(trained, monkeypatch, capsys, world, extra, words):
    tmp, root, _ = trained
    monkeypatch.setenv("WORLD_SIZE", world)
    monkeypatch.setenv("RANK", "0")
    # The whole launch, as srun would set it; the layout is refused before any rendezvous.
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    args = small_overrides(root, tmp / "run", **extra)
    assert launch.main(args) == 2
    assert words in one_error_line(capsys.readouterr().err)


@pytest.mark.slow
def test_print_shapes_into_a_closed_pipe_is_quiet():
    """`--print-shapes | head -1`: the reader leaves early. `true` leaves before Python has even
    imported torch, so the write always meets a closed pipe; stderr is what we check."""
    script = ROOT / "launch" / "train.py"
    proc = subprocess.run(f"{sys.executable} {script} --print-shapes | true", shell=True,
                          capture_output=True, text=True, timeout=120)
    assert proc.stderr == "", proc.stderr


def test_a_folder_as_config_is_named(tmp_path):
    proc = run_cli(["--config", str(tmp_path)])
    assert proc.returncode == 2
    assert "is a folder; pass --config with a YAML file" in one_error_line(proc.stderr)


@pytest.mark.slow
def test_an_error_on_one_rank_stops_both_without_a_hang(trained, tmp_path):
    """Only rank 0 writes, so only it finds the run folder unwritable; rank 1 must not hang."""
    tmp, root, _ = trained
    blocker = tmp_path / "file"
    blocker.write_text("x")
    args = small_overrides(root, blocker / "run", **{"model.name": "alexnet_columns"})
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "launch" / "train.py"), *args],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [2, 2]
    assert "is not writable" in one_error_line(outs[0][1])
    assert outs[1][1].strip() == ""


def _final_model(run_dir) -> dict[str, torch.Tensor]:
    return ckpt.load(run_dir / "checkpoints" / "last.pt")["model"]


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    for name in a:
        err = ((a[name] - b[name]).abs().max() / b[name].abs().max().clamp_min(1e-12)).item()
        assert err < 1e-4, f"{name}: relative error {err}"


@pytest.mark.slow
def test_torchrun_split_and_grouped_checkpoints_round_trip(idx_root, tmp_path):
    """2 split steps → grouped 2 more, and grouped 2 → split 2 more, equal 4 straight steps."""
    cols = {"model.name": "alexnet_columns"}

    def run(name, ranks, **extra):
        proc = run_cli(small_overrides(idx_root, tmp_path / name, **cols, **extra),
                       torchrun=ranks if ranks > 1 else None)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return tmp_path / name

    split2 = run("split2", 2, **{"train.max_steps": 2})
    # The main job's run folder, written by rank 0 alone.
    for name in ("config.yaml", "metrics.jsonl", "curves.png", "checkpoints/last.pt"):
        assert (split2 / name).is_file(), name
    straight = _final_model(run("straight", 1, **{"train.max_steps": 4}))
    last = split2 / "checkpoints" / "last.pt"
    _close(_final_model(run("grouped_after_split", 1, **{"train.max_steps": 4,
                                                          "train.resume": last})), straight)
    grouped2 = run("grouped2", 1, **{"train.max_steps": 2})
    last = grouped2 / "checkpoints" / "last.pt"
    _close(_final_model(run("split_after_grouped", 2, **{"train.max_steps": 4,
                                                          "train.resume": last})), straight)


@pytest.mark.slow
def test_torchrun_bad_input_prints_our_line_once(tmp_path):
    proc = run_cli(["model.name=alexnet_d2l", "parallel.columns=2", f"run.dir={tmp_path / 'r'}"],
                   torchrun=2)
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert ours == ["error: model.name=alexnet_d2l cannot be split into columns; set "
                    "parallel.columns=1 (the whole model on every rank, data parallel) or "
                    "model.name=alexnet_columns"]
    assert "[rank0]: Traceback" not in proc.stderr and "[rank1]: Traceback" not in proc.stderr
