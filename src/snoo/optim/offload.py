"""Host offload: a wrapper's state in pinned host memory, streamed through the accelerator in chunks.

SNOO touches its slow weights :math:`w` and momentum :math:`b` once every K steps, so with ``state_device="cpu"``
they live in pinned host memory and the accelerator holds none of them between outer steps. At an outer step,
:class:`HostOffload` moves them through the accelerator one chunk at a time, double-buffered:

.. code-block:: text

    chunk i, staging slot i % 2:
      side stream "h2d":   wait until slot i % 2 is free (the store of chunk i - 2 has read it);
                           copy w, b of chunk i host -> slot;                      record "loaded"
      compute stream:      wait "loaded"; the outer step on the slot and the fast weights p of chunk i
                           (p <- w in place);                                      record "computed"
      side stream "d2h":   wait "computed"; copy w, b of the slot -> host;         record "stored" (slot free)
    after the last chunk:  the host waits for the last store, so the host state is readable (state_dict,
                           torch.save) whenever the step returns

so the host-to-device copy of chunk i + 1, the update of chunk i and the device-to-host copy of chunk i - 1 overlap,
the arithmetic runs on the accelerator (the same :func:`snoo.optim.outer.outer_step` as with state beside the
parameters, so the results are bit for bit the same), and the step costs about the time to move its bytes over the
bus. Extra accelerator memory: two staging slots of ``chunk_numel`` elements per state tensor (with float32 state
and momentum, ``16 * chunk_numel`` bytes: 64 MiB at the default), plus a float32 copy of one chunk of the
parameters when they are bf16/fp16.

The host tensors are the state itself (no pinned bounce buffer): each is written by exactly one device-to-host copy
per outer step and read by one host-to-device copy of the next, and the host sync at the end of each step orders the
two. On a machine without an accelerator (state and parameters both in host memory) the same chunked code runs
with ordinary tensors and synchronous copies: that is how CPU-only CI keeps it tested.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

#: Default elements of each state tensor per chunk: 16 MiB of float32, so two staging slots of slow weights and
#: momentum take 64 MiB of accelerator memory, and a 124M-parameter model streams in about 30 chunks.
DEFAULT_CHUNK_NUMEL = 1 << 22

#: Chunk boundaries inside a tensor and offsets inside a staging slot are multiples of this many elements: aligned
#: for vectorised loads, and each piece splits into vector body and scalar tail as the whole tensor would.
ALIGN = 64


@dataclass(frozen=True)
class Piece:
    """Elements ``start:stop`` of tensor ``index`` (flattened), at ``offset`` in its staging slot. ``whole`` pieces
    (non-contiguous tensors, which cannot be sliced flat) keep the tensor's shape."""

    index: int
    start: int
    stop: int
    offset: int
    whole: bool = False


def plan_chunks(tensors: Sequence[Sequence[torch.Tensor]], chunk_numel: int) -> list[list[Piece]]:
    """Cut the tensors into chunks of at most ``chunk_numel`` packed elements (a non-contiguous tensor larger than
    that is one chunk of its own). ``tensors`` is a list of parallel lists (parameters, then each state tensor):
    a tensor is split only where every one of its parallel tensors is contiguous."""
    chunks: list[list[Piece]] = []
    current: list[Piece] = []
    used = 0

    def close() -> None:
        nonlocal current, used
        if current:
            chunks.append(current)
        current, used = [], 0

    for index in range(len(tensors[0])):
        numel = tensors[0][index].numel()
        if numel == 0:
            continue
        if not all(ts[index].is_contiguous() for ts in tensors):
            if current and _aligned(used) + numel > chunk_numel:
                close()
            current.append(Piece(index, 0, numel, _aligned(used), whole=True))
            used = _aligned(used) + numel
            continue
        start = 0
        while start < numel:
            offset = _aligned(used)
            take = min(numel - start, chunk_numel - offset)
            if take < numel - start:
                take -= take % ALIGN  # split points inside a tensor on multiples of ALIGN
            if take <= 0:
                close()
                continue
            current.append(Piece(index, start, start + take, offset))
            used, start = offset + take, start + take
    close()
    return chunks


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _piece_of(tensor: torch.Tensor, piece: Piece) -> torch.Tensor:
    return tensor if piece.whole else tensor.view(-1)[piece.start : piece.stop]


