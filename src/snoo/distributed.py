"""Averaging pseudo-gradients over a process group (DiLoCo), and what sharded parameters need.

SNOO's outer step is elementwise, so under DDP (replicated parameters) and FSDP2 (DTensor parameters, each rank
holding a shard) it runs on each rank's local tensors with no communication at all. Only DiLoCo, where each rank
takes its own K inner steps on its own data, communicates: once per outer step the ranks average their
pseudo-gradients. :func:`all_reduce_mean_` does that in few, large collectives; :class:`snoo.SNOO` calls it when
built with ``process_group=``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from snoo.optim.tensors import foreach_copy_, is_dtensor, local

__all__ = ["BUCKET_BYTES", "all_reduce_mean_", "check_process_group", "foreach_copy_", "is_dtensor", "local"]

#: Largest flat buffer one all-reduce sends; larger sets of tensors are sent in several buckets of about this size,
#: so the temporary buffer stays small next to the model.
BUCKET_BYTES = 256 * 2**20


def check_process_group(process_group: dist.ProcessGroup | None) -> None:
    """Raise a clear error unless ``process_group`` is None or a group of an initialised ``torch.distributed``."""
    if process_group is None:
        return
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "process_group was given but torch.distributed is not initialised: call "
            "torch.distributed.init_process_group(...) first (torchrun sets up the environment it reads)"
        )
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            f"process_group must be a torch.distributed.ProcessGroup (e.g. torch.distributed.group.WORLD or "
            f"torch.distributed.new_group(...)), got {type(process_group).__name__}"
        )


def all_reduce_mean_(
    tensors: list[torch.Tensor],
    process_group: dist.ProcessGroup,
    *,
    reduce_dtype: torch.dtype | None = None,
    what: str = "tensors",
) -> int:
    """Replace each tensor by its mean over the ranks of ``process_group``; return the bytes this rank sent in.

    Every rank must pass tensors of the same shapes, dtypes and order. They are copied into flat buffers (one per
    dtype, split at :data:`BUCKET_BYTES`), cast to ``reduce_dtype`` when given (``torch.bfloat16`` halves the bytes
    of float32 tensors and rounds them to 8 bits of mantissa), summed with one ``all_reduce`` per buffer, and copied
    back divided by the number of ranks. DTensors are reduced through their local shards.

    A failed collective (a rank died, or did not arrive within the group's timeout) raises a ``RuntimeError`` that
    says which collective failed, chained to the backend's error.
    """
    world = dist.get_world_size(process_group)
    sent = 0
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(local(t))
    for dtype, group in by_dtype.items():
        wire = reduce_dtype or dtype
        for bucket in _buckets(group, wire.itemsize):
            flat = torch.cat([t.reshape(-1).to(wire) for t in bucket])
            try:
                dist.all_reduce(flat, group=process_group)
            except Exception as e:  # the backends raise RuntimeError subclasses, or their own errors
                raise RuntimeError(
                    f"averaging {what} over {world} ranks failed ({type(e).__name__}): a rank probably died or did "
                    f"not reach the same step within the process group's timeout. Stop every rank and resume from "
                    f"the last checkpoint with a fresh launch."
                ) from e
            sent += flat.numel() * flat.element_size()
            views = torch.split(flat, [t.numel() for t in bucket])
            torch._foreach_copy_(bucket, [v.view(t.shape) for v, t in zip(views, bucket)])
            torch._foreach_div_(bucket, world)
    return sent


def _buckets(tensors: list[torch.Tensor], itemsize: int) -> list[list[torch.Tensor]]:
    out: list[list[torch.Tensor]] = [[]]
    size = 0
    for t in tensors:
        if out[-1] and size + t.numel() * itemsize > BUCKET_BYTES:
            out.append([])
            size = 0
        out[-1].append(t)
        size += t.numel() * itemsize
    return [b for b in out if b]


def __getattr__(name: str) -> Any:
    # moved to snoo.checkpoint, which sits above the wrappers and can ask them where their evaluation weights are
    if name == "load_evaluation_weights":
        from snoo.checkpoint import load_evaluation_weights

        return load_evaluation_weights
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
