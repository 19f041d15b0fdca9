"""SNOO and Lookahead against the equations of docs/snoo.md and docs/lookahead.md, their special cases, and optimizer
behaviour."""

from __future__ import annotations

import pathlib
import sysconfig

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import snoo
from helpers import TORCH_INNER, CountOps, batch, make_model, params_of, train_step


def reference_snoo(
    steps: int, k: int, lr: float, momentum: float, nesterov: bool, inner_lr: float = 1e-2, seed: int = 0
) -> list[torch.Tensor]:
    """SNOO written from the equations, one tensor at a time, in float64, with AdamW as the inner optimizer."""
    model = make_model(seed, torch.float64)
    inner = torch.optim.AdamW(model.parameters(), lr=inner_lr)
    params = list(model.parameters())
    w = [p.detach().clone() for p in params]  # at start: w = p, b = 0
    b = [torch.zeros_like(p) for p in params]
    for t in range(1, steps + 1):
        train_step(model, inner, t)
        if t % k == 0:
            with torch.no_grad():
                for i, p in enumerate(params):
                    s = w[i] - p
                    b[i] = momentum * b[i] + s
                    w[i] = w[i] - lr * (s + momentum * b[i]) if nesterov else w[i] - lr * b[i]
                    p.copy_(w[i])
    return params_of(model)


@settings(max_examples=25, deadline=None)
@given(
    k=st.integers(1, 7),
    lr=st.floats(0.05, 1.5),
    momentum=st.floats(0.0, 0.95),
    nesterov=st.booleans(),
    steps=st.integers(1, 30),
)
def test_snoo_equals_reference_from_the_equations(k, lr, momentum, nesterov, steps):
    model = make_model(0, torch.float64)
    opt = snoo.SNOO(torch.optim.AdamW(model.parameters(), lr=1e-2), k=k, lr=lr, momentum=momentum, nesterov=nesterov)
    for t in range(1, steps + 1):
        train_step(model, opt, t)
    expected = reference_snoo(steps, k, lr, momentum, nesterov)
    for got, want in zip(model.parameters(), expected):
        torch.testing.assert_close(got.detach(), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_snoo_is_torch_sgd_on_the_pseudo_gradient_bit_for_bit(nesterov, dtype):
    k, lr, momentum = 4, 0.7, 0.6
    model, ref = make_model(0, dtype), make_model(0, dtype)
    opt = snoo.SNOO(torch.optim.AdamW(model.parameters(), lr=1e-2), k=k, lr=lr, momentum=momentum, nesterov=nesterov)
    ref_inner = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    slow = [p.detach().clone() for p in ref.parameters()]
    outer = torch.optim.SGD(slow, lr=lr, momentum=momentum, nesterov=nesterov)
    for t in range(1, 4 * k + 1):
        train_step(model, opt, t)
        train_step(ref, ref_inner, t)
        if t % k == 0:
            for w, p in zip(slow, ref.parameters()):
                w.grad = w - p.detach()
            outer.step()
            with torch.no_grad():
                for w, p in zip(slow, ref.parameters()):
                    p.copy_(w)
    for got, want in zip(model.parameters(), ref.parameters()):
        assert torch.equal(got, want)


@pytest.mark.parametrize("alpha", [0.3, 0.5, 1.0])
def test_momentum_zero_is_lookahead_and_lookahead_matches_its_equation(alpha):
    k, steps = 3, 14
    a, b, ref = make_model(), make_model(), make_model()
    opt_a = snoo.SNOO(torch.optim.Adam(a.parameters(), lr=1e-2), k=k, lr=alpha, momentum=0.0)
    opt_b = snoo.Lookahead(torch.optim.Adam(b.parameters(), lr=1e-2), k=k, alpha=alpha)
    ref_inner = torch.optim.Adam(ref.parameters(), lr=1e-2)
    slow = params_of(ref)
    for t in range(1, steps + 1):
        train_step(a, opt_a, t)
        train_step(b, opt_b, t)
        train_step(ref, ref_inner, t)
        if t % k == 0:
            with torch.no_grad():
                for w, p in zip(slow, ref.parameters()):
                    w.add_(alpha * (p - w))  # w = w + alpha (p - w); p = w
                    p.copy_(w)
    for pa, pb, pr in zip(a.parameters(), b.parameters(), ref.parameters()):
        assert torch.equal(pa, pb)
        torch.testing.assert_close(pa, pr, rtol=1e-6, atol=1e-7)
    assert all("momentum" not in s for s in opt_a.state.values()), "momentum 0 must not allocate a buffer"


@pytest.mark.parametrize(
    "make", [lambda o: snoo.SNOO(o, k=1, lr=1.0, momentum=0.0), lambda o: snoo.Lookahead(o, 1, 1.0)]
)
def test_k1_lr1_momentum0_is_the_inner_optimizer_alone(make):
    a, b = make_model(), make_model()
    opt = make(torch.optim.AdamW(a.parameters(), lr=1e-2, weight_decay=0.1))
    plain = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.1)
    for t in range(1, 20):
        train_step(a, opt, t)
        train_step(b, plain, t)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_outer_step_follows_inner_steps_k_2k_never_step_1_and_keeps_inner_state():
    k = 5
    a, b = make_model(), make_model()
    opt = snoo.SNOO(torch.optim.AdamW(a.parameters(), lr=1e-2), k=k, lr=0.5, momentum=0.5)
    plain = torch.optim.AdamW(b.parameters(), lr=1e-2)
    for t in range(1, k):
        train_step(a, opt, t)
        train_step(b, plain, t)
        assert all(torch.equal(pa, pb) for pa, pb in zip(a.parameters(), b.parameters())), f"moved at step {t}"
    train_step(a, opt, k)
    train_step(b, plain, k)
    assert not all(torch.equal(pa, pb) for pa, pb in zip(a.parameters(), b.parameters()))
    for pa, pb in zip(a.parameters(), b.parameters()):  # the inner state survives the outer step untouched
        assert opt.inner.state[pa]["step"].item() == k
        assert torch.equal(opt.inner.state[pa]["exp_avg"], plain.state[pb]["exp_avg"])
        assert torch.equal(opt.inner.state[pa]["exp_avg_sq"], plain.state[pb]["exp_avg_sq"])


