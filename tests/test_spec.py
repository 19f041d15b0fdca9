"""The optimizer SPEC grammar: parsing, validation, overrides, grids, config tables and building."""

import subprocess
import sys

import pytest
import torch
from torch import nn

import snoo
from helpers import python_with_only
from snoo import spec


def test_defaults_and_shorthand():
    assert spec.canonical("snoo-adamw") == "snoo+adamw" == spec.canonical(" SNOO + adamw ")
    outer, inner = spec.resolved("snoo-adamw")
    assert outer["name"] == "snoo" and inner["name"] == "adamw"
    assert inner == {"name": "adamw", **spec.NAMES["adamw"].defaults}
    assert {"k", "lr", "momentum"} <= set(outer)


def test_given_values_are_typed_and_kept_in_order():
    stages = spec.parse("snoo(k=30,momentum=0.9,nesterov=false)+adamw(lr=1e-3)")
    assert stages[0].given == {"k": 30, "momentum": 0.9, "nesterov": False}
    assert isinstance(stages[0].given["k"], int)
    assert stages[1].params["lr"] == 1e-3
    assert spec.canonical(stages) == "snoo(k=30,momentum=0.9,nesterov=false)+adamw(lr=0.001)"
    assert spec.canonical(spec.canonical(stages)) == spec.canonical(stages)  # canonical is a fixed point


@pytest.mark.parametrize(
    ("bad", "words"),
    [
        ("foo", "unknown optimizer 'foo'"),
        ("adamw(lrr=1)", "unknown key 'lrr'"),
        ("adamw(lr=-1)", "out of range"),
        ("adamw(lr=abc)", "not a number"),
        ("adamw(lr=nan)", "not a number"),
        ("snoo(k=1.5)+adamw", "not an integer"),
        ("snoo(k=0)+adamw", "out of range"),
        ("snoo(momentum=1)+adamw", "out of range"),
        ("snoo(nesterov=2)+adamw", "not true/false"),
        ("snoo", "must end with a base optimizer"),
        ("adamw+snoo", "must end with a base optimizer"),
        ("adamw+adamw", "only wrappers"),
        ("adamw(lr=1,lr=2)", "given twice"),
        ("adamw(lr)", "expected key=value"),
        ("adamw(", "unbalanced"),
        ("", "empty"),
        ("adamw[lr=1]", "cannot read"),
    ],
)
def test_bad_specs_raise_one_line(bad, words):
    with pytest.raises(ValueError) as err:
        spec.parse(bad)
    assert words in str(err.value)
    assert "\n" not in str(err.value)


def test_split_list_keeps_commas_inside_parentheses():
    assert spec.split_list("adamw, snoo(k=20,lr=0.7)+adamw,") == ["adamw", "snoo(k=20,lr=0.7)+adamw"]


def test_override_addresses_outermost_stage_or_named_stage():
    assert spec.override("snoo-adamw", {"lr": 0.5}) == "snoo(lr=0.5)+adamw"
    assert spec.override("snoo-adamw", {"adamw.lr": "2e-3"}) == "snoo+adamw(lr=0.002)"
    assert spec.override("snoo-adamw", {"weight_decay": 0}) == "snoo+adamw(weight_decay=0)"
    with pytest.raises(ValueError, match="has a key 'alpha'"):
        spec.override("snoo-adamw", {"alpha": 0.5})
    assert spec.base("snoo(k=5)+adamw(lr=1e-3)") == "adamw(lr=0.001)"


def test_grid_is_the_product_first_key_slowest():
    points = spec.grid("snoo-adamw", "k=10,20 lr=0.3,0.5")
    assert [p for p, _ in points] == [
        {"k": 10, "lr": 0.3},
        {"k": 10, "lr": 0.5},
        {"k": 20, "lr": 0.3},
        {"k": 20, "lr": 0.5},
    ]
    assert points[1][1] == "snoo(k=10,lr=0.5)+adamw"
    with pytest.raises(ValueError, match="expected key=v1"):
        spec.grid("snoo-adamw", "k")


def test_from_config_string_or_tables():
    tables = [{"name": "snoo", "k": 20, "nesterov": True}, {"name": "adamw", "lr": 3e-3}]
    assert spec.from_config(tables) == "snoo(k=20,nesterov=true)+adamw(lr=0.003)"
    assert spec.from_config("snoo-adamw") == "snoo+adamw"
    with pytest.raises(ValueError, match="list of tables"):
        spec.from_config({"snoo": 1})


def test_build_adamw_decays_matrices_only():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    opt = spec.build("adamw(lr=1e-3,weight_decay=0.2)", model)
    assert isinstance(opt, torch.optim.AdamW)
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decay[id(model[0].weight)] == 0.2
    assert decay[id(model[0].bias)] == decay[id(model[1].weight)] == 0.0
    assert all(g["lr"] == 1e-3 and g["betas"] == (0.9, 0.95) for g in opt.param_groups)


def test_build_snoo_stack_shares_groups_with_inner():
    model = nn.Linear(4, 4)
    opt = spec.build("snoo(k=7,lr=0.5,momentum=0.25)+adamw(lr=2e-3)", model, track_norms=True)
    assert isinstance(opt, snoo.SNOO) and isinstance(opt, torch.optim.Optimizer)
    assert all(g["lr"] == 2e-3 for g in opt.param_groups)
    assert {g["outer_lr"] for g in opt.param_groups} == {0.5}
    assert {g["outer_momentum"] for g in opt.param_groups} == {0.25}
    x = torch.randn(8, 4)
    for _ in range(7):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert set(opt.outer_norms) == {"pseudo_grad", "momentum", "slow"}  # telemetry asked for and refreshed


