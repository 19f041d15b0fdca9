"""Random-access schedules: plain callables ``n -> value`` of the training step.

Every coefficient of this package that may change during training (EMA-Nesterov's ``beta``, Nesterov's
``momentum``, SNOO's outer ``lr`` and ``momentum``) takes either a number or a function of the step. Steps are counted
from 1: ``n`` is the number of the ``step()`` call the value is for. A schedule is *random-access*: the wrappers ask
for the value of step ``n + 1`` right after step ``n`` (the Nesterov lookahead for the next gradient needs the next
coefficient), and a checkpoint needs no schedule state, because the value depends on ``n`` alone.

The schedules here are small frozen objects (readable ``repr``, picklable, comparable); any callable ``n -> float``
works as well. Schedules are not saved in ``state_dict()``: pass the same one again when building the optimizer that
resumes a run (like ``torch.optim.lr_scheduler.LambdaLR``'s functions).

``follow_lr`` is the one that is not random-access: it reads a learning rate that something else moves.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from torch.optim import Optimizer

from snoo import checks
from snoo.checks import NON_NEGATIVE, POSITIVE, is_number

#: A hyperparameter that is either a number or a random-access schedule ``n -> value``.
Coefficient = float | Callable[[int], float]


def value_at(coefficient: Coefficient, n: int) -> float:
    """The value of ``coefficient`` (a number or a schedule) at step ``n``."""
    return float(coefficient(n)) if callable(coefficient) else float(coefficient)


__all__ = [
    "Coefficient",
    "constant",
    "cosine",
    "follow_lr",
    "is_number",
    "linear_warmup",
    "lr_lambda",
    "lr_ratio",
    "value_at",
    "warmup_stable_decay",
]


def _check_steps(name: str, steps: Any, allow_zero: bool = False) -> None:
    checks.integer(steps, name, NON_NEGATIVE if allow_zero else POSITIVE)


def _check_value(name: str, value: Any) -> float:
    return checks.number(value, name)


class _Schedule:
    """Base of the schedules here: a frozen dataclass whose ``repr`` reads like the call that built it."""

    name: str = ""

    def __call__(self, n: int) -> float:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self))  # type: ignore[arg-type]
        return f"schedules.{self.name}({args})"


@dataclasses.dataclass(frozen=True, repr=False)
class _Constant(_Schedule):
    value: float
    name = "constant"

    def __call__(self, n: int) -> float:
        return self.value


@dataclasses.dataclass(frozen=True, repr=False)
class _LinearWarmup(_Schedule):
    start: float
    end: float
    steps: int
    name = "linear_warmup"

    def __call__(self, n: int) -> float:
        return self.start + (self.end - self.start) * (min(max(n, 0), self.steps) / self.steps)


@dataclasses.dataclass(frozen=True, repr=False)
class _Cosine(_Schedule):
    start: float
    end: float
    steps: int
    name = "cosine"

    def __call__(self, n: int) -> float:
        progress = min(max(n, 0), self.steps) / self.steps
        return self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclasses.dataclass(frozen=True, repr=False)
class _WarmupStableDecay(_Schedule):
    peak: float
    warmup_steps: int
    decay_steps: int
    total_steps: int
    start: float
    end: float
    name = "warmup_stable_decay"

    def __call__(self, n: int) -> float:
        decay_from = self.total_steps - self.decay_steps
        if n < self.warmup_steps:
            return self.start + (self.peak - self.start) * (max(n, 0) / self.warmup_steps)
        if n <= decay_from:
            return self.peak
        if self.decay_steps == 0:
            return self.end
        return self.peak + (self.end - self.peak) * (min(n - decay_from, self.decay_steps) / self.decay_steps)


@dataclasses.dataclass(frozen=True, repr=False)
class _FollowLR(_Schedule):
    optimizer: Optimizer
    group: int
    peak: float | None
    name = "follow_lr"

    def __call__(self, n: int) -> float:
        return lr_ratio(self.optimizer.param_groups[self.group], self.peak)

    def __repr__(self) -> str:
        return f"schedules.follow_lr({type(self.optimizer).__name__}, group={self.group}, peak={self.peak!r})"


def constant(value: float) -> Callable[[int], float]:
    """``n -> value``."""
    return _Constant(_check_value("value", value))


def linear_warmup(start: float, end: float, steps: int) -> Callable[[int], float]:
    """From ``start`` (at step 0) to ``end`` at step ``steps`` in equal increments, then ``end``.

    Step 1 already takes the first increment: ``linear_warmup(0.0, 0.9, steps=500)(1) == 0.9 / 500``.
    """
    _check_steps("steps", steps)
    return _LinearWarmup(_check_value("start", start), _check_value("end", end), steps)


def cosine(start: float, end: float, steps: int) -> Callable[[int], float]:
    """Half a cosine from ``start`` (at step 0) to ``end`` at step ``steps``, then ``end``."""
    _check_steps("steps", steps)
    return _Cosine(_check_value("start", start), _check_value("end", end), steps)


def warmup_stable_decay(
    peak: float,
    warmup_steps: int,
    decay_steps: int,
    total_steps: int,
    *,
    start: float = 0.0,
    end: float = 0.0,
) -> Callable[[int], float]:
    """Warm-up-stable-decay: linear from ``start`` (step 0) to ``peak`` at step ``warmup_steps``, ``peak`` until step
    ``total_steps - decay_steps``, then linear to ``end`` at step ``total_steps`` (and ``end`` after it)."""
    _check_steps("warmup_steps", warmup_steps, allow_zero=True)
    _check_steps("decay_steps", decay_steps, allow_zero=True)
    _check_steps("total_steps", total_steps)
    if warmup_steps + decay_steps > total_steps:
        raise ValueError(
            f"warmup_steps + decay_steps ({warmup_steps} + {decay_steps}) must be at most total_steps ({total_steps})"
        )
    return _WarmupStableDecay(
        _check_value("peak", peak),
        warmup_steps,
        decay_steps,
        total_steps,
        _check_value("start", start),
        _check_value("end", end),
    )


def follow_lr(optimizer: Optimizer, group: int = 0, peak: float | None = None) -> Callable[[int], float]:
    """``n -> lr / peak`` of ``optimizer.param_groups[group]``, whatever moves that lr (a torch LR scheduler, a
    hand-written loop).

    Not random-access: it reads the lr the group holds when it is called, whatever ``n`` is. The wrappers ask for the
    value of step ``n + 1`` right after step ``n``; with the usual ``optimizer.step(); scheduler.step()`` order the
    group then still holds the lr of step ``n``, so the value lags one step behind the lr (negligible for smooth
    schedules). For the exact value, write the lr as a schedule here, drive the optimizer with it through
    :func:`lr_lambda`, and use ``lambda n: c * schedule(n)`` as the coefficient.

    ``peak``: the lr that counts as 1. ``None``: the group's ``"max_lr"`` (set by ``OneCycleLR``), else its
    ``"initial_lr"`` (set by every torch LR scheduler to the base lr), else an error at the first call.
    """
    if isinstance(group, bool) or not isinstance(group, int) or not 0 <= group < len(optimizer.param_groups):
        raise ValueError(f"group must be the position of one of the optimizer's {len(optimizer.param_groups)} groups")
    return _FollowLR(optimizer, group, None if peak is None else checks.number(peak, "peak", POSITIVE))


def lr_ratio(group: dict[str, Any], peak: float | None = None) -> float:
    """The group's current lr divided by ``peak`` (by default the group's ``"max_lr"`` or ``"initial_lr"``)."""
    if peak is None:
        peak = group.get("max_lr", group.get("initial_lr"))
        if peak is None:
            raise ValueError(
                "the lr's peak is unknown: this group has neither 'max_lr' nor 'initial_lr' (which torch LR "
                "schedulers record when they are built). Pass the peak lr explicitly"
            )
    return float(group["lr"]) / float(peak)


def lr_lambda(schedule: Callable[[int], float]) -> Callable[[int], float]:
    """``schedule`` as an ``lr_lambda`` for ``torch.optim.lr_scheduler.LambdaLR``, on this package's step clock.

    ``LambdaLR`` calls its function with 0 for the first step; this one returns ``schedule(1)`` then, so the lr of
    step ``n`` is ``base_lr * schedule(n)``, the same clock as every coefficient here. A plain function, so that
    ``LambdaLR.state_dict()`` does not try to save it.
    """
    if not callable(schedule):
        raise TypeError(f"schedule must be a callable n -> value, got {schedule!r}")

    def multiplier(last_epoch: int) -> float:
        return schedule(last_epoch + 1)

    return multiplier
