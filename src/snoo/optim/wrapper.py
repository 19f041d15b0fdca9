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

from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar

import torch
from torch.optim import Optimizer

from snoo.distributed import foreach_copy_, is_dtensor

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


class Wrapper(Optimizer):
    """Base class of the optimizers that wrap another optimizer. Subclasses set :attr:`state_prefix` and implement
    :meth:`_init_param_state`, :meth:`_after_inner_step` and :meth:`_evaluation_weights`."""

    #: Prefix of this wrapper's keys in ``state_dict()``; two wrappers with the same prefix cannot be stacked.
    state_prefix: ClassVar[str]
    #: Name under which ``eval()`` keeps the training point of each parameter while the evaluation weights are in.
    train_point: ClassVar[str] = "fast"
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
        # checked before any group is touched, so that a refused wrapper leaves the inner optimizer as it was
        self._check_group(defaults)
        self.inner = inner
        self.training = True
        self.state_device = None if state_device is None else torch.device(state_device)
        self._own_defaults = dict(defaults)
        self._inner_steps = 0
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

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not any(param_group is g for g in self.inner.param_groups):
            self.inner.add_param_group(param_group)
            param_group = self.inner.param_groups[-1]
        for name, default in self._own_defaults.items():
            param_group.setdefault(name, default)
        self._check_group(param_group)

    def _check_group(self, group: dict[str, Any]) -> None:
        """Raise ValueError for a group whose wrapper hyperparameters are out of range."""

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
    @torch.compiler.disable
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Take one step of the inner optimizer (with ``closure`` if given), then this wrapper's own update."""
        if not self.training:
            raise RuntimeError(
                f"{type(self).__name__}.step() was called in eval mode: the parameters hold the evaluation "
                f"weights. Call .train() before training again."
            )
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    if p.requires_grad and p not in self.state:
                        self.state[p] = self._init_param_state(p, group)
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
        """The weights ``eval()`` puts into ``param``."""
        raise NotImplementedError

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
        extend it."""
        return {"inner_steps": self._inner_steps, "training": self.training}

    def _group_extra_state(self, params: list[torch.Tensor]) -> dict[str, Any]:
        """What a group with these parameters saves beside :meth:`_extra_state`; subclasses extend it."""
        return {}

    def _load_extra_state(self, extras: list[dict[str, Any]], groups: list[list[torch.Tensor]]) -> Callable[[], None]:
        """Validate the saved entries of each group (from :meth:`_extra_state` and :meth:`_group_extra_state`) and
        return a function that applies them. ``groups`` holds this optimizer's parameters of each group."""
        extra = extras[0]
        for name, kind in (("inner_steps", int), ("training", bool)):
            if not isinstance(extra.get(name), kind):
                raise ValueError(f"param_groups[0]['{self.state_prefix}']['{name}'] must be a {kind.__name__}")
            if any(e.get(name) != extra[name] for e in extras):
                raise ValueError(f"the parameter groups of the state dict disagree on '{self.state_prefix}.{name}'")

        def apply() -> None:
            self._inner_steps = extra["inner_steps"]
            self.training = extra["training"]

        return apply

    def _state_dtypes(self, param: torch.Tensor) -> dict[str, torch.dtype]:
        """The per-parameter state tensors this wrapper may hold for ``param``, with their dtypes."""
        return {self.train_point: param.dtype}

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
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        name = type(self).__name__
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= state_dict.keys():
            raise ValueError(f"{name}.load_state_dict expects a dict from {name}.state_dict()")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"the state dict has {len(saved_groups)} parameter groups, this optimizer has {len(self.param_groups)}"
            )
        if not all(isinstance(saved.get(self.state_prefix), dict) for saved in saved_groups):
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
        schedules = self._schedules_to_keep(saved_groups)
        # saved ids (positions, or names under torch.distributed.checkpoint) -> parameters, like torch's optimizers
        params = dict(
            zip(
                (i for saved in saved_groups for i in saved["params"]),
                (p for group in self.param_groups for p in group["params"]),
            )
        )
        prefix = self.state_prefix + "."
        inner_state: dict[Any, dict[str, Any]] = {}
        own: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
        for key, entry in state_dict["state"].items():
            if key not in params:
                raise ValueError(f"the state dict has state for parameter {key!r}, which none of its groups lists")
            rest = {k: v for k, v in entry.items() if not k.startswith(prefix)}
            if rest:
                inner_state[key] = rest
            mine = {k[len(prefix) :]: v for k, v in entry.items() if k.startswith(prefix)}
            if mine:
                own[params[key]] = self._load_param_state(key, params[key], mine)
        apply_extra = self._load_extra_state(
            [saved[self.state_prefix] for saved in saved_groups], [group["params"] for group in self.param_groups]
        )
        if not saved_groups[0][self.state_prefix]["training"]:
            lacking = [key for key, p in params.items() if p in own and self.train_point not in own[p]]
            if lacking:
                raise ValueError(
                    f"the state dict was saved in eval mode but holds no training point ('{self.state_prefix}."
                    f"{self.train_point}') for parameter {lacking[0]!r}, so training could not continue. "
                    f"(torch.distributed.checkpoint loads only the entries that a fresh optimizer has: call train() "
                    f"before saving with it.)"
                )
        inner_groups = [{k: v for k, v in saved.items() if k != self.state_prefix} for saved in saved_groups]
        self.inner.load_state_dict({**state_dict, "state": inner_state, "param_groups": inner_groups})
        for group, kept in zip(self.param_groups, schedules):
            group.update(kept)
        self.state = defaultdict(dict, own)
        apply_extra()
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

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
            loaded[name] = self._new_state(param, value, dtypes[name])
        return loaded

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim.Optimizer pickles only defaults, state and param_groups; a wrapper also needs its inner.
        return dict(self.__dict__)

    def __repr__(self) -> str:
        own = ", ".join(f"{k}={v}" for k, v in self._own_defaults.items())
        return f"{type(self).__name__}({own})\n  around " + repr(self.inner).replace("\n", "\n  ")
