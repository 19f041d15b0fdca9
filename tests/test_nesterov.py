"""Nesterov for any optimizer against the note's equations (docs/nesterov.md), its special cases, the comparison with
NAdam, and optimizer behaviour. Run as a script, this file is the fresh process that resumes a checkpoint."""

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


def reference(steps: int, mu, weight_decay: float, lr: float = 1e-2):
    """The note's equations, one tensor at a time, in float64, around Adam (the black box A). Returns (phi_{T+1},
    theta_{T+1})."""
    model = make_model(0, torch.float64)
    inner = torch.optim.Adam(model.parameters(), lr=lr)
    params = list(model.parameters())
    mu_at = mu if callable(mu) else (lambda n: mu)
    theta = params_of(model)  # theta_1 = phi_1 = p, u_0 = 0
    u_prev = [torch.zeros_like(p) for p in params]
    for t in range(1, steps + 1):
        phi = params_of(model)
        train_step(model, inner, t)
        with torch.no_grad():
            for i, p in enumerate(params):
                u = p.detach() - phi[i]  # u_t = A_t(phi_t) - phi_t
                theta[i] = (1 - lr * weight_decay) * theta[i] + u
                p.copy_(theta[i] + mu_at(t + 1) * u)  # phi_{t+1} = theta_{t+1} + mu_{t+1} u_t
                if not weight_decay:  # the note's form of the same update
                    note = phi[i] + (1 + mu_at(t + 1)) * u - mu_at(t) * u_prev[i]
                    torch.testing.assert_close(p.detach(), note, rtol=1e-12, atol=1e-12)
                u_prev[i] = u
    return params_of(model), theta