@pytest.mark.parametrize("name", sorted(spec.NAMES))
def test_every_registered_name_builds_and_steps(name):
    from snoo.lab.model import GPT, ModelConfig

    model = GPT(ModelConfig(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=8))
    opt = spec.build(name if spec.NAMES[name].kind == "base" else f"{name}+adamw", model)
    assert isinstance(opt, torch.optim.Optimizer)
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randint(16, (2, 8))
    model(x, x).backward()
    opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_floats_from_tables_and_config_files_are_exact():
    lr = 0.00123456789
    assert spec.from_tables([{"name": "adamw", "lr": lr}])[0].params["lr"] == lr
    text = spec.from_config([{"name": "snoo", "lr": 0.123456789}, {"name": "adamw", "lr": lr}])
    stages = spec.parse(text)
    assert stages[0].params["lr"] == 0.123456789 and stages[1].params["lr"] == lr
    assert spec.canonical("adamw(lr=2e-3)") == "adamw(lr=0.002)"  # short where 6 digits are exact


def test_out_of_range_says_the_range_the_constructor_checks():
    with pytest.raises(ValueError, match=r"snoo: k=0 is out of range: k must be >= 1"):
        spec.parse("snoo(k=0)+adamw")
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\)"):
        spec.parse("nesterov(momentum=1)+sgd")
    # the ranges are the constructors' own: SCALE takes lr=0 (a frozen run), SGD-LL refuses tau=0
    spec.parse("scale(lr=0)")
    with pytest.raises(ValueError, match="tau must be > 0"):
        spec.parse("sgdll(tau=0)")


def test_the_library_alone_imports_with_no_warning_of_its_own(tmp_path):
    """``pip install -e .`` (torch only, no numpy): torch's own import warns that it cannot initialize NumPy; snoo's
    import adds nothing to that (docs/faq.md)."""
    code = (
        "import warnings\nfrom importlib.util import find_spec\nassert find_spec('numpy') is None\n"
        "with warnings.catch_warnings(record=True) as by_torch:\n"
        "    warnings.simplefilter('always')\n    import torch\n"
        "warnings.simplefilter('error')\nimport snoo\n"
        "print('|'.join(str(w.message).split(':')[0] for w in by_torch))\n"
    )
    done = python_with_only(tmp_path, set(), code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "Failed to initialize NumPy"  # torch's, at `import torch`


def test_import_snoo_is_cheap_and_its_submodules_load_on_first_use():
    code = (
        "import sys, torch, snoo\n"
        "heavy = [m for m in ('snoo.distributed', 'snoo.spec', 'torch.distributed.tensor', 'torch._dynamo',"
        " 'transformers', 'lightning') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "opt = snoo.spec.build('snoo-adamw', torch.nn.Linear(2, 2))\n"
        "assert type(opt).__name__ == 'SNOO' and snoo.distributed.load_evaluation_weights\n"
        "assert snoo.integrations.config.build_optimizer and 'snoo.integrations.hf' not in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_build_gives_run_time_keywords_to_the_outermost_stage_that_takes_them():
    snoo_stage, lookahead, ema = (spec.parse(f"{name}+adamw")[0] for name in ("snoo", "lookahead", "ema_nesterov"))
    assert spec.accepts(snoo_stage, "process_group") and spec.accepts(lookahead, "process_group")
    assert not spec.accepts(ema, "process_group")
    model = nn.Linear(3, 2)
    opt = spec.build("ema_nesterov+snoo(k=3)+adamw", model, outer={"state_device": "cpu"})
    assert opt.state_device == torch.device("cpu") and opt.inner.state_device is None  # the outermost only
    with pytest.raises(ValueError, match="no wrapper to take process_group"):
        spec.build("adamw", model, outer={"process_group": None})
    with pytest.raises(ValueError, match="cannot build"):
        spec.build("ema_nesterov+adamw", model, outer={"process_group": None})


def test_a_number_the_constructor_may_leave_unset_is_a_key_too():
    # EMA-Nesterov's total_steps (`int | None = None`) goes with rest_steps, and lr_peak (`float | None`) with
    # scale_by_lr: both can be given, typed as the annotation says, and left out they are the constructor's None
    stage = spec.parse("ema_nesterov(rest_steps=10,total_steps=100,lr_peak=3e-3)+adamw")[0]
    assert stage.params["total_steps"] == 100 and isinstance(stage.params["total_steps"], int)
    assert stage.params["lr_peak"] == 3e-3
    assert spec.parse("ema_nesterov+adamw")[0].params["total_steps"] is None
    opt = spec.build("ema_nesterov(rest_steps=10,total_steps=100)+adamw", nn.Linear(3, 2))
    assert (opt.rest_steps, opt.total_steps) == (10, 100)
    with pytest.raises(ValueError, match=r"total_steps='1\.5' is not an integer"):
        spec.parse("ema_nesterov(total_steps=1.5)+adamw")
    with pytest.raises(ValueError, match="rest_steps=5 needs total_steps"):
        spec.build("ema_nesterov(rest_steps=5)+adamw", nn.Linear(3, 2))
