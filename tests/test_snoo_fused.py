"""SNOO(..., fused=True) and Lookahead(..., fused=True): the compiled outer step against a float64 reference written
from the equations, within the bound :data:`snoo.optim.outer.FUSED_ROUNDING` states, and against the foreach path;
the non-finite check on the device and without it; what fused refuses. Also the checks before each step, which run
again only when the groups change.

Every compiled graph here has the parameter shapes of ``helpers.make_model`` and requires_grad parameters under
no_grad, as in a step, so the tests share three compilations (Nesterov with the check, Lookahead with the check,
heavy-ball with norms and without the check): each takes seconds on a CPU."""

from __future__ import annotations

import warnings

import pytest
import torch

import snoo
from helpers import make_model, params_of, train_step
from snoo.optim import snoo as snoo_module
from snoo.optim.outer import FUSED_ROUNDING, compiled_outer_step, outer_step
from test_snoo import reference_snoo

#: a float32 run of a dozen steps against the float64 reference (the tolerance of tests/test_cuda.py)
FLOAT32 = dict(rtol=1e-5, atol=1e-5)


def reference_outer_step(p, w, b, lr, momentum, nesterov):
    """One outer step in float64 from the equations; returns (new w, new b or None) and the size of what each
    element is made of, as FUSED_ROUNDING measures it."""
    p, w = p.double(), w.double()
    s = w - p
    if b is None:  # Lookahead: w + alpha (p - w)
        return (w - lr * s, None), (w.abs() + lr * s.abs(), None)
    b = b.double()
    new_b = momentum * b + s
    new_w = w - lr * (s + momentum * new_b) if nesterov else w - lr * new_b
    size_w = w.abs() + lr * (s.abs() + momentum * b.abs() + momentum * new_b.abs())
    size_b = s.abs() + momentum * b.abs() + new_b.abs()
    return (new_w, new_b), (size_w, size_b)


@pytest.mark.parametrize(
    "momentum, nesterov, finite, track_norms",
    [(0.5, True, True, False), (0.0, False, True, False), (0.6, False, False, True)],
    ids=["nesterov", "lookahead", "heavy-ball"],
)
def test_one_fused_outer_step_is_within_the_stated_bound_of_the_float64_reference_and_of_foreach(
    momentum, nesterov, finite, track_norms, one_thread
):
    g = torch.Generator().manual_seed(0)
    shapes = [p.shape for p in make_model().parameters()]
    w0 = [torch.randn(s, generator=g) * 3 for s in shapes]
    p0 = [w + torch.randn(s, generator=g) * 0.05 for w, s in zip(w0, shapes)]
    b0 = [torch.randn(s, generator=g) * 0.1 for s in shapes] if momentum else None
    lr = 0.7
    u = torch.finfo(torch.float32).eps / 2

    def run(fused: bool):
        params = [torch.nn.Parameter(p.clone()) for p in p0]  # as the optimizer holds them
        slow = [w.clone() for w in w0]
        buffers = [b.clone() for b in b0] if b0 else None
        with torch.no_grad():
            if fused:
                flag = torch.tensor(True) if finite else None
                lr_t, mu_t = torch.tensor(lr), torch.tensor(momentum)
                squares = compiled_outer_step()(
                    params, slow, buffers, lr_t, mu_t, flag, nesterov=nesterov, track_norms=track_norms
                )
            else:
                squares = outer_step(
                    params, slow, buffers, lr=lr, momentum=momentum, nesterov=nesterov, track_norms=track_norms
                )
        return [p.detach() for p in params], slow, buffers, squares

    fused, foreach = run(True), run(False)
    for i in range(len(shapes)):
        (want_w, want_b), (size_w, size_b) = reference_outer_step(
            p0[i], w0[i], b0[i] if b0 else None, lr, momentum, nesterov
        )
        bound_w = FUSED_ROUNDING * u * size_w
        for got in (fused, foreach):
            assert torch.all((got[1][i].double() - want_w).abs() <= bound_w / 2), "slow weights"
            assert torch.equal(got[0][i], got[1][i]), "p <- w"
        assert torch.all((fused[1][i].double() - foreach[1][i].double()).abs() <= bound_w)
        if b0:
            bound_b = FUSED_ROUNDING * u * size_b
            for got in (fused, foreach):
                assert torch.all((got[2][i].double() - want_b).abs() <= bound_b / 2), "momentum"
    assert fused[3].keys() == foreach[3].keys() == ({"pseudo_grad", "momentum", "slow"} if track_norms else set())
    for name in fused[3]:
        torch.testing.assert_close(fused[3][name], foreach[3][name])