@settings(max_examples=20, deadline=None)
@given(
    mu=st.one_of(
        st.floats(0.0, 0.99),
        st.sampled_from(
            [schedules.linear_warmup(0.0, 0.9, steps=8), schedules.cosine(0.95, 0.0, 20), lambda n: 0.2 * (n % 4)]
        ),
    ),
    weight_decay=st.sampled_from([0.0, 0.5]),
    steps=st.integers(1, 30),
)
def test_equals_reference_from_the_equations(mu, weight_decay, steps):
    model = make_model(0, torch.float64)
    opt = snoo.Nesterov(torch.optim.Adam(model.parameters(), lr=1e-2), momentum=mu, weight_decay=weight_decay)
    for t in range(1, steps + 1):
        train_step(model, opt, t)
    want_phi, want_theta = reference(steps, mu, weight_decay)
    for p, phi, theta in zip(model.parameters(), want_phi, want_theta):
        torch.testing.assert_close(p.detach(), phi, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(opt.state[p]["theta"], theta, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mu", [0.5, 0.9])
def test_around_heavy_ball_sgd_it_is_torch_nesterov_sgd(mu):
    """Heavy ball: u_t = mu u_{t-1} - lr g_t, so phi_{t+1} = phi_t + mu u_t + (u_t - mu u_{t-1})
    = phi_t - lr (g_t + mu b_t) with b_t the buffer: torch's nesterov SGD, whose parameters hold phi (its gradients
    are taken there)."""
    lr = 0.05
    a, b = make_model(0, torch.float64), make_model(0, torch.float64)
    opt = snoo.Nesterov(torch.optim.SGD(a.parameters(), lr=lr, momentum=mu), momentum=mu)
    ref = torch.optim.SGD(b.parameters(), lr=lr, momentum=mu, nesterov=True)
    for t in range(1, 41):
        train_step(a, opt, t)
        train_step(b, ref, t)
        for pa, pb in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(pa, pb, rtol=1e-10, atol=1e-12)


@pytest.fixture
def float64_default():
    """NAdam keeps its running product of momenta in float32 unless the default dtype is float64; its rounding would
    blur a comparison made at 1e-12."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def gradient_sequence(steps: int, *, spike: bool = False, noisy_scale: bool = False) -> list[torch.Tensor]:
    """Gradients that do not depend on the point: +-1 per coordinate (Adam's bias-corrected denominator is then
    exactly 1 at every step), with a loss spike (x30 at steps 201-203) or a scale that changes at every step."""
    g = torch.Generator().manual_seed(0)
    out = []
    for t in range(1, steps + 1):
        signs = torch.randint(0, 2, (500,), generator=g, dtype=torch.float64) * 2 - 1
        scale = torch.exp(torch.randn(500, generator=g, dtype=torch.float64)) if noisy_scale else 1.0
        out.append(signs * (30.0 if spike and 201 <= t <= 203 else scale))
    return out


def trajectory(opt_for, grads: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
    p = torch.nn.Parameter(torch.zeros(500, dtype=torch.float64))
    opt = opt_for([p])
    points = []
    for g in grads:
        p.grad = g.clone()
        opt.step()
        points.append(p.detach().clone())
    return points, opt


@pytest.mark.parametrize(
    "case, beta2, expected_gap",
    [("steady", 0.999, None), ("loss spike", 0.999, 0.01), ("beta2 .95, noisy scale", 0.95, 0.01)],
)
def test_nesterov_adam_versus_nadam(case, beta2, expected_gap, float64_default):
    """With gradients that do not depend on the point, Nesterov(Adam)'s real iterate theta is Adam's iterate exactly,
    and its parameters phi = theta + mu u_{t-1}. NAdam with a constant momentum (momentum_decay huge, so mu_t = beta1)
    is the same algorithm while Adam's denominator stays put: the two end within 1e-12 of each other (their early
    bias corrections differ and fade). When the denominator changes, NAdam divides the lookahead by the new
    denominator and the retraction at the next step by another, so they do not cancel and NAdam drifts for good.
    Measured, 300 steps, 500 coordinates, beta1 .9, lr 1e-3, distance at the end over the distance travelled:
    steady 1.1e-15; loss spike (x30 at steps 201-203) 2.1e-2, about 5 steps' worth, ahead along the direction of
    travel; beta2 .95 with a per-step random scale 2.3e-2."""
    beta1, lr, steps = 0.9, 1e-3, 300
    grads = gradient_sequence(steps, spike=case == "loss spike", noisy_scale=case.startswith("beta2"))
    adam, _ = trajectory(lambda ps: torch.optim.Adam(ps, lr=lr, betas=(beta1, beta2)), grads)
    ours, opt = trajectory(
        lambda ps: snoo.Nesterov(torch.optim.Adam(ps, lr=lr, betas=(beta1, beta2)), momentum=beta1), grads
    )
    nadam, _ = trajectory(lambda ps: torch.optim.NAdam(ps, lr=lr, betas=(beta1, beta2), momentum_decay=1e9), grads)

    (p,) = opt.state
    torch.testing.assert_close(opt.state[p]["theta"], adam[-1], rtol=1e-12, atol=1e-15)  # theta is Adam's
    torch.testing.assert_close(ours[-1], adam[-1] + beta1 * (adam[-1] - adam[-2]), rtol=1e-12, atol=1e-15)
    gap = ((nadam[-1] - ours[-1]).norm() / adam[-1].norm()).item()
    if expected_gap is None:
        assert gap < 1e-12, gap
        early = ((nadam[0] - ours[0]).norm() / adam[0].norm()).item()
        assert early > 0.1, "the bias corrections differ at the first step; the test would not see a change"
    else:
        assert gap > expected_gap, gap


def test_the_real_iterate_follows_the_inner_optimizer_exactly_whatever_the_momentum_does():
    """Gradients that do not depend on the point: theta must be the inner optimizer's own trajectory, even with a
    schedule and with the momentum changed by hand between steps (the lookahead actually applied is retracted)."""
    grads = gradient_sequence(40, noisy_scale=True)
    adam, _ = trajectory(lambda ps: torch.optim.Adam(ps, lr=1e-2, betas=(0.9, 0.9)), grads)
    p = torch.nn.Parameter(torch.zeros(500, dtype=torch.float64))
    opt = snoo.Nesterov(torch.optim.Adam([p], lr=1e-2, betas=(0.9, 0.9)), momentum=lambda n: 0.95 * math.sin(n) ** 2)
    for t, g in enumerate(grads, start=1):
        if t == 20:
            opt.param_groups[0]["nesterov_momentum"] = 0.5
        if t == 30:
            opt.param_groups[0]["nesterov_momentum"] = 0.0
        p.grad = g.clone()
        opt.step()
        torch.testing.assert_close(opt.state[p]["theta"], adam[t - 1], rtol=1e-12, atol=1e-15)
    assert torch.equal(p.detach(), opt.state[p]["theta"]), "momentum 0: phi = theta"


def test_weight_decay_acts_on_the_real_iterate_and_not_twice():
    """With a constant gradient of zero the inner Adam does nothing: only the decay moves theta, and phi = theta."""
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
    opt = snoo.Nesterov(torch.optim.Adam([p], lr=0.1, weight_decay=0.0), momentum=0.9, weight_decay=0.5)
    for _ in range(3):
        p.grad = torch.zeros(4, dtype=torch.float64)
        opt.step()
    torch.testing.assert_close(opt.state[p]["theta"], torch.full((4,), 0.95**3, dtype=torch.float64))
    torch.testing.assert_close(p.detach(), opt.state[p]["theta"])
    with pytest.raises(ValueError, match="act twice"):
        snoo.Nesterov(torch.optim.AdamW([p], lr=0.1), weight_decay=0.1)  # AdamW's default weight_decay is 0.01


def test_parameters_hold_phi_eval_puts_theta_train_puts_phi_back_exactly():
    model = make_model()
    opt = snoo.Nesterov(torch.optim.Adam(model.parameters(), lr=1e-2), momentum=0.9)
    for t in range(1, 6):
        train_step(model, opt, t)
    phi = params_of(model)
    opt.eval()
    assert all(torch.equal(p, opt.state[p]["theta"]) and not torch.equal(p, f) for p, f in zip(model.parameters(), phi))
    with pytest.raises(RuntimeError, match="eval mode"):
        opt.step()
    opt.train()
    assert all(torch.equal(p, f) for p, f in zip(model.parameters(), phi))


def test_frozen_and_gradless_parameters_are_left_exactly_as_they_are():
    torch.manual_seed(0)
    used, frozen, unused = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    frozen.requires_grad_(False)
    before = {"frozen": frozen.weight.detach().clone(), "unused": unused.weight.detach().clone()}
    params = [*used.parameters(), *frozen.parameters(), *unused.parameters()]
    opt = snoo.Nesterov(torch.optim.Adam(params, lr=1e-2), momentum=0.9, weight_decay=0.1)
    for t in range(1, 8):
        frozen(used(batch(t)[0][:, :4])).square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(frozen.weight, before["frozen"]) and frozen.weight not in opt.state
    assert torch.equal(unused.weight, before["unused"]), "no gradient: not even the decay moves it"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_parameters_keep_float32_state(dtype):
    model = make_model(0, dtype)
    opt = snoo.Nesterov(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), momentum=0.9)
    for t in range(1, 4):
        train_step(model, opt, t)
    for p in model.parameters():
        st_ = opt.state[p]
        assert st_["theta"].dtype == st_["d"].dtype == torch.float32
        assert torch.equal(p, (st_["theta"] + st_["d"]).to(dtype))


def test_update_is_a_few_foreach_passes_whatever_the_number_of_tensors():
    wrap = functools.partial(snoo.Nesterov, momentum=0.9, weight_decay=0.1)
    assert ops_in_wrapper_step(wrap, 3) == ops_in_wrapper_step(wrap, 50) <= 10


def test_refuses_bad_arguments_naming_them():
    inner = torch.optim.Adam(make_model().parameters(), lr=0.1)
    for kwargs, name in [
        (dict(momentum=1.0), "momentum"),
        (dict(momentum=-0.1), "momentum"),
        (dict(momentum=True), "momentum"),
        (dict(weight_decay=-1.0), "weight_decay"),
    ]:
        with pytest.raises(ValueError, match=name):
            snoo.Nesterov(inner, **kwargs)
    model = make_model()
    opt = snoo.Nesterov(torch.optim.Adam(model.parameters(), lr=0.1), momentum=lambda n: 1.5 if n == 3 else 0.5)
    train_step(model, opt, 1)
    with pytest.raises(ValueError, match="step 3"):
        train_step(model, opt, 2)


@pytest.mark.parametrize(
    "make_inner", inner_optimizers(torch.optim.Adam).values(), ids=inner_optimizers(torch.optim.Adam).keys()
)
def test_wraps_torch_and_snoo_optimizers_and_lowers_the_loss(make_inner):
    model = make_model()
    opt = snoo.Nesterov(make_inner(model), momentum=0.9)
    losses = [train_step(model, opt, 0) for _ in range(40)]  # one batch, over and over
    assert math.isfinite(losses[-1]) and losses[-1] < 0.9 * losses[0]


def test_wraps_torch_muon():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(16, 8) / 4)
    target = torch.randn(16, 8) / 4
    opt = snoo.Nesterov(torch.optim.Muon([w], lr=0.02), momentum=0.9)
    first = (w - target).square().sum().item()
    for _ in range(30):
        (w - target).square().sum().backward()
        opt.step()
        opt.zero_grad()
    opt.eval()
    assert (w - target).square().sum().item() < 0.5 * first


# -- checkpoints ----------------------------------------------------------------------------------------------------

STEPS = 15
MOMENTUM = schedules.warmup_stable_decay(0.9, warmup_steps=4, decay_steps=5, total_steps=STEPS, end=0.3)


def build() -> tuple[torch.nn.Module, snoo.Nesterov, torch.optim.lr_scheduler.LRScheduler]:
    model = make_model()
    opt = snoo.Nesterov(torch.optim.Adam(model.parameters(), lr=1e-2), momentum=MOMENTUM, weight_decay=0.1)
    return model, opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS)


run = run_without_a_bias_gradient_every(3)


CUTS = [(2, False), (7, True), (12, False)]  # (step, saved in eval mode)


def test_resume_in_a_fresh_process_is_bit_exact_with_a_schedule_and_in_eval_mode(tmp_path):
    opt = assert_resumes_bit_for_bit(__file__, tmp_path, build, run, STEPS, CUTS)
    assert set(opt.state_dict()["state"][0]) == {
        "step",
        "exp_avg",
        "exp_avg_sq",
        "nesterov.theta",
        "nesterov.d",
    }


if __name__ == "__main__":
    resume_and_finish(Path(sys.argv[1]), build, run, STEPS)
