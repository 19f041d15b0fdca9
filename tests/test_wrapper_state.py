"""The wrappers' state under careless or hostile use: refused groups and state dicts leave no trace, hand edits are
checked, non-finite outer steps are skipped, and a fuzzer throws broken state dicts at every wrapper's loader
(docs/faq.md, "Optimizer state and checkpoints: what is trusted, what is refused")."""

from __future__ import annotations

import copy
import math
import random
import warnings

import pytest
import torch

import snoo
from helpers import make_model, train_step

WRAPPERS = {
    "SNOO": lambda m: snoo.SNOO(torch.optim.AdamW(m.parameters(), lr=1e-2), k=2),
    "Lookahead": lambda m: snoo.Lookahead(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), k=2),
    "EMANesterov": lambda m: snoo.EMANesterov(torch.optim.AdamW(m.parameters(), lr=1e-2), gamma=0.9),
    "Nesterov": lambda m: snoo.Nesterov(torch.optim.Adam(m.parameters(), lr=1e-2)),
    "EMANesterov(SNOO)": lambda m: snoo.EMANesterov(snoo.SNOO(torch.optim.AdamW(m.parameters(), lr=1e-2), k=2)),
}


def trained(name: str, steps: int = 3, in_eval: bool = False) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = make_model()
    opt = WRAPPERS[name](model)
    for t in range(steps):
        train_step(model, opt, t)
    if in_eval:
        opt.eval()
    return model, opt


