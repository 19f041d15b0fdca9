"""EMA-Nesterov against its equations (docs/ema-nesterov.md), its special cases, and optimizer behaviour. Run as a
script, this file is the fresh process that resumes a checkpoint."""

from __future__ import annotations

import functools
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
    inner_optimizers,
    make_model,
    ops_in_wrapper_step,
    params_of,
    resume_and_finish,
    run_without_a_bias_gradient_every,
    train_step,
)
from snoo import schedules


def reference(steps: int, beta, gamma: float, warmup: int = 0, rest: int = 0, total: int | None = None):
    """EMA-Nesterov written from the equations, one tensor at a time, in float64, around AdamW (the black box A).
    Returns (what the parameters hold: y_{T+1}, the real iterate x_{T+1})."""
    model = make_model(0, torch.float64)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    params = list(model.parameters())
    x = params_of(model)  # x_1 = p, m_1 = 0, y_1 = x_1
    m = [torch.zeros_like(p) for p in params]
    for t in range(1, steps + 1):
        train_step(model, inner, t)  # the parameters held y_t; now A_t(y_t) = x_{t+1}
        n = t + 1
        off = n <= warmup or (rest and n > total - rest)
        beta_next = 0.0 if off else (beta(n) if callable(beta) else beta)
        with torch.no_grad():
            for i, p in enumerate(params):
                x_next = p.detach().clone()
                m[i] = gamma * m[i] + (1 - gamma) * (x_next - x[i])
                x[i] = x_next
                p.copy_(x[i] + beta_next * m[i])  # y_{t+1} = x_{t+1} + beta_{t+1} m_{t+1}
    return params_of(model), x


@settings(max_examples=20, deadline=None)
@given(
    beta=st.one_of(
        st.floats(0.0, 2.0),
        st.sampled_from(
            [schedules.linear_warmup(0.0, 0.9, steps=7), schedules.cosine(1.5, 0.1, steps=20), lambda n: 0.3 * (n % 3)]
        ),
    ),
    gamma=st.floats(0.0, 0.995),
    steps=st.integers(1, 30),
    warmup=st.integers(0, 4),
    rest=st.integers(0, 4),
)
def test_equals_reference_from_the_equations(beta, gamma, steps, warmup, rest):
    total = 25
    model = make_model(0, torch.float64)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    opt = snoo.EMANesterov(inner, beta=beta, gamma=gamma, warmup_steps=warmup, rest_steps=rest, total_steps=total)
    for t in range(1, steps + 1):
        train_step(model, opt, t)
    want_y, want_x = reference(steps, beta, gamma, warmup, rest, total)
    for p, y, x in zip(model.parameters(), want_y, want_x):
        torch.testing.assert_close(p.detach(), y, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(opt.state[p]["x"], x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mu", [0.5, 0.9])
def test_gamma_zero_around_sgd_is_torch_nesterov_sgd(mu):
    """On paper: torch's nesterov SGD, b_t = mu b_{t-1} + g_t, p <- p - lr (g_t + mu b_t), takes each gradient at the
    point its parameters hold, and with v_t = x_t - x_{t-1} = -lr b_{t-1} the lookahead form gives
    y_{t+1} = y_t - lr g_t + mu v_{t+1} = y_t - lr (g_t + mu b_t). So both hold y; x = p + lr mu b."""
    lr = 0.05
    a, b = make_model(0, torch.float64), make_model(0, torch.float64)
    opt = snoo.EMANesterov(torch.optim.SGD(a.parameters(), lr=lr), beta=mu, gamma=0.0)
    ref = torch.optim.SGD(b.parameters(), lr=lr, momentum=mu, nesterov=True)
    for t in range(1, 41):
        train_step(a, opt, t)
        train_step(b, ref, t)
        for pa, pb in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(pa, pb, rtol=1e-10, atol=1e-12)  # both hold y_{t+1}
            x = pb.detach() + lr * mu * ref.state[pb]["momentum_buffer"]
            torch.testing.assert_close(opt.state[pa]["x"], x, rtol=1e-10, atol=1e-12)
    opt.eval()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa.detach(), pb.detach() + lr * mu * ref.state[pb]["momentum_buffer"])


def test_accelerates_gradient_descent_on_an_ill_conditioned_quadratic():
    """f(x) = x'Hx/2, eigenvalues 1 to 1e-3 (condition number 1000), gradient descent with lr = 1/L, 300 steps.
    Measured (torch 2.13, CPU): GD 1.3e-3; EMA-Nesterov beta .5 gamma .99 (the defaults) 6.1e-4, beta .9 gamma .9
    1.1e-4, beta .9 gamma 0 (classical Nesterov) 2.7e-7."""
    torch.manual_seed(0)
    n = 40
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    hessian = q @ torch.diag(torch.logspace(0, -3, n, dtype=torch.float64)) @ q.T
    start = torch.randn(n, dtype=torch.float64)

    def final_loss(beta: float | None, gamma: float = 0.0) -> float:
        x = torch.nn.Parameter(start.clone())
        opt = torch.optim.SGD([x], lr=1.0)
        if beta is not None:
            opt = snoo.EMANesterov(opt, beta=beta, gamma=gamma)
        for _ in range(300):
            (0.5 * x @ hessian @ x).backward()
            opt.step()
            opt.zero_grad()
        if beta is not None:
            opt.eval()  # the real iterate x
        return (0.5 * x @ hessian @ x).item()

    gd = final_loss(None)
    assert final_loss(0.5, 0.99) < 0.8 * gd
    assert final_loss(0.9, 0.9) < 0.1 * gd
    assert final_loss(0.9, 0.0) < 0.01 * gd


def test_parameters_hold_y_eval_puts_x_train_puts_y_back_exactly_and_step_refuses_in_eval():
    model = make_model()
    opt = snoo.EMANesterov(torch.optim.AdamW(model.parameters(), lr=1e-2), beta=0.5, gamma=0.9)
    for t in range(1, 8):
        train_step(model, opt, t)
    y = params_of(model)
    for p in model.parameters():
        st_ = opt.state[p]
        torch.testing.assert_close(p.detach(), st_["x"] + 0.5 * st_["m"])
        assert not torch.equal(p, st_["x"])
    opt.eval()
    opt.eval()
    for p in model.parameters():
        assert torch.equal(p, opt.state[p]["x"])
    with pytest.raises(RuntimeError, match=r"train\(\)"):
        opt.step()
    opt.train()
    opt.train()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), y))
    train_step(model, opt, 8)


