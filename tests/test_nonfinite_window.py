"""Non-finite steps decided on the device and read once per log window keep their meaning:
such a step is never applied, ``stop`` applies no later step either and names the failing step,
``skip`` goes on and logs each skipped step, ``max_skipped`` in a row stops, and the epoch's
figures leave the skipped steps out, all as if every step had been read at once."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils.data import TensorDataset

from alexnet_mp import models
from alexnet_mp.config import ModelConfig, TrainConfig
from alexnet_mp.data import BatchTransform
from alexnet_mp.engine import LoopOptions, NonFiniteError, Precision, TrainState, train_one_epoch
from alexnet_mp.guard import StepGuard
from alexnet_mp.loader import make_loader, set_epoch
from alexnet_mp.optim import build_optimizer

CFG = ModelConfig(name="alexnet_grouped", num_classes=5, in_channels=1, dropout=0.0,
                  width=0.125, init="kaiming")
CPU = torch.device("cpu")
BATCH, STEPS = 4, 10


def _loader(poisoned: set[int]):
    """Batches of 4 in order; every image of the (1-based) steps in ``poisoned`` is NaN."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(STEPS * BATCH, 1, 67, 67, generator=g)
    for step in poisoned:
        x[(step - 1) * BATCH: step * BATCH] = float("nan")
    loader = make_loader(TensorDataset(x, torch.arange(STEPS * BATCH) % 5), batch_size=BATCH,
                         shuffle=False, seed=0, num_workers=0, pin_memory=False)
    set_epoch(loader, 0)
    return loader


def _train(poisoned: set[int], options: LoopOptions, momentum_form: str = "paper"):
    model = models.build_model(CFG, 67, CPU, 0)
    optimizer = build_optimizer(model, TrainConfig(lr=0.02, momentum_form=momentum_form))
    state, log = TrainState(), []
    error = None
    try:
        train_one_epoch(model, _loader(poisoned), optimizer, BatchTransform(67, (0.5,), (0.25,)),
                        state, Precision("none", CPU), options=options, guard=StepGuard(False),
                        on_log=log.append)
    except NonFiniteError as exc:
        error = exc
    return model, state, log, error


def _reference(skipped: set[int], last: int, momentum_form: str = "paper"):
    """A plain loop over steps 1..``last``, leaving out ``skipped`` as if they never came."""
    model = models.build_model(CFG, 67, CPU, 0)
    optimizer = build_optimizer(model, TrainConfig(lr=0.02, momentum_form=momentum_form))
    transform = BatchTransform(67, (0.5,), (0.25,))
    loss_sum, seen = 0.0, 0
    for step, (x, y) in enumerate(_loader(set()), start=1):
        if step > last:
            break
        if step in skipped:
            continue
        loss = torch.nn.functional.cross_entropy(model(transform(x)), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss_sum += (loss.detach() * y.shape[0]).item()
        seen += y.shape[0]
    return model, loss_sum, seen


def _same(a: torch.nn.Module, b: torch.nn.Module, exact: bool) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        if exact:
            assert torch.equal(p, q), name
        else:
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


def test_stop_names_the_failing_step_and_applies_nothing_after_it():
    model, state, log, error = _train({3}, LoopOptions(log_every=8))
    assert error is not None and error.loss_at_step == 3 and "at step 3" in str(error)
    assert state.global_step == 8  # read at the window's end: steps 4-8 ran, none applied
    reference, _, _ = _reference(set(), last=2)
    _same(model, reference, exact=True)
    assert [r for r in log if r["kind"] == "skipped"] == []


@pytest.mark.parametrize("momentum_form", ["paper", "torch"])
def test_skip_leaves_out_exactly_the_non_finite_steps(momentum_form):
    model, state, log, error = _train({3, 6}, LoopOptions(log_every=4, nonfinite="skip"),
                                      momentum_form)
    assert error is None and state.global_step == STEPS
    assert [r["step"] for r in log if r["kind"] == "skipped"] == [3, 6]
    reference, loss_sum, seen = _reference({3, 6}, last=STEPS, momentum_form=momentum_form)
    # The paper's update is the plain loop's arithmetic; torch's fused SGD is within rounding.
    _same(model, reference, exact=momentum_form == "paper")
    assert state.seen == seen == (STEPS - 2) * BATCH and state.skipped_in_row == 0
    if momentum_form == "paper":
        assert state.loss_sum == loss_sum
    steps = [r for r in log if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [4, 8, 10]


def test_max_skipped_in_a_row_stops_at_the_last_of_them():
    model, state, log, error = _train({4, 5, 6}, LoopOptions(log_every=8, nonfinite="skip",
                                                            max_skipped=3))
    assert error is not None and error.loss_at_step == 6 and "3 steps in a row" in str(error)
    assert [r["step"] for r in log if r["kind"] == "skipped"] == [4, 5]
    reference, _, _ = _reference(set(), last=3)
    _same(model, reference, exact=True)  # steps 7 and 8 ran but were not applied


def test_a_stop_request_is_acted_on_at_the_end_of_the_log_window():
    guard = StepGuard(False)
    model = models.build_model(CFG, 67, CPU, 0)
    optimizer = build_optimizer(model, TrainConfig(lr=0.02))
    state = TrainState()

    class Signalled:
        def __len__(self):
            return STEPS

        def __iter__(self):
            for i, batch in enumerate(_loader(set())):
                if i == 1:  # during step 2, as a signal handler would set it
                    guard._request_stop(15, None)
                yield batch

    train_one_epoch(model, Signalled(), optimizer, BatchTransform(67, (0.5,), (0.25,)), state,
                    Precision("none", CPU), options=LoopOptions(log_every=4), guard=guard)
    assert guard.stopping and guard.exit_code == 0 and state.global_step == 4


def test_skipped_steps_in_a_row_carry_over_a_window_and_a_resume():
    """The count in a row is the state's, so a run resumed after two skipped steps stops at the
    third as a straight run does."""
    _, state, _, error = _train({9, 10}, LoopOptions(log_every=4, nonfinite="skip",
                                                     max_skipped=3))
    assert error is None and state.skipped_in_row == 2
    resumed = dataclasses.replace(state, epoch=1, step=0)
    model = models.build_model(CFG, 67, CPU, 0)
    optimizer = build_optimizer(model, TrainConfig(lr=0.02))
    with pytest.raises(NonFiniteError, match="3 steps in a row") as err:
        train_one_epoch(model, _loader({1}), optimizer, BatchTransform(67, (0.5,), (0.25,)),
                        resumed, Precision("none", CPU),
                        options=LoopOptions(log_every=4, nonfinite="skip", max_skipped=3),
                        guard=StepGuard(False))
    assert err.value.loss_at_step == STEPS + 1
