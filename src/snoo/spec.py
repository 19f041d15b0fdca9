"""Name an optimizer, or a stack of wrappers around one, in a short string, and build it.

Grammar (whitespace ignored, names lower case)::

    SPEC   := STAGE ('+' STAGE)*          outermost first; the last stage is the base optimizer
    STAGE  := NAME [ '(' KEY '=' VALUE (',' KEY '=' VALUE)* ')' ]
    VALUE  := number | true | false

``snoo-adamw`` is shorthand for ``snoo+adamw``; a name with an underscore may be written with a hyphen
(``schedulefree-adamw``, ``ema-nesterov``). Examples::

    adamw
    adamw(lr=3e-3,weight_decay=0)
    snoo-adamw
    snoo(k=20,lr=0.7,momentum=0.5)+adamw(lr=3e-3)
    snoo(k=50)+lookahead(k=5)+sgd(lr=0.5)

Every key a stage leaves out takes the published default of that name (``NAMES[name].defaults``). Bad names, keys
and values raise ``ValueError`` with one line that says what was wrong and what is allowed. A TOML file may give the
same as a string or as a list of tables, outermost first: ``optimizer = [{name = "snoo", k = 20}, {name = "adamw"}]``
(``from_config``).

This module imports only torch and snoo, so config-driven trainers can use it without the lab.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import itertools
import pkgutil
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import snoo
from snoo import checks
from snoo.checks import NON_NEGATIVE, POSITIVE, UNIT
from snoo.optim import declaration
from snoo.optim.declaration import LR_TRIALS, Declared, Trial
from snoo.optim.wrapper import Wrapper

Params = nn.Module | Iterable[torch.Tensor]


@dataclass(frozen=True)
class Entry:
    """One name of the grammar: a base optimizer (built from a model) or a wrapper (built around an optimizer).

    ``ranges`` holds the range of each numeric key: for the package's own optimizers, the ranges their constructors
    check (their ``hyperparameter_ranges``), so a SPEC is refused at parse time with the constructor's own limits."""

    name: str
    kind: str  # "base" or "wrapper"
    defaults: dict[str, Any]
    make: Callable[..., torch.optim.Optimizer]
    doc: str = ""
    ranges: Mapping[str, checks.Range] = field(default_factory=dict)
    #: a package this entry needs beyond torch (checked when a SPEC names it, with the command that installs it)
    requires: str | None = None
    #: the optimizer keeps its own averaged iterate and wants no decaying lr schedule (schedule-free AdamW): it
    #: stands alone in a SPEC, and a trainer holds its lr constant after the warm-up (:func:`is_schedule_free`)
    schedule_free: bool = False
    #: what ``--tune N`` tries (the first N): (multiple of the base optimizer's lr, this entry's own knobs); a declared
    #: class's ``tuning_trials``, else the lr alone
    trials: tuple[Trial, ...] = LR_TRIALS
    #: how a plot names a key of this entry, where the key alone would mislead (a declared class's ``knob_labels``)
    knob_labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Stage:
    name: str
    given: dict[str, Any] = field(default_factory=dict)  # what the SPEC said, in its order

    @property
    def params(self) -> dict[str, Any]:
        return {**NAMES[self.name].defaults, **self.given}

    def __str__(self) -> str:
        if not self.given:
            return self.name
        return f"{self.name}({','.join(f'{k}={_fmt(v)}' for k, v in self.given.items())})"


def _fmt(value: Any) -> str:
    """A value as the grammar writes it; a float in 6 significant digits when that is exact, else in full (so that
    parsing it back gives the same float)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        short = f"{value:g}"
        return short if float(short) == value else repr(value)
    return str(value)


# ---------------------------------------------------------------------------------------------- base optimizers


def _decay_groups(params: Params, weight_decay: float) -> list[dict]:
    """nanoGPT's split: weight decay on matrices (embeddings, linear weights), none on gains and biases."""
    tensors = list(params.parameters() if isinstance(params, nn.Module) else params)
    matrices = [p for p in tensors if p.requires_grad and p.dim() >= 2]
    others = [p for p in tensors if p.requires_grad and p.dim() < 2]
    return [
        g
        for g in ({"params": matrices, "weight_decay": weight_decay}, {"params": others, "weight_decay": 0.0})
        if g["params"]
    ]


def _adamw(params: Params, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float):
    return torch.optim.AdamW(_decay_groups(params, weight_decay), lr=lr, betas=(beta1, beta2), eps=eps)