def test_frozen_and_gradless_parameters_are_left_exactly_as_they_are():
    torch.manual_seed(0)
    used, frozen, unused = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    frozen.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in [("frozen", frozen.weight), ("unused", unused.weight)]}
    params = [*used.parameters(), *frozen.parameters(), *unused.parameters()]
    opt = snoo.SNOO(torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1), k=2, lr=0.7, momentum=0.9)
    for t in range(1, 11):
        x = batch(t)[0][:, :4]
        frozen(used(x)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(frozen.weight, before["frozen"])
    assert torch.equal(unused.weight, before["unused"])
    assert frozen.weight not in opt.state


def test_parameter_with_gradient_in_part_of_a_cycle_takes_the_outer_step():
    """Like an MoE expert picked at some inner steps only: its pseudo-gradient counts even without a last grad."""
    torch.manual_seed(0)
    expert = torch.nn.Parameter(torch.randn(3))
    opt = snoo.SNOO(torch.optim.SGD([expert], lr=0.1), k=3, lr=0.5, momentum=0.0)
    w0 = expert.detach().clone()
    expert.sum().backward()  # gradient of ones at step 1 only
    opt.step()
    opt.zero_grad()
    opt.step()
    opt.step()
    torch.testing.assert_close(expert.detach(), w0 + 0.5 * ((w0 - 0.1) - w0))


def test_several_groups_each_with_its_own_outer_hyperparameters_and_add_param_group():
    torch.manual_seed(0)
    a, b, c = (torch.nn.Parameter(torch.randn(5)) for _ in range(3))
    inner = torch.optim.SGD([{"params": [a]}, {"params": [b], "outer_lr": 0.25, "outer_momentum": 0.0}], lr=0.1)
    opt = snoo.SNOO(inner, k=1, lr=0.5, momentum=0.0)
    opt.add_param_group({"params": [c], "lr": 0.2, "outer_lr": 1.0})
    assert opt.param_groups is inner.param_groups and len(inner.param_groups) == 3
    assert inner.param_groups[2]["outer_momentum"] == 0.0 and inner.param_groups[2]["lr"] == 0.2
    before = [x.detach().clone() for x in (a, b, c)]
    (a.sum() + b.sum() + c.sum()).backward()
    opt.step()
    for x, x0, inner_lr, outer_lr in zip((a, b, c), before, (0.1, 0.1, 0.2), (0.5, 0.25, 1.0)):
        torch.testing.assert_close(x.detach(), x0 - outer_lr * inner_lr)
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "outer_lr": -1.0})


