"""SGD against hand-computed updates, and the learning-rate schedules at their boundaries."""

from __future__ import annotations

import json

import numpy as np
import pytest

import tinyres
from tinyres import nn, optim


def scalar_param(value: float, device: str = "cpu") -> nn.Parameter:
    return nn.Parameter(tinyres.tensor([value], device=device))


def run_sgd(grads, device="cpu", **kwargs) -> list[float]:
    p = scalar_param(1.0, device)
    opt = optim.SGD([p], **kwargs)
    values = []
    for g in grads:
        p.grad = tinyres.tensor([g], device=device)
        opt.step()
        values.append(p.item())
    return values


# p0 = 1, gradients 1 then 2, lr 0.1, worked out by hand from PyTorch's formulas
HAND_COMPUTED = [
    # plain: p = 1 - 0.1 * 1 = 0.9, then 0.9 - 0.1 * 2 = 0.7
    ({}, [0.9, 0.7]),
    # momentum 0.9: buf = 1, p = 0.9; buf = 0.9 * 1 + 2 = 2.9, p = 0.9 - 0.29 = 0.61
    ({"momentum": 0.9}, [0.9, 0.61]),
    # + weight decay 0.1: g = 1 + 0.1 * 1 = 1.1, buf = 1.1, p = 0.89;
    #   g = 2 + 0.1 * 0.89 = 2.089, buf = 0.99 + 2.089 = 3.079, p = 0.89 - 0.3079 = 0.5821
    ({"momentum": 0.9, "weight_decay": 0.1}, [0.89, 0.5821]),
    # + nesterov: buf = 1.1, step 1.1 + 0.99 = 2.09, p = 0.791;
    #   g = 2.0791, buf = 3.0691, step 2.0791 + 2.76219 = 4.84129, p = 0.306871
    ({"momentum": 0.9, "weight_decay": 0.1, "nesterov": True}, [0.791, 0.306871]),
    # dampening 0.5: buf = 1 on the first step (no dampening), p = 0.9; buf = 0.9 + 0.5 * 2 = 1.9, p = 0.71
    ({"momentum": 0.9, "dampening": 0.5}, [0.9, 0.71]),
]


@pytest.mark.parametrize("kwargs, expected", HAND_COMPUTED)
def test_sgd_matches_hand_computed_steps(kwargs, expected, device):
    np.testing.assert_allclose(run_sgd([1.0, 2.0], device, lr=0.1, **kwargs), expected, rtol=1e-6)


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_matches_a_float64_reference_over_several_steps(nesterov, device, xp):
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal((3, 4)).astype(np.float32)
    grads = rng.standard_normal((5, 3, 4)).astype(np.float32)
    lr, momentum, wd = 0.05, 0.9, 5e-4
    p = nn.Parameter(tinyres.tensor(p0, device=device))
    opt = optim.SGD([p], lr=lr, momentum=momentum, weight_decay=wd, nesterov=nesterov)
    ref, buf = p0.astype(np.float64), None
    for g in grads:
        p.grad = tinyres.tensor(g, device=device)
        opt.step()
        d = g + wd * ref
        buf = d.copy() if buf is None else momentum * buf + d
        ref = ref - lr * (d + momentum * buf if nesterov else buf)
    np.testing.assert_allclose(p.numpy(), ref, rtol=1e-5, atol=1e-6)
    buffer = opt.state[0]["momentum_buffer"]
    assert isinstance(buffer, xp.ndarray) and buffer.dtype == np.float32


def test_sgd_updates_in_place_keeps_float32_and_leaves_grad_alone(device):
    p = nn.Parameter(tinyres.tensor(np.ones((2, 2), dtype=np.float32), device=device))
    q = nn.Parameter(tinyres.tensor(np.ones(3, dtype=np.float32), device=device))  # no grad: not touched
    opt = optim.SGD([p, q], lr=0.1, momentum=0.9, weight_decay=1e-4)
    opt.param_groups[0]["lr"] = np.float64(0.1)  # a NumPy scalar must not turn the update into float64
    data = p.data
    grad = tinyres.tensor(np.full((2, 2), 0.5, dtype=np.float32), device=device)
    p.grad = grad
    opt.step()
    assert p.data is data and p.dtype == np.float32
    np.testing.assert_array_equal(p.grad.numpy(), np.full((2, 2), 0.5, dtype=np.float32))
    np.testing.assert_array_equal(q.numpy(), np.ones(3))
    assert 1 not in opt.state  # q has no momentum buffer
    opt.zero_grad()
    assert p.grad is None