def test_warmup_is_the_inner_optimizer_alone_and_rest_ends_on_x_while_m_accumulates():
    a, b = make_model(), make_model()
    opt = snoo.EMANesterov(
        torch.optim.Adam(a.parameters(), lr=1e-2), beta=0.8, gamma=0.5, warmup_steps=5, rest_steps=4, total_steps=12
    )
    plain = torch.optim.Adam(b.parameters(), lr=1e-2)
    for t in range(1, 5):  # steps 1-5 take their gradients at y = x: lookahead off, bit for bit Adam
        train_step(a, opt, t)
        train_step(b, plain, t)
        assert all(torch.equal(pa, pb) for pa, pb in zip(a.parameters(), b.parameters()))
    assert any(s["m"].abs().sum() > 0 for s in opt.state.values()), "m accumulates during the warm-up"
    train_step(a, opt, 5)  # forms y_6 with beta .8
    assert all(not torch.equal(p, opt.state[p]["x"]) for p in a.parameters())
    for t in range(6, 9):  # steps 9-12 rest: after step 8 the parameters hold x
        train_step(a, opt, t)
    assert all(torch.equal(p, opt.state[p]["x"]) for p in a.parameters())
    m_before = [opt.state[p]["m"].clone() for p in a.parameters()]
    for t in range(9, 13):
        train_step(a, opt, t)
        assert all(torch.equal(p, opt.state[p]["x"]) for p in a.parameters())
    assert all(not torch.equal(opt.state[p]["m"], m) for p, m in zip(a.parameters(), m_before))