def snapshot(model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple:
    """Everything a load could change, as values: the parameters, the state dict (tensors cloned), the mode."""

    def frozen(x):
        if isinstance(x, torch.Tensor):
            return ("tensor", x.dtype, tuple(x.shape), x.detach().clone())
        if isinstance(x, dict):
            return {k: frozen(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [frozen(v) for v in x]
        return x

    return [p.detach().clone() for p in model.parameters()], frozen(opt.state_dict()), opt.training


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(same, a, b))
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def assert_refused_and_unchanged(model, opt, state_dict, match: str | None = None) -> Exception:
    before = snapshot(model, opt)
    with pytest.raises((ValueError, TypeError), match=match) as err:
        opt.load_state_dict(state_dict)
    assert "\n" not in str(err.value)
    assert same(snapshot(model, opt), before), "a refused state dict must change nothing"
    return err.value


# -- groups ---------------------------------------------------------------------------------------------------------


def test_a_refused_param_group_leaves_no_trace():
    w, q = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = snoo.SNOO(torch.optim.SGD([w], lr=0.1), k=1)
    with pytest.raises(ValueError, match="outer learning rate"):
        opt.add_param_group({"params": [q], "outer_lr": -1.0})
    assert len(opt.inner.param_groups) == 1 and len(opt.param_groups) == 1
    q.grad = torch.ones(3)
    w.grad = torch.ones(3)
    opt.step()
    assert torch.equal(q, torch.ones(3)), "q is in no group: nothing moves it"

    model = make_model()
    ema = snoo.EMANesterov(torch.optim.SGD([model[0].weight], lr=0.1))
    with pytest.raises(ValueError, match="gamma"):
        ema.add_param_group({"params": [model[2].weight], "ema_gamma": 5})
    assert len(ema.inner.param_groups) == 1
    # a group the inner optimizer refuses leaves nothing either, and a good one takes the defaults
    stack = snoo.EMANesterov(snoo.SNOO(torch.optim.SGD([model[0].weight], lr=0.1)))
    with pytest.raises(ValueError, match="outer learning rate"):
        stack.add_param_group({"params": [model[2].weight], "outer_lr": 0.0})
    assert len(stack.param_groups) == 1
    stack.add_param_group({"params": [model[2].weight], "ema_beta": 0.3})
    assert stack.param_groups[1]["ema_beta"] == 0.3 and stack.param_groups[1]["outer_lr"] == 0.7


def test_hand_edits_give_clear_errors_or_take_the_defaults():
    model = make_model()
    opt = snoo.SNOO(torch.optim.SGD([model[0].weight], lr=0.1), k=2)
    with pytest.raises(ValueError, match=r"k \(inner steps per outer step\) must be an int >= 1, got 0"):
        opt.k = 0
    assert opt.k == 2
    opt.inner.add_param_group({"params": [model[2].weight]})  # behind the wrapper's back
    opt.param_groups[0]["outer_momentum"] = 1.5
    with pytest.raises(ValueError, match=r"momentum \(outer momentum\) must be a finite number in \[0, 1\)"):
        train_step(model, opt, 0)
    opt.param_groups[0]["outer_momentum"] = 0.5
    for t in range(4):
        train_step(model, opt, t)
    assert opt.param_groups[1]["outer_lr"] == 0.7 and "slow" in opt.state[model[2].weight]


def test_state_device_is_checked_where_it_is_given():
    params = make_model().parameters()
    with pytest.raises(ValueError, match="state_device='meta' holds no data"):
        snoo.SNOO(torch.optim.SGD(params, lr=0.1), state_device="meta")
    with pytest.raises(ValueError, match=r"state_device must be None, 'cpu' or another device name.*'nonsense'"):
        snoo.EMANesterov(torch.optim.SGD(make_model().parameters(), lr=0.1), state_device="nonsense")


def test_zero_element_parameters_are_left_alone_by_scale_and_sgd_ll():
    empty = torch.nn.Parameter(torch.zeros(0, 4))
    flat = torch.nn.Parameter(torch.zeros(3, 0))
    w = torch.nn.Parameter(torch.ones(3, 4))
    for make in (snoo.SCALE, snoo.SGDLL):
        for role in ("matrix", "head", "embedding"):
            opt = make([{"params": [empty, flat, w], "role": role}])
            for p in (empty, flat, w):
                p.grad = torch.ones_like(p)
            opt.step()
            assert empty.shape == (0, 4) and flat.shape == (3, 0) and not torch.equal(w, torch.ones(3, 4))
            with torch.no_grad():
                w.fill_(1.0)


@pytest.mark.parametrize("name", [*WRAPPERS, "GPA"])
def test_with_a_scheduler_attached_a_wrapper_pickles_and_copies_into_an_independent_optimizer(name):
    """torch.save(opt) and deepcopy with an LR scheduler attached (it replaces the instance's ``step``): the copy
    holds the same state and trains on its own parameters as the original does on its own."""
    import io

    model = make_model()
    opt = snoo.GPA(torch.optim.AdamW(model.parameters(), lr=1e-2)) if name == "GPA" else WRAPPERS[name](model)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    for t in range(3):
        train_step(model, opt, t)
        sched.step()
    buffer = io.BytesIO()
    torch.save({"model": model, "opt": opt}, buffer)
    buffer.seek(0)
    for copied in (torch.load(buffer, weights_only=False), copy.deepcopy({"model": model, "opt": opt})):
        twin, twin_opt = copied["model"], copied["opt"]
        assert type(twin_opt) is type(opt) and same(snapshot(twin, twin_opt), snapshot(model, opt))
        before = [p.detach().clone() for p in model.parameters()]
        for t in range(3, 6):
            train_step(twin, twin_opt, t)
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before)), "the copy moved the original"
        assert not all(torch.equal(a, b) for a, b in zip(twin.parameters(), before)), "the copy did not train"


# -- load_state_dict ------------------------------------------------------------------------------------------------


def test_load_state_dict_checks_the_hyperparameters_and_counters():
    model, opt = trained("SNOO")
    good = opt.state_dict()
    for key, value, words in [
        ("outer_lr", float("nan"), "outer learning rate"),
        ("outer_momentum", 1.5, "outer momentum"),
        ("outer_nesterov", "yes", "nesterov"),
        ("lr", "0.1", "lr='0.1'"),
        ("betas", (0.9, float("inf")), "betas"),
    ]:
        bad = copy.deepcopy(good)
        bad["param_groups"][0][key] = value
        assert_refused_and_unchanged(model, opt, bad, match=words)
    for key, value, words in [
        ("inner_steps", -5, "inner_steps"),
        ("training", 1, "training"),
        ("k", 3, "k=3"),
        ("touched", [0, 99], "touched"),
        ("skipped_outer_steps", -1, "skipped_outer_steps"),
    ]:
        bad = copy.deepcopy(good)
        for group in bad["param_groups"]:
            group["snoo"][key] = value
        assert_refused_and_unchanged(model, opt, bad, match=words)
    opt.load_state_dict(good)  # and the good one still loads


