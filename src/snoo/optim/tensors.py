"""Tensor helpers the wrappers share: the dtype and device their state lives in, runs of tensors that one foreach
kernel can take, and copies that are aware of sharded (DTensor) parameters without importing DTensor.

``torch.distributed.tensor`` takes seconds to import; a tensor can only be a DTensor once something imported it, so
:func:`is_dtensor` looks the class up in ``sys.modules`` and ``import snoo`` stays cheap. :mod:`snoo.distributed`
re-exports these under its own name.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from typing import Any

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


LOW_PRECISION = (torch.float16, torch.bfloat16)


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


def check_state_device(state_device: Any) -> torch.device | None:
    """``state_device`` as a ``torch.device`` (``None`` stays ``None``), refused with a message naming the argument
    when it is no device this process can hold tensors on, or the meta device (which holds no data)."""
    if state_device is None:
        return None
    try:
        device = torch.device(state_device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ValueError(
            f"state_device must be None, 'cpu' or another device name such as 'cuda:0', got {state_device!r} ({e})"
        ) from None
    if device.type == "meta":
        raise ValueError(
            "state_device='meta' holds no data, so the wrapper's state (slow weights, momentum, ...) could not be "
            "kept there: use None (beside each parameter) or 'cpu' (host memory)"
        )
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"state_device={state_device!r} cannot hold tensors in this process: {first}") from None
    return device