def _sgd(params: Params, lr: float, momentum: float, nesterov: bool, weight_decay: float):
    return torch.optim.SGD(_decay_groups(params, weight_decay), lr=lr, momentum=momentum, nesterov=nesterov)


def _schedulefree_adamw(
    params: Params, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, warmup_steps: int
):
    try:
        import schedulefree
    except ImportError:
        raise ImportError(_missing("schedulefree_adamw", "schedulefree")) from None
    opt = schedulefree.AdamWScheduleFree(
        _decay_groups(params, weight_decay), lr=lr, betas=(beta1, beta2), eps=eps, warmup_steps=warmup_steps
    )
    opt.train()  # ready to step, like every optimizer here; the package's own starts in eval mode
    return opt


def _missing(name: str, package: str) -> str:
    return f"optimizer {name} needs the `{package}` package: pip install {package}"


def _grouped(cls: type) -> Callable[..., torch.optim.Optimizer]:
    """SCALE, SGD-LL and Muon+AdamW treat the embedding, the head and hidden matrices differently: they need the
    model, not a flat list of tensors."""

    def make(params: Params, **kwargs: Any) -> torch.optim.Optimizer:
        if not isinstance(params, nn.Module):
            raise ValueError(f"optimizer {cls.__name__} needs the model (an nn.Module) to find its parameter roles")
        head = next(
            (m for m in (getattr(params, n, None) for n in ("lm_head", "head")) if isinstance(m, nn.Module)), None
        )  # named, it may share its weight with the embedding (a tied head)
        return cls(snoo.param_groups(params, head=head), **kwargs)

    return make


def _optional_number(p: inspect.Parameter) -> type | None:
    """``int`` or ``float`` for a keyword annotated ``int | None`` or ``float | None`` with the default None (a
    number the grammar can give, e.g. EMA-Nesterov's ``total_steps``), else None."""
    if p.default is not None:
        return None
    named = {t.strip() for t in str(p.annotation).split("|")}
    return {frozenset({"int", "None"}): int, frozenset({"float", "None"}): float}.get(frozenset(named))


def _signature_defaults(cls: type, skip: tuple[str, ...]) -> dict[str, Any]:
    """Keyword defaults of a constructor, the ones the grammar can set: numbers and booleans, and None for a number
    that may be left out (``int | None = None``)."""
    out = {}
    for name, p in inspect.signature(cls).parameters.items():
        if name in skip or p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            continue
        if isinstance(p.default, (bool, int, float)) or _optional_number(p) is not None:
            out[name] = p.default
    return out


#: torch's optimizers and the `schedulefree` package's; the package's own declare themselves (:func:`_declared`)
_TORCH_ENTRIES = (
    # nanoGPT's AdamW; lr measured by the lab's lr sweep on the `small` preset (docs/lab.md)
    Entry(
        "adamw",
        "base",
        dict(lr=2e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1),
        _adamw,
        "torch.optim.AdamW; weight decay on matrices only",
        dict(lr=POSITIVE, beta1=UNIT, beta2=UNIT, eps=POSITIVE, weight_decay=NON_NEGATIVE),
    ),
    Entry(
        "sgd",
        "base",
        dict(lr=0.1, momentum=0.9, nesterov=False, weight_decay=0.0),
        _sgd,
        "torch.optim.SGD",
        dict(lr=POSITIVE, momentum=UNIT, weight_decay=NON_NEGATIVE),
    ),
    # the `schedulefree` package's AdamW (optional extra); the lab gives it its warm-up and then a constant lr
    Entry(
        "schedulefree_adamw",
        "base",
        dict(lr=2.5e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, warmup_steps=0),
        _schedulefree_adamw,
        "schedulefree.AdamWScheduleFree; weight decay on matrices only; no lr schedule",
        dict(lr=POSITIVE, beta1=UNIT, beta2=UNIT, eps=POSITIVE, weight_decay=NON_NEGATIVE, warmup_steps=NON_NEGATIVE),
        requires="schedulefree",
        schedule_free=True,
    ),
)