def test_scale_by_lr_uses_the_group_lr_relative_to_its_peak():
    model = make_model()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = snoo.EMANesterov(inner, beta=0.6, gamma=0.5, scale_by_lr=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0 / (1 + epoch))
    for t in range(1, 6):
        train_step(model, opt, t)
        ratio = opt.param_groups[0]["lr"] / 0.1  # read right after the step, before the scheduler moves it
        for p in model.parameters():
            st_ = opt.state[p]
            torch.testing.assert_close(p.detach() - st_["x"], 0.6 * ratio * st_["m"])
        sched.step()
    assert opt.param_groups[0]["lr"] < 0.1

    bare = make_model()
    no_peak = snoo.EMANesterov(torch.optim.SGD(bare.parameters(), lr=0.1), scale_by_lr=True)
    before = params_of(bare)
    x, y = batch(0)
    (bare(x) - y).square().mean().backward()
    with pytest.raises(ValueError, match="peak"):
        no_peak.step()
    assert all(torch.equal(p, b) for p, b in zip(bare.parameters(), before)), "refused before moving anything"
    fixed = snoo.EMANesterov(torch.optim.SGD(bare.parameters(), lr=0.05), scale_by_lr=True, lr_peak=0.1)
    fixed.step()
    fixed.step()
    p = next(bare.parameters())
    st_ = fixed.state[p]
    torch.testing.assert_close(p.detach() - st_["x"], 0.5 * 0.5 * st_["m"])


def test_frozen_and_gradless_parameters_are_left_exactly_as_they_are():
    torch.manual_seed(0)
    used, frozen, unused = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    frozen.requires_grad_(False)
    before = {"frozen": frozen.weight.detach().clone(), "unused": unused.weight.detach().clone()}
    params = [*used.parameters(), *frozen.parameters(), *unused.parameters()]
    opt = snoo.EMANesterov(torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1), beta=0.9, gamma=0.5)
    for t in range(1, 8):
        x = batch(t)[0][:, :4]
        frozen(used(x)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(frozen.weight, before["frozen"]) and frozen.weight not in opt.state
    assert torch.equal(unused.weight, before["unused"])
    assert torch.equal(opt.state[unused.weight]["x"], before["unused"])
    assert not opt.state[unused.weight]["m"].any()


def test_a_parameter_skipped_at_a_step_keeps_its_lookahead_and_continues_as_if_that_step_had_not_happened():
    torch.manual_seed(0)
    rare = torch.nn.Parameter(torch.randn(3))
    twin = torch.nn.Parameter(rare.detach().clone())
    opt = snoo.EMANesterov(torch.optim.SGD([rare], lr=0.1), beta=0.7, gamma=0.5)
    ref = snoo.EMANesterov(torch.optim.SGD([twin], lr=0.1), beta=0.7, gamma=0.5)
    for t in range(1, 10):
        if t % 3:  # the twin only sees the steps where `rare` has a gradient
            (rare * t).sum().backward()
            (twin * t).sum().backward()
            ref.step()
            ref.zero_grad()
        before = rare.detach().clone()
        opt.step()
        opt.zero_grad()
        if not t % 3:
            assert torch.equal(rare, before)
    assert torch.equal(rare, twin)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_parameters_keep_float32_state(dtype):
    model = make_model(0, dtype)
    opt = snoo.EMANesterov(torch.optim.SGD(model.parameters(), lr=0.05), beta=0.5, gamma=0.9)
    for t in range(1, 4):
        train_step(model, opt, t)
    for p in model.parameters():
        st_ = opt.state[p]
        assert p.dtype == dtype and st_["x"].dtype == st_["m"].dtype == torch.float32
        assert torch.equal(p, (st_["x"] + 0.5 * st_["m"]).to(dtype))
    opt.eval()
    assert all(torch.equal(p, opt.state[p]["x"].to(dtype)) for p in model.parameters())


def test_update_is_a_few_foreach_passes_whatever_the_number_of_tensors():
    wrap = functools.partial(snoo.EMANesterov, beta=0.5, gamma=0.9)
    assert ops_in_wrapper_step(wrap, 3) == ops_in_wrapper_step(wrap, 50) <= 8


def test_refuses_bad_arguments_naming_them():
    inner = torch.optim.SGD(make_model().parameters(), lr=0.1)
    cases = [
        (dict(beta=-0.1), ValueError, "beta"),
        (dict(beta=float("inf")), ValueError, "beta"),
        (dict(gamma=1.0), ValueError, "gamma"),
        (dict(gamma=-0.5), ValueError, "gamma"),
        (dict(warmup_steps=-1), ValueError, "warmup_steps"),
        (dict(rest_steps=3), ValueError, "total_steps"),
        (dict(rest_steps=30, total_steps=20), ValueError, "rest_steps"),
        (dict(total_steps=0), ValueError, "total_steps"),
        (dict(lr_peak=0.0), ValueError, "lr_peak"),
        (dict(scale_by_lr=1), TypeError, "scale_by_lr"),
    ]
    for kwargs, error, name in cases:
        with pytest.raises(error, match=name):
            snoo.EMANesterov(inner, **kwargs)
    assert all("ema_beta" not in g for g in inner.param_groups), "a refused wrapper leaves the inner as it was"
    model = make_model()
    opt = snoo.EMANesterov(torch.optim.SGD(model.parameters(), lr=0.1), beta=lambda n: -1.0 if n == 3 else 0.5)
    train_step(model, opt, 1)
    with pytest.raises(ValueError, match="step 3"):
        train_step(model, opt, 2)


@pytest.mark.parametrize("make_inner", inner_optimizers().values(), ids=inner_optimizers().keys())
def test_wraps_torch_and_snoo_optimizers_and_lowers_the_loss(make_inner):
    model = make_model()
    opt = snoo.EMANesterov(make_inner(model), beta=0.5, gamma=0.9)
    losses = [train_step(model, opt, 0) for _ in range(40)]  # one batch, over and over
    assert math.isfinite(losses[-1]) and losses[-1] < 0.9 * losses[0]


def test_lr_scheduler_on_the_wrapper_moves_the_inner_lr_and_state_device_keeps_state_there():
    model = make_model()
    opt = snoo.EMANesterov(torch.optim.AdamW(model.parameters(), lr=1e-2), state_device="cpu")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    train_step(model, opt, 1)
    sched.step()
    assert opt.inner.param_groups[0]["lr"] == 5e-3 and opt.param_groups is opt.inner.param_groups
    assert all(s["x"].device.type == "cpu" for s in opt.state.values())


# -- checkpoints ----------------------------------------------------------------------------------------------------

STEPS = 17
BETA = schedules.linear_warmup(0.0, 0.8, steps=6)


def build() -> tuple[torch.nn.Module, snoo.EMANesterov, torch.optim.lr_scheduler.LRScheduler]:
    model = make_model()
    opt = snoo.EMANesterov(torch.optim.AdamW(model.parameters(), lr=1e-2), beta=BETA, gamma=0.9, scale_by_lr=True)
    return model, opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS)


