"""GPA against its equations (ALGORITHMS.md), its special cases, stacking and optimizer behaviour. Run as a script,
this file is the fresh process that resumes a checkpoint."""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import snoo
from helpers import (
    assert_resumes_bit_for_bit,
    batch,
    make_model,
    ops_in_wrapper_step,
    params_of,
    resume_and_finish,
    run_without_a_bias_gradient_every,
    train_step,
)
from snoo import spec

INNERS = {
    "SGD": lambda params: torch.optim.SGD(params, lr=0.05),
    "SGD-momentum": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
    "AdamW": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.05),
}


def reference(make_inner, steps: int, mu_y: float, mu_x: float):
    """GPA written from the equations, one tensor at a time, in float64, around the black box A = make_inner(...).
    Returns (what the parameters hold: y_{T+1}, x_{T+1}, z_{T+1})."""
    model = make_model(0, torch.float64)
    inner = make_inner(model.parameters())
    params = list(model.parameters())
    x, z, y = params_of(model), params_of(model), params_of(model)  # x_1 = z_1 = y_1 = p
    for t in range(1, steps + 1):
        train_step(model, inner, t)  # the parameters held y_t; now y_t + u_t
        with torch.no_grad():
            for i, p in enumerate(params):
                u = p - y[i]
                z[i] = z[i] + u
                x[i] = mu_x * x[i] + (1 - mu_x) * z[i]
                y[i] = mu_y * x[i] + (1 - mu_y) * z[i]
                p.copy_(y[i])
    return params_of(model), x, z


@settings(max_examples=15, deadline=None)
@given(
    inner=st.sampled_from(sorted(INNERS)),
    mu_y=st.floats(0.0, 1.0),
    mu_x=st.one_of(st.floats(0.0, 0.999), st.just(0.9967)),
    steps=st.integers(1, 25),
)
def test_equals_reference_from_the_equations(inner, mu_y, mu_x, steps):
    model = make_model(0, torch.float64)
    opt = snoo.GPA(INNERS[inner](model.parameters()), mu_y=mu_y, mu_x=mu_x)
    for t in range(1, steps + 1):
        train_step(model, opt, t)
    want_y, want_x, want_z = reference(INNERS[inner], steps, mu_y, mu_x)
    for p, y, x, z in zip(model.parameters(), want_y, want_x, want_z, strict=True):
        torch.testing.assert_close(p.detach(), y, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(opt.state[p]["x"], x, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(opt.state[p]["z"], z, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("inner", sorted(INNERS))
def test_mu_x_zero_is_the_inner_optimizer_alone_bit_for_bit(inner):
    """x = z = y at every step: z_t - x_t is exactly 0, so z_{t+1} is the parameter as the inner step left it, and the
    lerps of weight 1 (x) and of any weight between equal ends (y) return it unchanged. Bit for bit, in float32."""
    a, b = make_model(), make_model()
    opt = snoo.GPA(INNERS[inner](a.parameters()), mu_y=0.7, mu_x=0.0)
    plain = INNERS[inner](b.parameters())
    for t in range(1, 31):
        train_step(a, opt, t)
        train_step(b, plain, t)
        assert all(torch.equal(pa, pb) for pa, pb in zip(a.parameters(), b.parameters()))
    assert all(torch.equal(opt.state[p]["x"], p) and torch.equal(opt.state[p]["z"], p) for p in a.parameters())


@pytest.mark.parametrize("inner", sorted(INNERS))
def test_mu_y_zero_takes_gradients_at_z_and_evaluates_an_ema_of_z(inner):
    """y = z: the parameters follow the inner optimizer alone, bit for bit (the correction mu_y (z - x) is exactly
    0), and x, what eval() gives, is the EMA of its iterates."""
    mu_x = 0.8
    a, b = make_model(), make_model()
    opt = snoo.GPA(INNERS[inner](a.parameters()), mu_y=0.0, mu_x=mu_x)
    plain = INNERS[inner](b.parameters())
    ema = [p.double() for p in params_of(b)]
    for t in range(1, 31):
        train_step(a, opt, t)
        train_step(b, plain, t)
        assert all(torch.equal(pa, pb) for pa, pb in zip(a.parameters(), b.parameters()))
        ema = [mu_x * e + (1 - mu_x) * p.detach().double() for e, p in zip(ema, b.parameters())]
    assert all(torch.equal(opt.state[p]["z"], p) for p in a.parameters())
    opt.eval()
    for p, e in zip(a.parameters(), ema):
        torch.testing.assert_close(p.detach().double(), e, rtol=1e-5, atol=1e-6)  # float32 against float64
        assert not torch.equal(p, opt.state[p][opt.state_spec.train_point])


@pytest.mark.parametrize("mu", [0.5, 0.9])
def test_mu_y_one_around_sgd_is_heavy_ball_momentum(mu):
    """Gradients at x: x_{t+1} - x_t = (1 - mu)(z_t - x_t) - (1 - mu) lr g_t, and z_t - x_t = mu (x_t - x_{t-1}) /
    (1 - mu), so x_{t+1} = x_t + mu (x_t - x_{t-1}) - (1 - mu) lr g_t: torch's SGD with momentum mu and lr
    (1 - mu) lr, whose parameters are its iterate, as GPA's hold y = x."""
    lr = 0.05
    a, b = make_model(0, torch.float64), make_model(0, torch.float64)
    opt = snoo.GPA(torch.optim.SGD(a.parameters(), lr=lr), mu_y=1.0, mu_x=mu)
    ref = torch.optim.SGD(b.parameters(), lr=(1 - mu) * lr, momentum=mu)
    for t in range(1, 41):
        train_step(a, opt, t)
        train_step(b, ref, t)
        for pa, pb in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(pa, pb, rtol=1e-10, atol=1e-12)
            assert torch.equal(pa, opt.state[pa]["x"])


def test_averaging_lowers_the_loss_of_noisy_sgd_at_a_constant_lr():
    """A quadratic with noisy gradients, SGD at a constant lr: the last iterate stays in a noise ball whose loss the
    average x is far below (measured, torch 2.13 CPU: SGD's last iterate 0.46, GPA's x 0.015 with the defaults)."""
    torch.manual_seed(0)
    n, steps = 20, 1500
    curvature = torch.logspace(0, -1, n, dtype=torch.float64)
    noise = torch.randn(steps, n, dtype=torch.float64)

    def final_loss(wrap: bool) -> float:
        w = torch.nn.Parameter(torch.ones(n, dtype=torch.float64))
        opt = torch.optim.SGD([w], lr=0.5)
        if wrap:
            opt = snoo.GPA(opt)
        for t in range(steps):
            w.grad = curvature * w.detach() + 0.3 * noise[t]
            opt.step()
        if wrap:
            opt.eval()
        return (0.5 * curvature * w.detach() ** 2).sum().item()

    assert final_loss(True) < 0.1 * final_loss(False)


def test_parameters_hold_y_eval_puts_x_train_puts_y_back_exactly_and_step_refuses_in_eval():
    model = make_model()
    opt = snoo.GPA(torch.optim.AdamW(model.parameters(), lr=1e-2), mu_y=0.6, mu_x=0.9)
    for t in range(1, 8):
        train_step(model, opt, t)
    y = params_of(model)
    for p in model.parameters():
        st_ = opt.state[p]
        torch.testing.assert_close(p.detach(), 0.6 * st_["x"] + 0.4 * st_["z"])
        assert not torch.equal(p, st_["x"]) and not torch.equal(st_["x"], st_["z"])
    opt.eval()
    opt.eval()
    assert all(torch.equal(p, opt.state[p]["x"]) for p in model.parameters())
    with pytest.raises(RuntimeError, match=r"train\(\)"):
        opt.step()
    opt.train()
    opt.train()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), y))
    assert all(opt.state_spec.train_point not in s for s in opt.state.values())
    train_step(model, opt, 8)


