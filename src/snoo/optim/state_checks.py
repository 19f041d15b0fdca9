"""What a wrapper checks in a state dict before it loads anything: pure functions of the saved values and of what the
optimizer has now, raising ``ValueError`` with what was wrong; none changes a tensor or an optimizer.

:meth:`snoo.optim.wrapper.Wrapper.load_state_dict` runs them all first and applies the result at once, so a refused
state dict leaves the optimizer as it was. The layout they check is :class:`snoo.optim.wrapper.Wrapper`'s: the inner
optimizer's state dict, with each wrapper's per-parameter tensors under ``"<prefix>.<name>"`` keys of ``state[i]``
and its scalars under a ``"<prefix>"`` entry of each parameter group.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.optim import Optimizer

from snoo import checks
from snoo.optim.tensors import state_dtype

#: What ``state_dict()`` holds in place of a hyperparameter that is a schedule (a function is not saved).
SCHEDULE_PLACEHOLDER = "<schedule, not saved>"

#: Optimizers whose per-parameter state tensors are the parameter's shape or hold a single number (a step count).
#: An optimizer of the package says so with ``elementwise_state = True``.
ELEMENTWISE_STATE: tuple[type[Optimizer], ...] = tuple(
    getattr(torch.optim, name)
    for name in ("Adam", "AdamW", "SGD", "RMSprop", "Adagrad", "Adamax", "NAdam", "RAdam", "ASGD", "Rprop", "Muon")
    if hasattr(torch.optim, name)
)

#: The ranges torch's optimizers check in their constructors, for the names they share; a state dict's value for an
#: optimizer of :data:`ELEMENTWISE_STATE` is checked against them (``betas``: each of the pair).
INNER_RANGES: dict[str, checks.Range] = {
    "lr": checks.NON_NEGATIVE,
    "eps": checks.NON_NEGATIVE,
    "weight_decay": checks.NON_NEGATIVE,
    "momentum": checks.NON_NEGATIVE,
    "betas": checks.UNIT,
}


@dataclass(frozen=True)
class StateSpec:
    """What a wrapper keeps per parameter, declared once in its class (``state_spec``)."""

    #: Prefix of the wrapper's keys in ``state_dict()``; two wrappers with the same prefix cannot be stacked.
    prefix: str
    #: The per-parameter state tensors kept beside the training point, all in :func:`snoo.optim.tensors.state_dtype`.
    names: tuple[str, ...]
    #: The one of :attr:`names` that ``eval()`` puts into the parameters (SNOO's ``"slow"``), and that
    #: :func:`snoo.checkpoint.load_evaluation_weights` reads from a checkpoint.
    evaluation: str
    #: Of :attr:`names`, those a parameter with any state must have (a state dict lacking one is refused); ``None``:
    #: :attr:`evaluation` alone.
    required: tuple[str, ...] | None = None
    #: Name under which ``eval()`` keeps the training point of each parameter while the evaluation weights are in.
    train_point: str = "train_point"
    #: Keys of state dicts saved before a key was renamed -> the key now: they load as the new one.
    renamed: Mapping[str, str] = field(default_factory=dict)

    def dtypes(self, param: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.dtype]:
        """The tensors the wrapper may hold for ``param``, with their dtypes (``dtype``: that of the state)."""
        return {self.train_point: param.dtype, **dict.fromkeys(self.names, dtype)}


def check_layout(state_dict: Any, name: str) -> None:
    """A state dict of wrapper ``name`` is a mapping with ``state`` (a dict) and ``param_groups`` (dicts with
    ``params``)."""
    if (
        not isinstance(state_dict, Mapping)
        or not {"state", "param_groups"} <= state_dict.keys()
        or not isinstance(state_dict["state"], Mapping)
        or not isinstance(state_dict["param_groups"], (list, tuple))
        or not all(
            isinstance(g, Mapping) and isinstance(g.get("params"), (list, tuple)) for g in state_dict["param_groups"]
        )
    ):
        raise ValueError(
            f"{name}.load_state_dict expects a dict from {name}.state_dict(): 'state' (a dict) and "
            f"'param_groups' (a list of dicts, each with its 'params')"
        )


def refuse_meta(saved_state: Mapping[Any, Any], saved_groups: list[Mapping[str, Any]]) -> None:
    """Refuse tensors on the meta device, which hold no values to load (every check would fail on them)."""
    where = [(f"state of parameter {key!r}", entry) for key, entry in saved_state.items()]
    where += [(f"parameter group {g} of the state dict", group) for g, group in enumerate(saved_groups)]
    for what, entries in where:
        if not isinstance(entries, Mapping):
            continue  # refused below, with its reason
        meta = next((k for k, v in entries.items() if isinstance(v, torch.Tensor) and v.is_meta), None)
        if meta is not None:
            raise ValueError(
                f"{what}: {meta!r} is a tensor on the meta device, which holds no values: save the state dict "
                f"of an optimizer whose tensors are real"
            )


def saved_params(
    saved_groups: list[Mapping[str, Any]], groups: list[dict[str, Any]], prefix: str, name: str
) -> dict[Any, torch.Tensor]:
    """The saved parameter ids (positions, or names under ``torch.distributed.checkpoint``) -> this optimizer's
    parameters, like torch's optimizers map them, once the groups are seen to match."""
    if len(saved_groups) != len(groups):
        raise ValueError(f"the state dict has {len(saved_groups)} parameter groups, this optimizer has {len(groups)}")
    if not all(isinstance(saved.get(prefix), Mapping) for saved in saved_groups):
        raise ValueError(
            f"the parameter groups of this state dict have no '{prefix}' entry, so it was not saved "
            f"by {name} (a state dict of the inner optimizer alone belongs in {name}.inner.load_state_dict)"
        )
    for g, (saved, group) in enumerate(zip(saved_groups, groups)):
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(
                f"parameter group {g} has {len(saved['params'])} parameters in the state dict and "
                f"{len(group['params'])} in this optimizer"
            )
    saved_ids = [i for saved in saved_groups for i in saved["params"]]
    if not all(isinstance(i, (int, str)) and not isinstance(i, bool) for i in saved_ids):
        raise ValueError("the parameter ids of the state dict must be positions (ints) or names (strings)")
    params = dict(zip(saved_ids, (p for group in groups for p in group["params"])))
    if len(params) != len(saved_ids):
        raise ValueError("the state dict lists a parameter id in more than one place")
    return params


