"""SCALE against a float64 loop-per-tensor reference written from the update rules; argument checks; state."""

from __future__ import annotations

import math

import pytest
import torch

import snoo

SHAPES = {
    "embedding": [(10, 4), (6, 3)],
    "matrix": [(6, 5), (3, 4, 2), (1, 7)],
    "head": [(7, 4)],
    "vector": [(5,), (1,), ()],
}


def make_params(dtype: torch.dtype = torch.float64) -> dict[str, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return {
        role: [torch.randn(s, generator=gen, dtype=dtype).requires_grad_() for s in shapes]
        for role, shapes in SHAPES.items()
    }


def make_grads(params: dict[str, list[torch.Tensor]], step: int) -> dict[str, list[torch.Tensor | None]]:
    gen = torch.Generator().manual_seed(100 + step)
    grads: dict[str, list[torch.Tensor | None]] = {}
    for role, ps in params.items():
        grads[role] = []
        for i, p in enumerate(ps):
            g = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if p.ndim == 2 and i == 0:
                g[1] = 0.0  # a row (an unused token, for embeddings a row of zeros in every column) at rest
            if step == 2 and i == 0:
                g = None  # a tensor without gradient this step: no update, no state change
            grads[role].append(g)
    return grads


def scale_reference(p, g, state, role, lr, momentum, betas, eps, weight_decay):
    """One SCALE step on one tensor, written from the equations of docs/scale.md."""
    p = p * (1 - lr * weight_decay)
    if role == "vector":
        b1, b2 = betas
        state["t"] = state.get("t", 0) + 1
        t = state["t"]
        state["a"] = b1 * state.get("a", torch.zeros_like(p)) + (1 - b1) * g
        state["v"] = b2 * state.get("v", torch.zeros_like(p)) + (1 - b2) * g * g
        return p - lr * (state["a"] / (1 - b1**t)) / ((state["v"] / (1 - b2**t)).sqrt() + eps)
    d = g
    if role == "head" and momentum > 0:
        state["m"] = momentum * state.get("m", torch.zeros_like(p)) + (1 - momentum) * g
        d = state["m"]
    rows = d.reshape(d.shape[0], -1)
    if role == "embedding":
        rms = rows.pow(2).mean(dim=0, keepdim=True).sqrt()  # one per column
    else:
        rms = rows.pow(2).mean(dim=1, keepdim=True).sqrt()  # one per row
    u = rows / rms.clamp(min=1e-8)
    return p - lr * u.reshape(p.shape)


OPTIONS = {"momentum": 0.8, "betas": (0.85, 0.99), "eps": 1e-6, "weight_decay": 0.1}


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("momentum", [0.8, 0.0])
def test_matches_float64_reference(foreach: bool, momentum: float) -> None:
    params = make_params()
    ref = {role: [p.detach().clone() for p in ps] for role, ps in params.items()}
    ref_state: dict[tuple[str, int], dict] = {}
    lrs = {"embedding": 0.3, "matrix": 0.05, "head": 0.2, "vector": 0.01}
    # two groups share the "matrix" role with different lrs: each group uses its own
    groups = [
        {"params": params["embedding"], "role": "embedding", "lr": lrs["embedding"]},
        {"params": params["matrix"][:2], "role": "matrix", "lr": lrs["matrix"]},
        {"params": params["head"], "role": "head", "lr": lrs["head"]},
        {"params": params["matrix"][2:], "role": "matrix", "lr": 0.07},
        {"params": params["vector"], "role": "vector", "lr": lrs["vector"]},
    ]
    opts = {**OPTIONS, "momentum": momentum}
    opt = snoo.SCALE(groups, foreach=foreach, **opts)
    for step in range(5):
        grads = make_grads(params, step)
        for role, ps in params.items():
            for i, p in enumerate(ps):
                p.grad = grads[role][i]
                g = grads[role][i]
                if g is None:
                    continue
                lr = 0.07 if (role == "matrix" and i == 2) else lrs[role]
                ref[role][i] = scale_reference(ref[role][i], g, ref_state.setdefault((role, i), {}), role, lr, **opts)
        opt.step()
        for role, ps in params.items():
            for p, r in zip(ps, ref[role], strict=True):
                torch.testing.assert_close(p.detach(), r, rtol=1e-12, atol=1e-12)
    # the resting row of the first matrix only decayed (4 steps with a gradient): its update is 0 / 1e-8 = 0
    decay = (1 - lrs["matrix"] * OPTIONS["weight_decay"]) ** 4
    torch.testing.assert_close(params["matrix"][0][1].detach(), make_params()["matrix"][0][1].detach() * decay)


def test_foreach_equals_loop_float32() -> None:
    results = []
    for foreach in (False, True):
        params = make_params(torch.float32)
        groups = [{"params": ps, "role": role} for role, ps in params.items()]
        opt = snoo.SCALE(groups, foreach=foreach, **OPTIONS)
        for step in range(3):
            grads = make_grads(params, step)
            for role, ps in params.items():
                for p, g in zip(ps, grads[role], strict=True):
                    p.grad = g
            opt.step()
        results.append([p.detach() for ps in params.values() for p in ps])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_state_is_head_buffer_and_adam_moments_only() -> None:
    params = make_params(torch.float32)
    opt = snoo.SCALE([{"params": ps, "role": role} for role, ps in params.items()])
    for ps in params.values():
        for p in ps:
            p.grad = torch.ones_like(p)
    opt.step()
    for p in params["embedding"] + params["matrix"]:
        assert not opt.state[p]
    assert set(opt.state[params["head"][0]]) == {"momentum_buffer"}
    assert set(opt.state[params["vector"][0]]) == {"step", "exp_avg", "exp_avg_sq"}
    opt0 = snoo.SCALE([{"params": params["head"], "role": "head"}], momentum=0.0)
    opt0.step()
    assert not opt0.state[params["head"][0]]


def test_update_has_unit_row_rms() -> None:
    w = torch.randn(5, 8, requires_grad=True)
    before = w.detach().clone()
    w.grad = torch.randn(5, 8) * torch.tensor([1e-3, 1.0, 10.0, 1e2, 1e4]).unsqueeze(1)
    snoo.SCALE([{"params": [w], "role": "matrix"}], lr=0.5).step()
    row_rms = (w.detach() - before).pow(2).mean(dim=1).sqrt()
    torch.testing.assert_close(row_rms, torch.full((5,), 0.5))


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"lr": -1.0}, ValueError, "lr"),
        ({"lr": "0.1"}, TypeError, "lr"),
        ({"momentum": 1.0}, ValueError, "momentum"),
        ({"momentum": -0.1}, ValueError, "momentum"),
        ({"betas": (0.9,)}, TypeError, "betas"),
        ({"betas": (0.9, 1.0)}, ValueError, r"betas\[1\]"),
        ({"eps": -1e-8}, ValueError, "eps"),
        ({"weight_decay": math.nan}, ValueError, "weight_decay"),
        ({"foreach": 1}, TypeError, "foreach"),
    ],
)
def test_bad_arguments(kwargs: dict, error: type, name: str) -> None:
    w = torch.zeros(2, 2, requires_grad=True)
    with pytest.raises(error, match=name):
        snoo.SCALE([{"params": [w], "role": "matrix"}], **kwargs)
    if "foreach" not in kwargs:  # the same check on a group's own option
        with pytest.raises(error, match=name):
            snoo.SCALE([{"params": [w], "role": "matrix", **kwargs}])
