"""snoo.integrations.config: an optimizer built from a plain config (nested tables, a list of tables, a SPEC) is the
optimizer one would build by hand, a TOML file switches a training loop from AdamW to SNOO without code changes, and
bad configs fail with one line that says what is allowed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import snoo
from snoo import spec
from snoo.integrations.config import build_optimizer, parse_config

NESTED = {"name": "snoo", "k": 5, "lr": 0.6, "inner": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.05}}
FORMS = {
    "nested": NESTED,
    "tables": [{"name": "snoo", "k": 5, "lr": 0.6}, {"name": "adamw", "lr": 3e-3, "weight_decay": 0.05}],
    "spec-table": {"spec": "snoo(k=5,lr=0.6)+adamw(lr=3e-3,weight_decay=0.05)"},
    "spec": "snoo(k=5,lr=0.6)+adamw(lr=3e-3,weight_decay=0.05)",
    "torchtitan-case": {
        "name": "SNOO",
        "k": 5,
        "lr": 0.6,
        "inner": {"name": "AdamW", "lr": 3e-3, "weight_decay": 0.05},
    },
}


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.Linear(16, 3))


def by_hand(model: nn.Module) -> snoo.SNOO:
    """What every form of the config names, written out: AdamW with weight decay on matrices only, inside SNOO."""
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": 0.05}, {"params": others, "weight_decay": 0.0}]
    return snoo.SNOO(torch.optim.AdamW(groups, lr=3e-3, betas=(0.9, 0.95), eps=1e-8), k=5, lr=0.6, momentum=0.5)


def describe(opt: torch.optim.Optimizer) -> list[Any]:
    """An optimizer's stack, its wrappers' own settings and its parameter groups, parameters by identity."""
    stack, layer = [], opt
    while layer is not None:
        stack.append((type(layer).__name__, getattr(layer, "k", None)))
        layer = getattr(layer, "inner", None)
    groups = [([id(p) for p in g["params"]], {k: v for k, v in g.items() if k != "params"}) for g in opt.param_groups]
    return [stack, groups]


@pytest.mark.parametrize("form", FORMS)
def test_every_form_builds_the_optimizer_one_would_build_by_hand(form):
    model = make_model()
    assert describe(build_optimizer(model, FORMS[form])) == describe(by_hand(model))


def test_floats_are_kept_exactly():
    lr = 1.23456789e-3  # a SPEC string written by spec.canonical keeps 6 significant digits of it
    for config in ({"name": "adamw", "lr": lr}, [{"name": "snoo", "lr": 0.123456789}, {"name": "adamw", "lr": lr}]):
        opt = build_optimizer(make_model(), config)
        assert {g["lr"] for g in opt.param_groups} == {lr}
    assert {g["outer_lr"] for g in opt.param_groups} == {0.123456789}


def test_parse_config_fills_in_the_defaults_for_a_run_log():
    resolved = spec.resolved(parse_config({"name": "snoo", "inner": {"name": "adamw"}}))
    assert resolved == [
        {"name": "snoo", **spec.NAMES["snoo"].defaults},
        {"name": "adamw", **spec.NAMES["adamw"].defaults},
    ]


def test_model_parts_get_one_optimizer_over_all_their_parameters():
    embed, body, head = nn.Embedding(16, 8), nn.Linear(8, 8), nn.Linear(8, 16)
    head.weight = embed.weight  # tied across parts: one tensor, counted once
    opt = build_optimizer([embed, body, head], {"name": "snoo", "inner": {"name": "adamw"}})
    params = [p for g in opt.param_groups for p in g["params"]]
    assert sorted(map(id, params)) == sorted({id(p) for part in (embed, body, head) for p in part.parameters()})
    assert len(params) == 4  # embedding (= head weight), body weight and bias, head bias

    # the optimizers that give roles to parameters find the embedding and the head across the parts
    roles = {
        g["role"] for g in build_optimizer([nn.Embedding(16, 8), nn.Linear(8, 16, bias=False)], "scale").param_groups
    }
    assert roles == {"embedding", "head"}

    tensors = build_optimizer(make_model().parameters(), "sgd(lr=0.5)")
    assert [len(g["params"]) for g in tensors.param_groups] == [2, 4]  # two matrices decay, gains and biases not


def test_track_norms_reaches_the_outermost_wrapper():
    assert build_optimizer(make_model(), NESTED, track_norms=True).track_norms
    assert not build_optimizer(make_model(), NESTED).track_norms


@pytest.mark.parametrize(
    ("config", "words"),
    [
        ({"name": "adamx"}, "unknown optimizer 'adamx'; known: adamw, sgd"),
        ({"name": "adamw", "betas": [0.9, 0.95]}, "adamw: unknown key 'betas'; keys: lr, beta1, beta2"),
        ({"name": "adamw", "lr": -1.0}, "adamw: lr=-1 is out of range"),
        ({"name": "adamw", "lr": [1e-3]}, "adamw: lr=[0.001] is not a number or true/false"),
        ({"name": "snoo", "k": 2.5, "inner": {"name": "adamw"}}, "snoo: k='2.5' is not an integer"),
        ({"name": "snoo", "nesterov": 1, "inner": {"name": "adamw"}}, "snoo: nesterov='1' is not true/false"),
        ({"name": "snoo", "k": 20}, "'snoo' wraps another optimizer: give it under 'inner'"),
        ({"name": "adamw", "inner": {"name": "sgd"}}, "'adamw' is a base optimizer: it wraps nothing"),
        ({"name": "snoo", "inner": "adamw"}, "'inner' included, needs a string 'name'; got 'adamw'"),
        ([{"name": "adamw"}, {"name": "snoo"}], "must end with a base optimizer"),
        ([{"lr": 1e-3}], "list of tables with a 'name' each"),
        ([], "list of tables with a 'name' each"),
        ({"spec": "snoo-adamw", "k": 20}, "with a 'spec' takes nothing else; remove 'k'"),
        ({"spec": 3}, "'spec' must be a SPEC string"),
        ({"optimizer": "adamw"}, "an optimizer config is a table with a 'name'"),
        ("snoo(k=0)+adamw", "snoo: k=0 is out of range"),
    ],
)
def test_bad_configs_raise_one_line_that_says_what_is_allowed(config, words):
    with pytest.raises(ValueError) as err:
        build_optimizer(make_model(), config)
    assert words in str(err.value)
    assert "\n" not in str(err.value)


def test_a_model_must_be_a_module_parts_or_tensors():
    model = make_model()
    with pytest.raises(TypeError, match=r"Parameter groups \(dicts\) are not taken"):
        build_optimizer([{"params": list(model.parameters())}], "adamw")
    with pytest.raises(TypeError, match="got nothing"):
        build_optimizer([], "adamw")


# -- a config-driven training loop ----------------------------------------------------------------------------------

TOML = """
steps = 12

