"""Averaging tensors over a process group (DiLoCo's pseudo-gradients), in few, large collectives.

SNOO's outer step is elementwise, so under DDP (replicated parameters) and FSDP2 (DTensor parameters, each rank
holding a shard) it runs on each rank's local tensors with no communication at all. Only DiLoCo, where each rank
takes its own K inner steps on its own data, communicates: once per outer step (per fragment, when streaming) the
ranks average their pseudo-gradients. :func:`start_all_reduce_mean` starts that without waiting (so inner steps can
run while it is in flight) and :func:`all_reduce_mean_` waits for it. This module sits below the wrappers;
:mod:`snoo.distributed` re-exports its public names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from snoo.optim.tensors import local

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


def failed_collective(what: str, world: int, error: Exception) -> RuntimeError:
    """The error a failed collective of DiLoCo raises (chained to the backend's), saying what to do."""
    return RuntimeError(
        f"averaging {what} over {world} ranks failed ({type(error).__name__}): a rank probably died or did not reach "
        f"the same step within the process group's timeout. Stop every rank and resume from the last checkpoint "
        f"with a fresh launch."
    )


class InFlight:
    """Collectives started with ``async_op=True`` and what to do once they are done: :meth:`wait` waits for every
    work handle, then runs ``finish`` once, and returns what it returned. The bytes this rank handed to the
    collectives are in :attr:`sent`."""

    def __init__(self, works: list[Any], finish: Callable[[], Any], *, sent: int, what: str, world: int) -> None:
        self.works, self.finish, self.sent, self.what, self.world = works, finish, sent, what, world
        self._done = False
        self._result: Any = None

    def wait(self) -> Any:
        if not self._done:
            try:
                for work in self.works:
                    work.wait()
            except Exception as e:  # the backends raise RuntimeError subclasses, or their own errors
                raise failed_collective(self.what, self.world, e) from e
            self._result = self.finish()
            self._done = True
        return self._result


def start_all_reduce_mean(
    tensors: list[torch.Tensor],
    process_group: dist.ProcessGroup,
    *,
    reduce_dtype: torch.dtype | None = None,
    what: str = "tensors",
) -> InFlight:
    """Start replacing each tensor by its mean over the ranks of ``process_group``; the tensors hold the mean once
    the returned :class:`InFlight` is waited for (not before). See :func:`all_reduce_mean_`."""
    world = dist.get_world_size(process_group)
    sent = 0
    works, copies = [], []
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(local(t))
    for dtype, group in by_dtype.items():
        wire = reduce_dtype or dtype
        for bucket in _buckets(group, wire.itemsize):
            flat = torch.cat([t.reshape(-1).to(wire) for t in bucket])
            try:
                works.append(dist.all_reduce(flat, group=process_group, async_op=True))
            except Exception as e:
                raise failed_collective(what, world, e) from e
            sent += flat.numel() * flat.element_size()
            copies.append((flat, bucket))

    def finish() -> None:
        for flat, bucket in copies:
            views = torch.split(flat, [t.numel() for t in bucket])
            torch._foreach_copy_(bucket, [v.view(t.shape) for v, t in zip(views, bucket)])
            torch._foreach_div_(bucket, world)

    return InFlight(works, finish, sent=sent, what=what, world=world)


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
    pending = start_all_reduce_mean(tensors, process_group, reduce_dtype=reduce_dtype, what=what)
    pending.wait()
    return pending.sent


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