def test_per_group_values_and_a_scheduler_on_the_wrapper_moves_the_inner_lr():
    """Two independent models in one optimizer, the second group with mu_x = 0 of its own: the first takes the steps
    of a GPA built with the wrapper's values alone, the second those of SGD alone, bit for bit; a scheduler on the
    wrapper halves the lr both see."""
    first, second, twin_first, twin_second = make_model(0), make_model(1), make_model(0), make_model(1)
    groups = [{"params": list(first.parameters())}, {"params": list(second.parameters()), "gpa_mu_x": 0.0}]
    opt = snoo.GPA(torch.optim.SGD(groups, lr=0.1, momentum=0.5), mu_y=0.5, mu_x=0.9)
    assert [(g["gpa_mu_y"], g["gpa_mu_x"]) for g in opt.param_groups] == [(0.5, 0.9), (0.5, 0.0)]
    alone = snoo.GPA(torch.optim.SGD(twin_first.parameters(), lr=0.1, momentum=0.5), mu_y=0.5, mu_x=0.9)
    plain = torch.optim.SGD(twin_second.parameters(), lr=0.1, momentum=0.5)
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5) for o in (opt, alone, plain)]
    for t in range(1, 6):
        x, y = batch(t)
        ((first(x) - y).square().mean() + (second(x) - y).square().mean()).backward()
        opt.step()
        opt.zero_grad()
        train_step(twin_first, alone, t)
        train_step(twin_second, plain, t)
        for s in scheds:
            s.step()
    assert opt.inner.param_groups[0]["lr"] == 0.1 / 2**5 and opt.param_groups is opt.inner.param_groups
    assert all(torch.equal(p, q) for p, q in zip(first.parameters(), twin_first.parameters()))
    assert all(torch.equal(p, q) for p, q in zip(second.parameters(), twin_second.parameters()))
    assert not all(torch.equal(opt.state[p]["x"], p) for p in first.parameters())