def _declared(cls: type[Declared]) -> Entry:
    """The entry of a class that declares a ``spec_name`` (:mod:`snoo.optim.declaration`): a wrapper takes every
    argument after ``inner`` (telemetry is the trainer's choice, not the SPEC's); any other class is a base optimizer
    over the parameter roles of ``snoo.param_groups``."""
    assert cls.spec_name is not None
    where = f"snoo.{cls.__name__}" if cls.__module__.startswith("snoo.") else f"{cls.__module__}.{cls.__qualname__}"
    wrapper = issubclass(cls, Wrapper)
    return Entry(
        cls.spec_name,
        "wrapper" if wrapper else "base",
        _signature_defaults(cls, ("inner", "track_norms") if wrapper else ("params",)),
        cls if wrapper else _grouped(cls),
        where if wrapper else f"{where} over snoo.param_groups(model)",
        cls.hyperparameter_ranges,
        trials=cls.tuning_trials,
        knob_labels=cls.knob_labels,
    )


class _Names(Mapping[str, Entry]):
    """The names of the grammar: torch's optimizers, then every class declared with a ``spec_name`` (the package's
    base optimizers, then its wrappers, then any a user defines, e.g. in a test), read as they are now: a class
    defined after this module was imported is a name from then on."""

    def __init__(self) -> None:
        self._classes: tuple = ()
        self._entries: dict[str, Entry] = {}

    def _current(self) -> dict[str, Entry]:
        classes = tuple(declaration.DECLARED.values())
        if classes != self._classes:
            declared = [_declared(cls) for cls in classes]
            entries = [*_TORCH_ENTRIES, *(e for e in declared if e.kind == "base")]
            entries += [e for e in declared if e.kind == "wrapper"]
            self._classes, self._entries = classes, {e.name: e for e in entries}
        return self._entries

    def __getitem__(self, name: str) -> Entry:
        return self._current()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._current())

    def __len__(self) -> int:
        return len(self._current())


def _import_own_optimizers() -> None:
    """The package's own optimizers declare themselves when their module is imported: import every module of
    :mod:`snoo.optim`, so that adding an optimizer there is adding its file."""
    for module in pkgutil.iter_modules(snoo.optim.__path__):
        importlib.import_module(f"snoo.optim.{module.name}")


_import_own_optimizers()

NAMES: Mapping[str, Entry] = _Names()

# ---------------------------------------------------------------------------------------------- parsing

_STAGE = re.compile(r"([a-z][a-z0-9_]*)(?:\((.*)\))?$")


def _split_top(text: str, seps: str) -> list[str]:
    """Split at separators outside parentheses."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch == "(") - (ch == ")")
        if depth < 0:
            raise ValueError(f"unbalanced ')' in optimizer SPEC {text!r}")
        if depth == 0 and ch in seps:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"unbalanced '(' in optimizer SPEC {text!r}")
    return [*parts, text[start:]]


def split_list(text: str) -> list[str]:
    """``adamw,snoo(k=20,lr=0.7)+adamw`` -> two SPECs: commas inside parentheses belong to the SPEC."""
    return [s for s in (p.strip() for p in _split_top(text, ",")) if s]


def _check_value(name: str, key: str, value: Any) -> None:
    within = NAMES[name].ranges.get(key)
    if within is not None and not isinstance(value, bool) and value not in within:
        raise ValueError(f"{name}: {key}={_fmt(value)} is out of range: {key} must be {within}")


def _typed_like(name: str, key: str) -> Any:
    """A value of the key's type: its default, or for a default of None, the number its constructor's annotation
    names (``int | None``: 0)."""
    default = NAMES[name].defaults[key]
    if default is None:
        return _optional_number(inspect.signature(NAMES[name].make).parameters[key])()  # type: ignore[misc]
    return default


def parse_value(name: str, key: str, text: str) -> Any:
    """A value of the grammar, typed like the key's default (int, float or bool) and range-checked."""
    default = _typed_like(name, key)
    text = text.strip().lower()
    try:
        if isinstance(default, bool):
            if text not in ("true", "false"):
                raise ValueError
            value: Any = text == "true"
        elif isinstance(default, int):
            value = int(text)
        else:
            value = float(text)
            if value != value or value in (float("inf"), float("-inf")):
                raise ValueError
    except ValueError:
        kind = "true/false" if isinstance(default, bool) else "an integer" if isinstance(default, int) else "a number"
        raise ValueError(f"{name}: {key}={text!r} is not {kind}") from None
    _check_value(name, key, value)
    return value


def _check_name(name: str) -> None:
    if name not in NAMES:
        raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(NAMES)}")


