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
  dicts (which rename the ids to parameter names and keep nothing else) carry everything.
- A hyperparameter of the wrapper may be a number or a schedule ``n -> value`` (:mod:`snoo.optim.schedules`).
  Schedules are not saved: ``state_dict()`` holds a placeholder that names them, and ``load_state_dict`` keeps the
  schedule the loading optimizer was built with (and refuses a state saved with a schedule by one built without).
- Wrappers stack, with one rule: a wrapper whose parameters hold a lookahead point between steps
  (:attr:`Wrapper.holds_lookahead`: EMA-Nesterov, Nesterov) must be the outermost, because it takes every move of the
  parameters it did not make itself for an update of its inner optimizer. ``eval()`` and ``train()`` go through the
  whole stack: the parameters get the evaluation weights of the innermost wrapper.
- Per-parameter state is created lazily at the first ``step()`` that sees the parameter (so weights loaded into the
  model after the optimizer was built are the ones the algorithm starts from), in float32 for bf16/fp16 parameters,
  optionally on another device (``state_device``, e.g. host memory while the model is on a GPU).
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch.optim import Optimizer

from snoo import checks
from snoo.optim.tensors import foreach_copy_, is_dtensor

LOW_PRECISION = (torch.float16, torch.bfloat16)

#: What ``state_dict()`` holds in place of a hyperparameter that is a schedule (a function is not saved).
SCHEDULE_PLACEHOLDER = "<schedule, not saved>"


def state_dtype(param: torch.Tensor) -> torch.dtype:
    """The dtype a wrapper keeps its state in: float32 for bf16/fp16 parameters, else the parameter's own."""
    return torch.float32 if param.dtype in LOW_PRECISION else param.dtype


def bucket_by_device_and_dtype(
    params: list[torch.Tensor], state: Mapping[torch.Tensor, dict[str, torch.Tensor]], key: str
) -> Iterator[tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]]:
    """Split ``params`` and their entries of ``state`` into runs that ``torch._foreach_*`` can take at once: same
    parameter device and dtype, same device and dtype of ``state[p][key]``."""
    buckets: dict[tuple, tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]] = {}
    for p in params:
        st = state[p]
        s = st[key]
        bucket = buckets.setdefault((p.device, p.dtype, s.device, s.dtype), ([], []))
        bucket[0].append(p)
        bucket[1].append(st)
    yield from buckets.values()


def synchronize_for_host(tensors: list[torch.Tensor]) -> None:
    """Wait for non-blocking copies from an accelerator to host memory to land before the host reads them."""
    device = tensors[0].device
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def as_state_tensors(params: list[torch.Tensor], like: torch.Tensor) -> list[torch.Tensor]:
    """The parameters as tensors of the device and dtype of the state tensor ``like``: the parameters themselves when
    they already are, else copies (float32 for low-precision parameters, host copies for state in host memory)."""
    if params[0].device == like.device and params[0].dtype == like.dtype:
        return params
    copies = [p.to(device=like.device, dtype=like.dtype, non_blocking=True) for p in params]
    if like.device != params[0].device:
        synchronize_for_host(params)
    return copies


def check_state_device(state_device: Any) -> torch.device | None:
    """``state_device`` as a ``torch.device`` (``None`` stays ``None``), refused with a message naming the argument
    when it is no device this process can hold tensors on, or the meta device (which holds no data)."""
    if state_device is None:
        return None
    try:
        device = torch.device(state_device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ValueError(
            f"state_device must be None, 'cpu' or another device name such as 'cuda:0', got {state_device!r} ({e})"
        ) from None
    if device.type == "meta":
        raise ValueError(
            "state_device='meta' holds no data, so the wrapper's state (slow weights, momentum, ...) could not be "
            "kept there: use None (beside each parameter) or 'cpu' (host memory)"
        )
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"state_device={state_device!r} cannot hold tensors in this process: {first}") from None
    return device


def _compatible(saved: Any, current: Any) -> bool:
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
        return isinstance(saved, (tuple, list)) and len(saved) == len(current) and all(map(_compatible, saved, current))
    return type(saved) is type(current)


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


#: A trial of ``--tune``: (the inner optimizer's lr as a multiple of its default, this wrapper's own knobs).
Trial = tuple[float, dict[str, float]]
#: The trials of an optimizer that declares no others: its lr, doubled and halved in turn (the lab's ``--tune N``
#: takes the first N).
LR_TRIALS: tuple[Trial, ...] = tuple((f, {}) for f in (1.0, 2.0, 0.5, 4.0, 0.25, 8.0))


