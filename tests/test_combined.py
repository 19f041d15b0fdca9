"""MuonAdamW: the same steps as torch's Muon and AdamW side by side, one param_groups list, one state_dict."""

from __future__ import annotations

import copy
import io

import pytest
import torch

import snoo


def make_params() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    shapes = [(12, 4), (8, 6), (6, 8), (12, 4), (6,), (8, 8), (3,)]
    return [torch.randn(s, generator=gen).requires_grad_() for s in shapes]


def make_groups(ps: list[torch.Tensor]) -> list[dict]:
    # interleaved roles, per-group options of both kinds
    return [
        {"params": [ps[0]], "role": "embedding", "lr": 0.01},
        {"params": [ps[1], ps[2]], "role": "matrix"},
        {"params": [ps[3]], "role": "head", "betas": (0.8, 0.9)},
        {"params": [ps[4], ps[6]], "role": "vector", "weight_decay": 0.1},
        {"params": [ps[5]], "role": "matrix", "lr": 0.05, "momentum": 0.9, "nesterov": False},
    ]


def set_grads(ps: list[torch.Tensor], step: int) -> None:
    gen = torch.Generator().manual_seed(10 + step)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen)


HYPER = {"lr": 0.02, "momentum": 0.95, "weight_decay": 0.01, "adamw_lr": 3e-3, "adamw_betas": (0.9, 0.95)}


def test_equals_torch_muon_and_adamw_side_by_side() -> None:
    ps = make_params()
    qs = [p.detach().clone().requires_grad_() for p in ps]
    opt = snoo.MuonAdamW(make_groups(ps), **HYPER)
    ref_groups = make_groups(qs)
    muon = torch.optim.Muon([g for g in ref_groups if g["role"] == "matrix"], lr=0.02, momentum=0.95, weight_decay=0.01)
    adamw = torch.optim.AdamW(
        [g for g in ref_groups if g["role"] != "matrix"], lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0
    )
    for step in range(4):
        set_grads(ps, step)
        set_grads(qs, step)
        opt.step()
        muon.step()
        adamw.step()
        for p, q in zip(ps, qs, strict=True):
            assert torch.equal(p, q)
    assert [g["role"] for g in opt.param_groups] == ["embedding", "matrix", "head", "vector", "matrix"]
    assert opt.param_groups[4]["lr"] == 0.05 and opt.param_groups[1]["lr"] == 0.02
    assert opt.param_groups[0]["lr"] == 0.01 and opt.param_groups[2]["lr"] == 3e-3
    assert opt.param_groups[3]["weight_decay"] == 0.1 and opt.param_groups[2]["weight_decay"] == 0.0


def test_state_dict_keyed_by_position_and_loads_bit_exact() -> None:
    ps = make_params()
    opt = snoo.MuonAdamW(make_groups(ps), **HYPER)
    for step in range(3):
        set_grads(ps, step)
        opt.step()
    buf = io.BytesIO()
    torch.save({"model": [p.detach() for p in ps], "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    sd = saved["opt"]
    assert sorted(sd["state"]) == list(range(7))
    assert [g["params"] for g in sd["param_groups"]] == [[0], [1, 2], [3], [4, 5], [6]]
    assert set(sd["state"][1]) == {"momentum_buffer"} and set(sd["state"][0]) >= {"exp_avg", "exp_avg_sq"}

    qs = [t.clone().requires_grad_() for t in saved["model"]]
    fresh = snoo.MuonAdamW(make_groups(qs), **HYPER)
    fresh.load_state_dict(sd)
    # re-linked: the inner optimizers read the loaded group dicts and the one state
    assert fresh._muon.param_groups[0] is fresh.param_groups[1]
    assert fresh._adamw.state is fresh.state
    for step in range(3, 6):
        set_grads(ps, step)
        set_grads(qs, step)
        opt.step()
        fresh.step()
    for p, q in zip(ps, qs, strict=True):
        assert torch.equal(p, q)


def test_lambda_lr_moves_both_and_keeps_ratio() -> None:
    ps = make_params()
    opt = snoo.MuonAdamW(make_groups(ps), **HYPER)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s)
    for step in range(3):
        set_grads(ps, step)
        opt.step()
        sched.step()
    lrs = [g["lr"] for g in opt.param_groups]
    assert lrs == pytest.approx([0.01 / 8, 0.02 / 8, 3e-3 / 8, 3e-3 / 8, 0.05 / 8])
    assert opt.param_groups[1]["lr"] / opt.param_groups[2]["lr"] == pytest.approx(0.02 / 3e-3)
    assert [g["lr"] for g in opt._muon.param_groups] == [lrs[1], lrs[4]]
    # a zero multiplier freezes every tensor, Muon's and AdamW's alike
    ps = make_params()
    opt = snoo.MuonAdamW(make_groups(ps), weight_decay=0.0)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.0)
    before = [p.detach().clone() for p in ps]
    set_grads(ps, 0)
    opt.step()
    for p, b in zip(ps, before, strict=True):
        assert torch.equal(p, b)


