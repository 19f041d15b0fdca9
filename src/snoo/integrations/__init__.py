"""Glue for training frameworks: Hugging Face Trainer and Accelerate, Lightning, config-driven trainers.

Each submodule imports its framework lazily, so ``import snoo`` never needs them; ``snoo.integrations.hf``,
``snoo.integrations.lightning`` and ``snoo.integrations.config`` are imported on first access.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from snoo.integrations import config, hf, lightning

_LAZY = ("config", "hf", "lightning")
__all__ = ["config", "hf", "lightning"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return importlib.import_module(f"snoo.integrations.{name}")
    raise AttributeError(f"module 'snoo.integrations' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
