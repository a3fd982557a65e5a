"""The paper's optimizer details: no weight decay on biases, the rate inside the momentum.

The updates are checked against the formulas written out by hand, step by step (not through the
optimizer's code), over three steps with a rate change before the third; resume is checked
against a straight run, bit for bit.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import one_process_layout, small_overrides
from torch import nn

from alexnet_mp import checkpoint as ckpt
from alexnet_mp.config import TrainConfig, load_config
from alexnet_mp.errors import UserError
from alexnet_mp.models import build_model
from alexnet_mp.optim import PaperSGD, build_optimizer, is_bias
from alexnet_mp.run import Trainer

LR, LR3, M, WD = 0.1, 0.01, 0.9, 0.05  # a large decay, so that it shows in every step
W0, B0 = [0.5, -1.5], [0.25]
GRADS = [([1.0, -2.0], [0.5]), ([-0.5, 3.0], [-1.0]), ([2.0, 0.25], [0.75])]


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 1, dtype=torch.float64)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([W0], dtype=torch.float64))
            self.fc.bias.copy_(torch.tensor(B0, dtype=torch.float64))


def three_steps(form: str, bias_decay: bool, **kw) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Weights and biases after each of three steps of GRADS, the rate LR then LR3."""
    model = Tiny()
    train = TrainConfig(lr=LR, momentum=M, weight_decay=WD, bias_decay=bias_decay,
                        momentum_form=form)
    opt = build_optimizer(model, train) if not kw else PaperSGD(
        [{"params": [model.fc.weight], "weight_decay": WD},
         {"params": [model.fc.bias], "weight_decay": WD if bias_decay else 0.0}],
        lr=LR, momentum=M, **kw)
    out = []
    for i, (gw, gb) in enumerate(GRADS):
        if i == 2:
            for group in opt.param_groups:
                group["lr"] = LR3
        model.fc.weight.grad = torch.tensor([gw], dtype=torch.float64)
        model.fc.bias.grad = torch.tensor(gb, dtype=torch.float64)
        opt.step()
        out.append((model.fc.weight.detach().clone()[0], model.fc.bias.detach().clone()))
    return out


def by_hand_torch(w: float, gs: list[float], wd: float) -> list[float]:
    """torch.optim.SGD: d = g + wd w; v = m v + d (v = d at the first step); w = w - lr v."""
    g1, g2, g3 = gs
    v1 = g1 + wd * w
    w1 = w - LR * v1
    v2 = M * v1 + (g2 + wd * w1)
    w2 = w1 - LR * v2
    v3 = M * v2 + (g3 + wd * w2)
    w3 = w2 - LR3 * v3
    return [w1, w2, w3]


def by_hand_paper(w: float, gs: list[float], wd: float) -> list[float]:
    """The paper: v = m v - wd lr w - lr g (v = 0 before the first step); w = w + v."""
    g1, g2, g3 = gs
    v1 = -wd * LR * w - LR * g1
    w1 = w + v1
    v2 = M * v1 - wd * LR * w1 - LR * g2
    w2 = w1 + v2
    v3 = M * v2 - wd * LR3 * w2 - LR3 * g3
    w3 = w2 + v3
    return [w1, w2, w3]


def expected(form: str, bias_decay: bool) -> list[tuple[list[float], list[float]]]:
    hand = by_hand_paper if form == "paper" else by_hand_torch
    w = [hand(W0[j], [g[0][j] for g in GRADS], WD) for j in range(2)]
    b = hand(B0[0], [g[1][0] for g in GRADS], WD if bias_decay else 0.0)
    return [([w[0][i], w[1][i]], [b[i]]) for i in range(3)]


@pytest.mark.parametrize("bias_decay", [True, False])
@pytest.mark.parametrize("form", ["torch", "paper"])
def test_three_steps_with_a_rate_change_match_the_hand_computation(form, bias_decay):
    got = three_steps(form, bias_decay)
    for step, ((w, b), (ew, eb)) in enumerate(zip(got, expected(form, bias_decay)), 1):
        torch.testing.assert_close(w, torch.tensor(ew, dtype=torch.float64), rtol=1e-12,
                                   atol=1e-14, msg=f"{form} weights, step {step}")
        torch.testing.assert_close(b, torch.tensor(eb, dtype=torch.float64), rtol=1e-12,
                                   atol=1e-14, msg=f"{form} bias, step {step}")


def test_the_forms_agree_until_the_rate_changes():
    """The paper's velocity is -lr times torch's while the rate holds; after a change torch
    rescales the whole velocity and the paper does not."""
    torch_form, paper = three_steps("torch", False), three_steps("paper", False)
    for step in range(2):
        torch.testing.assert_close(torch_form[step][0], paper[step][0], rtol=1e-12, atol=1e-14)
    assert not torch.allclose(torch_form[2][0], paper[2][0], rtol=1e-6)


