"""Glue for training frameworks: Hugging Face Trainer and Accelerate, Lightning, config-driven trainers, torchft.

Each submodule imports its framework lazily, so ``import snoo`` never needs them; ``snoo.integrations.hf``,
``snoo.integrations.lightning``, ``snoo.integrations.config`` and ``snoo.integrations.torchft`` are imported on first
access.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from snoo.integrations import config, hf, lightning, torchft

_LAZY = ("config", "hf", "lightning", "torchft")
__all__ = ["config", "hf", "lightning", "torchft"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return importlib.import_module(f"snoo.integrations.{name}")
    raise AttributeError(f"module 'snoo.integrations' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
