"""snoo: SNOO (Step-K Nesterov Outer Optimizer) and its relatives as drop-in ``torch.optim`` optimizers.

Every public name is imported on first use (``snoo.SNOO``, ``from snoo import SNOO``), so ``import snoo`` itself
takes no time and the ``snoo`` command answers Ctrl-C with one line even while torch loads. ``snoo.distributed`` and
``snoo.checkpoint`` (``torch.distributed``'s tensors and checkpoints), ``snoo.integrations.hf`` and
``snoo.integrations.lightning`` (their frameworks) and ``snoo.spec`` are modules of their own.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from snoo import checkpoint, checks, distributed, schedules, spec
    from snoo import integrations as integrations
    from snoo.optim.combined import MuonAdamW
    from snoo.optim.ema_nesterov import EMANesterov
    from snoo.optim.gpa import GPA
    from snoo.optim.groups import param_groups
    from snoo.optim.nesterov import Nesterov
    from snoo.optim.scale import SCALE
    from snoo.optim.sgd_ll import SGDLL
    from snoo.optim.snoo import SNOO, Lookahead

#: Submodules imported on first access as ``snoo.<name>``.
_LAZY = {name: f"snoo.{name}" for name in ("checkpoint", "checks", "distributed", "integrations", "spec")}
_LAZY["schedules"] = "snoo.optim.schedules"
#: Classes and functions imported on first access, with their modules.
_NAMES = {
    "MuonAdamW": "snoo.optim.combined",
    "EMANesterov": "snoo.optim.ema_nesterov",
    "GPA": "snoo.optim.gpa",
    "param_groups": "snoo.optim.groups",
    "Nesterov": "snoo.optim.nesterov",
    "SCALE": "snoo.optim.scale",
    "SGDLL": "snoo.optim.sgd_ll",
    "SNOO": "snoo.optim.snoo",
    "Lookahead": "snoo.optim.snoo",
}

__all__ = [
    "GPA",
    "SCALE",
    "SGDLL",
    "SNOO",
    "EMANesterov",
    "Lookahead",
    "MuonAdamW",
    "Nesterov",
    "checkpoint",
    "checks",
    "distributed",
    "param_groups",
    "schedules",
    "spec",
]
__version__ = "0.1.0.dev0"


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return importlib.import_module(_LAZY[name])
    if name in _NAMES:
        value = getattr(importlib.import_module(_NAMES[name]), name)
        globals()[name] = value  # once
        return value
    raise AttributeError(f"module 'snoo' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, *_NAMES})