def test_paper_form_foreach_and_loop_are_bit_identical():
    loop = three_steps("paper", False, weight_decay=WD, foreach=False)
    fused = three_steps("paper", False, weight_decay=WD, foreach=True)
    for (w1, b1), (w2, b2) in zip(loop, fused):
        assert torch.equal(w1, w2) and torch.equal(b1, b2)


def test_paper_form_keeps_one_momentum_buffer_per_parameter():
    model = Tiny()
    opt = build_optimizer(model, TrainConfig(momentum_form="paper", bias_decay=False))
    model.fc.weight.grad = torch.ones_like(model.fc.weight)
    model.fc.bias.grad = torch.ones_like(model.fc.bias)
    opt.step()
    for p in model.parameters():
        assert set(opt.state[p]) == {"momentum_buffer"}
        assert opt.state[p]["momentum_buffer"].shape == p.shape


@pytest.mark.parametrize("name", ["alexnet_grouped", "alexnet_d2l"])
def test_bias_groups_are_built_by_name(name):
    cfg = load_config(None, [f"model.name={name}", "model.width=0.125", "model.num_classes=10"])
    model = build_model(cfg.model, 67, torch.device("cpu"), 0)
    names = {p: n for n, p in model.named_parameters()}
    one = build_optimizer(model, TrainConfig())
    assert len(one.param_groups) == 1 and one.param_groups[0]["weight_decay"] == 5e-4
    weights, biases = build_optimizer(model, TrainConfig(bias_decay=False)).param_groups
    assert all(not is_bias(names[p]) for p in weights["params"]) and weights["weight_decay"] > 0
    assert all(names[p].endswith(".bias") for p in biases["params"])
    assert biases["weight_decay"] == 0.0
    assert len(weights["params"]) + len(biases["params"]) == len(names)


def trainer(idx_root, run, **extra) -> Trainer:
    cfg = load_config(None, small_overrides(idx_root, run, **extra))
    return Trainer(cfg, one_process_layout(cfg.model.name))


@pytest.mark.parametrize("form", ["torch", "paper"])
def test_resume_without_bias_decay_equals_a_straight_run(idx_root, tmp_path, form):
    # The rate halves every epoch (6 steps): the run stops in epoch 2, resumes across a decay.
    extra = {"train.epochs": 3, "train.bias_decay": False, "train.momentum_form": form,
             "train.schedule": "step", "train.step_size": 1, "train.gamma": 0.5}
    straight = trainer(idx_root, tmp_path / "a", **extra)
    straight.run()
    trainer(idx_root, tmp_path / "b", **extra, **{"train.max_steps": 8}).run()
    saved = ckpt.load(tmp_path / "b" / "checkpoints" / "last.pt")["optimizer"]
    assert [g["weight_decay"] for g in saved["param_groups"]] == [5e-4, 0.0]
    assert all(n.endswith(".bias") for n in saved["param_groups"][1]["params"])
    resumed = trainer(idx_root, tmp_path / "b", **extra)
    assert resumed.state.global_step == 8
    assert [g["weight_decay"] for g in resumed.optimizer.param_groups] == [5e-4, 0.0]
    resumed.run()
    a, b = dict(straight.model.named_parameters()), dict(resumed.model.named_parameters())
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"
        assert torch.equal(straight.optimizer.state[a[name]]["momentum_buffer"],
                           resumed.optimizer.state[b[name]]["momentum_buffer"]), name


def test_bias_decay_may_change_on_resume_and_momentum_form_may_not(idx_root, tmp_path, capsys):
    extra = {"train.schedule": "plateau", "train.patience": 0, "train.max_steps": 2}
    trainer(idx_root, tmp_path / "r", **extra).run()
    with pytest.raises(UserError, match="different train.momentum_form"):
        trainer(idx_root, tmp_path / "r", **extra, **{"train.momentum_form": "paper"})
    # One group becomes two: both take the saved group's rate; biases lose their decay; the
    # plateau schedule (one min_lr a group) still steps.
    changed = trainer(idx_root, tmp_path / "r", **{**extra, "train.max_steps": "null",
                                                   "train.bias_decay": False})
    assert "train.bias_decay: True -> False" in capsys.readouterr().err
    assert [g["weight_decay"] for g in changed.optimizer.param_groups] == [5e-4, 0.0]
    changed.run()
    assert changed.state.epoch == 1


def test_momentum_form_is_one_of_two():
    with pytest.raises(UserError, match="train.momentum_form' is 'nesterov'; choose one of: "
                                        "torch, paper"):
        load_config(None, ["train.momentum_form=nesterov"])
    assert dataclasses.asdict(TrainConfig())["momentum_form"] == "torch"