def test_lr_is_readable_and_writable_both_ways():
    opt = optim.SGD([scalar_param(0.0)], lr=0.1)
    assert opt.lr == opt.param_groups[0]["lr"] == 0.1
    opt.lr = 0.05
    assert opt.param_groups[0]["lr"] == 0.05 and type(opt.param_groups[0]["lr"]) is float


def test_sgd_rejects_bad_settings():
    with pytest.raises(ValueError, match="nesterov"):
        optim.SGD([scalar_param(0.0)], lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="empty"):
        optim.SGD([], lr=0.1)
    with pytest.raises(ValueError, match=r"SGD: momentum must be below 1 .* got momentum 1.5"):
        optim.SGD([scalar_param(0.0)], lr=0.1, momentum=1.5)
    with pytest.raises(ValueError, match="dampening 2"):
        optim.SGD([scalar_param(0.0)], lr=0.1, momentum=0.9, dampening=2)


def test_zero_grad_sets_to_none_or_zeroes_in_place():
    p = scalar_param(1.0)
    opt = optim.SGD([p], lr=0.1)
    (p * 3).sum().backward()
    grad = p.grad
    opt.zero_grad(set_to_none=False)
    assert p.grad is grad and p.grad.item() == 0
    opt.zero_grad(set_to_none=True)
    assert p.grad is None
    opt.zero_grad(set_to_none=False)  # no gradient yet: nothing to zero
    assert p.grad is None


def test_momentum_buffers_follow_the_parameters_to_another_device(device, xp):
    """Steps taken on the CPU, then the module moves: the next step finds the buffers where the weights are."""
    model = nn.Linear(3, 2)
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        for p in model.parameters():
            p.grad = tinyres.tensor(np.ones(p.shape, dtype=np.float32))
        opt.step()
    model.to(device)
    for p in model.parameters():
        p.grad = tinyres.tensor(np.ones(p.shape, dtype=np.float32), device=device)
    opt.step()  # mixing a CPU buffer with GPU weights would raise here
    assert all(type(s["momentum_buffer"]) is xp.ndarray for s in opt.state.values())
    # the buffer is 1 + 0.9 + 0.81 after three unit gradients, wherever it lives
    np.testing.assert_allclose(opt.state_dict()["state"][0]["momentum_buffer"], np.full((2, 3), 2.71), rtol=1e-6)


def test_lr_scheduler_namespace_as_in_pytorch():
    from tinyres.optim.lr_scheduler import MultiStepLR

    assert optim.lr_scheduler.MultiStepLR is MultiStepLR is optim.MultiStepLR
    assert optim.lr_scheduler.WarmupLR is optim.WarmupLR and optim.lr_scheduler.LRScheduler is optim.LRScheduler


def test_optimizer_state_dict_round_trip():
    params = [scalar_param(1.0), nn.Parameter(tinyres.zeros(2, 3))]
    opt = optim.SGD(params, lr=0.1, momentum=0.9)
    for p in params:
        p.grad = tinyres.tensor(np.ones(p.shape, dtype=np.float32))
    opt.step()
    state = opt.state_dict()
    assert state["param_groups"] == [{"lr": 0.1, "momentum": 0.9, "dampening": 0.0, "weight_decay": 0.0,
                                      "nesterov": False, "params": [0, 1]}]
    assert all(type(a) is np.ndarray for s in state["state"].values() for a in s.values())
    json.dumps(state["param_groups"])  # hyperparameters are plain numbers

    other = optim.SGD([scalar_param(1.0), nn.Parameter(tinyres.zeros(2, 3))], lr=0.5, momentum=0.9)
    other.load_state_dict(state)
    assert other.lr == 0.1
    np.testing.assert_array_equal(other.state[1]["momentum_buffer"], np.ones((2, 3)))
    state["state"][1]["momentum_buffer"] = np.ones((3, 2))
    with pytest.raises(ValueError, match=r"expected shape \(2, 3\), got \(3, 2\)"):
        other.load_state_dict(state)


# ---- schedules ---------------------------------------------------------------------------

def lrs(scheduler: optim.LRScheduler, steps: int, **step_kwargs) -> list[float]:
    """The lr in force at iterations 0 .. steps-1."""
    values = []
    for _ in range(steps):
        values.append(scheduler.optimizer.lr)
        scheduler.step(**step_kwargs)
    return values


