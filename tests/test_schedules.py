"""Random-access schedules, and schedules as SNOO's outer lr and momentum."""

from __future__ import annotations

import math
import pickle

import pytest
import torch

import snoo
from snoo import schedules


def test_values_at_the_ends_and_in_between():
    assert schedules.constant(0.3)(1) == schedules.constant(0.3)(10**6) == 0.3
    warm = schedules.linear_warmup(0.0, 0.9, steps=500)
    assert warm(1) == pytest.approx(0.9 / 500) and warm(250) == pytest.approx(0.45)
    assert warm(500) == warm(10**6) == 0.9
    cos = schedules.cosine(1.0, 0.1, steps=100)
    assert cos(0) == 1.0 and cos(50) == pytest.approx(0.55) and cos(100) == pytest.approx(0.1) and cos(500) == cos(100)
    assert cos(25) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    wsd = schedules.warmup_stable_decay(1.0, warmup_steps=10, decay_steps=20, total_steps=100, end=0.1)
    assert [wsd(n) for n in (5, 10, 50, 80)] == [0.5, 1.0, 1.0, 1.0]
    assert wsd(90) == pytest.approx(0.55) and wsd(100) == pytest.approx(0.1) and wsd(1000) == pytest.approx(0.1)
    no_decay = schedules.warmup_stable_decay(2.0, warmup_steps=0, decay_steps=0, total_steps=5, end=0.5)
    assert [no_decay(n) for n in (1, 5, 6)] == [2.0, 2.0, 0.5]


def test_random_access_in_any_order_picklable_and_readable():
    made = [
        schedules.linear_warmup(0.2, 0.9, steps=7),
        schedules.cosine(0.9, 0.0, steps=11),
        schedules.warmup_stable_decay(0.7, 3, 4, 12, start=0.1),
    ]
    for s in made:
        forward = [s(n) for n in range(1, 20)]
        backward = [s(n) for n in reversed(range(1, 20))][::-1]
        assert forward == backward
        assert pickle.loads(pickle.dumps(s)) == s
    assert repr(made[1]) == "schedules.cosine(start=0.9, end=0.0, steps=11)"


def test_refuses_bad_arguments_naming_them():
    for make, name in [
        (lambda: schedules.linear_warmup(0.0, 1.0, steps=0), "steps"),
        (lambda: schedules.cosine(0.0, 1.0, steps=2.5), "steps"),
        (lambda: schedules.cosine(float("nan"), 1.0, steps=2), "start"),
        (lambda: schedules.constant("0.5"), "value"),
        (lambda: schedules.warmup_stable_decay(1.0, 6, 6, 10), "at most total_steps"),
        (lambda: schedules.follow_lr(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), group=1), "group"),
        (lambda: schedules.follow_lr(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), peak=0.0), "peak"),
    ]:
        with pytest.raises(ValueError, match=name):
            make()
    with pytest.raises(TypeError, match="callable"):
        schedules.lr_lambda(0.5)


def test_follow_lr_reads_the_lr_relative_to_its_peak():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=0.2)
    ratio = schedules.follow_lr(opt)
    with pytest.raises(ValueError, match="peak"):
        ratio(1)
    assert schedules.follow_lr(opt, peak=0.4)(1) == 0.5
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1 / (1 + epoch))
    opt.step()
    sched.step()
    assert ratio(2) == pytest.approx(0.5)  # initial_lr 0.2 is the peak

    one_cycle = torch.optim.SGD([p], lr=0.2)
    sched = torch.optim.lr_scheduler.OneCycleLR(one_cycle, max_lr=1.0, total_steps=10)
    assert schedules.follow_lr(one_cycle)(1) == pytest.approx(one_cycle.param_groups[0]["lr"] / 1.0)


def test_lr_lambda_puts_lambdalr_on_the_same_clock():
    """The lr that step n uses is base_lr * schedule(n), with the usual step(); scheduler.step() order."""
    schedule = schedules.warmup_stable_decay(1.0, warmup_steps=3, decay_steps=3, total_steps=8)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedules.lr_lambda(schedule))
    for n in range(1, 9):
        assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * schedule(n))
        opt.step()
        sched.step()
    assert "lr_lambdas" in sched.state_dict()  # a plain function: LambdaLR does not try to save it
    assert sched.state_dict()["lr_lambdas"] == [None]


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, t: int) -> None:
    g = torch.Generator().manual_seed(1000 + t)
    x, y = torch.randn(32, 6, generator=g).double(), torch.randn(32, 3, generator=g).double()
    (model(x) - y).square().mean().backward()
    opt.step()
    opt.zero_grad()