def test_refuses_bad_arguments_naming_them():
    inner = torch.optim.SGD(make_model().parameters(), lr=0.1)
    for kwargs, name in [
        (dict(mu_y=1.5), "mu_y"),
        (dict(mu_y=-0.1), "mu_y"),
        (dict(mu_x=1.0), "mu_x"),
        (dict(mu_x=float("nan")), "mu_x"),
        (dict(mu_x="0.9"), "mu_x"),
    ]:
        with pytest.raises(ValueError, match=name):
            snoo.GPA(inner, **kwargs)
    assert all("gpa_mu_y" not in g for g in inner.param_groups), "a refused wrapper leaves the inner as it was"
    with pytest.raises(TypeError, match=r"torch\.optim\.Optimizer"):
        snoo.GPA([torch.nn.Parameter(torch.zeros(2))])
    opt = snoo.GPA(inner)
    with pytest.raises(ValueError, match="mu_x"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "gpa_mu_x": 1.5})
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})
    assert (opt.param_groups[-1]["gpa_mu_y"], opt.param_groups[-1]["gpa_mu_x"]) == (0.7, 0.9967)


def test_frozen_and_gradless_parameters_are_left_exactly_as_they_are():
    torch.manual_seed(0)
    used, frozen, unused = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    frozen.requires_grad_(False)
    before = {"frozen": frozen.weight.detach().clone(), "unused": unused.weight.detach().clone()}
    params = [*used.parameters(), *frozen.parameters(), *unused.parameters()]
    opt = snoo.GPA(torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1), mu_y=0.7, mu_x=0.5)
    for t in range(1, 8):
        frozen(used(batch(t)[0][:, :4])).square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(frozen.weight, before["frozen"]) and frozen.weight not in opt.state
    assert torch.equal(unused.weight, before["unused"])
    assert torch.equal(opt.state[unused.weight]["x"], before["unused"])
    assert torch.equal(opt.state[unused.weight]["z"], before["unused"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_parameters_keep_float32_state(dtype):
    model = make_model(0, dtype)
    opt = snoo.GPA(torch.optim.SGD(model.parameters(), lr=0.05), mu_y=0.7, mu_x=0.9)
    for t in range(1, 4):
        train_step(model, opt, t)
    for p in model.parameters():
        st_ = opt.state[p]
        assert p.dtype == dtype and st_["x"].dtype == st_["z"].dtype == torch.float32
        assert torch.equal(p, torch.lerp(st_["z"], st_["x"], 0.7).to(dtype))
    opt.eval()
    assert all(torch.equal(p, opt.state[p]["x"].to(dtype)) for p in model.parameters())


def test_update_is_a_few_foreach_passes_whatever_the_number_of_tensors():
    wrap = snoo.GPA
    assert ops_in_wrapper_step(wrap, 3) == ops_in_wrapper_step(wrap, 50) <= 8


@pytest.mark.parametrize(
    "make_inner",
    [
        lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2),
        lambda m: snoo.SCALE(snoo.param_groups(m, head=m[2]), lr=1e-2),
        lambda m: snoo.MuonAdamW(snoo.param_groups(m, head=m[2]), lr=0.02),
    ],
    ids=["AdamW", "SCALE", "MuonAdamW"],
)
def test_wraps_torch_and_snoo_optimizers_and_lowers_the_loss(make_inner):
    model = make_model()
    opt = snoo.GPA(make_inner(model), mu_x=0.9)
    losses = [train_step(model, opt, 0) for _ in range(40)]  # one batch, over and over
    opt.eval()
    x, y = batch(0)
    assert math.isfinite(losses[-1]) and (model(x) - y).square().mean().item() < 0.9 * losses[0]


# -- stacking -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "outer, inner",
    [(snoo.SNOO, snoo.GPA), (snoo.Lookahead, snoo.GPA), (snoo.EMANesterov, snoo.GPA), (snoo.GPA, snoo.Nesterov)],
)
def test_gpa_must_be_outermost_and_cannot_wrap_a_lookahead_wrapper(outer, inner):
    """SNOO(GPA(A)): SNOO's reset p = w would land in GPA's u at the next step, so GPA's z would take SNOO's jump for
    a move of A; GPA's parameters hold y, not its iterate. Refused with the order that is exact."""
    adamw = torch.optim.AdamW(make_model().parameters(), lr=1e-2)
    middle = inner(adamw)
    with pytest.raises(TypeError, match=rf"lookahead point.*{inner.__name__}\({outer.__name__}\(AdamW"):
        outer(middle)
    with pytest.raises(TypeError, match="both keep their hyperparameters"):
        snoo.GPA(snoo.GPA(torch.optim.AdamW(make_model().parameters())))


