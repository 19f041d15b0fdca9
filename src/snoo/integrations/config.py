"""Build an optimizer from a plain config, so a config-driven trainer selects SNOO by editing a file, not code.

A torchtitan-style trainer reads an ``[optimizer]`` table from TOML (or YAML, JSON, Hydra) and builds the optimizer
from it. :func:`build_optimizer` takes that table in any of the forms the lab's SPEC grammar (:mod:`snoo.spec`)
knows, all outermost first, and builds the same optimizer from each::

    {"name": "snoo", "k": 20, "lr": 0.7, "inner": {"name": "adamw", "lr": 3e-3}}   # nested: a wrapper's "inner"
    [{"name": "snoo", "k": 20, "lr": 0.7}, {"name": "adamw", "lr": 3e-3}]          # a list of tables
    {"spec": "snoo(k=20,lr=0.7)+adamw(lr=3e-3)"}                                   # a SPEC string in a table
    "snoo(k=20,lr=0.7)+adamw(lr=3e-3)"                                             # a SPEC string

Names, keys, defaults and checks are the grammar's (``snoo.spec.NAMES``; the table in docs/lab.md): a key left out
takes the published default, and a wrong name, key or value is a ``ValueError`` that says what is allowed. Like
:mod:`snoo.spec`, this module needs only torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from snoo import spec

__all__ = ["ModelLike", "OptimizerConfig", "build_optimizer", "parse_config"]

#: What :func:`build_optimizer` takes as ``config``.
OptimizerConfig = str | Mapping[str, Any] | Sequence[Mapping[str, Any]]

#: What :func:`build_optimizer` builds over: a model, the parts of one (torchtitan's ``model_parts``), or tensors.
ModelLike = nn.Module | Iterable[nn.Module] | Iterable[torch.Tensor]


def parse_config(config: OptimizerConfig) -> list[spec.Stage]:
    """The stages an optimizer config names, outermost first, checked; ``snoo.spec.resolved(stages)`` lists every
    hyperparameter with the defaults filled in (for a run's log) and ``snoo.spec.canonical(stages)`` names it."""
    if isinstance(config, str):
        return spec.parse(config)
    if isinstance(config, Mapping) and "spec" in config:
        if len(config) > 1:
            others = ", ".join(repr(k) for k in config if k != "spec")
            raise ValueError(f"an optimizer config with a 'spec' takes nothing else; remove {others} or the 'spec'")
        if not isinstance(config["spec"], str):
            raise ValueError(f"the optimizer config's 'spec' must be a SPEC string, got {config['spec']!r}")
        return spec.parse(config["spec"])
    if isinstance(config, Mapping) and "name" in config:
        return spec.from_tables(_unnest(config))
    if isinstance(config, Sequence) and not isinstance(config, Mapping):
        return spec.from_tables(config)
    raise ValueError(
        "an optimizer config is a table with a 'name' (a wrapper's under 'inner'), a list of such tables, outermost "
        f"first, a table {{'spec': SPEC}} or a SPEC string; got {config!r}"
    )


def _unnest(config: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """``{name: snoo, ..., inner: {name: adamw, ...}}`` -> ``[{name: snoo, ...}, {name: adamw, ...}]``."""
    tables = []
    table: Any = config
    while True:
        if not isinstance(table, Mapping) or not isinstance(table.get("name"), str):
            raise ValueError(
                f"each table of an optimizer config, 'inner' included, needs a string 'name'; got {table!r}"
            )
        tables.append({key: value for key, value in table.items() if key != "inner"})
        name = table["name"].strip().lower()
        wraps = name in spec.NAMES and spec.NAMES[name].kind == "wrapper"
        if "inner" not in table:
            if wraps:
                raise ValueError(
                    f"{name!r} wraps another optimizer: give it under 'inner', e.g. "
                    f"{{'name': {name!r}, 'inner': {{'name': 'adamw', 'lr': 3e-3}}}}"
                )
            return tables
        if name in spec.NAMES and not wraps:
            raise ValueError(f"{name!r} is a base optimizer: it wraps nothing, so it takes no 'inner'")
        table = table["inner"]


def build_optimizer(model: ModelLike, config: OptimizerConfig, *, track_norms: bool = False) -> torch.optim.Optimizer:
    """Build the optimizer ``config`` names (any form of :func:`parse_config`) over ``model``.

    Args:
        model: the model, preferably (AdamW's weight decay goes to matrices only; SCALE, SGD-LL and Muon need to find
            the embedding and the head); or a list of modules, such as torchtitan's ``model_parts``, which get one
            optimizer over all their parameters, in the order of the list (a tensor shared by two parts counts once);
            or an iterable of tensors (``model.parameters()``).
        config: the optimizer config.
        track_norms: ask the outermost wrapper that can (SNOO) to record its outer-step norms (``outer_norms``).

    Returns:
        A ``torch.optim.Optimizer``: the base optimizer, or the outermost wrapper around it, whose ``param_groups``
        are the base optimizer's.
    """
    return spec.build(parse_config(config), _as_params(model), track_norms=track_norms)


def _as_params(model: ModelLike) -> spec.Params:
    if isinstance(model, nn.Module):
        return model
    items = list(model)
    if items and all(isinstance(m, nn.Module) for m in items):
        return nn.ModuleList(items)
    if items and all(isinstance(t, torch.Tensor) for t in items):
        return items
    kinds = sorted({type(item).__name__ for item in items}) or ["nothing"]
    raise TypeError(
        "model must be an nn.Module, a list of modules (model parts) or an iterable of tensors; got "
        f"{', '.join(kinds)}. Parameter groups (dicts) are not taken: the config's base optimizer makes its own"
    )
