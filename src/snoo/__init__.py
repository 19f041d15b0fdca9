"""snoo: SNOO (Step-K Nesterov Outer Optimizer) and its relatives as drop-in ``torch.optim`` optimizers.

``import snoo`` loads the optimizers only. The submodules that need more (``snoo.distributed``, ``snoo.checkpoint``:
``torch.distributed``'s tensors and checkpoints; ``snoo.integrations.hf`` and ``snoo.integrations.lightning``: their
frameworks) and ``snoo.spec`` are imported on first use, so ``snoo.spec.build(...)`` works after ``import snoo``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from snoo import checks
from snoo.optim import schedules
from snoo.optim.combined import MuonAdamW
from snoo.optim.ema_nesterov import EMANesterov
from snoo.optim.gpa import GPA
from snoo.optim.groups import param_groups
from snoo.optim.nesterov import Nesterov
from snoo.optim.scale import SCALE
from snoo.optim.sgd_ll import SGDLL
from snoo.optim.snoo import SNOO, Lookahead

if TYPE_CHECKING:
    from snoo import checkpoint, distributed, spec
    from snoo import integrations as integrations

#: Submodules imported on first access as ``snoo.<name>``.
_LAZY = ("checkpoint", "distributed", "integrations", "spec")

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
        return importlib.import_module(f"snoo.{name}")
    raise AttributeError(f"module 'snoo' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