def test_step_with_closure_returns_the_loss_including_lbfgs():
    model = make_model()
    opt = snoo.SNOO(torch.optim.LBFGS(model.parameters(), lr=0.5), k=2)
    x, y = batch(0)

    def closure():
        opt.zero_grad()
        loss = (model(x) - y).square().mean()
        loss.backward()
        return loss

    first = opt.step(closure)
    for _ in range(5):
        last = opt.step(closure)
    assert isinstance(first, torch.Tensor) and last.item() < first.item()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_dtypes_and_float32_state_for_low_precision(dtype):
    model = make_model(0, dtype)
    opt = snoo.SNOO(torch.optim.SGD(model.parameters(), lr=0.05), k=2, lr=0.7, momentum=0.5)
    state_dtype = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    start = [p.detach().to(state_dtype, copy=True) for p in model.parameters()]
    for t in range(1, 3):
        train_step(model, opt, t)
    for p, w0 in zip(model.parameters(), start):
        slow, mom = opt.state[p]["slow"], opt.state[p]["momentum"]
        assert slow.dtype == mom.dtype == w0.dtype
        assert p.dtype == dtype
        # after the first outer step: b = s, w = w0 - lr (s + mu s), p = w rounded to the parameter's dtype
        expected = w0 - 0.7 * (1 + 0.5) * mom
        torch.testing.assert_close(slow, expected)
        assert torch.equal(p, slow.to(dtype))


@pytest.mark.parametrize("make_inner", TORCH_INNER.values(), ids=TORCH_INNER.keys())
def test_wraps_common_torch_optimizers_and_lowers_the_loss(make_inner):
    model = make_model()
    opt = snoo.SNOO(make_inner(model.parameters()), k=5)
    losses = [train_step(model, opt, 0) for _ in range(60)]  # one batch, over and over
    assert losses[-1] < 0.7 * losses[0]


def test_wraps_torch_muon():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(16, 8) / 4)
    target = torch.randn(16, 8) / 4
    opt = snoo.SNOO(torch.optim.Muon([w], lr=0.02), k=4)
    losses = []
    for _ in range(40):
        loss = (w - target).square().sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_refuses_bad_arguments_naming_them():
    params = make_model().parameters()
    inner = torch.optim.SGD(params, lr=0.1)
    cases = [
        (dict(k=0), ValueError, "k"),
        (dict(k=2.0), TypeError, "k"),
        (dict(k=True), TypeError, "k"),
        (dict(lr=0.0), ValueError, "lr"),
        (dict(lr=float("nan")), ValueError, "lr"),
        (dict(momentum=1.0), ValueError, "momentum"),
        (dict(momentum=-0.1), ValueError, "momentum"),
        (dict(nesterov=1), TypeError, "nesterov"),
    ]
    for kwargs, error, name in cases:
        with pytest.raises(error, match=name):
            snoo.SNOO(inner, **kwargs)
    with pytest.raises(TypeError, match=r"torch\.optim\.Optimizer"):
        snoo.SNOO(list(make_model().parameters()))
    for alpha in (0.0, 1.5):
        with pytest.raises(ValueError, match="alpha"):
            snoo.Lookahead(inner, alpha=alpha)
    with pytest.raises(TypeError, match="cannot wrap"):
        snoo.SNOO(snoo.Lookahead(inner))


