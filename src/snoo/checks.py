"""The one way this package checks a number a user gave: a real number (not a bool), finite, in a range.

Every constructor, schedule and SPEC of the package checks its numbers here, so the same mistake gets the same
message wherever it is made: ``"<owner>: <name> must be <range>, got <value>"``. A value of the wrong type is a
:class:`NotANumberError` (a ``TypeError`` and a ``ValueError`` both); a number outside its range (NaN and infinities
included) is a ``ValueError``.

This module imports nothing from the package (it is the bottom floor, like :mod:`snoo.distributed`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["NotANumberError", "Range", "flag", "integer", "is_number", "number", "pair", "show"]


class NotANumberError(TypeError, ValueError):
    """A value of the wrong kind where a number (or an int, or a bool) belongs: a ``TypeError``, and a ``ValueError``
    too, so that code catching either of the two (``spec.build``, a trainer's config check) sees it."""


def is_number(value: Any) -> bool:
    """A real number (an int or a float, not a bool): what a coefficient is when it is not a schedule."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class Range:
    """An interval of the real line: ``low`` and ``high`` (``None``: unbounded), each end open or closed.

    ``str(Range(0, 1, high_open=True))`` is ``"in [0, 1)"``, the words an error message uses.
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return not (self.high is not None and (value > self.high or (self.high_open and value == self.high)))

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{_g(self.low)}, {_g(self.high)}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {_g(self.low)}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {_g(self.high)}"
        return "finite"


def _g(x: float) -> str:
    return f"{x:g}"


#: Ranges that many hyperparameters share.
POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
UNIT = Range(0, 1, high_open=True)  # a momentum or EMA coefficient: [0, 1)
ANY = Range()


def show(value: Any) -> str:
    """``value`` for an error message: one line, at most about 80 characters (a tensor by its shape and dtype)."""
    if type(value).__name__ in ("Tensor", "Parameter", "DTensor"):
        return f"a tensor of shape {tuple(value.shape)} ({str(value.dtype).removeprefix('torch.')})"
    text = " ".join(repr(value).split())
    return text if len(text) <= 80 else text[:77] + "..."


def _prefix(owner: str) -> str:
    return f"{owner}: " if owner else ""


def number(value: Any, name: str, within: Range = ANY, *, owner: str = "", where: str = "") -> float:
    """``value`` as a float, after checking that it is a real number (:class:`NotANumberError` otherwise) and finite and
    ``within`` the range (``ValueError`` otherwise). ``owner`` and ``where`` (e.g. ``" (at step 3)"``) go into the
    message."""
    if not is_number(value):
        raise NotANumberError(f"{_prefix(owner)}{name} must be a real number {within}, got {show(value)}{where}")
    value = float(value)
    if value not in within:
        raise ValueError(f"{_prefix(owner)}{name} must be a finite number {within}, got {show(value)}{where}")
    return value


def integer(value: Any, name: str, within: Range = ANY, *, owner: str = "", where: str = "") -> int:
    """``value`` after checking that it is an int (not a bool; :class:`NotANumberError` otherwise) ``within`` the range
    (``ValueError`` otherwise)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise NotANumberError(f"{_prefix(owner)}{name} must be an int {within}, got {show(value)}{where}")
    if value not in within:
        raise ValueError(f"{_prefix(owner)}{name} must be an int {within}, got {show(value)}{where}")
    return value


def flag(value: Any, name: str, *, owner: str = "") -> bool:
    """``value`` after checking that it is a bool (:class:`NotANumberError` otherwise)."""
    if not isinstance(value, bool):
        raise NotANumberError(f"{_prefix(owner)}{name} must be a bool, got {show(value)}")
    return value


def pair(value: Any, name: str, within: Range = ANY, *, owner: str = "") -> tuple[float, float]:
    """A pair of numbers such as Adam's ``betas``, each checked like :func:`number` (``name[0]``, ``name[1]``)."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise NotANumberError(f"{_prefix(owner)}{name} must be a pair of numbers {within}, got {show(value)}")
    return (
        number(value[0], f"{name}[0]", within, owner=owner),
        number(value[1], f"{name}[1]", within, owner=owner),
    )