def _slot_view(buffer: torch.Tensor, piece: Piece, like: torch.Tensor) -> torch.Tensor:
    view = buffer[piece.offset : piece.offset + piece.stop - piece.start]
    return view.view(like.shape) if piece.whole else view


class _Lanes:
    """How chunks move and what waits for what. This base moves them synchronously on the current stream: right on
    any device, and all there is on the host."""

    def begin(self) -> None:
        pass

    def load(self, slot: int, staged: list[torch.Tensor], host: list[torch.Tensor]) -> None:
        torch._foreach_copy_(staged, host)

    def wait_loaded(self, slot: int) -> None:
        pass

    def store(self, slot: int, host: list[torch.Tensor], staged: list[torch.Tensor]) -> None:
        torch._foreach_copy_(host, staged)

    def finish(self) -> None:
        pass


class _CudaLanes(_Lanes):
    """Copies on two side streams (host-to-device and device-to-host, so both directions of the bus work at once),
    the update on the current stream, and events between them."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.h2d = torch.cuda.Stream(device)
        self.d2h = torch.cuda.Stream(device)
        self.loaded = [torch.cuda.Event(), torch.cuda.Event()]
        self.computed = [torch.cuda.Event(), torch.cuda.Event()]
        self.stored = [torch.cuda.Event(), torch.cuda.Event()]
        self.busy = [False, False]

    def begin(self) -> None:
        self.compute = torch.cuda.current_stream(self.device)
        # copies into the host state queued on the compute stream (eval(), load_state_dict) land before we read it
        self.h2d.wait_stream(self.compute)
        self.busy = [False, False]

    def wait_slot_free(self, slot: int) -> None:
        if self.busy[slot]:
            self.h2d.wait_event(self.stored[slot])

    def load(self, slot: int, staged: list[torch.Tensor], host: list[torch.Tensor]) -> None:
        self.wait_slot_free(slot)
        with torch.cuda.stream(self.h2d):
            torch._foreach_copy_(staged, host, non_blocking=True)
        self.loaded[slot].record(self.h2d)

    def wait_loaded(self, slot: int) -> None:
        self.compute.wait_event(self.loaded[slot])

    def store(self, slot: int, host: list[torch.Tensor], staged: list[torch.Tensor]) -> None:
        self.computed[slot].record(self.compute)
        self.d2h.wait_event(self.computed[slot])
        with torch.cuda.stream(self.d2h):
            torch._foreach_copy_(host, staged, non_blocking=True)
        self.stored[slot].record(self.d2h)
        self.busy[slot] = True

    def finish(self) -> None:
        # the host state is the target of non-blocking copies: nothing on the host may read it before they land
        self.d2h.synchronize()


class HostOffload:
    """Runs an elementwise update of state that lives off the accelerator (pinned host memory) chunk by chunk on the
    accelerator, double-buffered; see the module docstring for the schedule.

    Args:
        chunk_numel: at most this many elements of each state tensor per chunk (a tensor is cut on multiples of
            :data:`ALIGN`; a non-contiguous one is never cut). The accelerator holds two chunks of each state tensor
            at a time; smaller chunks use less memory and start the pipeline sooner, larger ones take fewer
            launches.
    """

    def __init__(self, chunk_numel: int = DEFAULT_CHUNK_NUMEL) -> None:
        if isinstance(chunk_numel, bool) or not isinstance(chunk_numel, int) or chunk_numel < ALIGN:
            raise ValueError(f"chunk_numel (elements per chunk) must be an int >= {ALIGN}, got {chunk_numel!r}")
        self.chunk_numel = chunk_numel
        self._lanes: dict[torch.device, _Lanes] = {}
        self._staging: dict[tuple[torch.device, torch.dtype], list[list[torch.Tensor]]] = {}

    def lanes(self, device: torch.device) -> _Lanes:
        """The streams and events of ``device`` (made at first use)."""
        if device not in self._lanes:
            self._lanes[device] = _CudaLanes(device) if device.type == "cuda" else _Lanes()
        return self._lanes[device]

    def _slots(self, device: torch.device, dtype: torch.dtype, count: int, numel: int) -> list[list[torch.Tensor]]:
        """Two staging slots of ``count`` flat buffers of at least ``numel`` elements each, kept between outer steps
        (and between the buckets of one), and no larger than a chunk unless a chunk needs it."""
        slots = self._staging.get((device, dtype))
        size = slots[0][0].numel() if slots else 0
        if slots is None or len(slots[0]) < count or not numel <= size <= max(numel, self.chunk_numel):
            self._staging.pop((device, dtype), None)  # free the old ones first: at most two slots at a time
            slots = [[torch.empty(numel, device=device, dtype=dtype) for _ in range(count)] for _ in range(2)]
            if device.type == "cuda":
                lanes = self.lanes(device)
                for buffer in (b for slot in slots for b in slot):
                    # used on the side streams too: not to be handed out again before their work is done
                    buffer.record_stream(lanes.h2d)  # type: ignore[attr-defined]
                    buffer.record_stream(lanes.d2h)  # type: ignore[attr-defined]
            self._staging[(device, dtype)] = slots
        return slots

    @torch.no_grad()
    def apply(
        self,
        update: Callable[..., dict[str, torch.Tensor]],
        params: list[torch.Tensor],
        *state: list[torch.Tensor] | None,
        **kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        """``update(params, *state, **kwargs)`` chunk by chunk, with each chunk of ``state`` (lists parallel to
        ``params``, all on one device and of one dtype; ``None`` passes through) staged on the parameters' device.
        ``update`` must be elementwise and write its results into its arguments (``params`` and the state); it
        returns a dict of 0-d tensors (squared norms), summed here over the chunks."""
        device = params[0].device
        present = [ts for ts in state if ts is not None]
        if not present:
            return update(params, *state, **kwargs)
        chunks = plan_chunks([params, *present], self.chunk_numel)
        if not chunks:
            return {}
        numel = max(p.offset + p.stop - p.start for chunk in chunks for p in chunk)
        slots = self._slots(device, present[0][0].dtype, len(present), numel)
        lanes = self.lanes(device)
        lanes.begin()
        totals: dict[str, torch.Tensor] = {}
        for i, chunk in enumerate(chunks):
            slot = i % 2
            host = [_piece_of(ts[p.index], p) for ts in present for p in chunk]
            staged = [_slot_view(buf, p, ts[p.index]) for buf, ts in zip(slots[slot], present) for p in chunk]
            lanes.load(slot, staged, host)
            lanes.wait_loaded(slot)
            views = iter(staged[j : j + len(chunk)] for j in range(0, len(staged), len(chunk)))
            chunk_state = [None if ts is None else next(views) for ts in state]
            result = update([_piece_of(params[p.index], p) for p in chunk], *chunk_state, **kwargs)
            for name, value in result.items():
                totals[name] = totals[name] + value if name in totals else value
            lanes.store(slot, host, staged)
        lanes.finish()
        return totals

    def __getstate__(self) -> dict[str, Any]:
        # streams, events and staging buffers belong to this process: a copy makes its own at its first step
        return {"chunk_numel": self.chunk_numel}

    def __setstate__(self, saved: dict[str, Any]) -> None:
        self.__init__(saved["chunk_numel"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"HostOffload(chunk_numel={self.chunk_numel})"
