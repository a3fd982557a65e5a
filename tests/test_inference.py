"""After training: evaluate and predict from a checkpoint alone, centre and ten-crop, one device
and two columns under torchrun; the ten crops checked against crops cut by hand."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from alexnet_mp import checkpoint as ckpt
from alexnet_mp import inference
from alexnet_mp.config import DataConfig, ModelConfig
from alexnet_mp.data import BatchTransform, build_data
from alexnet_mp.engine import Precision, evaluate, ten_crop_log_probs
from alexnet_mp.models import build_model

ROOT = Path(__file__).resolve().parents[1]
COLOURS = {"blue": (20, 30, 210), "green": (30, 200, 40), "red": (220, 30, 20)}  # sorted = labels


def _launch(name: str):
    spec = importlib.util.spec_from_file_location(f"launch_{name}", ROOT / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_cli, evaluate_cli, predict_cli = (_launch(n) for n in ("train", "evaluate", "predict"))


def run_script(script: str, args: list[str], ranks: int = 1) -> subprocess.CompletedProcess:
    path = str(ROOT / "launch" / script)
    cmd = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
            "--standalone", path, *args] if ranks > 1 else [sys.executable, path, *args])
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)


def coloured(colour: tuple[int, int, int], g: torch.Generator, size: int = 40) -> Image.Image:
    noise = torch.randint(-25, 26, (size, size, 3), generator=g)
    pixels = (torch.tensor(colour) + noise).clamp(0, 255).to(torch.uint8)
    return Image.fromarray(pixels.numpy())


def write_folder(root: Path, val_per_class: int = 3) -> Path:
    """train/ (4 a class) and val/ (3 a class: 9, an odd count) of 40x40 PNG and JPEG files."""
    g = torch.Generator().manual_seed(0)
    for part, n in (("train", 4), ("val", val_per_class)):
        for name, colour in COLOURS.items():
            (root / part / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                ext = "jpg" if i % 2 else "png"
                coloured(colour, g).save(root / part / name / f"{i}.{ext}")
    return root


def train_args(root: Path, run_dir: Path) -> list[str]:
    values = {"data.name": "imagefolder", "data.root": root, "model.num_classes": 3,
              "model.in_channels": 3, "model.width": 0.125, "data.image_size": 67,
              "train.batch_size": 4, "train.max_steps": 4, "run.dir": run_dir,
              "run.progress": False, "run.threads": 1}
    return [f"{k}={v}" for k, v in values.items()]


QUIET = ["run.progress=false", "run.threads=1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The same 4 steps on one device and as two columns under torchrun."""
    tmp = tmp_path_factory.mktemp("inference")
    root = write_folder(tmp / "images")
    assert train_cli.main(train_args(root, tmp / "one")) == 0
    proc = run_script("train.py", train_args(root, tmp / "two"), ranks=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = Path("checkpoints") / "last.pt"
    return tmp, root, tmp / "one" / last, tmp / "two" / last


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and "Traceback" not in stderr
    return lines[0]


def figures(result: dict) -> tuple:
    return result["images"], result["top1"], result["top5"], result["loss"]


def same_figures(a: dict, b: dict, rel: float = 1e-5) -> None:
    assert a["images"] == b["images"] and a["top1"] == b["top1"] and a["top5"] == b["top5"], (
        figures(a), figures(b))
    assert a["loss"] == pytest.approx(b["loss"], rel=rel)


# -- the ten crops ----------------------------------------------------------------------------

def test_ten_crop_equals_ten_crops_cut_by_hand():
    """28-pixel digits-like tensors scaled to 76 (= round(67 * 256 / 227)) on the device, then
    cut by slicing into the four corners and the centre and flipped: the averaged softmax, its
    loss and its top-1/top-5 are what evaluate(ten_crop=True) reports."""
    torch.manual_seed(0)
    cfg = ModelConfig(name="alexnet_grouped", num_classes=7, in_channels=1, width=0.125,
                      init="xavier")
    model = build_model(cfg, 67, "cpu", seed=0).eval()
    x = torch.randint(0, 256, (6, 1, 28, 28), dtype=torch.uint8)
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    transform = BatchTransform(inference.scaled_size(67), (0.13,), (0.31,))
    got = evaluate(model, [(x[:4], y[:4]), (x[4:], y[4:])], transform,
                   Precision("none", torch.device("cpu")), ten_crop=True, crop_size=67)

    big = transform(x)
    side, s = big.shape[-1], 67
    assert side == 76
    # An odd margin, as the paper's 256 - 227: (76 - 67) / 2 = 4.5, which torchvision rounds to
    # 4; the mirrored centre is this patch mirrored, not the centre of the mirrored image.
    c = 4
    crops = [big[..., :s, :s], big[..., :s, side - s:], big[..., side - s:, :s],
             big[..., side - s:, side - s:], big[..., c:c + s, c:c + s]]
    crops += [crop.flip(-1) for crop in crops]
    with torch.no_grad():
        probs = torch.stack([F.softmax(model(crop), dim=1) for crop in crops]).mean(0)
        helper = ten_crop_log_probs(model, big, s).exp()
    torch.testing.assert_close(helper, probs, rtol=1e-5, atol=1e-7)
    # not the centre crop alone: the other nine views change the answer
    with torch.no_grad():
        assert not torch.allclose(F.softmax(model(crops[4]), dim=1), probs, atol=1e-4)
    loss = -probs[torch.arange(6), y].log().mean().item()
    top1 = (probs.argmax(1) == y).float().mean().item()
    top5 = (probs.topk(5, dim=1).indices == y[:, None]).any(1).float().mean().item()
    assert got["test_images"] == 6
    assert got["test_loss"] == pytest.approx(loss, rel=1e-5)
    assert got["test_acc"] == pytest.approx(top1) and got["test_top5"] == pytest.approx(top5)


# -- evaluate ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_evaluate_from_the_checkpoint_alone_on_one_and_two_ranks(trained, tmp_path, capsys):
    tmp, root, one, two = trained
    # One device, beside the checkpoint: the figures training itself reported for these weights.
    assert evaluate_cli.main([str(one), *QUIET]) == 0
    printed = capsys.readouterr().out
    centre = json.loads((one.parent / "last.eval.json").read_text())
    assert "top-1" in printed and "last.eval.json" in printed
    epochs = [json.loads(line) for line in (tmp / "one" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in epochs if r.get("kind") == "epoch"][-1]
    assert last["step"] == centre["step"] == 4
    assert (centre["images"], centre["top1"]) == (9, last["test_acc"])
    assert centre["loss"] == pytest.approx(last["test_loss"], rel=1e-5)
    assert centre["split"] == "val" and not centre["ten_crop"] and centre["ranks"] == 1

    assert evaluate_cli.main([str(one), "--ten-crop", *QUIET]) == 0
    ten = json.loads((one.parent / "last.eval-10crop.json").read_text())
    assert ten["ten_crop"] and ten["scaled_size"] == 76 and ten["images"] == 9
    assert ten["loss"] != pytest.approx(centre["loss"], rel=1e-6)

    # Two columns under torchrun, the checkpoint cut into rows; and two whole replicas, each
    # reading half of the 9 images (one padded sample, left out): the same figures.
    for extra, alone, layout in (([], centre, "column split"),
                                 (["--ten-crop"], ten, "column split"),
                                 (["--ten-crop", "parallel.columns=1"], ten,
                                  "data parallel, 2 replicas")):
        out = tmp_path / f"two{len(extra)}.json"
        proc = run_script("evaluate.py", [str(one), "--out", str(out), *extra], ranks=2)
        assert proc.returncode == 0, proc.stderr[-3000:]
        split = json.loads(out.read_text())
        assert (split["layout"], split["ranks"]) == (layout, 2)
        same_figures(split, alone)
        assert proc.stdout.count("top-1") == 1  # rank 0 alone speaks

    # The torchrun run's checkpoint on one device: the same network took the same steps.
    assert evaluate_cli.main([str(two), "--out", str(tmp_path / "t.json"), *QUIET]) == 0
    same_figures(json.loads((tmp_path / "t.json").read_text()), centre, rel=1e-3)


def _save(state: dict, path: Path) -> Path:
    ckpt.save_atomic(state, path)
    return path


def _foreign_model(one: Path, tmp: Path) -> Path:
    return _save({**ckpt.load(one), "model_name": "resnet50"}, tmp / "resnet.pt")


def _other_classes(one: Path, tmp: Path) -> list[str]:
    root = tmp / "other"
    for part in ("train", "val"):
        for name in ("ant", "bee", "cat"):
            (root / part / name).mkdir(parents=True)
            coloured((9, 9, 9), torch.Generator()).save(root / part / name / "0.png")
    return [str(one), "--data-root", str(root)]


BAD = {
    "missing file": (lambda one, t: [str(t / "nope.pt")], "does not exist"),
    "corrupt file": (lambda one, t: [str(_write(t / "bad.pt", one.read_bytes()[:5000]))],
                     "unreadable or truncated"),
    "unknown model": (lambda one, t: [str(_foreign_model(one, t))], "holds a model 'resnet50'"),
    "another width": (lambda one, t: [str(one), "model.width=0.25"], "does not fit"),
    "other classes": (_other_classes, "does not have the classes"),
    "unknown key": (lambda one, t: [str(one), "data.rot=x"], "did you mean 'data.root'"),
    "unwritable out": (lambda one, t: [str(one), "--out", str(_write(t / "f", b"x") / "r.json")],
                       "for the results"),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_exit_2(trained, tmp_path, capsys, case):
    _, _, one, _ = trained
    make_args, words = BAD[case]
    assert evaluate_cli.main([*make_args(one, tmp_path), *QUIET]) == 2
    assert words in one_error_line(capsys.readouterr().err)


# -- predict ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_predict_reads_an_image_as_evaluation_does(trained):
    _, root, _, _ = trained
    info = inference.DataInfo("imagefolder", list(COLOURS), (0.5,) * 3, (0.25,) * 3, 67, 3)
    test = build_data(DataConfig(name="imagefolder", root=str(root), image_size=67),
                      num_classes=3, in_channels=3, seed=0).test
    for i in (0, 1):  # a PNG and a JPEG
        path, _ = test.samples[i]
        assert torch.equal(inference.read_image(path, info), test[i][0])


@pytest.mark.slow
def test_predict_names_the_classes_and_the_broken_file(trained, tmp_path):
    _, root, one, _ = trained
    good = [root / "val" / "red" / "0.png", root / "val" / "blue" / "1.jpg"]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(good[1].read_bytes()[:300])  # a truncated JPEG
    proc = run_script("predict.py", [str(one), str(good[0]), str(broken), str(good[1])])
    assert proc.returncode == 1, proc.stderr
    assert "broken.jpg" in one_error_line(proc.stderr)
    lines = proc.stdout.splitlines()
    assert len(lines) == 8, proc.stdout  # 3 classes: --top 5 shows all three of each image
    assert lines[0] == str(good[0]) and lines[4] == str(good[1])
    for block in (lines[1:4], lines[5:8]):
        assert sorted(line.split()[-1] for line in block) == sorted(COLOURS)


@pytest.mark.slow
def test_predict_json_ten_crop_and_an_old_checkpoint(trained, tmp_path, capsys):
    _, root, one, _ = trained
    image = root / "val" / "green" / "0.png"
    assert predict_cli.main([str(one), str(image), str(tmp_path / "gone.png"), "--json",
                             "--top", "2", "--ten-crop"]) == 1
    out = capsys.readouterr()
    doc = json.loads(out.out)
    assert doc["ten_crop"] and doc["step"] == 4
    found, missing = doc["results"]
    assert len(found["top"]) == 2 and {t["class"] for t in found["top"]} <= set(COLOURS)
    assert found["top"][0]["probability"] >= found["top"][1]["probability"]
    assert "gone.png" in missing["error"] and "no such file" in one_error_line(out.err)

    # A checkpoint written before the data record: numbered classes, and a warning that says so.
    state = ckpt.load(one)
    del state["data"]
    old = _save(state, tmp_path / "old.pt")
    assert predict_cli.main([str(old), str(image), "--json"]) == 0
    out = capsys.readouterr()
    assert {t["class"] for t in json.loads(out.out)["results"][0]["top"]} == {"0", "1", "2"}
    assert "predates stored class names" in out.err
    probs = [t["probability"] for t in json.loads(out.out)["results"][0]["top"]]
    assert math.isclose(sum(probs), 1.0, rel_tol=1e-5)


@pytest.mark.slow
def test_the_epoch_end_evaluation_can_judge_by_ten_crops(trained, tmp_path):
    """train.ten_crop=true: the epoch's record holds what evaluate.py --ten-crop reports for the
    same weights."""
    tmp, root, _, _ = trained
    run = tmp_path / "ten"
    assert train_cli.main([*train_args(root, run), "train.ten_crop=true"]) == 0
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    epoch = [r for r in records if r.get("kind") == "epoch"][-1]
    checkpoint = run / "checkpoints" / "last.pt"
    assert evaluate_cli.main([str(checkpoint), "--ten-crop", *QUIET]) == 0
    ten = json.loads((run / "checkpoints" / "last.eval-10crop.json").read_text())
    assert (ten["images"], ten["top1"], ten["top5"]) == (9, epoch["test_acc"],
                                                          epoch["test_top5"])
    assert ten["loss"] == pytest.approx(epoch["test_loss"], rel=1e-5)


def test_five_crops_without_mirroring_equal_five_crops_cut_by_hand():
    torch.manual_seed(0)
    cfg = ModelConfig(name="alexnet_grouped", num_classes=7, in_channels=1, width=0.125,
                      init="xavier")
    model = build_model(cfg, 67, "cpu", seed=0).eval()
    big = BatchTransform(76, (0.13,), (0.31,))(torch.randint(0, 256, (3, 1, 28, 28),
                                                             dtype=torch.uint8))
    s, c = 67, 4
    crops = [big[..., :s, :s], big[..., :s, 76 - s:], big[..., 76 - s:, :s],
             big[..., 76 - s:, 76 - s:], big[..., c:c + s, c:c + s]]
    with torch.no_grad():
        probs = torch.stack([F.softmax(model(crop), dim=1) for crop in crops]).mean(0)
        five = ten_crop_log_probs(model, big, s, mirror=False).exp()
        ten = ten_crop_log_probs(model, big, s).exp()
    torch.testing.assert_close(five, probs, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(ten, probs, atol=1e-5)  # the mirrored views do count otherwise


def test_a_model_trained_without_mirroring_is_tested_on_five_crops(tmp_path, capsys):
    """data.hflip=false: training's epoch-end ten_crop test, evaluate.py --ten-crop and
    predict.py --ten-crop leave the mirrored views out, and say so."""
    root = write_folder(tmp_path / "images", val_per_class=2)
    run = tmp_path / "run"
    assert train_cli.main([*train_args(root, run), "train.ten_crop=true",
                           "data.hflip=false"]) == 0
    assert "tested on 5 crops (no mirror: data.hflip=false)" in capsys.readouterr().out
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    epoch = [r for r in records if r.get("kind") == "epoch"][-1]
    checkpoint = run / "checkpoints" / "last.pt"
    out = tmp_path / "five.json"
    assert evaluate_cli.main([str(checkpoint), "--ten-crop", "--out", str(out), *QUIET]) == 0
    assert "5 crops (no mirror: data.hflip=false)" in capsys.readouterr().out
    five = json.loads(out.read_text())
    assert five["views"] == "5 crops (no mirror: data.hflip=false)"
    assert five["loss"] == pytest.approx(epoch["test_loss"], rel=1e-5)
    # The same weights judged with the mirrored views too: another figure.
    assert evaluate_cli.main([str(checkpoint), "--ten-crop", "--out", str(out),
                              "data.hflip=true", *QUIET]) == 0
    ten = json.loads(out.read_text())
    assert ten["views"] == "10 crops" and ten["loss"] != pytest.approx(five["loss"], rel=1e-6)
    capsys.readouterr()
    image = root / "val" / "green" / "0.png"
    assert predict_cli.main([str(checkpoint), str(image), "--json", "--ten-crop"]) == 0
    assert json.loads(capsys.readouterr().out)["views"].startswith("5 crops (no mirror")


def test_a_truncated_checkpoint_is_refused_with_advice_for_this_command(tmp_path, capsys):
    path = tmp_path / "step-00000004.pt"
    ckpt.save_atomic({"format": ckpt.FORMAT, "model": {"w": torch.ones(1000)}}, path)
    path.write_bytes(path.read_bytes()[:2000])
    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    for main, args in ((evaluate_cli.main, [str(path), *QUIET]),
                       (predict_cli.main, [str(path), str(image)])):
        assert main(args) == 2
        line = one_error_line(capsys.readouterr().err)
        assert "is unreadable or truncated" in line and "train.resume" not in line
        assert line.endswith("pass an older checkpoint as the checkpoint argument (such as "
                             "another step-N.pt beside it)")
