"""Tensor helpers the wrappers share, aware of sharded (DTensor) parameters without importing DTensor.

``torch.distributed.tensor`` takes seconds to import; a tensor can only be a DTensor once something imported it, so
:func:`is_dtensor` looks the class up in ``sys.modules`` and ``import snoo`` stays cheap. :mod:`snoo.distributed`
re-exports these under its own name.
"""

from __future__ import annotations

import sys

import torch


def is_dtensor(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (a parameter sharded by ``fully_shard``, or any tensor over a device mesh)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The part of ``tensor`` this rank holds: the local shard of a DTensor, else the tensor itself."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def foreach_copy_(dst: list[torch.Tensor], src: list[torch.Tensor], non_blocking: bool = False) -> None:
    """``torch._foreach_copy_`` that also takes DTensors sharded alike (DTensor has no rule for it): the copy is
    elementwise, so it runs shard by shard."""
    torch._foreach_copy_([local(t) for t in dst], [local(t) for t in src], non_blocking=non_blocking)