def test_a_state_dict_of_another_wrapper_or_another_inner_optimizer_is_refused():
    model, snoo_opt = trained("SNOO")
    lookahead = snoo.Lookahead(torch.optim.AdamW(model.parameters(), lr=1e-2), k=2)
    assert_refused_and_unchanged(model, lookahead, snoo_opt.state_dict(), match="saved by 'SNOO'")
    for t in range(2):
        train_step(model, lookahead, t)
    assert_refused_and_unchanged(model, snoo_opt, lookahead.state_dict(), match="saved by 'Lookahead'")

    sgd_model = make_model()
    with_sgd = snoo.SNOO(torch.optim.SGD(sgd_model.parameters(), lr=0.1, momentum=0.9), k=2)
    for t in range(3):
        train_step(sgd_model, with_sgd, t)
    saved = with_sgd.state_dict()
    err = assert_refused_and_unchanged(model, snoo_opt, saved, match="around 'SGD'")
    assert "AdamW" in str(err)
    # without the names (a state dict of an older snoo), AdamW's own loader fails half-way: it is put back
    for group in saved["param_groups"]:
        del group["snoo"]["inner"], group["snoo"]["wrapper"]
    assert_refused_and_unchanged(model, snoo_opt, saved)


def test_a_state_that_lacks_or_poisons_the_wrappers_tensors_is_refused():
    model, opt = trained("Nesterov")
    good = opt.state_dict()
    lacking = copy.deepcopy(good)
    del lacking["state"][1]["nesterov.d"]
    assert_refused_and_unchanged(model, opt, lacking, match="not 'nesterov.d'")
    poisoned = copy.deepcopy(good)
    poisoned["state"][0]["nesterov.theta"][0, 0] = float("inf")
    assert_refused_and_unchanged(model, opt, poisoned, match="NaN or infinite")
    stale = copy.deepcopy(good)
    stale["state"][0]["nesterov.phi"] = torch.zeros_like(model[0].weight)
    assert_refused_and_unchanged(model, opt, stale, match="saved in train mode but holds a training point")


# -- non-finite outer steps -----------------------------------------------------------------------------------------


STACKS = {
    "SNOO": lambda m: snoo.SNOO(torch.optim.AdamW(m.parameters(), lr=1e-2), k=2),
    "EMANesterov(SNOO)": WRAPPERS["EMANesterov(SNOO)"],
    "Nesterov(SNOO)": lambda m: snoo.Nesterov(snoo.SNOO(torch.optim.AdamW(m.parameters(), lr=1e-2), k=2)),
    "GPA(SNOO)": lambda m: snoo.GPA(snoo.SNOO(torch.optim.AdamW(m.parameters(), lr=1e-2), k=2)),
}


@pytest.mark.parametrize("stack", STACKS)
@pytest.mark.parametrize(
    ("spoil", "cause"),
    [
        (lambda e: {**e, "step": torch.tensor(math.nan)}, "'step' must be a count >= 0"),  # issue 24, item 11
        (lambda e: {**e, "step": e["step"].to("meta")}, "'step' is a tensor on the meta device"),  # item 12
        (lambda e: {**e, "snoo.slow": e["snoo.slow"].to("meta")}, "'snoo.slow' is a tensor on the meta device"),
    ],
)
def test_a_stack_names_the_real_cause_of_a_refusal(stack, spoil, cause):
    model = make_model()
    opt = STACKS[stack](model)
    for t in range(3):
        train_step(model, opt, t)
    state_dict = copy.deepcopy(opt.state_dict())
    state_dict["state"][0] = spoil(state_dict["state"][0])
    err = assert_refused_and_unchanged(model, opt, state_dict)
    assert isinstance(err, ValueError) and cause in str(err), err


