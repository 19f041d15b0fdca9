"""What an optimizer of this package says about itself, once, in its own class.

A class that sets :attr:`Declared.spec_name` is a name of the SPEC grammar (:mod:`snoo.spec`) from the moment it is
defined: the grammar reads its keys and defaults from its constructor, checks a SPEC's values against its
:attr:`~Declared.hyperparameter_ranges`, the lab's ``--tune N`` gives it the first N of its
:attr:`~Declared.tuning_trials`, and plots label its knobs with :attr:`~Declared.knob_labels`. A wrapper
(:class:`snoo.optim.wrapper.Wrapper`) is built around the optimizer of the stage after it; any other declared class
is a base optimizer, built over ``snoo.param_groups(model)`` (the roles SCALE, SGD-LL and Muon+AdamW need).

Adding an optimizer to the lab is therefore one file: a class with these four declarations (docs/wrappers.md).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, ClassVar

from snoo import checks

#: A trial of ``--tune``: (the base optimizer's lr as a multiple of its default, this optimizer's own knobs).
Trial = tuple[float, dict[str, float]]
#: The trials of an optimizer that declares no others: its lr, doubled and halved in turn (the lab's ``--tune N``
#: takes the first N).
LR_TRIALS: tuple[Trial, ...] = tuple((f, {}) for f in (1.0, 2.0, 0.5, 4.0, 0.25, 8.0))

#: Every class defined so far that declares a ``spec_name``, by that name, in the order they were defined.
DECLARED: dict[str, type[Declared]] = {}

_SPEC_NAME = re.compile(r"[a-z][a-z0-9_]*")


class Declared:
    """The declarations an optimizer class makes about itself; a mixin of ``torch.optim.Optimizer`` subclasses."""

    #: The name a SPEC gives this optimizer (lower case, ``[a-z][a-z0-9_]*``; ``ema_nesterov`` may be written
    #: ``ema-nesterov``). ``None``: not a name of the grammar (a base class, or a subclass that adds no algorithm).
    #: Read from the class's own body only, so a subclass does not take its parent's name.
    spec_name: ClassVar[str | None] = None
    #: The range of each numeric argument of the constructor: what the constructor checks, and what
    #: :mod:`snoo.spec` checks a SPEC against before building anything.
    hyperparameter_ranges: ClassVar[Mapping[str, checks.Range]] = {}
    #: What ``snoo compare --tune N`` tries, in order (the first N): the same budget for every contender, each on its
    #: own knobs. Declare the package defaults first, then the base lr both ways, then other published settings.
    tuning_trials: ClassVar[tuple[Trial, ...]] = LR_TRIALS
    #: How a plot names a knob of this optimizer when the SPEC's short key would mislead (SNOO's ``lr`` is its outer
    #: lr); a key not listed is labelled ``"<spec_name> <key>"``.
    knob_labels: ClassVar[Mapping[str, str]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("spec_name")
        if name is None:
            return
        if not isinstance(name, str) or not _SPEC_NAME.fullmatch(name):
            raise ValueError(f"{cls.__qualname__}.spec_name must be lower case [a-z][a-z0-9_]*, got {name!r}")
        taken = DECLARED.get(name)
        if taken is not None and (taken.__module__, taken.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(
                f"{cls.__qualname__}.spec_name {name!r} is declared by {taken.__module__}.{taken.__qualname__} "
                f"already: choose another name"
            )
        DECLARED[name] = cls  # a class defined again (a module reloaded) replaces its earlier self