def test_eval_puts_slow_weights_train_restores_fast_exactly_and_step_refuses_in_eval():
    model = make_model()
    opt = snoo.SNOO(torch.optim.AdamW(model.parameters(), lr=1e-2), k=4)
    for t in range(1, 7):  # mid-cycle: fast weights differ from slow
        train_step(model, opt, t)
    fast = params_of(model)
    opt.eval()
    opt.eval()
    for p, f in zip(model.parameters(), fast):
        assert torch.equal(p, opt.state[p]["slow"])
        assert not torch.equal(p, f)
    with pytest.raises(RuntimeError, match=r"train\(\)"):
        opt.step()
    opt.train()
    opt.train()
    for p, f in zip(model.parameters(), fast):
        assert torch.equal(p, f)
    train_step(model, opt, 7)  # steps again after train()


def test_eval_before_any_step_is_harmless():
    model = make_model()
    before = params_of(model)
    opt = snoo.SNOO(torch.optim.AdamW(model.parameters()))
    opt.eval()
    opt.train()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize(
    "make_sched",
    [
        lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10),
        lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1 / (1 + s)),
        lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=20),
    ],
)
@pytest.mark.parametrize("on", ["wrapper", "inner"])
def test_lr_schedulers_on_either_move_the_inner_lr(make_sched, on):
    model, twin = make_model(), make_model()
    opt = snoo.SNOO(torch.optim.AdamW(model.parameters(), lr=1e-2), k=3)
    plain = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    sched = make_sched(opt if on == "wrapper" else opt.inner)
    plain_sched = make_sched(plain)
    for t in range(1, 8):
        train_step(model, opt, t)
        train_step(twin, plain, t)
        sched.step()
        plain_sched.step()
        assert opt.inner.param_groups[0]["lr"] == plain.param_groups[0]["lr"]
        assert opt.param_groups[0]["betas"] == plain.param_groups[0]["betas"]
    assert opt.inner.param_groups[0]["lr"] != 1e-2


def test_outer_hyperparameters_can_be_scheduled_per_group():
    model = make_model()
    opt = snoo.SNOO(torch.optim.SGD(model.parameters(), lr=0.05), k=1, lr=0.5, momentum=0.0)
    p = next(model.parameters())
    for t, outer_lr in enumerate([0.5, 1.0], start=1):
        opt.param_groups[0]["outer_lr"] = outer_lr
        before = p.detach().clone()
        x, y = batch(t)
        (model(x) - y).square().mean().backward()
        step = p.grad.clone() * 0.05
        opt.step()
        opt.zero_grad()
        torch.testing.assert_close(p.detach(), before - outer_lr * step)


def test_track_norms_reports_the_norms_of_the_outer_step():
    model, ref = make_model(0, torch.float64), make_model(0, torch.float64)
    opt = snoo.SNOO(torch.optim.SGD(model.parameters(), lr=0.05), k=2, lr=0.7, momentum=0.5, track_norms=True)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    assert opt.outer_norms == {}
    w0 = params_of(ref)
    for t in (1, 2):
        train_step(model, opt, t)
        train_step(ref, ref_opt, t)
    s = [w - p.detach() for w, p in zip(w0, ref.parameters())]
    b = s
    w = [wi - 0.7 * (si + 0.5 * bi) for wi, si, bi in zip(w0, s, b)]
    norm = lambda ts: torch.cat([t.flatten() for t in ts]).norm()  # noqa: E731
    torch.testing.assert_close(opt.outer_norms["pseudo_grad"], norm(s))
    torch.testing.assert_close(opt.outer_norms["momentum"], norm(b))
    torch.testing.assert_close(opt.outer_norms["slow"], norm(w))


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_outer_step_is_a_few_foreach_passes_whatever_the_number_of_tensors(momentum):
    def ops_in_outer_step(n_tensors: int) -> int:
        params = [torch.nn.Parameter(torch.randn(8)) for _ in range(n_tensors)]
        opt = snoo.SNOO(torch.optim.SGD(params, lr=0.1), k=2, momentum=momentum, track_norms=True)
        for p in params:
            p.grad = torch.ones(8)
        opt.step()  # creates state
        opt.step()  # warm the momentum buffer
        opt.step()
        counter = CountOps()
        inner_step = opt.inner.step
        opt.inner.step = lambda closure=None: None  # count the outer step only
        with counter:
            opt.step()
        opt.inner.step = inner_step
        return counter.count

    assert ops_in_outer_step(3) == ops_in_outer_step(60)