def test_a_non_finite_outer_step_is_skipped_warned_once_and_counted():
    model = make_model()
    opt = snoo.SNOO(torch.optim.SGD(model.parameters(), lr=0.05), k=2, track_norms=True)
    for t in range(2):
        train_step(model, opt, t)
    slow = [opt.state[p]["slow"].clone() for p in model.parameters()]
    momentum = [opt.state[p]["momentum"].clone() for p in model.parameters()]
    norms = dict(opt.outer_norms)

    def poisoned_step(t: int) -> None:
        train_step(model, opt, t) if t != 2 else None
        if t == 2:  # one NaN gradient in the cycle
            x = torch.randn(4, 6)
            model(x).sum().backward()
            model[0].weight.grad[0, 0] = float("nan")
            opt.step()
            opt.zero_grad()

    with pytest.warns(RuntimeWarning, match="outer step was skipped"):
        poisoned_step(2)
        train_step(model, opt, 3)  # the outer step of inner step 4
    assert opt.skipped_outer_steps == 1
    for p, w, b in zip(model.parameters(), slow, momentum, strict=True):
        assert torch.equal(opt.state[p]["slow"], w) and torch.equal(opt.state[p]["momentum"], b)
        assert torch.equal(p, w), "the fast weights restart from the last good slow weights"
    assert all(torch.equal(norms[k], opt.outer_norms[k]) for k in norms), "no norms of a skipped step"

    # warned once; the count survives a checkpoint; the next good cycle takes its outer step
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in (4, 5):
            x = torch.randn(4, 6)
            model(x).sum().backward()
            model[0].weight.grad[0, 0] = float("inf")
            opt.step()
            opt.zero_grad()
    assert opt.skipped_outer_steps == 2
    fresh_model = make_model()
    fresh = snoo.SNOO(torch.optim.SGD(fresh_model.parameters(), lr=0.05), k=2)
    fresh.load_state_dict(opt.state_dict())
    assert fresh.skipped_outer_steps == 2
    for t in (6, 7):
        train_step(model, opt, t)
    assert opt.skipped_outer_steps == 2 and not torch.equal(opt.state[model[0].weight]["slow"], slow[0])


# -- the fuzzer -----------------------------------------------------------------------------------------------------

JUNK = [None, "x", -1, 1.5, float("nan"), True, [], {}, (0.9,), torch.zeros(2, 2), torch.tensor(float("nan"))]


def _paths(x, path=()):
    yield path
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _paths(v, (*path, k))
    elif isinstance(x, (list, tuple)):
        for i, v in enumerate(x):
            yield from _paths(v, (*path, i))


def _get(x, path):
    for k in path:
        x = x[k]
    return x


def mutate(state_dict: dict, rng: random.Random) -> dict:
    """One random damage: a key deleted, a value replaced by junk, a list truncated, bits flipped in a tensor."""
    sd = copy.deepcopy(state_dict)
    paths = [p for p in _paths(sd) if p]
    path = rng.choice(paths)
    parent, key = _get(sd, path[:-1]), path[-1]
    value = parent[key]
    kind = rng.choice(["delete", "junk", "truncate", "flip"])
    if isinstance(parent, tuple):  # betas: a tuple cannot be changed in place
        kind = "junk"
        grand = _get(sd, path[:-2])
        grand[path[-2]] = tuple(rng.choice(JUNK) if i == key else v for i, v in enumerate(parent))
    elif kind == "delete" and isinstance(parent, dict):
        del parent[key]
    elif kind == "truncate" and isinstance(value, list) and value:
        parent[key] = value[: rng.randrange(len(value))]
    elif kind == "flip" and isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
        bits = value.view(torch.int32) if value.dtype == torch.float32 else value.view(torch.int64)
        flat = bits.view(-1)
        i = rng.randrange(flat.numel())
        flat[i] ^= 1 << rng.randrange(8 * value.element_size())
    else:
        parent[key] = copy.deepcopy(rng.choice(JUNK))
    return sd


@pytest.mark.parametrize("name", list(WRAPPERS))
def test_fuzzed_state_dicts_are_refused_cleanly_or_load_and_step(name):
    rng = random.Random(f"fuzz-{name}")
    refused = 0
    for trial in range(60):
        in_eval = trial % 4 == 3
        _, source = trained(name, steps=3, in_eval=in_eval)
        damaged = mutate(source.state_dict(), rng)
        # into an optimizer that has stepped, and into a fresh one (a resume), as a run would
        model, opt = trained(name, steps=2) if trial % 2 else trained(name, steps=0)
        before = snapshot(model, opt)
        try:
            opt.load_state_dict(damaged)
        except (ValueError, TypeError) as e:
            refused += 1
            assert "\n" not in str(e), str(e)
            assert same(snapshot(model, opt), before), f"trial {trial}: a refused state dict changed the optimizer"
            continue
        # accepted: the damage was a value of the right kind (an lr, a step count, a bit of a moment); it trains on
        opt.train()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # a bit flip may make a moment non-finite
                train_step(model, opt, 9)
        except (ValueError, TypeError) as e:  # a clear error at the step is acceptable too
            assert "\n" not in str(e), str(e)
    assert refused >= 20, f"only {refused} of 60 damaged state dicts were refused"


