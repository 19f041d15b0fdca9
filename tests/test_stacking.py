"""Wrappers around wrappers: which stacks are refused and why, and EMA-Nesterov / Nesterov around SNOO against the
equations. Run as a script, this file is the fresh process that resumes a checkpoint."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import snoo
from helpers import (
    assert_fresh_process_finishes_the_same,
    make_model,
    params_of,
    resume_and_finish,
    save_checkpoints,
    train_step,
)


@pytest.mark.parametrize(
    "outer, inner",
    [
        (snoo.SNOO, snoo.EMANesterov),
        (snoo.SNOO, snoo.Nesterov),
        (snoo.Lookahead, snoo.EMANesterov),
        (snoo.Nesterov, snoo.EMANesterov),
        (snoo.EMANesterov, snoo.Nesterov),
    ],
)
def test_a_wrapper_whose_parameters_hold_a_lookahead_point_cannot_be_wrapped(outer, inner):
    """SNOO(EMANesterov(A)) by the equations: SNOO's fast weights would be y = x + beta m instead of x (its pseudo-
    gradient would carry EMA-Nesterov's lookahead and its own Nesterov would extrapolate it again), and at SNOO's reset
    p = w the wrapper's x stays behind, so the jump w - x would enter m as if A had made it, and be extrapolated at
    every following step. Both algorithms would silently change: refused, with the order that is exact."""
    model = make_model()
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-2)
    middle = inner(adamw)
    keys = set(adamw.param_groups[0])
    with pytest.raises(TypeError, match=rf"lookahead point.*{inner.__name__}\({outer.__name__}\(AdamW"):
        outer(middle)
    assert set(adamw.param_groups[0]) == keys, "a refused wrapper leaves the groups as they were"


def reference(steps: int, k: int, beta: float, gamma: float) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """EMA-Nesterov from its equations with the black box A = SNOO(AdamW) written from SNOO's equations, in float64.
    Returns (y_{T+1}, SNOO's slow weights)."""
    model = make_model(0, torch.float64)
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-2)
    params = list(model.parameters())
    slow, buf = params_of(model), [torch.zeros_like(p) for p in params]  # SNOO: w = p, b = 0
    x, m = params_of(model), [torch.zeros_like(p) for p in params]  # EMA-Nesterov: x_1 = p, m_1 = 0
    eta, mu = 0.7, 0.5
    for t in range(1, steps + 1):
        train_step(model, adamw, t)  # the parameters held y_t; AdamW steps from there
        with torch.no_grad():
            if t % k == 0:  # SNOO's outer step: the fast weights are AdamW's result
                for i, p in enumerate(params):
                    s = slow[i] - p
                    buf[i] = mu * buf[i] + s
                    slow[i] = slow[i] - eta * (s + mu * buf[i])
                    p.copy_(slow[i])
            for i, p in enumerate(params):  # now p = SNOO(AdamW)(y_t) = x_{t+1}
                m[i] = gamma * m[i] + (1 - gamma) * (p - x[i])
                x[i] = p.detach().clone()
                p.copy_(x[i] + beta * m[i])
    return params_of(model), slow


@pytest.mark.parametrize("steps", [5, 6, 17])
def test_ema_nesterov_around_snoo_is_ema_nesterov_with_snoo_as_its_base_optimizer(steps):
    k, beta, gamma = 3, 0.5, 0.8
    model = make_model(0, torch.float64)
    inner = snoo.SNOO(torch.optim.AdamW(model.parameters(), lr=1e-2), k=k, lr=0.7, momentum=0.5)
    opt = snoo.EMANesterov(inner, beta=beta, gamma=gamma)
    for t in range(1, steps + 1):
        train_step(model, opt, t)
    want_y, want_slow = reference(steps, k, beta, gamma)
    for p, y, w in zip(model.parameters(), want_y, want_slow):
        torch.testing.assert_close(p.detach(), y, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(inner.state[p]["slow"], w, rtol=1e-12, atol=1e-12)
    if steps % k == 0:  # right after an outer step, EMA-Nesterov's real iterate is SNOO's slow weights
        assert all(torch.equal(opt.state[p]["x"], inner.state[p]["slow"]) for p in model.parameters())


def test_eval_of_the_stack_gives_snoo_slow_weights_and_train_restores_the_lookahead_point():
    model = make_model()
    inner = snoo.SNOO(torch.optim.AdamW(model.parameters(), lr=1e-2), k=4)
    opt = snoo.EMANesterov(inner, beta=0.5, gamma=0.9)
    for t in range(1, 7):  # mid-cycle: y, x and w all differ
        train_step(model, opt, t)
    y = params_of(model)
    opt.eval()
    assert not inner.training
    assert all(torch.equal(p, inner.state[p]["slow"]) for p in model.parameters())
    with pytest.raises(RuntimeError, match="eval mode"):
        opt.step()
    opt.train()
    assert inner.training and all(torch.equal(p, q) for p, q in zip(model.parameters(), y))


def test_nesterov_around_snoo_lowers_the_loss():
    model = make_model()
    opt = snoo.Nesterov(snoo.SNOO(torch.optim.Adam(model.parameters(), lr=1e-2), k=5), momentum=0.9)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 6, generator=g), torch.randn(64, 3, generator=g)
    first = (model(x) - y).square().mean().item()
    for _ in range(40):
        (model(x) - y).square().mean().backward()
        opt.step()
        opt.zero_grad()
    opt.eval()
    assert (model(x) - y).square().mean().item() < 0.8 * first


# -- checkpoints of the stack ---------------------------------------------------------------------------------------

STEPS = 14


def build() -> tuple[torch.nn.Module, snoo.EMANesterov, torch.optim.lr_scheduler.LRScheduler]:
    model = make_model()
    inner = snoo.SNOO(torch.optim.AdamW(model.parameters(), lr=1e-2), k=4, lr=snoo.schedules.cosine(0.8, 0.4, STEPS))
    opt = snoo.EMANesterov(inner, beta=0.5, gamma=0.9)
    return model, opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS)


def run(model, opt, sched, start: int, stop: int) -> None:
    for t in range(start + 1, stop + 1):
        train_step(model, opt, t)
        sched.step()


CUTS = [(4, False), (6, True), (9, False)]  # (step, saved in eval mode)


def test_the_stack_saves_and_resumes_bit_for_bit_in_a_fresh_process(tmp_path):
    model, opt, sched = build()
    run(model, opt, sched, 0, STEPS)
    expected = params_of(model)
    sd = save_checkpoints(tmp_path, build, run, CUTS).state_dict()
    assert {"snoo", "ema_nesterov"} <= set(sd["param_groups"][0])
    assert {"snoo.slow", "snoo.momentum", "ema_nesterov.x", "ema_nesterov.m"} <= set(sd["state"][0])
    assert_fresh_process_finishes_the_same(__file__, tmp_path, CUTS, expected)


if __name__ == "__main__":
    resume_and_finish(Path(sys.argv[1]), build, run, STEPS)