def test_gpa_around_snoo_is_gpa_with_snoo_as_its_black_box():
    """The reference drives its own SNOO(AdamW) and applies GPA's equations by hand around it."""
    steps, mu_y, mu_x = 11, 0.7, 0.8

    def make_inner(params):
        return snoo.SNOO(torch.optim.AdamW(params, lr=1e-2), k=3, lr=0.7, momentum=0.5)

    model = make_model(0, torch.float64)
    opt = snoo.GPA(make_inner(model.parameters()), mu_y=mu_y, mu_x=mu_x)
    for t in range(1, steps + 1):
        train_step(model, opt, t)
    want_y, want_x, _ = reference(make_inner, steps, mu_y, mu_x)
    for p, y, x in zip(model.parameters(), want_y, want_x, strict=True):
        torch.testing.assert_close(p.detach(), y, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(opt.state[p]["x"], x, rtol=1e-12, atol=1e-12)
    y = params_of(model)
    opt.eval()  # the stack ends on the innermost evaluation weights: SNOO's slow weights
    assert not opt.inner.training
    assert all(torch.equal(p, opt.inner.state[p]["slow"]) for p in model.parameters())
    opt.train()
    assert opt.inner.training and all(torch.equal(p, q) for p, q in zip(model.parameters(), y))


def test_spec_names_gpa_around_any_stage_and_refuses_the_other_order():
    model = make_model()
    opt = spec.build("gpa(mu_y=0.5)+adamw", model)
    assert isinstance(opt, snoo.GPA) and {(g["gpa_mu_y"], g["gpa_mu_x"]) for g in opt.param_groups} == {(0.5, 0.9967)}
    assert spec.canonical("gpa+snoo-adamw") == "gpa+snoo+adamw"
    assert isinstance(spec.build("gpa+snoo+adamw", model).inner, snoo.SNOO)
    with pytest.raises(ValueError, match=r"cannot build 'snoo\+gpa\+adamw'.*lookahead point"):
        spec.build("snoo+gpa+adamw", model)
    assert spec.canonical("gpa(mu_y=1)+sgd") == "gpa(mu_y=1)+sgd"
    for bad in ("gpa(mu_x=1)+adamw", "gpa(mu_y=-0.5)+adamw", "gpa(mu_y=1.5)+adamw"):
        with pytest.raises(ValueError, match="out of range"):
            spec.parse(bad)


# -- checkpoints ----------------------------------------------------------------------------------------------------

STEPS = 15


def build() -> tuple[torch.nn.Module, snoo.GPA, torch.optim.lr_scheduler.LRScheduler]:
    model = make_model()
    opt = snoo.GPA(torch.optim.AdamW(model.parameters(), lr=1e-2), mu_y=0.7, mu_x=0.8)
    return model, opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS)


run = run_without_a_bias_gradient_every(4)


CUTS = [(1, False), (4, True), (9, False)]  # (step, saved in eval mode)


def test_resume_in_a_fresh_process_is_bit_exact_and_in_eval_mode(tmp_path):
    sd = assert_resumes_bit_for_bit(__file__, tmp_path, build, run, STEPS, CUTS).state_dict()
    assert set(sd["state"][1]) >= {"gpa.x", "gpa.z", "exp_avg", "exp_avg_sq"}
    assert sd["param_groups"][0]["gpa"] == {"inner_steps": 9, "training": True, "wrapper": "GPA", "inner": "AdamW"}


def test_state_dict_round_trip_continues_the_same_in_process():
    model, opt, sched = build()
    run(model, opt, sched, 0, 6)
    # state dicts share the live tensors: a copy, as torch.save would make
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()})
    run(model, opt, sched, 6, 10)
    fresh_model, fresh, fresh_sched = build()
    fresh_model.load_state_dict(saved["model"])
    fresh.load_state_dict(saved["opt"])
    fresh_sched.load_state_dict(saved["sched"])
    run(fresh_model, fresh, fresh_sched, 6, 10)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), fresh_model.parameters()))
    assert all(
        torch.equal(opt.state[p]["x"], fresh.state[q]["x"])
        for p, q in zip(model.parameters(), fresh_model.parameters())
    )
    bad = {**saved["opt"], "state": {0: {**saved["opt"]["state"][0], "gpa.w": torch.zeros(16, 6)}}}
    with pytest.raises(ValueError, match="not state that GPA keeps"):
        build()[1].load_state_dict(bad)


if __name__ == "__main__":
    resume_and_finish(Path(sys.argv[1]), build, run, STEPS)