def schedules_to_keep(
    saved_groups: list[Mapping[str, Any]], groups: list[dict[str, Any]], own: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """The schedules among this optimizer's hyperparameters ``own`` that stand where ``saved_groups`` hold a
    placeholder, per group; a placeholder where this optimizer holds a number is refused."""
    keep = []
    for g, (saved, group) in enumerate(zip(saved_groups, groups)):
        kept = {}
        for name in own:
            value = saved.get(name)
            if isinstance(value, str) and value.startswith(SCHEDULE_PLACEHOLDER):
                if not callable(group.get(name)):
                    raise ValueError(
                        f"parameter group {g} was saved with a schedule for '{name}' ({value}), which a state "
                        f"dict cannot hold; this optimizer has {name}={group.get(name)!r}. Build it with the "
                        f"same schedule to continue the run"
                    )
                kept[name] = group[name]
        keep.append(kept)
    return keep


def compatible(saved: Any, current: Any) -> bool:
    """Whether a value a state dict brings may replace ``current``: the same kind of thing (a number for a number,
    a flag for a flag, a pair for a pair), finite where ``current`` is. ``None`` and flags stand for each other
    (torch's ``foreach=None`` means "pick for me")."""
    if current is None or isinstance(current, bool):
        return saved is None or isinstance(saved, bool)
    if saved is None or isinstance(saved, bool):
        return False
    if isinstance(current, torch.Tensor) and current.numel() == 1:
        current = current.item()
    if isinstance(saved, torch.Tensor) and saved.numel() == 1:
        saved = saved.item()
    if checks.is_number(current):
        return checks.is_number(saved) and (math.isfinite(saved) or not math.isfinite(current))
    if isinstance(current, (tuple, list)):
        return isinstance(saved, (tuple, list)) and len(saved) == len(current) and all(map(compatible, saved, current))
    return type(saved) is type(current)


def _number_like(value: Any) -> bool:
    return not (value is None or isinstance(value, bool))


def _plain_state_value(value: Any) -> bool:
    """What an optimizer's per-parameter state may hold: tensors, numbers, flags, None, and lists, tuples and dicts
    of them (no strings or objects: torch's loader would turn a string into garbage)."""
    if value is None or isinstance(value, (torch.Tensor, bool, int, float)):
        return True
    if isinstance(value, (list, tuple)):
        return all(map(_plain_state_value, value))
    if isinstance(value, dict):
        return all(_plain_state_value(v) for v in value.values())
    return False


def check_inner_group(
    g: int, inner_group: Mapping[str, Any], group: Mapping[str, Any], stacked: set[str], inner: str, elementwise: bool
) -> None:
    """Group ``g`` of a state dict, the wrappers' entries taken out, against this optimizer's ``group``: every number
    the group has is there, of the same kind, and (for an optimizer of :data:`ELEMENTWISE_STATE`, named ``inner``) in
    torch's range. ``stacked``: the keys that belong to the wrappers of the stack, theirs to check."""
    # a flag that a newer torch added may be missing (the inner optimizer's loader fills it in), a number not
    lacking = [k for k, v in group.items() if k not in inner_group and k not in stacked and _number_like(v)]
    if lacking:
        raise ValueError(f"parameter group {g} of the state dict has no {lacking[0]!r}")
    for key, value in inner_group.items():
        # a key this optimizer does not have yet (a scheduler's "initial_lr") is taken as it comes
        if key not in group or key in stacked:
            continue
        if not compatible(value, group[key]):
            raise ValueError(
                f"parameter group {g} of the state dict has {key}={checks.show(value)}, where this "
                f"optimizer's {inner} has {checks.show(group[key])}"
            )
        within = INNER_RANGES.get(key) if elementwise else None
        if within is None or isinstance(value, bool) or not isinstance(value, (int, float, tuple, list)):
            continue  # (torch takes a tensor lr too)
        values = value if isinstance(value, (tuple, list)) else [value]
        if not all(checks.is_number(v) and v in within for v in values):
            raise ValueError(
                f"parameter group {g} of the state dict has {key}={checks.show(value)}, where {inner} takes {key} "
                f"{within}"
            )


def split_param_states(
    saved_state: Mapping[Any, Any],
    params: dict[Any, torch.Tensor],
    saved_groups: list[Mapping[str, Any]],
    spec: StateSpec,
    name: str,
    inner: Optimizer,
    inner_state: Mapping[torch.Tensor, Mapping[str, Any]],
    elementwise: bool,
) -> tuple[dict[Any, dict[str, Any]], dict[Any, dict[str, Any]]]:
    """Each parameter's saved state, split into the inner optimizer's part (checked by
    :func:`check_inner_param_state` against ``inner_state``, the state ``inner`` has now) and wrapper ``name``'s
    (its keys without the prefix, old names renamed; checked by :func:`check_own_param_state`), both by saved id."""
    prefix = spec.prefix + "."
    group_of = {i: g for g, saved in enumerate(saved_groups) for i in saved["params"]}
    inner_keys: dict[int, tuple[Any, dict]] = {}  # per group: the first parameter's inner state keys
    inner_saved: dict[Any, dict[str, Any]] = {}
    own: dict[Any, dict[str, Any]] = {}
    for key, entry in saved_state.items():
        if key not in params:
            raise ValueError(
                f"the state dict has state for parameter {checks.show(key)}, which none of its groups lists"
            )
        if not isinstance(entry, Mapping):
            raise ValueError(f"the state of parameter {key!r} must be a dict, got {type(entry).__name__}")
        rest = {k: v for k, v in entry.items() if not (isinstance(k, str) and k.startswith(prefix))}
        if rest:
            check_inner_param_state(key, params[key], rest, inner_state.get(params[key], {}), inner, elementwise)
            inner_saved[key] = rest
            kinds = {k: v is None for k, v in rest.items()}
            first, expected = inner_keys.setdefault(group_of[key], (key, kinds))
            if elementwise and kinds != expected:  # the optimizer makes the same state for a whole group
                raise ValueError(
                    f"the state of parameter {key!r} has {sorted(map(str, rest))}, that of parameter {first!r} "
                    f"of the same group {sorted(map(str, expected))} (or one holds None where the other a "
                    f"tensor): {type(inner).__name__} keeps the same state for every parameter of a group"
                )
        mine: dict[str, Any] = {}
        for k, v in entry.items():
            if isinstance(k, str) and k.startswith(prefix):
                now = spec.renamed.get(k[len(prefix) :], k[len(prefix) :])
                if now in mine:
                    raise ValueError(f"state of parameter {key!r} holds '{prefix}{now}' under its old name too")
                mine[now] = v
        if mine:
            param = params[key]
            check_own_param_state(key, param, mine, spec, spec.dtypes(param, state_dtype(param)), name)
            own[key] = mine
    return inner_saved, own


def check_inner_param_state(
    key: Any,
    param: torch.Tensor,
    saved: Mapping[Any, Any],
    current: Mapping[str, Any],
    inner: Optimizer,
    elementwise: bool,
) -> None:
    """Refuse inner state that no optimizer keeps (strings, objects), and tensors whose shape differs from
    ``current``, the state ``inner`` has now for ``param`` (or, for optimizers whose state is elementwise, from the
    parameter's shape)."""
    name_of_inner = type(inner).__name__
    for name, value in saved.items():
        if not _plain_state_value(value):
            raise ValueError(
                f"state of parameter {key!r}: {name!r} is a {type(value).__name__}, which no optimizer keeps"
            )
        if elementwise and not (value is None or isinstance(value, torch.Tensor)):
            raise ValueError(
                f"state of parameter {key!r}: {name!r} is {checks.show(value)}, where {name_of_inner} keeps a tensor"
            )
        if (
            elementwise
            and name == "step"
            and not (
                isinstance(value, torch.Tensor) and value.numel() == 1 and math.isfinite(value.item()) and value >= 0
            )
        ):
            raise ValueError(f"state of parameter {key!r}: 'step' must be a count >= 0, got {checks.show(value)}")
        if elementwise and isinstance(value, torch.Tensor) and value.numel() > 1 and value.shape != param.shape:
            raise ValueError(
                f"state of parameter {key!r}: {name!r} has shape {tuple(value.shape)}, the parameter "
                f"{tuple(param.shape)}: {name_of_inner} keeps its state elementwise"
            )
        now = current.get(name)
        if isinstance(now, torch.Tensor) and (not isinstance(value, torch.Tensor) or value.shape != now.shape):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(
                f"state of parameter {key!r}: {name!r} is {shape}, where {name_of_inner} keeps a tensor of shape "
                f"{tuple(now.shape)}"
            )


def check_own_param_state(
    i: Any, param: torch.Tensor, saved: Mapping[str, Any], spec: StateSpec, dtypes: Mapping[str, torch.dtype], name: str
) -> None:
    """The wrapper's saved tensors of parameter ``i``: each one it keeps (``dtypes``), floating point, of the
    parameter's shape, finite, and every one :attr:`StateSpec.required` there. ``name``: the wrapper's class."""
    for key, value in saved.items():
        where = f"state of parameter {i!r}: '{spec.prefix}.{key}'"
        if key not in dtypes:
            raise ValueError(f"{where} is not state that {name} keeps ({sorted(dtypes)})")
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise ValueError(f"{where} must be a floating-point tensor, got {type(value).__name__}")
        if value.shape != param.shape:
            raise ValueError(f"{where} has shape {tuple(value.shape)}, the parameter {tuple(param.shape)}")
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{where} holds NaN or infinite values: the run had diverged when it was saved")
    required = spec.required if spec.required is not None else (spec.evaluation,)
    lacking = [key for key in required if key not in saved]
    if lacking:
        raise ValueError(
            f"state of parameter {i!r} has {', '.join(f'{spec.prefix}.{n}' for n in sorted(saved))} but "
            f"not '{spec.prefix}.{lacking[0]}', which {name} keeps for every parameter"
        )


def check_training_points(
    training: bool, params: Mapping[Any, torch.Tensor], own: Mapping[Any, Mapping[str, Any]], spec: StateSpec, name: str
) -> None:
    """A state saved in eval mode holds the training point of each parameter with state, one in train mode none.
    ``own``: the wrapper's saved state by saved id; ``params``: the saved ids in the order of the parameters."""
    if training:
        stale = [key for key in params if spec.train_point in own.get(key, {})]
        if stale:
            raise ValueError(
                f"the state dict was saved in train mode but holds a training point ('{spec.prefix}."
                f"{spec.train_point}') for parameter {stale[0]!r}: so {name} did not save it"
            )
    else:
        lacking = [key for key in params if key in own and spec.train_point not in own[key]]
        if lacking:
            raise ValueError(
                f"the state dict was saved in eval mode but holds no training point ('{spec.prefix}."
                f"{spec.train_point}') for parameter {lacking[0]!r}, so training could not continue. "
                f"(torch.distributed.checkpoint loads only the entries that a fresh optimizer has: call train() "
                f"before saving with it.)"
            )