def test_fused_snoo_and_lookahead_train_like_the_float64_reference_and_the_foreach_path(one_thread):
    steps, k = 9, 3
    for fused_kind, kwargs, ref in (
        (snoo.SNOO, dict(k=k, lr=0.7, momentum=0.5), reference_snoo(steps, k, 0.7, 0.5, True)),
        (snoo.Lookahead, dict(k=k, alpha=0.6), reference_snoo(steps, k, 0.6, 0.0, False)),
    ):
        models = [make_model(), make_model()]
        opts = [
            fused_kind(torch.optim.AdamW(m.parameters(), lr=1e-2), **kwargs, fused=f)
            for m, f in zip(models, (True, False))
        ]
        for t in range(1, steps + 1):
            for model, opt in zip(models, opts):
                train_step(model, opt, t)
        fused, foreach = (params_of(m) for m in models)
        for got, eager, want in zip(fused, foreach, ref, strict=True):
            torch.testing.assert_close(got.double(), want, **FLOAT32)
            torch.testing.assert_close(got, eager, **FLOAT32)
        assert opts[0].skipped_outer_steps == 0


def test_fused_skips_a_non_finite_outer_step_on_the_device_and_counts_it_once_read(one_thread):
    model = make_model()
    opt = snoo.SNOO(torch.optim.SGD(model.parameters(), lr=0.05), k=2, fused=True)
    for t in (1, 2, 3):
        train_step(model, opt, t)
    slow = [opt.state[p]["slow"].clone() for p in model.parameters()]
    momentum = [opt.state[p]["momentum"].clone() for p in model.parameters()]
    model(torch.randn(4, 6)).sum().backward()
    model[0].weight.grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="outer step was skipped"):
        opt.step()  # inner step 4: the outer step of a poisoned cycle
    opt.zero_grad()
    assert opt.skipped_outer_steps == 1
    for p, w, b in zip(model.parameters(), slow, momentum, strict=True):
        assert torch.equal(opt.state[p]["slow"], w) and torch.equal(opt.state[p]["momentum"], b)
        assert torch.equal(p.detach(), w), "the fast weights restart from the last good slow weights"
    for t in (5, 6):
        train_step(model, opt, t)
    assert opt.skipped_outer_steps == 1 and not torch.equal(opt.state[model[0].weight]["slow"], slow[0])


def test_without_the_check_no_flag_is_computed_and_a_non_finite_step_goes_through(monkeypatch, one_thread):
    def no_check(*args):
        raise AssertionError("skip_nonfinite=False computes no flag (and so no host synchronisation)")

    monkeypatch.setattr(snoo_module, "finite_flag", no_check)
    models = [make_model(), make_model()]
    opts = [
        snoo.SNOO(
            torch.optim.SGD(m.parameters(), lr=0.05),
            k=2,
            momentum=0.6,
            nesterov=False,
            fused=fused,
            track_norms=True,
            skip_nonfinite=False,
        )
        for m, fused in zip(models, (True, False))
    ]
    for t in (1, 2):
        for model, opt in zip(models, opts):
            train_step(model, opt, t)
    torch.testing.assert_close(params_of(models[0]), params_of(models[1]), **FLOAT32)
    for name in ("pseudo_grad", "momentum", "slow"):
        torch.testing.assert_close(opts[0].outer_norms[name], opts[1].outer_norms[name], **FLOAT32)
    for model, opt in zip(models, opts):
        model(torch.randn(4, 6)).sum().backward()
        model[0].weight.grad[0, 0] = float("inf")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            opt.step()
            opt.step()
        assert opt.skipped_outer_steps == 0
        assert not torch.isfinite(opt.state[model[0].weight]["slow"]).all(), "unchecked, the step went through"