def _check_key(name: str, key: str) -> None:
    if key not in NAMES[name].defaults:
        raise ValueError(f"{name}: unknown key {key!r}; keys: {', '.join(NAMES[name].defaults)}")


def _parse_stage(text: str) -> Stage:
    m = _STAGE.match(text)
    if not m:
        raise ValueError(f"cannot read optimizer stage {text!r}: expected name or name(key=value,...)")
    name, body = m.group(1), m.group(2)
    _check_name(name)
    given: dict[str, Any] = {}
    for item in filter(None, (body or "").split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"{name}: expected key=value, got {item!r}")
        _check_key(name, key)
        if key in given:
            raise ValueError(f"{name}: key {key!r} given twice")
        given[key] = parse_value(name, key, value)
    return Stage(name, given)


def parse(spec: str) -> list[Stage]:
    """A SPEC string -> its stages, outermost first, each validated."""
    text = re.sub(r"\s+", "", spec).lower()
    if not text:
        raise ValueError("empty optimizer SPEC; try 'adamw' or 'snoo-adamw'")
    for name in (n for n in NAMES if "_" in n):  # `ema-nesterov` for `ema_nesterov`: '-' also joins two stages
        text = re.sub(rf"(?<![a-z0-9_]){re.escape(name.replace('_', '-'))}(?![a-z0-9_])", name, text)
    stages = [_parse_stage(part) for part in _split_top(text, "+-")]
    *wrappers, base = stages
    if NAMES[base.name].kind != "base":
        raise ValueError(f"SPEC {spec!r} must end with a base optimizer ({_names('base')}), not {base.name!r}")
    for st in wrappers:
        if NAMES[st.name].kind != "wrapper":
            raise ValueError(
                f"{st.name!r} is a base optimizer; only wrappers ({_names('wrapper')}) can stand "
                f"before another stage in {spec!r}"
            )
    if wrappers and NAMES[base.name].schedule_free:
        raise ValueError(
            f"{base.name} cannot be wrapped ({canonical(stages)!r}): its parameters hold an interpolation of its own "
            f"averaged iterate, which a wrapper would take for the model; use it alone"
        )
    for st in stages:
        package = NAMES[st.name].requires
        if package and importlib.util.find_spec(package) is None:
            raise ImportError(_missing(st.name, package))
    return stages


def _names(kind: str) -> str:
    return ", ".join(n for n, e in NAMES.items() if e.kind == kind)


def canonical(spec: str | list[Stage]) -> str:
    """The SPEC written the one standard way: ``snoo-adamw`` -> ``snoo+adamw``."""
    return "+".join(map(str, parse(spec) if isinstance(spec, str) else spec))


def resolved(spec: str | list[Stage]) -> list[dict[str, Any]]:
    """Every stage with every hyperparameter, defaults filled in: what a result file should record."""
    return [{"name": st.name, **st.params} for st in (parse(spec) if isinstance(spec, str) else spec)]


def is_schedule_free(spec: str | list[Stage]) -> bool:
    """Whether the SPEC's optimizer wants a constant lr after the warm-up (it keeps its own average)."""
    return NAMES[(parse(spec) if isinstance(spec, str) else spec)[-1].name].schedule_free


def base(spec: str) -> str:
    """The base optimizer alone, as the user set it: ``snoo(k=20)+adamw(lr=1e-3)`` -> ``adamw(lr=0.001)``."""
    return str(parse(spec)[-1])


def _locate(stages: list[Stage], address: str) -> tuple[int, str]:
    """``key`` -> the outermost stage that has it; ``name.key`` -> the stage so named."""
    name, _, key = address.rpartition(".")
    for i, st in enumerate(stages):
        if (not name or st.name == name) and key in st.params:
            return i, key
    raise ValueError(f"no stage of {canonical(stages)!r} has a key {address!r}")


def override(spec: str, settings: Mapping[str, Any]) -> str:
    """Set keys in a SPEC (addressed as in ``_locate``); values are strings of the grammar or numbers.

    Returns the canonical SPEC.
    """
    stages = parse(spec)
    for address, value in settings.items():
        i, key = _locate(stages, address)
        st = stages[i]
        value = parse_value(st.name, key, value if isinstance(value, str) else _fmt(value))
        stages[i] = Stage(st.name, {**st.given, key: value})
    return canonical(stages)


