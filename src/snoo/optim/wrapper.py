"""What every wrapper of this package shares.

A wrapper is a real :class:`torch.optim.Optimizer` that owns an *inner* optimizer and adds an algorithm around its
steps (SNOO's outer loop, a Nesterov lookahead, ...). This module holds the machinery that does not depend on the
algorithm:

- ``param_groups`` *are* the inner optimizer's group dicts (the same objects), so an LR scheduler built on the wrapper
  or on the inner optimizer moves the same ``lr``. The wrapper's own hyperparameters are added to each group under
  names of their own (``outer_lr``, ...), so a schedule or a user can move them per group too.
- ``train()`` / ``eval()``: in eval mode the parameters hold the wrapper's evaluation weights (SNOO's slow weights);
  the training point is kept and put back exactly by ``train()``. ``step()`` refuses to run in eval mode.
- One ``state_dict`` layout: the inner optimizer's state dict, with the wrapper's per-parameter tensors added to
  ``state[i]`` under ``"<prefix>.<name>"`` keys (keyed by parameter position, like torch's optimizers) and its
  scalars (step count, mode, ...) under a ``"<prefix>"`` entry of each parameter group. Wrappers stack, each with its
  own prefix. Only ``state`` and ``param_groups`` are used, so ``torch.distributed.checkpoint``'s optimizer state
  dicts (which rename the ids to parameter names and keep nothing else) carry everything. What a wrapper keeps is
  declared once, in its ``state_spec``; a state dict is checked by the pure functions of
  :mod:`snoo.optim.state_checks` before anything is loaded.
- A hyperparameter of the wrapper may be a number or a schedule ``n -> value`` (:mod:`snoo.optim.schedules`).
  Schedules are not saved: ``state_dict()`` holds a placeholder that names them, and ``load_state_dict`` keeps the
  schedule the loading optimizer was built with (and refuses a state saved with a schedule by one built without).
- Wrappers stack, with one rule: a wrapper whose parameters hold a lookahead point between steps
  (:attr:`Wrapper.holds_lookahead`: EMA-Nesterov, Nesterov, GPA) must be the outermost, because it takes every move
  of the parameters it did not make itself for an update of its inner optimizer. ``eval()`` and ``train()`` go
  through the whole stack: the parameters get the evaluation weights of the innermost wrapper.
- Per-parameter state is created lazily at the first ``step()`` that sees the parameter (so weights loaded into the
  model after the optimizer was built are the ones the algorithm starts from), in float32 for bf16/fp16 parameters,
  optionally on another device (``state_device``, e.g. host memory while the model is on a GPU).
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch.optim import Optimizer

from snoo import checks
from snoo.optim import state_checks
from snoo.optim.declaration import Declared
from snoo.optim.state_checks import ELEMENTWISE_STATE, SCHEDULE_PLACEHOLDER, StateSpec
from snoo.optim.tensors import (
    bucket_by_device_and_dtype,
    check_state_device,
    foreach_copy_,
    is_dtensor,
    state_dtype,
    synchronize_for_host,
)

__all__ = ["SCHEDULE_PLACEHOLDER", "LookaheadPointWrapper", "StateSpec", "Wrapper"]


@dataclass
class LoadPlan:
    """What :meth:`Wrapper.load_state_dict` found valid in a state dict, as plain values, before anything changes."""

    #: the state dict of the inner optimizer (the wrapper's entries taken out)
    inner: dict[str, Any]
    #: the wrapper's per-parameter state, as fresh tensors
    own: dict[torch.Tensor, dict[str, torch.Tensor]]
    #: per group, the schedules of this optimizer that stand where the state dict holds a placeholder
    schedules: list[dict[str, Any]]
    #: the scalars of :meth:`Wrapper._extra_state`, parsed by :meth:`Wrapper._parse_extra_state`
    extra: dict[str, Any] = field(default_factory=dict)


class _eager_under_compile:
    """``torch.compiler.disable`` for a method, applied when the method is first looked up rather than when the class
    is defined: ``torch.compiler.disable`` imports ``torch._dynamo``, which takes seconds, and ``import snoo`` should
    not. (``Optimizer.__init__`` looks ``step`` up on the class to add its hooks, so the first optimizer built does.)"""

    def __init__(self, method: Callable[..., Any]) -> None:
        self.method = method
        self.disabled: Callable[..., Any] | None = None
        functools.update_wrapper(self, method)  # type: ignore[arg-type]

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if self.disabled is None:
            self.disabled = torch.compiler.disable(self.method)
        return self.disabled if obj is None else self.disabled.__get__(obj, owner)


class Wrapper(Optimizer, Declared):
    """Base class of the optimizers that wrap another optimizer.

    A subclass declares, in its own file:

    - :attr:`state_spec`: what it keeps per parameter (its prefix in ``state_dict()``, the names of its tensors,
      which one ``eval()`` puts in, the name of the kept training point);
    - ``spec_name``, ``hyperparameter_ranges``, ``tuning_trials`` and ``knob_labels``
      (:class:`snoo.optim.declaration.Declared`) to be a name of the SPEC grammar and of the lab;

    and implements :meth:`_check_group` (its hyperparameters in a group), :meth:`_init_param_state` (its start) and
    :meth:`_after_inner_step` (its update; ``self._inner_steps`` counts the steps taken, from 1). It may extend
    :meth:`_extra_state` / :meth:`_parse_extra_state` / :meth:`_apply_extra_state` for scalars it saves."""

    #: What this wrapper keeps per parameter: see :class:`snoo.optim.state_checks.StateSpec`.
    state_spec: ClassVar[StateSpec]
    #: True when, between steps, the parameters hold a lookahead point that this wrapper derives from its own state
    #: and expects to find where it left it. Such a wrapper cannot be wrapped: the outer wrapper would move the
    #: parameters (SNOO's ``p = w``) and this one would count the move as an update of its inner optimizer.
    holds_lookahead: ClassVar[bool] = False

    def __init__(
        self,
        inner: Optimizer,
        defaults: dict[str, Any],
        *,
        state_device: torch.device | str | None = None,
    ) -> None:
        if not isinstance(inner, Optimizer):
            raise TypeError(
                f"inner must be a torch.optim.Optimizer (e.g. torch.optim.AdamW(model.parameters())), "
                f"got {type(inner).__name__}"
            )
        nested = inner
        while isinstance(nested, Wrapper):
            if nested.state_spec.prefix == self.state_spec.prefix:
                raise TypeError(
                    f"{type(self).__name__} cannot wrap {type(nested).__name__}: both keep their hyperparameters "
                    f"and state under '{self.state_spec.prefix}', so a scheduler or a checkpoint could not tell the "
                    f"two outer loops apart. Use one {type(self).__name__} around the inner optimizer."
                )
            if nested.holds_lookahead:
                raise TypeError(
                    f"{type(self).__name__} cannot wrap {type(nested).__name__}: between steps the parameters hold "
                    f"{type(nested).__name__}'s lookahead point, not its iterate, so {type(self).__name__} would take "
                    f"the lookahead point for the model, and {type(nested).__name__} would count every move "
                    f"{type(self).__name__} makes to the parameters as an update of its own inner optimizer. Put "
                    f"{type(nested).__name__} outermost instead, e.g. {type(nested).__name__}"
                    f"({type(self).__name__}(AdamW(...))): it then treats {type(self).__name__}(AdamW) as its base "
                    f"optimizer, exactly as its equations say."
                )
            nested = nested.inner
        self.state_device = check_state_device(state_device)
        self._own_defaults = dict(defaults)
        # every group checked before any is touched, so that a refused wrapper leaves the inner optimizer as it was
        self._check_group(defaults)
        for group in inner.param_groups:
            self._check_group(self._with_own_defaults(group))
        self.inner = inner
        self.training = True
        self._inner_steps = 0
        #: :meth:`_groups_layout` when the groups were last checked and every parameter had its state
        self._checked_layout: tuple | None = None
        # Optimizer.__init__ calls add_param_group for each of the inner's groups, which only adds our keys.
        super().__init__(inner.param_groups, {**inner.defaults, **defaults})
        # inner.load_state_dict (of a state dict of the inner optimizer alone) replaces the group dicts: keep ours
        self._own_before_load: list[dict[str, Any]] = []
        inner.register_load_state_dict_pre_hook(self._remember_own_hyperparameters)
        inner.register_load_state_dict_post_hook(self._restore_own_hyperparameters)

    # -- the inner optimizer's groups are ours -------------------------------------------------------------------

    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        return self.inner.param_groups

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        # Optimizer.__init__ assigns an empty list before adding the groups, which here already live in the inner.
        if groups:
            self.inner.param_groups = groups

    def _with_own_defaults(self, group: Mapping[str, Any]) -> dict[str, Any]:
        """``group`` with this wrapper's hyperparameters it lacks filled in from the defaults (a copy)."""
        return {**self._own_defaults, **group}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the inner optimizer (where it lives) with this wrapper's hyperparameters filled in.

        The group is checked before the inner optimizer sees it: a refused group leaves no trace."""
        if any(param_group is g for g in self.inner.param_groups):  # Optimizer.__init__, for the inner's own groups
            for name, default in self._own_defaults.items():
                param_group.setdefault(name, default)
            return
        if not isinstance(param_group, dict):
            raise TypeError(f"a parameter group must be a dict, got {type(param_group).__name__}")
        own = {name: param_group.get(name, default) for name, default in self._own_defaults.items()}
        self._check_group({**self.inner.defaults, **param_group, **own})
        self.inner.add_param_group(param_group)
        group = self.inner.param_groups[-1]
        for name, value in own.items():
            group.setdefault(name, value)

    def _check_group(self, group: dict[str, Any]) -> None:
        """Raise ValueError (or TypeError) for a group whose wrapper hyperparameters are out of range. ``group`` has
        all of this wrapper's hyperparameters, and the inner optimizer's where it has them."""

    def _groups_layout(self) -> tuple:
        """What the checks before a step depend on, compared at each step so that they cost nothing while it stays
        the same (O(groups), not O(parameters)): each group, its list of parameters and their number, this
        wrapper's hyperparameters in it, and the state's identity and size."""
        own = tuple(self._own_defaults)
        groups = tuple(
            (id(g), id(g["params"]), len(g["params"]), *(g.get(name) for name in own)) for g in self.param_groups
        )
        return groups, id(self.state), len(self.state)

    def _check_groups(self) -> None:
        """Before each step: give a group that was added to the inner optimizer directly this wrapper's defaults,
        and check every group's hyperparameters (set by hand, by a scheduler, or loaded)."""
        for group in self.param_groups:
            if not self._own_defaults.keys() <= group.keys():
                for name, default in self._own_defaults.items():
                    group.setdefault(name, default)
            self._check_group(group)

    def _remember_own_hyperparameters(self, inner: Optimizer, state_dict: dict[str, Any]) -> None:
        self._own_before_load = [{k: g[k] for k in self._own_defaults if k in g} for g in inner.param_groups]

    def _restore_own_hyperparameters(self, inner: Optimizer) -> None:
        # a state dict saved by this wrapper brings its own values, which stay; one of the inner alone brings none
        for group, own in zip(inner.param_groups, self._own_before_load):
            for name, value in own.items():
                group.setdefault(name, value)
        self._own_before_load = []

    def _new_state(self, param: torch.Tensor, source: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A fresh copy of ``source`` as state of ``param``: on ``state_device`` (the parameter's own if unset),
        pinned when that is host memory behind an accelerator, so copies to and from it can be asynchronous."""
        device = self.state_device or param.device
        if device == param.device:
            # empty_like keeps a DTensor a DTensor (state sharded like its parameter) and keeps the strides
            return torch.empty_like(param, dtype=dtype).copy_(source.detach(), non_blocking=True)
        if is_dtensor(param):
            raise ValueError(
                f"state_device={device} is not supported for sharded (DTensor) parameters: their state stays sharded "
                f"on {param.device} like the parameter"
            )
        out = torch.empty(
            param.shape,
            dtype=param.dtype if dtype is None else dtype,
            device=device,
            pin_memory=device.type == "cpu" and param.device.type != "cpu",
        )
        out.copy_(source.detach(), non_blocking=True)
        if device.type == "cpu" and source.device.type != "cpu":
            synchronize_for_host([source])  # the host may read it next (state_dict, torch.save)
        return out

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    # -- stepping ---------------------------------------------------------------------------------------------------

    # Dynamo traced this step but dropped the update of the step counter (torch 2.13), so the outer step never fired:
    # under torch.compile(opt.step) the wrapper's step runs eagerly. Compile the model; the step is a few foreach ops.
    @_eager_under_compile
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Take one step of the inner optimizer (with ``closure`` if given), then this wrapper's own update."""
        if not self.training:
            raise RuntimeError(
                f"{type(self).__name__}.step() was called in eval mode: the parameters hold the evaluation "
                f"weights. Call .train() before training again."
            )
        layout = self._groups_layout()
        if layout != self._checked_layout:
            self._check_groups()
            with torch.no_grad():
                for group in self.param_groups:
                    for p in group["params"]:
                        if p.requires_grad and p not in self.state:
                            self.state[p] = self._init_param_state(p, group)
            # a parameter without state (frozen now, maybe not at the next step) keeps this check running every step
            if len(self.state) == sum(len(g["params"]) for g in self.param_groups):
                self._checked_layout = self._groups_layout()
        with torch.no_grad():
            self._before_inner_step()
        loss = self.inner.step(closure) if closure is not None else self.inner.step()
        self._inner_steps += 1
        with torch.no_grad():
            self._after_inner_step()
        return loss

    def _init_param_state(self, param: torch.Tensor, group: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The state of a parameter of ``group`` seen for the first time, before the inner optimizer moves it.

        Every tensor the wrapper will keep should exist from here on: ``torch.distributed.checkpoint`` loads into
        the state that a fresh optimizer has after one step, and skips what it does not find there."""
        raise NotImplementedError

    def _before_inner_step(self) -> None:
        """Run under no_grad before each inner step, once the state exists (checks that need the groups as a
        scheduler left them, ...). Does nothing unless a subclass needs it."""

    def _after_inner_step(self) -> None:
        """This wrapper's own update, run under no_grad after each inner step (``self._inner_steps`` counts them)."""
        raise NotImplementedError

    # -- evaluation weights -----------------------------------------------------------------------------------------

    def _evaluation_weights(self, param: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """The weights ``eval()`` puts into ``param``: its state ``state_spec.evaluation``."""
        return state[self.state_spec.evaluation]

    @torch.no_grad()
    def eval(self) -> Wrapper:
        """Put the evaluation weights into the parameters, keeping the training point to restore. Idempotent.

        An inner wrapper then does the same from there: the parameters end with the innermost evaluation weights."""
        if self.training:
            params = list(self.state)
            if params:
                for p in params:
                    self.state[p][self.state_spec.train_point] = self._new_state(p, p)
                evaluation = [self._evaluation_weights(p, self.state[p]) for p in params]
                foreach_copy_(params, evaluation, non_blocking=True)
            self.training = False
        if isinstance(self.inner, Wrapper):
            self.inner.eval()
        return self

    @torch.no_grad()
    def train(self) -> Wrapper:
        """Put back exactly the training point that ``eval()`` kept (an inner wrapper's first). Idempotent."""
        if isinstance(self.inner, Wrapper):
            self.inner.train()
        if not self.training:
            params = [p for p in self.state if self.state_spec.train_point in self.state[p]]
            if params:
                kept = [self.state[p].pop(self.state_spec.train_point) for p in params]
                foreach_copy_(params, kept, non_blocking=True)
            self.training = True
        return self

    # -- checkpoints ------------------------------------------------------------------------------------------------

    def _extra_state(self) -> dict[str, Any]:
        """Scalars saved in every group of ``state_dict()["param_groups"]`` under ``state_spec.prefix``; subclasses
        extend it (and :meth:`_parse_extra_state`, :meth:`_apply_extra_state` with it)."""
        return {
            "wrapper": type(self).__name__,
            "inner": type(self.inner).__name__,
            "inner_steps": self._inner_steps,
            "training": self.training,
        }

    def _group_extra_state(self, params: list[torch.Tensor]) -> dict[str, Any]:
        """What a group with these parameters saves beside :meth:`_extra_state`; subclasses extend it."""
        return {}

    def _parse_extra_state(self, extras: list[dict[str, Any]], groups: list[list[torch.Tensor]]) -> dict[str, Any]:
        """Check the saved entries of each group (from :meth:`_extra_state` and :meth:`_group_extra_state`) and return
        them as plain values for :meth:`_apply_extra_state`; change nothing. ``groups`` holds this optimizer's
        parameters of each group. Raise ValueError for anything that is not what this optimizer saves."""
        extra = extras[0]
        for name, kind in (("wrapper", type(self)), ("inner", type(self.inner))):
            saved = extra.get(name, kind.__name__)  # absent from state dicts of snoo <= 0.1.0.dev0
            if saved != kind.__name__:
                what = "it" if name == "wrapper" else "its inner optimizer"
                raise ValueError(
                    f"the state dict was saved by {checks.show(extra.get('wrapper', 'a wrapper'))} around "
                    f"{checks.show(extra.get('inner'))}, "
                    f"not by {type(self).__name__} around {type(self.inner).__name__}: {what} keeps other state. "
                    f"Build the optimizer the checkpoint was saved from to continue the run"
                )
        steps = extra.get("inner_steps")
        checks.integer(steps, f"param_groups[0]['{self.state_spec.prefix}']['inner_steps']", checks.NON_NEGATIVE)
        checks.flag(extra.get("training"), f"param_groups[0]['{self.state_spec.prefix}']['training']")
        for name in ("wrapper", "inner", "inner_steps", "training"):
            if any(e.get(name) != extra.get(name) for e in extras):
                raise ValueError(
                    f"the parameter groups of the state dict disagree on '{self.state_spec.prefix}.{name}'"
                )
        return {"inner_steps": steps, "training": extra["training"]}

    def _apply_extra_state(self, values: dict[str, Any]) -> None:
        """Set what :meth:`_parse_extra_state` returned; cannot fail."""
        self._inner_steps = values["inner_steps"]
        self.training = values["training"]

    def state_dict(self) -> dict[str, Any]:
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        saved = self.inner.state_dict()
        # the inner's state dict names each parameter by an id (its position, for torch's optimizers): ours too
        ids = {
            p: i
            for group, saved_group in zip(self.param_groups, saved["param_groups"])
            for p, i in zip(group["params"], saved_group["params"])
        }
        state = dict(saved["state"])
        for p, own in self.state.items():
            i = ids[p]
            entry = dict(state.get(i, {}))  # a copy: the inner's dict is its live state
            entry.update({f"{self.state_spec.prefix}.{name}": value for name, value in own.items()})
            state[i] = entry
        extra = self._extra_state()
        groups = [
            {
                **{k: self._saved_hyperparameter(k, v) for k, v in saved_group.items()},
                self.state_spec.prefix: {**extra, **self._group_extra_state(group["params"])},
            }
            for group, saved_group in zip(self.param_groups, saved["param_groups"])
        ]
        saved = {**saved, "state": state, "param_groups": groups}
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, saved)
            if result is not None:
                saved = result
        return saved

    def _saved_hyperparameter(self, name: str, value: Any) -> Any:
        if name in self._own_defaults and callable(value):
            return f"{SCHEDULE_PLACEHOLDER} {value!r}"
        return value

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this wrapper (``state_dict()``'s layout): everything is checked first, then applied
        at once, so a refused state dict (``ValueError`` or ``TypeError``) leaves the optimizer as it was."""
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        plan = self._plan_load(state_dict)
        self._commit_load(plan)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    @property
    def _inner_state_is_elementwise(self) -> bool:
        return isinstance(self.inner, ELEMENTWISE_STATE) or getattr(self.inner, "elementwise_state", False)

    def _plan_load(self, state_dict: Any) -> LoadPlan:
        """Validate and parse ``state_dict`` (:mod:`snoo.optim.state_checks`); change nothing."""
        name, spec = type(self).__name__, self.state_spec
        state_checks.check_layout(state_dict, name)
        saved_groups = list(state_dict["param_groups"])
        state_checks.refuse_meta(state_dict["state"], saved_groups)
        params = state_checks.saved_params(saved_groups, self.param_groups, spec.prefix, name)
        extra = self._parse_extra_state(
            [dict(saved[spec.prefix]) for saved in saved_groups],
            [group["params"] for group in self.param_groups],
        )
        schedules = state_checks.schedules_to_keep(saved_groups, self.param_groups, self._own_defaults)
        inner_groups = [
            self._plan_inner_group(g, saved, group, kept)
            for g, (saved, group, kept) in enumerate(zip(saved_groups, self.param_groups, schedules))
        ]
        inner_state, own = state_checks.split_param_states(
            state_dict["state"],
            params,
            saved_groups,
            spec,
            name,
            self.inner,
            {} if isinstance(self.inner, Wrapper) else self.inner.state,  # a wrapper inside checks its own
            self._inner_state_is_elementwise,
        )
        state_checks.check_training_points(extra["training"], params, own, spec, name)
        own_tensors = {}
        for i, saved in own.items():
            p = params[i]
            dtypes = spec.dtypes(p, state_dtype(p))
            own_tensors[p] = {key: self._new_state(p, value, dtypes[key]) for key, value in saved.items()}
        inner = {**state_dict, "state": inner_state, "param_groups": inner_groups}
        return LoadPlan(inner=inner, own=own_tensors, schedules=schedules, extra=extra)

    def _plan_inner_group(
        self, g: int, saved: Mapping[str, Any], group: dict[str, Any], kept: dict[str, Any]
    ) -> dict[str, Any]:
        """Group ``g`` of a state dict as the inner optimizer will load it (this wrapper's entry taken out), after
        checking this wrapper's hyperparameters, and the inner optimizer's against the kind and range it has."""
        inner_group = {k: v for k, v in saved.items() if k != self.state_spec.prefix}
        try:
            self._check_group({**group, **inner_group, **kept})
        except (TypeError, ValueError) as e:
            raise type(e)(f"parameter group {g} of the state dict: {e}") from None
        # the hyperparameters of wrappers inside this one are theirs to check, when they load their part
        stacked: set[str] = {"params"}
        nested: Optimizer = self
        while isinstance(nested, Wrapper):
            stacked.update(nested._own_defaults, [nested.state_spec.prefix])
            nested = nested.inner
        state_checks.check_inner_group(
            g, inner_group, group, stacked, type(self.inner).__name__, self._inner_state_is_elementwise
        )
        return inner_group

    def _commit_load(self, plan: LoadPlan) -> None:
        """Apply a checked :class:`LoadPlan`. The inner optimizer checks its own part as it loads it; if it refuses,
        its previous state is put back, so the wrapper is left as it was."""
        own_before = [{k: g[k] for k in self._own_defaults if k in g} for g in self.param_groups]
        before = None
        if not isinstance(self.inner, Wrapper):  # a wrapper inside loads all or nothing: no state to put back
            before = self.inner.state_dict()  # the live tensors: loading them back restores the state exactly
            # without our hyperparameters, which may be schedules (not for the inner's loader to deep-copy)
            before["param_groups"] = [
                {k: v for k, v in g.items() if k not in self._own_defaults} for g in before["param_groups"]
            ]
        try:
            self.inner.load_state_dict(plan.inner)
        except Exception as e:
            if before is not None:
                self.inner.load_state_dict(before)
            for group, own in zip(self.param_groups, own_before):
                group.update(own)
            if isinstance(e, (TypeError, ValueError)):
                raise
            raise ValueError(
                f"{type(self.inner).__name__} refused its part of the state dict ({type(e).__name__}: {e}): it was "
                f"not saved by {type(self).__name__} around {type(self.inner).__name__}"
            ) from e
        for group, kept in zip(self.param_groups, plan.schedules):
            group.update(kept)
        self.state = defaultdict(dict, plan.own)
        self._apply_extra_state(plan.extra)

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim.Optimizer pickles only defaults, state and param_groups; a wrapper also needs its inner. Not an
        # instance's own `step`: an LR scheduler puts one there that reaches this optimizer through a weak reference,
        # which pickle cannot name and a copy would share with the original (torch's optimizers drop it too).
        state = dict(self.__dict__)
        state.pop("step", None)
        return state

    def __repr__(self) -> str:
        own = ", ".join(f"{k}={v}" for k, v in self._own_defaults.items())
        return f"{type(self).__name__}({own})\n  around " + repr(self.inner).replace("\n", "\n  ")


class LookaheadPointWrapper(Wrapper):
    """Base of the wrappers whose parameters hold a lookahead point derived from their state (EMA-Nesterov, Nesterov,
    GPA): after each inner step that moved a parameter, one foreach update (:meth:`_update`) of its state tensors,
    in the order of :attr:`StateSpec.names <snoo.optim.state_checks.StateSpec.names>`, and of the lookahead point,
    with the coefficients of each group (:meth:`_coefficients`). A subclass declares its state (each tensor
    required: ``StateSpec(..., required=names)``, since the update needs them all), its start
    (:meth:`_init_param_state`) and those two methods."""

    holds_lookahead = True

    def _coefficients(self, group: dict[str, Any], t: int) -> dict[str, float]:
        """The keyword arguments of :meth:`_update` for ``group`` right after step ``t`` (the coefficients of the
        lookahead point where the gradient of step ``t + 1`` is taken)."""
        raise NotImplementedError

    def _update(self, params: list[torch.Tensor], *state: list[torch.Tensor], **coefficients: float) -> None:
        """The update of one bucket of tensors that share device and dtype (a foreach kernel): the parameters, then
        each state tensor of :attr:`state_spec` in its order."""
        raise NotImplementedError

    def _after_inner_step(self) -> None:
        # a parameter with no gradient was not moved by the inner step: its state and lookahead point stay
        names = self.state_spec.names
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None and p in self.state]
            if not params:
                continue
            coefficients = self._coefficients(group, self._inner_steps)
            for bucket, states in bucket_by_device_and_dtype(params, self.state, names[0]):
                self._update(bucket, *([st[name] for st in states] for name in names), **coefficients)