def test_torch_compile_of_a_model_trained_under_snoo():
    model = make_model()
    compiled = torch.compile(model, backend="aot_eager")
    opt = snoo.SNOO(torch.optim.AdamW(model.parameters(), lr=1e-2), k=3)
    eager = make_model()
    eager_opt = snoo.SNOO(torch.optim.AdamW(eager.parameters(), lr=1e-2), k=3)
    for t in range(1, 8):
        train_step(compiled, opt, t)
        train_step(eager, eager_opt, t)
    opt.eval()
    eager_opt.eval()
    x, _ = batch(99)
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-6)


def test_a_compiled_step_runs_the_outer_loop_like_eager():
    # Dynamo once dropped the wrapper's step counter, so the outer step never fired; the wrapper's step now runs eagerly
    model, eager = make_model(), make_model()
    opt = snoo.SNOO(torch.optim.AdamW(model.parameters(), lr=1e-2), k=3)
    eager_opt = snoo.SNOO(torch.optim.AdamW(eager.parameters(), lr=1e-2), k=3)
    compiled_step = torch.compile(opt.step, backend="aot_eager")
    for t in range(1, 8):
        for m, step in ((model, compiled_step), (eager, eager_opt.step)):
            x, y = batch(t)
            (m(x) - y).square().mean().backward()
            step()
            m.zero_grad()
    assert opt.state_dict()["param_groups"][0]["snoo"]["inner_steps"] == 7
    assert all(map(torch.equal, params_of(model), params_of(eager)))


def test_state_device_keeps_state_there():
    model = make_model()
    opt = snoo.SNOO(torch.optim.AdamW(model.parameters(), lr=1e-2), k=2, state_device="cpu")
    for t in range(1, 5):
        train_step(model, opt, t)
    assert all(s["slow"].device.type == "cpu" for s in opt.state.values())


def test_snoo_beats_its_inner_optimizer_at_equal_steps_on_real_text():
    """A small real training: a byte-level MLP language model on Python's own standard library source, AdamW with a
    cosine schedule, 300 steps, the same batches. SNOO's momentum on the 20-step pseudo-gradient gets further than
    AdamW alone (held-out loss after equal steps). Measured on seeds 0-2: 2.58/2.60/2.56 alone, 2.52/2.54/2.49 with
    SNOO. At AdamW's best lr for this tiny budget (1e-2, 400 steps) AdamW alone was ahead by about 0.03; tuned
    comparisons are the lab's job (`snoo compare --tune-baseline`)."""
    paths = sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:60]
    data = torch.frombuffer(bytearray(b"".join(p.read_bytes() for p in paths)), dtype=torch.uint8).long()
    split = int(0.9 * len(data))
    context = 16

    def get(source: torch.Tensor, g: torch.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        ix = torch.randint(len(source) - context - 1, (size,), generator=g)
        return torch.stack([source[i : i + context] for i in ix]), source[ix + context]

    def run(wrap: bool) -> float:
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Embedding(256, 24),
            torch.nn.Flatten(),
            torch.nn.Linear(24 * context, 256),
            torch.nn.GELU(),
            torch.nn.Linear(256, 256),
        )
        inner = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
        opt = snoo.SNOO(inner, k=20, lr=0.7, momentum=0.5) if wrap else inner
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=300)
        g = torch.Generator().manual_seed(1)
        for _ in range(300):
            x, y = get(data[:split], g, 64)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            schedule.step()
            opt.zero_grad()
        if wrap:
            opt.eval()
        x, y = get(data[split:], torch.Generator().manual_seed(123), 4096)
        with torch.no_grad():
            return torch.nn.functional.cross_entropy(model(x), y).item()

    plain, wrapped = run(False), run(True)
    assert wrapped < plain - 0.03, (plain, wrapped)
