"""Checkpoints of SNOO: bit-exact resume in a fresh process at any step, and clear errors for a state that does not
fit. Run as a script, this file is the fresh process: it loads a checkpoint and finishes the run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import snoo
from helpers import WithRareParameter as Net
from helpers import assert_fresh_process_finishes_the_same, resume_and_finish, save_checkpoints

STEPS, K = 23, 5


def build() -> tuple[Net, snoo.SNOO, torch.optim.lr_scheduler.LRScheduler]:
    model = Net()
    opt = snoo.SNOO(torch.optim.AdamW(model.parameters(), lr=1e-2), k=K, lr=0.6, momentum=0.7, track_norms=True)
    return model, opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS)


def run(model: Net, opt: snoo.SNOO, sched, start: int, stop: int) -> None:
    for t in range(start + 1, stop + 1):
        g = torch.Generator().manual_seed(t)
        x, y = torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)
        (model(x, t % 3 == 0) - y).square().mean().backward()  # `rare` every third step
        opt.step()
        sched.step()
        opt.zero_grad()


CUTS = [(1, False), (7, False), (10, False), (13, True), (19, False)]
# (step, saved in eval mode): mid-cycle, right after an outer step, in eval mode, and at 19, where `rare` got its
# gradient of this cycle (step 18) before the cut and none after it: only the saved state says it takes the outer step


def test_resume_in_a_fresh_process_is_bit_exact(tmp_path):
    model, opt, sched = build()
    run(model, opt, sched, 0, STEPS)
    expected = [p.detach() for p in model.parameters()]
    save_checkpoints(tmp_path, build, run, CUTS)
    assert_fresh_process_finishes_the_same(__file__, tmp_path, CUTS, expected)


def test_state_dict_layout_is_keyed_by_position_and_does_not_alias_the_inner_state():
    model, opt, sched = build()
    run(model, opt, sched, 0, 10)
    assert opt.state_dict()["param_groups"][0]["snoo"]["touched"] == []  # right after an outer step
    run(model, opt, sched, 10, 11)  # step 11 gives `rare` (position 0: own parameters come first) no gradient
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups"}  # all that torch.distributed.checkpoint keeps
    assert sd["param_groups"][0]["snoo"] == {
        "wrapper": "SNOO",
        "inner": "AdamW",
        "inner_steps": 11,
        "training": True,
        "k": K,
        "skipped_outer_steps": 0,
        "touched": [1, 2, 3, 4],
    }
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq", "snoo.slow", "snoo.momentum"}
    assert sd["param_groups"][0]["outer_lr"] == 0.6 and sd["param_groups"][0]["params"] == [0, 1, 2, 3, 4]
    assert all(not any(k.startswith("snoo.") for k in s) for s in opt.inner.state.values())


def test_load_restores_the_mode_and_keeps_state_in_float32_for_bf16(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4).to(torch.bfloat16)
    opt = snoo.SNOO(torch.optim.SGD(model.parameters(), lr=0.1), k=2)
    for _ in range(3):
        model(torch.ones(2, 4, dtype=torch.bfloat16)).sum().backward()
        opt.step()
        opt.zero_grad()
    opt.eval()
    torch.save(opt.state_dict(), tmp_path / "o.pt")
    fresh = snoo.SNOO(torch.optim.SGD(model.parameters(), lr=0.1), k=2)
    fresh.load_state_dict(torch.load(tmp_path / "o.pt", weights_only=True))
    assert not fresh.training
    with pytest.raises(RuntimeError, match="eval mode"):
        fresh.step()
    assert all(s["slow"].dtype == torch.float32 and s["fast"].dtype == torch.bfloat16 for s in fresh.state.values())


def test_a_state_that_does_not_fit_is_refused_with_what_does_not_match():
    model, opt, sched = build()
    run(model, opt, sched, 0, 6)
    good = opt.state_dict()

    plain = torch.optim.AdamW(Net().parameters())
    with pytest.raises(ValueError, match="no 'snoo' entry"):
        opt.load_state_dict(plain.state_dict())

    other = torch.nn.Linear(6, 5)
    other_opt = snoo.SNOO(torch.optim.AdamW(other.parameters()), k=K)
    with pytest.raises(ValueError, match="2 parameters in the state dict and 5"):
        build()[1].load_state_dict(other_opt.state_dict() | {"state": {}})

    bad_shape = {**good, "state": {**good["state"], 0: {**good["state"][0], "snoo.slow": torch.zeros(2, 2)}}}
    target = build()[1]
    with pytest.raises(ValueError, match=r"parameter 0: 'snoo.slow' has shape \(2, 2\)"):
        target.load_state_dict(bad_shape)
    assert len(target.inner.state) == 0 and len(target.state) == 0, "a refused state must change nothing"

    unknown = {**good, "state": {**good["state"], 1: {**good["state"][1], "snoo.velocity": torch.zeros(16)}}}
    with pytest.raises(ValueError, match=r"'snoo\.velocity' is not state"):
        build()[1].load_state_dict(unknown)

    with pytest.raises(ValueError, match=r"k=5.*k=7"):
        snoo.SNOO(torch.optim.AdamW(Net().parameters()), k=7).load_state_dict(good)

    with pytest.raises(ValueError, match="expects a dict"):
        opt.load_state_dict([1, 2])


def test_the_inner_optimizer_alone_loads_its_own_state_and_keeps_the_outer_settings():
    model, opt, sched = build()
    plain = torch.optim.AdamW(model.parameters(), lr=0.01)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    plain.step()  # a state dict of AdamW alone, e.g. from before SNOO was added to the run
    opt.param_groups[0]["outer_lr"] = 0.25  # set by hand before loading: must survive it
    opt.inner.load_state_dict(plain.state_dict())
    assert opt.param_groups[0]["outer_lr"] == 0.25 and opt.param_groups[0]["outer_momentum"] == 0.7
    assert opt.inner.state[model.rare]["step"] == 1
    opt.zero_grad()
    run(model, opt, sched, 0, K + 1)  # steps, and takes an outer step, with the loaded moments


def test_deepcopy_keeps_the_inner_optimizer():
    import copy

    model, opt, sched = build()
    run(model, opt, sched, 0, 3)
    clone = copy.deepcopy(opt)
    assert isinstance(clone.inner, torch.optim.AdamW) and clone.param_groups is clone.inner.param_groups
    assert clone.state_dict()["param_groups"] == opt.state_dict()["param_groups"]


if __name__ == "__main__":
    resume_and_finish(Path(sys.argv[1]), build, run, STEPS)