def test_a_cycle_that_leaves_a_parameter_without_gradient_runs_the_foreach_path(monkeypatch, one_thread):
    model = make_model()
    opt = snoo.SNOO(torch.optim.SGD(model.parameters(), lr=0.05), k=2, fused=True)
    monkeypatch.setattr(snoo_module, "compiled_outer_step", lambda: pytest.fail("a partial cycle compiled"))
    frozen = model[2].bias
    before = frozen.detach().clone()
    for _ in (1, 2):
        model(torch.randn(4, 6)).square().sum().backward()
        frozen.grad = None  # like an expert no token picked
        opt.step()
        opt.zero_grad()
    assert torch.equal(frozen.detach(), before) and torch.equal(opt.state[frozen]["slow"], before)
    assert not torch.equal(model[0].weight.detach(), params_of(make_model())[0]), "the others took the outer step"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(process_group=object()), "process_group"),
        (dict(state_device="cpu"), "state_device"),
        (dict(fused=1), "fused must be a bool"),
        (dict(skip_nonfinite=None), "skip_nonfinite must be a bool"),
    ],
)
def test_fused_refuses_what_it_cannot_run_naming_it(kwargs, match):
    model = make_model()
    with pytest.raises((ValueError, TypeError), match=match):
        snoo.SNOO(torch.optim.SGD(model.parameters(), lr=0.1), **{"fused": True, **kwargs})


# -- the checks before each step ------------------------------------------------------------------------------------


def test_the_checks_before_a_step_run_again_only_when_the_groups_change(monkeypatch):
    model = make_model()
    opt = snoo.SNOO(torch.optim.SGD(model.parameters(), lr=0.1), k=4)
    calls = []
    check = opt._check_group
    monkeypatch.setattr(opt, "_check_group", lambda group: calls.append(1) or check(group))
    train_step(model, opt, 1)
    assert len(calls) == 1
    for t in (2, 3, 4):
        train_step(model, opt, t)
    assert len(calls) == 1, "nothing changed: no check"
    opt.param_groups[0]["outer_lr"] = 0.5
    train_step(model, opt, 5)
    assert len(calls) == 2
    opt.param_groups[0]["outer_momentum"] = 1.5
    with pytest.raises(ValueError, match="outer momentum"):
        opt.step()
    opt.param_groups[0]["outer_momentum"] = 0.5
    extra = torch.nn.Parameter(torch.ones(2))
    opt.add_param_group({"params": [extra], "outer_lr": 0.3})
    extra.grad = torch.ones(2)
    opt.step()  # inner step 6: no outer step
    assert torch.equal(opt.state[extra]["slow"], torch.ones(2)), "state from its value before the inner step"
    assert not torch.equal(extra.detach(), torch.ones(2))


def test_a_parameter_unfrozen_later_gets_its_state_from_the_step_that_first_sees_it():
    model = make_model()
    frozen = model[0].bias
    frozen.requires_grad_(False)
    opt = snoo.SNOO(torch.optim.SGD(model.parameters(), lr=0.1), k=4)
    for t in (1, 2):
        train_step(model, opt, t)
    assert frozen not in opt.state
    frozen.requires_grad_(True)
    before = frozen.detach().clone()
    train_step(model, opt, 3)
    assert torch.equal(opt.state[frozen]["slow"], before) and not torch.equal(frozen.detach(), before)


def test_a_compile_failure_says_to_use_the_foreach_path(monkeypatch):
    import torch._dynamo

    def fails(*args, **kwargs):
        raise torch._dynamo.exc.Unsupported("no C++ compiler")

    monkeypatch.setattr(snoo_module, "compiled_outer_step", lambda: fails)
    model = make_model()
    opt = snoo.SNOO(torch.optim.SGD(model.parameters(), lr=0.1), k=1, fused=True)
    model(torch.randn(4, 6)).sum().backward()
    with pytest.raises(
        RuntimeError, match=r"fused=True: torch.compile could not build .*no C\+\+ compiler.*fused=False"
    ):
        opt.step()