LR = schedules.cosine(0.9, 0.2, steps=24)
MOMENTUM = schedules.linear_warmup(0.0, 0.8, steps=16)  # 0 at no step, but small at the first outer steps


def reference_snoo(steps: int, k: int, lr, momentum) -> list[torch.Tensor]:
    """SNOO from the equations with lr and momentum evaluated at the inner step n = jK of outer step j; a momentum of
    0 leaves the buffer as it is, like torch.optim.SGD."""
    model = make_model()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    params = list(model.parameters())
    w = [p.detach().clone() for p in params]
    b = [torch.zeros_like(p) for p in params]
    for t in range(1, steps + 1):
        train_step(model, inner, t)
        if t % k == 0:
            eta, mu = lr(t), momentum(t)
            with torch.no_grad():
                for i, p in enumerate(params):
                    s = w[i] - p
                    if mu:
                        b[i] = mu * b[i] + s
                    w[i] = w[i] - eta * (s + mu * b[i])
                    p.copy_(w[i])
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("k", [1, 3, 4])
def test_snoo_takes_schedules_for_its_outer_lr_and_momentum_at_the_inner_step(k):
    model = make_model()
    opt = snoo.SNOO(torch.optim.AdamW(model.parameters(), lr=1e-2), k=k, lr=LR, momentum=MOMENTUM)
    for t in range(1, 25):
        train_step(model, opt, t)
    for got, want in zip(model.parameters(), reference_snoo(24, k, LR, MOMENTUM)):
        torch.testing.assert_close(got.detach(), want, rtol=1e-12, atol=1e-12)
    if k == 1:
        return
    # the outer-step clock would give other weights
    outer_clock = reference_snoo(24, k, lambda n: LR(n // k), lambda n: MOMENTUM(n // k))
    assert not all(torch.allclose(a, b) for a, b in zip(model.parameters(), outer_clock))


def test_snoo_with_a_schedule_saves_and_resumes_bit_for_bit_and_refuses_a_state_without_it():
    def build() -> tuple[torch.nn.Module, snoo.SNOO]:
        model = make_model()
        return model, snoo.SNOO(torch.optim.AdamW(model.parameters(), lr=1e-2), k=3, lr=LR, momentum=0.5)

    model, opt = build()
    for t in range(1, 13):
        train_step(model, opt, t)
    expected = [p.detach().clone() for p in model.parameters()]

    model, opt = build()
    for t in range(1, 6):
        train_step(model, opt, t)
    saved = opt.state_dict()
    assert (
        saved["param_groups"][0]["outer_lr"] == "<schedule, not saved> schedules.cosine(start=0.9, end=0.2, steps=24)"
    )
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="schedule for 'outer_lr'"):
        snoo.SNOO(torch.optim.AdamW(make_model().parameters(), lr=1e-2), k=3, lr=0.9).load_state_dict(saved)
    model, opt = build()
    model.load_state_dict(weights)
    opt.load_state_dict(saved)
    assert opt.param_groups[0]["outer_lr"] is LR
    for t in range(6, 13):
        train_step(model, opt, t)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), expected))


def test_snoo_refuses_a_schedule_value_out_of_range_naming_the_step():
    model = make_model()
    opt = snoo.SNOO(torch.optim.SGD(model.parameters(), lr=0.1), k=2, lr=lambda n: 0.5 if n < 4 else 0.0)
    for t in range(1, 4):
        train_step(model, opt, t)
    with pytest.raises(ValueError, match=r"lr \(outer learning rate\).*step 4"):
        train_step(model, opt, 4)
    with pytest.raises(ValueError, match="momentum"):
        snoo.SNOO(torch.optim.SGD(model.parameters(), lr=0.1), momentum=lambda n: 1.0, k=1).step()