run = run_without_a_bias_gradient_every(4)


CUTS = [(1, False), (6, False), (9, True)]  # (step, saved in eval mode)


def test_resume_in_a_fresh_process_is_bit_exact_with_a_schedule_and_in_eval_mode(tmp_path):
    sd = assert_resumes_bit_for_bit(__file__, tmp_path, build, run, STEPS, CUTS).state_dict()
    assert sd["param_groups"][0]["ema_beta"].startswith("<schedule, not saved> schedules.linear_warmup(")
    assert set(sd["state"][1]) >= {"ema_nesterov.x", "ema_nesterov.m", "ema_nesterov.y"}


def test_a_state_saved_with_a_schedule_needs_the_schedule_to_load():
    model, opt, sched = build()
    run(model, opt, sched, 0, 3)
    sd = opt.state_dict()
    plain = snoo.EMANesterov(torch.optim.AdamW(make_model().parameters(), lr=1e-2), beta=0.8)
    with pytest.raises(ValueError, match="schedule for 'ema_beta'"):
        plain.load_state_dict(sd)
    assert len(plain.state) == 0 and len(plain.inner.state) == 0
    fresh = build()[1]
    fresh.load_state_dict(sd)
    assert fresh.param_groups[0]["ema_beta"] is BETA and fresh.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


if __name__ == "__main__":
    resume_and_finish(Path(sys.argv[1]), build, run, STEPS)