def test_closure_zero_grad_deepcopy_add_group() -> None:
    ps = make_params()
    opt = snoo.MuonAdamW(make_groups(ps)[:3])
    calls = []

    def closure() -> torch.Tensor:
        calls.append(torch.is_grad_enabled())
        set_grads(ps, 0)
        return torch.tensor(1.0)

    assert opt.step(closure).item() == 1.0 and calls == [True]
    opt.zero_grad()
    assert all(p.grad is None for p in ps[:4]) and ps[4].grad is not None
    opt.add_param_group({"params": [ps[5]], "role": "matrix", "lr": 0.1})
    assert opt._muon.param_groups[-1] is opt.param_groups[-1]
    with pytest.raises(ValueError, match="more than one"):
        opt.add_param_group({"params": [ps[1]], "role": "vector"})
    clone = copy.deepcopy(opt)
    assert clone._muon.param_groups[0] is clone.param_groups[1] and clone._adamw.state is clone.state
    assert clone.param_groups[1]["params"][0] is not ps[1]


def test_role_mismatch_on_load_refused() -> None:
    ps = make_params()
    opt = snoo.MuonAdamW(make_groups(ps))
    other = snoo.MuonAdamW([{"params": ps[:5] + ps[6:], "role": "vector"}, {"params": [ps[5]], "role": "matrix"}])
    with pytest.raises(ValueError, match="roles"):
        opt.load_state_dict(other.state_dict())


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"lr": -1.0}, ValueError, "lr"),
        ({"momentum": 1.5}, ValueError, "momentum"),
        ({"weight_decay": -0.1}, ValueError, "weight_decay"),
        ({"adamw_lr": -1.0}, ValueError, "adamw_lr"),
        ({"adamw_betas": (1.0, 0.9)}, ValueError, "adamw_betas"),
        ({"adamw_eps": "x"}, TypeError, "adamw_eps"),
        ({"adamw_weight_decay": -1.0}, ValueError, "adamw_weight_decay"),
        ({"ns_steps": 0}, ValueError, "ns_steps"),
        ({"adjust_lr_fn": "rms"}, ValueError, "adjust_lr_fn"),
        ({"nesterov": 1}, TypeError, "nesterov"),
    ],
)
def test_bad_arguments(kwargs: dict, error: type, name: str) -> None:
    with pytest.raises(error, match=name):
        snoo.MuonAdamW(make_groups(make_params()), **kwargs)


def test_muon_matrix_must_be_2d() -> None:
    conv = torch.zeros(4, 3, 2, 2, requires_grad=True)
    with pytest.raises(ValueError, match=r"2-D.*'vector'"):
        snoo.MuonAdamW([{"params": [conv], "role": "matrix"}])