class Wrapper(Optimizer):
    """Base class of the optimizers that wrap another optimizer.

    A subclass sets :attr:`state_prefix`, :attr:`state_names` and :attr:`evaluation_key`, and implements
    :meth:`_init_param_state`, :meth:`_after_inner_step` and :meth:`_check_group`; it may extend
    :meth:`_extra_state` / :meth:`_parse_extra_state` / :meth:`_apply_extra_state` for scalars it saves."""

    #: Prefix of this wrapper's keys in ``state_dict()``; two wrappers with the same prefix cannot be stacked.
    state_prefix: ClassVar[str]
    #: The per-parameter state tensors this wrapper keeps beside the training point, all in :func:`state_dtype`.
    state_names: ClassVar[tuple[str, ...]] = ()
    #: The one of :attr:`state_names` that ``eval()`` puts into the parameters (SNOO's ``"slow"``), and that
    #: :func:`snoo.checkpoint.load_evaluation_weights` reads from a checkpoint.
    evaluation_key: ClassVar[str]
    #: Of :attr:`state_names`, those a parameter with any state must have (a state dict lacking one is refused);
    #: ``None``: :attr:`evaluation_key` alone.
    required_state: ClassVar[tuple[str, ...] | None] = None
    #: Name under which ``eval()`` keeps the training point of each parameter while the evaluation weights are in.
    train_point: ClassVar[str] = "train_point"
    #: True when, between steps, the parameters hold a lookahead point that this wrapper derives from its own state
    #: and expects to find where it left it. Such a wrapper cannot be wrapped: the outer wrapper would move the
    #: parameters (SNOO's ``p = w``) and this one would count the move as an update of its inner optimizer.
    holds_lookahead: ClassVar[bool] = False
    #: What ``snoo compare --tune N`` tries, in order (the first N): the same budget for every contender, each on its
    #: own knobs. A subclass declares the inner lr both ways first, then its own published settings.
    tuning_trials: ClassVar[tuple[Trial, ...]] = LR_TRIALS

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
            if nested.state_prefix == self.state_prefix:
                raise TypeError(
                    f"{type(self).__name__} cannot wrap {type(nested).__name__}: both keep their hyperparameters "
                    f"and state under '{self.state_prefix}', so a scheduler or a checkpoint could not tell the "
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
        """The weights ``eval()`` puts into ``param``: its state :attr:`evaluation_key`."""
        return state[self.evaluation_key]

    @torch.no_grad()
    def eval(self) -> Wrapper:
        """Put the evaluation weights into the parameters, keeping the training point to restore. Idempotent.

        An inner wrapper then does the same from there: the parameters end with the innermost evaluation weights."""
        if self.training:
            params = list(self.state)
            if params:
                for p in params:
                    self.state[p][self.train_point] = self._new_state(p, p)
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
            params = [p for p in self.state if self.train_point in self.state[p]]
            if params:
                kept = [self.state[p].pop(self.train_point) for p in params]
                foreach_copy_(params, kept, non_blocking=True)
            self.training = True
        return self

    # -- checkpoints ------------------------------------------------------------------------------------------------

    def _extra_state(self) -> dict[str, Any]:
        """Scalars saved in every group of ``state_dict()["param_groups"]`` under ``state_prefix``; subclasses
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
        checks.integer(steps, f"param_groups[0]['{self.state_prefix}']['inner_steps']", checks.NON_NEGATIVE)
        checks.flag(extra.get("training"), f"param_groups[0]['{self.state_prefix}']['training']")
        for name in ("wrapper", "inner", "inner_steps", "training"):
            if any(e.get(name) != extra.get(name) for e in extras):
                raise ValueError(f"the parameter groups of the state dict disagree on '{self.state_prefix}.{name}'")
        return {"inner_steps": steps, "training": extra["training"]}

    def _apply_extra_state(self, values: dict[str, Any]) -> None:
        """Set what :meth:`_parse_extra_state` returned; cannot fail."""
        self._inner_steps = values["inner_steps"]
        self.training = values["training"]

    def _state_dtypes(self, param: torch.Tensor) -> dict[str, torch.dtype]:
        """The per-parameter state tensors this wrapper may hold for ``param``, with their dtypes."""
        return {self.train_point: param.dtype, **dict.fromkeys(self.state_names, state_dtype(param))}

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
            entry.update({f"{self.state_prefix}.{name}": value for name, value in own.items()})
            state[i] = entry
        extra = self._extra_state()
        groups = [
            {
                **{k: self._saved_hyperparameter(k, v) for k, v in saved_group.items()},
                self.state_prefix: {**extra, **self._group_extra_state(group["params"])},
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

    def _schedules_to_keep(self, saved_groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The schedules of this optimizer's groups that stand where ``saved_groups`` hold a placeholder."""
        keep = []
        for g, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            kept = {}
            for name in self._own_defaults:
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
        """Validate and parse ``state_dict``; change nothing."""
        name = type(self).__name__
        if (
            not isinstance(state_dict, Mapping)
            or not {"state", "param_groups"} <= state_dict.keys()
            or not isinstance(state_dict["state"], Mapping)
            or not isinstance(state_dict["param_groups"], (list, tuple))
            or not all(
                isinstance(g, Mapping) and isinstance(g.get("params"), (list, tuple))
                for g in state_dict["param_groups"]
            )
        ):
            raise ValueError(
                f"{name}.load_state_dict expects a dict from {name}.state_dict(): 'state' (a dict) and "
                f"'param_groups' (a list of dicts, each with its 'params')"
            )
        saved_groups = list(state_dict["param_groups"])
        self._refuse_meta(state_dict["state"], saved_groups)
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"the state dict has {len(saved_groups)} parameter groups, this optimizer has {len(self.param_groups)}"
            )
        if not all(isinstance(saved.get(self.state_prefix), Mapping) for saved in saved_groups):
            raise ValueError(
                f"the parameter groups of this state dict have no '{self.state_prefix}' entry, so it was not saved "
                f"by {name} (a state dict of the inner optimizer alone belongs in {name}.inner.load_state_dict)"
            )
        for g, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"parameter group {g} has {len(saved['params'])} parameters in the state dict and "
                    f"{len(group['params'])} in this optimizer"
                )
        # saved ids (positions, or names under torch.distributed.checkpoint) -> parameters, like torch's optimizers
        saved_ids = [i for saved in saved_groups for i in saved["params"]]
        if not all(isinstance(i, (int, str)) and not isinstance(i, bool) for i in saved_ids):
            raise ValueError("the parameter ids of the state dict must be positions (ints) or names (strings)")
        params = dict(zip(saved_ids, (p for group in self.param_groups for p in group["params"])))
        if len(params) != len(saved_ids):
            raise ValueError("the state dict lists a parameter id in more than one place")
        extra = self._parse_extra_state(
            [dict(saved[self.state_prefix]) for saved in saved_groups],
            [group["params"] for group in self.param_groups],
        )
        schedules = self._schedules_to_keep(saved_groups)
        inner_groups = [
            self._plan_inner_group(g, saved, group, kept)
            for g, (saved, group, kept) in enumerate(zip(saved_groups, self.param_groups, schedules))
        ]
        inner_state, own = self._plan_param_states(state_dict["state"], params, saved_groups)
        self._check_training_points(extra["training"], params, own)
        inner = {**state_dict, "state": inner_state, "param_groups": inner_groups}
        return LoadPlan(inner=inner, own=own, schedules=schedules, extra=extra)

    @staticmethod
    def _refuse_meta(saved_state: Mapping[Any, Any], saved_groups: list[Mapping[str, Any]]) -> None:
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

    def _plan_inner_group(
        self, g: int, saved: Mapping[str, Any], group: dict[str, Any], kept: dict[str, Any]
    ) -> dict[str, Any]:
        """Group ``g`` of a state dict as the inner optimizer will load it (this wrapper's entry taken out), after
        checking this wrapper's hyperparameters, and the inner optimizer's against the kind and range it has."""
        inner_group = {k: v for k, v in saved.items() if k != self.state_prefix}
        try:
            self._check_group({**group, **inner_group, **kept})
        except (TypeError, ValueError) as e:
            raise type(e)(f"parameter group {g} of the state dict: {e}") from None
        # the hyperparameters of wrappers inside this one are theirs to check, when they load their part
        stacked: set[str] = {"params"}
        nested: Optimizer = self
        while isinstance(nested, Wrapper):
            stacked.update(nested._own_defaults, [nested.state_prefix])
            nested = nested.inner
        # a flag that a newer torch added may be missing (the inner optimizer's loader fills it in), a number not
        lacking = [k for k, v in group.items() if k not in inner_group and k not in stacked and _number_like(v)]
        if lacking:
            raise ValueError(f"parameter group {g} of the state dict has no {lacking[0]!r}")
        for key, value in inner_group.items():
            # a key this optimizer does not have yet (a scheduler's "initial_lr") is taken as it comes
            if key not in group or key in stacked:
                continue
            if not _compatible(value, group[key]):
                raise ValueError(
                    f"parameter group {g} of the state dict has {key}={checks.show(value)}, where this "
                    f"optimizer's {type(self.inner).__name__} has {checks.show(group[key])}"
                )
            within = INNER_RANGES.get(key) if self._inner_state_is_elementwise else None
            if within is None or isinstance(value, bool) or not isinstance(value, (int, float, tuple, list)):
                continue  # (torch takes a tensor lr too)
            values = value if isinstance(value, (tuple, list)) else [value]
            if not all(checks.is_number(v) and v in within for v in values):
                raise ValueError(
                    f"parameter group {g} of the state dict has {key}={checks.show(value)}, where "
                    f"{type(self.inner).__name__} takes {key} {within}"
                )
        return inner_group

    def _plan_param_states(
        self, saved_state: Mapping[Any, Any], params: dict[Any, torch.Tensor], saved_groups: list[Mapping[str, Any]]
    ) -> tuple[dict[Any, dict[str, Any]], dict[torch.Tensor, dict[str, torch.Tensor]]]:
        """Each parameter's state: the inner optimizer's part, checked, and this wrapper's, as fresh tensors."""
        prefix = self.state_prefix + "."
        group_of = {i: g for g, saved in enumerate(saved_groups) for i in saved["params"]}
        inner_keys: dict[int, tuple[Any, dict]] = {}  # per group: the first parameter's inner state keys
        inner_state: dict[Any, dict[str, Any]] = {}
        own: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
        elementwise = self._inner_state_is_elementwise
        for key, entry in saved_state.items():
            if key not in params:
                raise ValueError(
                    f"the state dict has state for parameter {checks.show(key)}, which none of its groups lists"
                )
            if not isinstance(entry, Mapping):
                raise ValueError(f"the state of parameter {key!r} must be a dict, got {type(entry).__name__}")
            rest = {k: v for k, v in entry.items() if not (isinstance(k, str) and k.startswith(prefix))}
            if rest:
                self._check_inner_param_state(key, params[key], rest)
                inner_state[key] = rest
                kinds = {k: v is None for k, v in rest.items()}
                first, expected = inner_keys.setdefault(group_of[key], (key, kinds))
                if elementwise and kinds != expected:  # the optimizer makes the same state for a whole group
                    raise ValueError(
                        f"the state of parameter {key!r} has {sorted(map(str, rest))}, that of parameter {first!r} "
                        f"of the same group {sorted(map(str, expected))} (or one holds None where the other a "
                        f"tensor): {type(self.inner).__name__} keeps the same state for every parameter of a group"
                    )
            mine = {k[len(prefix) :]: v for k, v in entry.items() if isinstance(k, str) and k.startswith(prefix)}
            if mine:
                own[params[key]] = self._load_param_state(key, params[key], mine)
        return inner_state, own

    def _check_training_points(
        self, training: bool, params: dict[Any, torch.Tensor], own: dict[torch.Tensor, dict[str, torch.Tensor]]
    ) -> None:
        """A state saved in eval mode holds the training point of each parameter with state, one in train mode none."""
        if training:
            stale = [key for key, p in params.items() if self.train_point in own.get(p, {})]
            if stale:
                raise ValueError(
                    f"the state dict was saved in train mode but holds a training point ('{self.state_prefix}."
                    f"{self.train_point}') for parameter {stale[0]!r}: so {type(self).__name__} did not save it"
                )
        else:
            lacking = [key for key, p in params.items() if p in own and self.train_point not in own[p]]
            if lacking:
                raise ValueError(
                    f"the state dict was saved in eval mode but holds no training point ('{self.state_prefix}."
                    f"{self.train_point}') for parameter {lacking[0]!r}, so training could not continue. "
                    f"(torch.distributed.checkpoint loads only the entries that a fresh optimizer has: call train() "
                    f"before saving with it.)"
                )

    def _check_inner_param_state(self, key: Any, param: torch.Tensor, saved: Mapping[Any, Any]) -> None:
        """Refuse inner state that no optimizer keeps (strings, objects), and tensors whose shape differs from the
        state the inner optimizer already has for ``param`` (or, for optimizers whose state is elementwise, from the
        parameter's shape)."""
        current = self.inner.state.get(param, {}) if not isinstance(self.inner, Wrapper) else {}
        elementwise = self._inner_state_is_elementwise
        for name, value in saved.items():
            if not _plain_state_value(value):
                raise ValueError(
                    f"state of parameter {key!r}: {name!r} is a {type(value).__name__}, which no optimizer keeps"
                )
            if elementwise and not (value is None or isinstance(value, torch.Tensor)):
                raise ValueError(
                    f"state of parameter {key!r}: {name!r} is {checks.show(value)}, where "
                    f"{type(self.inner).__name__} keeps a tensor"
                )
            if (
                elementwise
                and name == "step"
                and not (
                    isinstance(value, torch.Tensor)
                    and value.numel() == 1
                    and math.isfinite(value.item())
                    and value >= 0
                )
            ):
                raise ValueError(f"state of parameter {key!r}: 'step' must be a count >= 0, got {checks.show(value)}")
            if elementwise and isinstance(value, torch.Tensor) and value.numel() > 1 and value.shape != param.shape:
                raise ValueError(
                    f"state of parameter {key!r}: {name!r} has shape {tuple(value.shape)}, the parameter "
                    f"{tuple(param.shape)}: {type(self.inner).__name__} keeps its state elementwise"
                )
            now = current.get(name)
            if isinstance(now, torch.Tensor) and (not isinstance(value, torch.Tensor) or value.shape != now.shape):
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(
                    f"state of parameter {key!r}: {name!r} is {shape}, where {type(self.inner).__name__} keeps a "
                    f"tensor of shape {tuple(now.shape)}"
                )

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

    def _load_param_state(self, i: Any, param: torch.Tensor, saved: dict[str, Any]) -> dict[str, torch.Tensor]:
        dtypes = self._state_dtypes(param)
        loaded = {}
        for name, value in saved.items():
            where = f"state of parameter {i!r}: '{self.state_prefix}.{name}'"
            if name not in dtypes:
                raise ValueError(f"{where} is not state that {type(self).__name__} keeps ({sorted(dtypes)})")
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                raise ValueError(f"{where} must be a floating-point tensor, got {type(value).__name__}")
            if value.shape != param.shape:
                raise ValueError(f"{where} has shape {tuple(value.shape)}, the parameter {tuple(param.shape)}")
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"{where} holds NaN or infinite values: the run had diverged when it was saved")
            loaded[name] = self._new_state(param, value, dtypes[name])
        required = self.required_state if self.required_state is not None else (self.evaluation_key,)
        lacking = [name for name in required if name not in loaded]
        if lacking:
            raise ValueError(
                f"state of parameter {i!r} has {', '.join(f'{self.state_prefix}.{n}' for n in sorted(loaded))} but "
                f"not '{self.state_prefix}.{lacking[0]}', which {type(self).__name__} keeps for every parameter"
            )
        return loaded

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
    """Base of the wrappers whose parameters hold a lookahead point (EMA-Nesterov, Nesterov): each keeps the real
    iterate (``"iterate"``, what ``eval()`` puts in) and one direction tensor (``state_names[1]``, zero at the
    first step), and after each inner step updates both and the lookahead point from coefficients of the *next*
    step. A subclass names its state and implements :meth:`_coefficients` and :meth:`_update`."""

    holds_lookahead = True
    evaluation_key = "iterate"
    train_point = "lookahead_point"

    @property
    def required_state(self) -> tuple[str, ...]:  # type: ignore[override]
        return self.state_names

    def _init_param_state(self, param: torch.Tensor, group: dict[str, Any]) -> dict[str, torch.Tensor]:
        iterate = self._new_state(param, param, state_dtype(param))  # the real iterate starts at the parameter
        return {"iterate": iterate, self.state_names[1]: torch.zeros_like(iterate)}  # and no lookahead yet

    def _coefficients(self, group: dict[str, Any], n: int) -> dict[str, float]:
        """The keyword arguments of :meth:`_update` for ``group`` when the next gradient is that of step ``n``."""
        raise NotImplementedError

    def _update(
        self, params: list[torch.Tensor], iterates: list[torch.Tensor], directions: list[torch.Tensor], **kwargs: float
    ) -> None:
        """The update of one bucket of tensors that share device and dtype (a foreach kernel)."""
        raise NotImplementedError

    def _after_inner_step(self) -> None:
        # a parameter with no gradient was not moved by the inner step: its state and lookahead point stay
        next_step = self._inner_steps + 1
        direction = self.state_names[1]
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None and p in self.state]
            if not params:
                continue
            coefficients = self._coefficients(group, next_step)
            for bucket, states in bucket_by_device_and_dtype(params, self.state, "iterate"):
                self._update(bucket, [st["iterate"] for st in states], [st[direction] for st in states], **coefficients)