def grid(spec: str, text: str) -> list[tuple[dict[str, Any], str]]:
    """``"k=10,20 lr=0.3,0.5"`` -> every combination as (typed settings, SPEC), the first key varying slowest."""
    axes: dict[str, list[str]] = {}
    for item in text.split():
        key, eq, values = item.partition("=")
        if not eq or not key or not values:
            raise ValueError(f"--grid item {item!r}: expected key=v1,v2,...")
        axes[key] = values.split(",")
    if not axes:
        raise ValueError("--grid is empty; e.g. --grid 'k=10,20,50 lr=0.3,0.5,0.7'")
    out = []
    for combo in itertools.product(*axes.values()):
        new = override(spec, dict(zip(axes, combo)))
        stages = parse(new)
        typed = {}
        for address in axes:
            i, key = _locate(stages, address)
            typed[address] = stages[i].params[key]
        out.append((typed, new))
    return out


def from_tables(tables: Sequence[Mapping[str, Any]]) -> list[Stage]:
    """Tables ``{name = ..., key = value, ...}``, outermost first, as a TOML, JSON or YAML file gives them -> their
    stages, checked as a SPEC's are and with the same messages, ready for :func:`build`.

    A value is a number or a boolean, or a string of the grammar (YAML reads ``3e-3`` as text). Names ignore case
    (``AdamW``). Floats are kept exactly, here and in the SPEC string ``canonical`` writes (which uses 6
    significant digits only where they are exact).
    """
    if (
        isinstance(tables, (str, Mapping))
        or not isinstance(tables, Sequence)
        or not tables
        or not all(isinstance(t, Mapping) and isinstance(t.get("name"), str) for t in tables)
    ):
        raise ValueError("an optimizer given as tables must be a list of tables with a 'name' each, outermost first")
    names = [table["name"].strip().lower() for table in tables]
    for name in names:
        _check_name(name)
    parse("+".join(names))  # the order: wrappers first, a base optimizer last
    return [
        Stage(name, {key: _table_value(name, key, value) for key, value in table.items() if key != "name"})
        for name, table in zip(names, tables)
    ]


def _table_value(name: str, key: str, value: Any) -> Any:
    _check_key(name, key)
    if isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, (int, float)):
        text = repr(value)  # exact: float(repr(x)) == x
    elif isinstance(value, str):
        text = value
    else:
        raise ValueError(f"{name}: {key}={value!r} is not a number or true/false")
    return parse_value(name, key, text)


def from_config(value: Any) -> str:
    """An optimizer from a config file: a SPEC string or a list of tables ``{name = ..., key = value}``."""
    if isinstance(value, str):
        return canonical(value)
    if isinstance(value, list):
        return canonical(from_tables(value))
    raise ValueError("config 'optimizer' must be a SPEC string or a list of tables with a 'name' each")


# ---------------------------------------------------------------------------------------------- building


def accepts(stage: Stage, keyword: str) -> bool:
    """Whether the constructor of ``stage``'s optimizer takes ``keyword``, a setting a SPEC cannot give (e.g.
    ``process_group``: the stage can average over ranks)."""
    return keyword in inspect.signature(NAMES[stage.name].make).parameters


def build(
    spec: str | list[Stage],
    params: Params,
    *,
    track_norms: bool = False,
    outer: Mapping[str, Any] | None = None,
) -> torch.optim.Optimizer:
    """Build the optimizer a SPEC names, over a model (preferred: weight decay and roles need it) or tensors.

    ``track_norms`` asks the outermost wrapper that supports it to record its outer-step telemetry. ``outer``: more
    keywords for the outermost wrapper's constructor, what is known only at run time (a process group, ...).
    """
    stages = parse(spec) if isinstance(spec, str) else spec
    *wrappers, base_stage = stages
    if outer and not wrappers:
        raise ValueError(f"{canonical(stages)!r} has no wrapper to take {', '.join(outer)}")
    try:
        opt = NAMES[base_stage.name].make(params, **base_stage.params)
        for i, st in enumerate(reversed(wrappers)):
            entry, extra = NAMES[st.name], {}
            outermost = i == len(wrappers) - 1
            if track_norms and outermost and accepts(st, "track_norms"):
                extra["track_norms"] = True
            if outermost:
                extra.update(outer or {})
            opt = entry.make(opt, **st.params, **extra)
    except (ValueError, TypeError) as e:  # a constructor's own check, e.g. a combination it refuses
        raise ValueError(f"cannot build {canonical(stages)!r}: {str(e).splitlines()[0]}") from e
    return opt