def test_with_a_process_group_the_averaged_pseudo_gradient_is_checked(tmp_path):
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        model = make_model()
        opt = snoo.SNOO(torch.optim.SGD(model.parameters(), lr=0.05), k=2, process_group=dist.group.WORLD)
        for t in range(2):
            train_step(model, opt, t)
        slow = [opt.state[p]["slow"].clone() for p in model.parameters()]
        train_step(model, opt, 2)
        model(torch.randn(4, 6)).sum().backward()
        model[2].bias.grad[0] = float("-inf")
        with pytest.warns(RuntimeWarning, match="averaged pseudo-gradient held NaN or infinite"):
            opt.step()
        assert opt.skipped_outer_steps == 1
        assert all(torch.equal(opt.state[p]["slow"], w) and torch.equal(p, w) for p, w in zip(model.parameters(), slow))
    finally:
        dist.destroy_process_group()


# -- state dicts saved before the state keys were named after the math ------------------------------------------------

#: new key -> the key snoo saved before (up to f6ad21c), per wrapper: such a checkpoint must load and continue the same
OLD_KEYS = {
    "EMANesterov": {"x": "iterate", "m": "update_ema", "y": "lookahead_point"},
    "Nesterov": {"theta": "iterate", "d": "lookahead", "phi": "lookahead_point"},
    "GPA": {"y": "train_point"},
}
OLD_KEY_WRAPPERS = {
    "EMANesterov": WRAPPERS["EMANesterov"],
    "Nesterov": WRAPPERS["Nesterov"],
    "GPA": lambda m: snoo.GPA(torch.optim.AdamW(m.parameters(), lr=1e-2), mu_x=0.8),
}


@pytest.mark.parametrize(
    ("name", "in_eval"),
    [("EMANesterov", False), ("EMANesterov", True), ("Nesterov", False), ("Nesterov", True), ("GPA", True)],
)  # GPA renamed its training point only, which a state dict holds in eval mode
def test_a_state_dict_in_the_old_key_names_loads_and_continues_bit_for_bit(name, in_eval):
    model = make_model()
    opt = OLD_KEY_WRAPPERS[name](model)
    for t in range(3):
        train_step(model, opt, t)
    if in_eval:
        opt.eval()
    saved_model, saved = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    prefix = opt.state_spec.prefix
    renamed = {f"{prefix}.{new}": f"{prefix}.{old}" for new, old in OLD_KEYS[name].items()}
    old = {**saved, "state": {i: {renamed.get(k, k): v for k, v in st.items()} for i, st in saved["state"].items()}}
    assert any(k in renamed.values() for st in old["state"].values() for k in st), "the old names are in use"
    assert not any(k in renamed for st in old["state"].values() for k in st)
    fresh_model = make_model(seed=1)
    fresh_model.load_state_dict(saved_model)
    fresh = OLD_KEY_WRAPPERS[name](fresh_model)
    fresh.load_state_dict(old)
    assert same(fresh.state_dict(), saved), "loaded under the new names, nothing else changed"
    for o, m in ((opt, model), (fresh, fresh_model)):
        o.train()
        for t in range(3, 6):
            train_step(m, o, t)
    assert all(map(torch.equal, fresh_model.parameters(), model.parameters()))
    assert same(fresh.state_dict(), opt.state_dict())
    both = copy.deepcopy(old)
    first = next(iter(both["state"].values()))
    old_key = next(k for k in first if k in renamed.values())
    first[next(k for k, v in renamed.items() if v == old_key)] = first[old_key].clone()
    assert_refused_and_unchanged(fresh_model, fresh, both, match="under its old name too")