[optimizer]
{optimizer}
"""
ADAMW = 'name = "adamw"\nlr = 3e-3\nweight_decay = 0.05'
SNOO = 'name = "snoo"\nk = 5\nlr = 0.6\n\n[optimizer.inner]\n' + ADAMW


def train(config: dict[str, Any], build: Callable[[nn.Module], torch.optim.Optimizer] | None = None):
    """The trainer: all it knows of the optimizer comes from the config (``build`` hands it one, for the check)."""
    model = make_model()
    opt = build(model) if build else build_optimizer(model, config["optimizer"])
    losses = []
    for t in range(config["steps"]):
        g = torch.Generator().manual_seed(t)
        x, y = torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)
        loss = (model(x) - y).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return opt, losses


def test_a_toml_file_switches_the_trainer_from_adamw_to_snoo(tmp_path):
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    configs = {}
    for name, table in (("adamw", ADAMW), ("snoo", SNOO)):
        (tmp_path / f"{name}.toml").write_text(TOML.format(optimizer=table))
        with open(tmp_path / f"{name}.toml", "rb") as f:
            configs[name] = tomllib.load(f)

    adamw, adamw_losses = train(configs["adamw"])
    snoo_opt, snoo_losses = train(configs["snoo"])
    assert type(adamw) is torch.optim.AdamW and type(snoo_opt) is snoo.SNOO and type(snoo_opt.inner) is type(adamw)

    model = make_model()
    assert describe(build_optimizer(model, configs["snoo"]["optimizer"])) == describe(by_hand(model))
    assert snoo_losses == train(configs["snoo"], by_hand)[1]  # trains exactly as the hand-built SNOO
    assert snoo_losses[:5] == adamw_losses[:5] and snoo_losses[5:] != adamw_losses[5:]  # SNOO acts from step k on