def test_multistep_lr_divides_at_each_milestone():
    opt = optim.SGD([scalar_param(0.0)], lr=0.1)
    sched = optim.MultiStepLR(opt, milestones=[3, 5], gamma=0.1)
    np.testing.assert_allclose(lrs(sched, 7), [0.1, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    assert sched.iteration == 7 and sched.get_last_lr() == [opt.lr]


def test_multistep_lr_at_the_papers_milestones():
    opt = optim.SGD([scalar_param(0.0)], lr=0.1)
    sched = optim.MultiStepLR(opt, milestones=[32_000, 48_000])
    state = sched.state_dict()
    for iteration, lr in [(31_999, 0.1), (32_000, 0.01), (47_999, 0.01), (48_000, 0.001), (64_000, 0.001)]:
        sched.load_state_dict({**state, "iteration": iteration - 1})
        sched.step()  # now `iteration` steps have been taken
        assert opt.lr == pytest.approx(lr, rel=1e-12), iteration


def test_warmup_until_iteration_then_the_wrapped_schedule():
    opt = optim.SGD([scalar_param(0.0)], lr=0.1)
    sched = optim.WarmupLR(opt, optim.MultiStepLR(opt, [5]), warmup_lr=0.01, until_iter=2, until_error=None)
    # the wrapped schedule counts from iteration 0, so its milestone stays at 5
    np.testing.assert_allclose(lrs(sched, 7), [0.01, 0.01, 0.1, 0.1, 0.1, 0.01, 0.01])


def test_warmup_until_training_error_falls_below_80_percent():
    opt = optim.SGD([scalar_param(0.0)], lr=0.1)
    sched = optim.WarmupLR(opt, optim.MultiStepLR(opt, [100]), warmup_lr=0.01, until_error=0.8)
    assert opt.lr == 0.01
    for error in (0.9, 0.85, 0.8):  # 80% is not below 80%
        sched.step(train_error=error)
        assert opt.lr == 0.01
    sched.step(train_error=0.79)
    assert opt.lr == 0.1 and sched.get_last_lr() == [0.1]
    sched.step(train_error=0.9)  # the warm-up does not come back
    assert opt.lr == 0.1


def test_scheduler_state_dict_is_json_and_resumes():
    opt = optim.SGD([scalar_param(0.0)], lr=0.1)
    sched = optim.WarmupLR(opt, optim.MultiStepLR(opt, [4]), until_iter=2)
    lrs(sched, 3)
    state = json.loads(json.dumps(sched.state_dict()))

    opt2 = optim.SGD([scalar_param(0.0)], lr=0.1)
    sched2 = optim.WarmupLR(opt2, optim.MultiStepLR(opt2, [4]), until_iter=2)
    sched2.load_state_dict(state)
    assert opt2.lr == opt.lr and sched2.iteration == 3
    assert lrs(sched2, 4) == lrs(sched, 4)
    with pytest.raises(ValueError, match="missing"):
        sched2.load_state_dict({"iteration": 3})


# ---- the schedules found after the paper, against values worked out from PyTorch's documented formulas ----

def one_cycle(total_steps: int = 10, max_lr: float = 1.0, **kwargs) -> optim.OneCycleLR:
    opt = optim.SGD([scalar_param(0.0)], lr=123.0, momentum=0.9)  # the optimizer's lr is not used
    return optim.OneCycleLR(opt, max_lr=max_lr, total_steps=total_steps, **kwargs)


def momenta(scheduler: optim.LRScheduler, steps: int) -> list[float]:
    """The momentum in force at iterations 0 .. steps-1."""
    values = []
    for _ in range(steps):
        values.append(scheduler.optimizer.param_groups[0]["momentum"])
        scheduler.step()
    return values


def test_one_cycle_cosine_rises_to_max_lr_then_falls_to_its_floor():
    # max_lr 1, 10 steps, 30% up: lr from 1/25 up to 1 at step 2 (0.3 * 10 - 1), then down to 1/25/1e4 at step 9
    lr_floor = 0.04 / 1e4
    down = [lr_floor + (1 - lr_floor) / 2 * (1 + np.cos(np.pi * (k - 2) / 7)) for k in range(2, 11)]
    sched = one_cycle()
    np.testing.assert_allclose(lrs(sched, 10) + [sched.optimizer.lr], [0.04, 0.52] + down, rtol=1e-12)
    assert down[0] == pytest.approx(1.0) and down[7] == pytest.approx(4e-6)
    assert down[8] == pytest.approx(0.0495194, rel=1e-5)  # step 10, one past the floor, as PyTorch allows


def test_one_cycle_cycles_momentum_against_the_lr():
    # momentum 0.95 -> 0.85 while the lr rises, back to 0.95 while it falls; the optimizer's 0.9 is replaced
    up = [0.95, 0.90, 0.85]
    down = [0.95 - 0.05 * (1 + np.cos(np.pi * (k - 2) / 7)) for k in range(3, 10)]
    np.testing.assert_allclose(momenta(one_cycle(), 10), up + down, rtol=1e-12)
    sched = one_cycle(cycle_momentum=False)
    assert momenta(sched, 10) == [0.9] * 10


def test_one_cycle_linear_and_three_phase():
    linear = lrs(one_cycle(anneal_strategy="linear"), 10)
    np.testing.assert_allclose(linear[:4], [0.04, 0.52, 1.0, 1 - (1 - 4e-6) / 7], rtol=1e-12)
    np.testing.assert_allclose(linear[9], 4e-6, rtol=1e-9)
    # three phases: up to step 2, back down to the start at step 4 (2 * 0.3 * 10 - 2), then to the floor at step 9
    three = one_cycle(three_phase=True, div_factor=10.0, final_div_factor=100.0)
    values, m = lrs(three, 10), momenta(one_cycle(three_phase=True), 10)
    np.testing.assert_allclose(values[:5], [0.1, 0.55, 1.0, 0.55, 0.1], rtol=1e-12)
    assert values[9] == pytest.approx(0.001, rel=1e-12)
    np.testing.assert_allclose(m[:5] + m[9:], [0.95, 0.90, 0.85, 0.90, 0.95, 0.95], rtol=1e-12)


def test_one_cycle_refuses_bad_arguments_and_a_step_past_the_end():
    sched = one_cycle(total_steps=3)
    for _ in range(3):
        sched.step()
    with pytest.raises(ValueError, match="stepped 4 times, but total_steps is 3"):
        sched.step()
    for kwargs, message in [({"total_steps": 0}, "total_steps"), ({"pct_start": 1.5}, "pct_start"),
                            ({"anneal_strategy": "cosine"}, "anneal_strategy")]:
        with pytest.raises(ValueError, match=message):
            one_cycle(**kwargs)


def test_cosine_annealing_follows_half_a_cosine_down_to_eta_min():
    opt = optim.SGD([scalar_param(0.0)], lr=0.1)
    sched = optim.CosineAnnealingLR(opt, T_max=4)
    np.testing.assert_allclose(lrs(sched, 6), [0.1, 0.0853553390593, 0.05, 0.0146446609407, 0.0, 0.0146446609407],
                               rtol=1e-10, atol=1e-15)
    opt = optim.SGD([scalar_param(0.0)], lr=0.1)
    np.testing.assert_allclose(lrs(optim.CosineAnnealingLR(opt, T_max=2, eta_min=0.01), 3), [0.1, 0.055, 0.01])


def test_linear_warmup_then_cosine_in_sequence():
    opt = optim.SGD([scalar_param(0.0)], lr=0.1)
    np.testing.assert_allclose(lrs(optim.LinearLR(opt, start_factor=0.25, total_iters=4), 6),
                               [0.025, 0.04375, 0.0625, 0.08125, 0.1, 0.1])
    opt = optim.SGD([scalar_param(0.0)], lr=0.1)
    warmup = optim.LinearLR(opt, start_factor=0.5, total_iters=2)
    cosine = optim.CosineAnnealingLR(opt, T_max=2)  # starts from 0.1, not from what LinearLR set
    sched = optim.SequentialLR(opt, [warmup, cosine], milestones=[2])
    np.testing.assert_allclose(lrs(sched, 5), [0.05, 0.075, 0.1, 0.05, 0.0], atol=1e-15)
    with pytest.raises(ValueError, match="one milestone fewer"):
        optim.SequentialLR(opt, [warmup, cosine], milestones=[2, 3])


@pytest.mark.parametrize("make", [
    lambda opt: optim.OneCycleLR(opt, max_lr=0.4, total_steps=20, pct_start=0.25),
    lambda opt: optim.CosineAnnealingLR(opt, T_max=20, eta_min=0.001),
    lambda opt: optim.SequentialLR(opt, [optim.LinearLR(opt, 0.1, total_iters=5), optim.CosineAnnealingLR(opt, 15)],
                                   milestones=[5]),
], ids=["one-cycle", "cosine", "linear-then-cosine"])
def test_new_schedules_resume_exactly_from_a_checkpoint(tmp_path, make):
    model = nn.Linear(3, 2)
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    sched = make(opt)
    lrs(sched, 7)
    tinyres.save_checkpoint(tmp_path / "c.npz", model, opt, sched)
    expected_lrs, expected_momenta = lrs(sched, 8), [opt.param_groups[0]["momentum"]]

    model2 = nn.Linear(3, 2)
    opt2 = optim.SGD(model2.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    sched2 = make(opt2)
    tinyres.load_checkpoint(tmp_path / "c.npz", model2, opt2, sched2)
    assert sched2.iteration == 7
    assert lrs(sched2, 8) == expected_lrs and [opt2.param_groups[0]["momentum"]] == expected_momenta
