"""Averaging pseudo-gradients over a process group (DiLoCo), and what sharded parameters need.

The public face of :mod:`snoo.optim.collectives` (the averaging), :mod:`snoo.optim.compression` (low-bit
pseudo-gradients) and :mod:`snoo.optim.tensors` (DTensor-aware helpers). It sits above the optimizers and imports
from them only, so the optimizers never import this module. :class:`snoo.SNOO` averages its pseudo-gradients with
:func:`all_reduce_mean_` (or :func:`start_all_reduce_mean`, streaming) when built with ``process_group=``.
"""

from __future__ import annotations

from typing import Any

from snoo.optim.collectives import BUCKET_BYTES, all_reduce_mean_, check_process_group, start_all_reduce_mean
from snoo.optim.tensors import foreach_copy_, is_dtensor, local

__all__ = [
    "BUCKET_BYTES",
    "all_reduce_mean_",
    "check_process_group",
    "foreach_copy_",
    "is_dtensor",
    "local",
    "start_all_reduce_mean",
]


def __getattr__(name: str) -> Any:
    # moved to snoo.checkpoint, which sits above the wrappers and can ask them where their evaluation weights are
    if name == "load_evaluation_weights":
        from snoo.checkpoint import load_evaluation_weights

        return load_evaluation_weights
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
