"""SGD-LL against a float64 loop-per-tensor reference written from the update rules; argument checks."""

from __future__ import annotations

import math

import pytest
import torch

import snoo

SHAPES = {"embedding": [(10, 4)], "matrix": [(6, 5), (3, 4, 2)], "head": [(7, 4), (5, 3)], "vector": [(5,), ()]}


def sgd_ll_reference(p, g, state, role, lr, momentum, tau, delta, flags):
    """One SGD-LL step on one tensor, written from the equations of docs/sgd-ll.md; ``flags`` records which clips
    fired."""
    state["m"] = momentum * state.get("m", torch.zeros_like(p)) + (1 - momentum) * g
    d = state["m"].clone()
    if role == "head":
        for r in range(d.shape[0]):
            norm = d[r].norm().item()
            if delta / max(norm, 1e-8) < 1:
                flags.add("row clipped")
                d[r] = d[r] * (delta / max(norm, 1e-8))
            else:
                flags.add("row kept")
    rms = max(d.pow(2).mean().sqrt().item(), 1e-9)
    if lr * rms > tau:
        flags.add("tensor clipped")
        d = d * tau / (lr * rms)
    else:
        flags.add("tensor kept")
    return p - lr * d


@pytest.mark.parametrize("foreach", [False, True])
def test_matches_float64_reference(foreach: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    params = {
        role: [torch.randn(s, generator=gen, dtype=torch.float64).requires_grad_() for s in shapes]
        for role, shapes in SHAPES.items()
    }
    # group 1 at the paper's lr (every tensor clipped), group 2 at a small lr (no tensor clip), own tau/delta
    settings = [
        {"lr": 100.0, "momentum": 0.9, "tau": 5e-4, "delta": 1e-3},
        {"lr": 0.05, "momentum": 0.5, "tau": 1e-2, "delta": 2e-2},
    ]
    groups, where = [], {}
    for k, s in enumerate(settings):
        for role, ps in params.items():
            half = ps[k::2]
            if half:
                groups.append({"params": half, "role": role, **s})
                for p in half:
                    where[id(p)] = (role, s)
    opt = snoo.SGDLL(groups, foreach=foreach)
    tensors = [p for ps in params.values() for p in ps]
    ref = [p.detach().clone() for p in tensors]
    ref_state: list[dict] = [{} for _ in tensors]
    flags: set[str] = set()
    for step in range(6):
        for i, p in enumerate(tensors):
            role, s = where[id(p)]
            scale = 1.0 if s["lr"] > 1 else 1e-3
            g = torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale
            if role == "head":
                g[0] *= 1e-3  # a quiet token class: its row stays under delta
            if step == 3 and i == 1:
                p.grad = None  # no gradient: no update, momentum not touched
                continue
            p.grad = g
            ref[i] = sgd_ll_reference(ref[i], g, ref_state[i], role, **s, flags=flags)
        opt.step()
        for i, p in enumerate(tensors):
            torch.testing.assert_close(p.detach(), ref[i], rtol=1e-12, atol=1e-14)
            # the momentum is stored unclipped
            torch.testing.assert_close(opt.state[p]["momentum_buffer"], ref_state[i]["m"], rtol=1e-12, atol=0)
    assert flags == {"row clipped", "row kept", "tensor clipped", "tensor kept"}


def test_step_rms_is_at_most_tau() -> None:
    w = torch.randn(50, 20, requires_grad=True)
    before = w.detach().clone()
    w.grad = torch.randn(50, 20) * 1e3
    snoo.SGDLL([{"params": [w], "role": "matrix"}], lr=300.0, tau=5e-4).step()
    rms = (w.detach() - before).pow(2).mean().sqrt().item()
    assert rms == pytest.approx(5e-4, rel=1e-4)


def test_foreach_equals_loop_float32() -> None:
    results = []
    for foreach in (False, True):
        gen = torch.Generator().manual_seed(1)
        params = {r: [torch.randn(s, generator=gen).requires_grad_() for s in ss] for r, ss in SHAPES.items()}
        opt = snoo.SGDLL([{"params": ps, "role": r} for r, ps in params.items()], lr=3.0, foreach=foreach)
        for _ in range(3):
            for ps in params.values():
                for p in ps:
                    p.grad = torch.randn(p.shape, generator=gen) * 1e-4
            opt.step()
        results.append([p.detach() for ps in params.values() for p in ps])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def test_lr_zero_moves_nothing_but_momentum() -> None:
    w = torch.randn(4, 3, requires_grad=True)
    before = w.detach().clone()
    w.grad = torch.ones(4, 3)
    opt = snoo.SGDLL([{"params": [w], "role": "head"}], lr=0.0)
    opt.step()
    assert torch.equal(w.detach(), before)
    torch.testing.assert_close(opt.state[w]["momentum_buffer"], torch.full((4, 3), 0.1))


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"lr": -1.0}, ValueError, "lr"),
        ({"lr": None}, TypeError, "lr"),
        ({"momentum": 1.0}, ValueError, "momentum"),
        ({"tau": 0.0}, ValueError, "tau"),
        ({"delta": -1.0}, ValueError, "delta"),
        ({"delta": math.inf}, ValueError, "delta"),
        ({"tau": True}, TypeError, "tau"),
    ],
)
def test_bad_arguments(kwargs: dict, error: type, name: str) -> None:
    w = torch.zeros(2, 2, requires_grad=True)
    with pytest.raises(error, match=name):
        snoo.SGDLL([{"params": [w], "role": "head"}], **kwargs)
    with pytest.raises(error, match=name):
        snoo.SGDLL([{"params": [w], "role": "head", **kwargs}])
