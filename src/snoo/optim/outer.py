"""SNOO's outer step as functions over tensors: the ``torch._foreach_*`` form (:func:`outer_step`,
:func:`outer_update`), the compiled single-pass form (:func:`fused_outer_step`), and the non-finite check and norms
that go with them. :class:`snoo.SNOO` and :class:`snoo.Lookahead` call these; the equations are in their docstrings.

On CPU tensor lists larger than a cache holds (:data:`CPU_BLOCKS_FROM`) the foreach form runs block by block
(:func:`cache_blocks`): its five to six passes over :math:`p, w, b` then stream each byte from memory once and find
it in the cache for the others.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch.optim import Optimizer

from snoo.optim.tensors import as_state_tensors, foreach_copy_, is_dtensor


def total_norms(squares: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The l2 norms over all buckets from the squared norms of each (on the device of the first)."""
    parts: dict[str, list[torch.Tensor]] = {}
    for sq in squares:
        for name, value in sq.items():
            parts.setdefault(name, []).append(value)
    device = squares[0]["slow"].device if squares else None
    return {name: torch.stack([v.to(device) for v in vs]).sum().sqrt() for name, vs in parts.items()}


def finite_flag(tensor_lists: list[list[torch.Tensor]]) -> torch.Tensor:
    """A 0-d bool tensor on the device of the first tensor: whether every tensor of the lists is finite. One
    reduction per list (a read of each tensor), no host synchronisation; under FSDP2 the sum is over all ranks'
    shards, so every rank takes the same decision."""
    sums = [squared_norm(ts) for ts in tensor_lists if ts]
    device = sums[0].device
    return torch.isfinite(torch.stack([s.to(device) for s in sums])).all()


def all_finite(tensor_lists: list[list[torch.Tensor]]) -> bool:
    """Whether every tensor of the lists is finite: :func:`finite_flag` and one host synchronisation."""
    return not any(tensor_lists) or bool(finite_flag(tensor_lists))


def squared_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    total = torch.stack(torch._foreach_norm(tensors)).square().sum()
    # over DTensor shards: the sum over all ranks (one small collective, only when norms are tracked)
    return total.full_tensor() if is_dtensor(total) else total


#: Elements of each tensor list in one block of the CPU outer step (:func:`cache_blocks`): 2 MiB of float32 per list,
#: so that a block of :math:`p, w, b` (6 MiB) stays in a laptop's last-level cache while the passes go over it.
#: Measured by ``benchmarks/cache_blocks.py`` (docs/snoo.md): 2^18 to 2^20 are within 4% of each other on a 32 MiB
#: cache, 2^17 and 2^21 slower.
CPU_BLOCK_ELEMENTS = 1 << 19

#: Elements per tensor list above which the CPU outer step runs in blocks (4 MiB of float32): at 4 MiB blocks and
#: whole tensors took the same time, from 8 MiB on blocks were faster (``benchmarks/cache_blocks.py``).
CPU_BLOCKS_FROM = 1 << 20


def cache_blocks(
    lists: Sequence[list[torch.Tensor] | None], elements: int = CPU_BLOCK_ELEMENTS
) -> Iterator[list[list[torch.Tensor] | None]]:
    """The tensor lists (alike in length and shapes; ``None`` stays ``None``) cut into blocks of at most ``elements``
    elements per list: whole tensors grouped while they fit, and flat views of at most ``elements`` of a larger one.
    Every element is in exactly one block, so an elementwise in-place step applied block by block is the same step,
    rounding for rounding. A larger tensor that is not contiguous in every list stays whole (it has no flat view)."""
    present = [ts for ts in lists if ts is not None]
    pieces: list[tuple[int, int, int]] = []  # (index, start, length); start -1: the whole tensor
    size = 0
    for i, tensor in enumerate(present[0]):
        numel = tensor.numel()
        cut = numel > elements and all(ts[i].is_contiguous() for ts in present)
        for start in range(0, numel, elements) if cut else (-1,):
            length = min(elements, numel - start) if cut else numel
            if size and size + length > elements:
                yield _block(lists, pieces)
                pieces, size = [], 0
            pieces.append((i, start, length))
            size += length
    if pieces:
        yield _block(lists, pieces)


def _block(
    lists: Sequence[list[torch.Tensor] | None], pieces: list[tuple[int, int, int]]
) -> list[list[torch.Tensor] | None]:
    return [
        None
        if ts is None
        else [ts[i] if start < 0 else ts[i].view(-1).narrow(0, start, length) for i, start, length in pieces]
        for ts in lists
    ]


def _by_cache_blocks(
    step: Callable[..., dict[str, torch.Tensor]], lists: list[list[torch.Tensor] | None], **kwargs
) -> dict[str, torch.Tensor]:
    """``step(*lists, **kwargs)``, block by block (:func:`cache_blocks`) where the lists are plain CPU tensors (each
    list shares one device: its first tensor tells) larger than :data:`CPU_BLOCKS_FROM`; the squared norms it
    returns are summed over the blocks."""
    firsts = [ts[0] for ts in lists if ts]
    if (
        not firsts
        or any(t.device.type != "cpu" or is_dtensor(t) for t in firsts)
        or sum(t.numel() for t in lists[0]) <= CPU_BLOCKS_FROM
    ):
        return step(*lists, **kwargs)
    total: dict[str, torch.Tensor] = {}
    for block in cache_blocks(lists, CPU_BLOCK_ELEMENTS):
        for name, square in step(*block, **kwargs).items():
            total[name] = total[name] + square if name in total else square
    return total


@torch.no_grad()
def outer_step(
    params: list[torch.Tensor],
    slow: list[torch.Tensor],
    momentum_buffers: list[torch.Tensor] | None,
    *,
    lr: float,
    momentum: float,
    nesterov: bool,
    track_norms: bool = False,
) -> dict[str, torch.Tensor]:
    r"""One outer step of SNOO over tensors that share device and dtype, in a few ``torch._foreach_*`` passes (block
    by block on CPU: :func:`cache_blocks`).

    ``params`` hold the fast weights :math:`p` and receive the new slow weights. ``slow`` (:math:`w`) and
    ``momentum_buffers`` (:math:`b`; ``None`` when ``momentum == 0``) may be float32 for low-precision parameters
    and may live on another device (host memory). Returns the squared l2 norms of :math:`s`, :math:`b` and the new
    :math:`w` when ``track_norms`` is set, else an empty dict.
    """
    return _by_cache_blocks(
        _outer_step,
        [params, slow, momentum_buffers],
        lr=lr,
        momentum=momentum,
        nesterov=nesterov,
        track_norms=track_norms,
    )


def _outer_step(
    params: list[torch.Tensor],
    slow: list[torch.Tensor],
    momentum_buffers: list[torch.Tensor] | None,
    *,
    lr: float,
    momentum: float,
    nesterov: bool,
    track_norms: bool = False,
) -> dict[str, torch.Tensor]:
    # the fast weights as state tensors: the parameters themselves, or float32 / host copies; a scratch either way,
    # since p <- w overwrites the parameters at the end
    fast = as_state_tensors(params, slow[0])
    if momentum == 0:
        squares = {"pseudo_grad": squared_norm(torch._foreach_sub(slow, fast))} if track_norms else {}
        # w <- w + eta (p - w); lerp returns p exactly when eta == 1
        torch._foreach_lerp_(slow, fast, lr)
        if track_norms:
            squares["slow"] = squared_norm(slow)
        foreach_copy_(params, slow, non_blocking=True)
        return squares
    torch._foreach_sub_(fast, slow)  # -s = p - w
    return _outer_update(
        params, fast, slow, momentum_buffers, lr=lr, momentum=momentum, nesterov=nesterov, track_norms=track_norms
    )


@torch.no_grad()
def outer_update(
    params: list[torch.Tensor],
    neg_pseudo_grad: list[torch.Tensor],
    slow: list[torch.Tensor],
    momentum_buffers: list[torch.Tensor] | None,
    *,
    lr: float,
    momentum: float,
    nesterov: bool,
    track_norms: bool = False,
) -> dict[str, torch.Tensor]:
    r"""The outer step from the negated pseudo-gradient :math:`-s = p - w` (e.g. averaged over DiLoCo workers),
    which serves as scratch space; like :func:`outer_step` otherwise."""
    return _by_cache_blocks(
        _outer_update,
        [params, neg_pseudo_grad, slow, momentum_buffers],
        lr=lr,
        momentum=momentum,
        nesterov=nesterov,
        track_norms=track_norms,
    )


def _outer_update(
    params: list[torch.Tensor],
    neg_pseudo_grad: list[torch.Tensor],
    slow: list[torch.Tensor],
    momentum_buffers: list[torch.Tensor] | None,
    *,
    lr: float,
    momentum: float,
    nesterov: bool,
    track_norms: bool = False,
) -> dict[str, torch.Tensor]:
    neg_s = neg_pseudo_grad
    squares = {"pseudo_grad": squared_norm(neg_s)} if track_norms else {}
    if momentum == 0:
        torch._foreach_add_(slow, neg_s, alpha=lr)  # w <- w - eta s
    else:
        assert momentum_buffers is not None
        # b <- mu b + s
        torch._foreach_mul_(momentum_buffers, momentum)
        torch._foreach_sub_(momentum_buffers, neg_s)
        if nesterov:
            # w <- w - eta (s + mu b): neg_s becomes -(s + mu b), the same rounding as SGD(nesterov=True)
            torch._foreach_add_(neg_s, momentum_buffers, alpha=-momentum)
            torch._foreach_add_(slow, neg_s, alpha=lr)
        else:
            torch._foreach_add_(slow, momentum_buffers, alpha=-lr)
        if track_norms:
            squares["momentum"] = squared_norm(momentum_buffers)
    if track_norms:
        squares["slow"] = squared_norm(slow)
    # p <- w
    foreach_copy_(params, slow, non_blocking=True)
    return squares


#: How far :func:`fused_outer_step` may end from :func:`outer_step` after one outer step from the same tensors, per
#: element, in units of the state dtype's rounding unit :math:`u` (``torch.finfo(dtype).eps / 2``) times the size of
#: what the element is made of: :math:`|w| + \eta(|s| + \mu|b| + \mu|b'|)` for the slow and fast weights,
#: :math:`|s| + \mu|b| + |b'|` for the momentum (:math:`b'` the new momentum). Each path rounds the pseudo-gradient,
#: the momentum, the Nesterov direction, the new slow weights and the float32 values of :math:`\eta, \mu`; summing the
#: first-order errors puts each within :math:`8u` of that size from the exact result (the compiled kernel may use a
#: fused multiply-add or keep a value in a register, so the two round differently), hence :math:`16u` between them.
#: Tested against a float64 reference written from the equations (``tests/test_snoo_fused.py``).
FUSED_ROUNDING = 16

FUSED_REFUSED = (
    "fused=True compiles the outer step of parameters and state that live on one device, on this process alone; it "
    "cannot take {what}: use fused=False (the foreach path) there"
)


def check_fusable(
    inner: Optimizer, *, state_device: torch.device | str | None, process_group: dist.ProcessGroup | None
) -> None:
    """Refuse, with the reason, what the fused outer step cannot run."""
    if process_group is not None:
        raise ValueError(FUSED_REFUSED.format(what="a process_group (DiLoCo averages the pseudo-gradients first)"))
    if state_device is not None:
        raise ValueError(FUSED_REFUSED.format(what="state_device (the offload streams the state in chunks)"))
    if any(is_dtensor(p) for group in inner.param_groups for p in group["params"]):
        raise ValueError(FUSED_REFUSED.format(what="sharded (DTensor) parameters"))
    import torch._dynamo  # seconds to import: only for those who ask for fused

    if not torch._dynamo.is_dynamo_supported():
        raise ValueError(f"fused=True needs torch.compile, which this Python ({sys.version.split()[0]}) lacks")


@functools.cache
def compiled_outer_step() -> Callable[..., dict[str, torch.Tensor]]:
    # made at the first fused outer step: torch.compile imports torch._dynamo, which takes seconds
    return torch.compile(fused_outer_step, fullgraph=True)


def fused_outer_step(
    params: list[torch.Tensor],
    slow: list[torch.Tensor],
    momentum_buffers: list[torch.Tensor] | None,
    lr: torch.Tensor,
    momentum: torch.Tensor,
    finite: torch.Tensor | None,
    *,
    nesterov: bool,
    track_norms: bool = False,
) -> dict[str, torch.Tensor]:
    r"""The outer step of :func:`outer_step` written per tensor, for ``torch.compile`` to fuse into one pass over
    :math:`p, w, b` each (no temporaries: a bf16 parameter is read as float32 inside the kernel).

    ``lr`` and ``momentum`` are 0-d tensors on the state's device (so a new value does not recompile; ``momentum``
    is ignored when ``momentum_buffers`` is ``None``: Lookahead's lerp). ``finite``, a 0-d bool tensor or ``None``:
    where it is false, the slow weights and momentum stay as they are and the parameters get the slow weights (the
    skipped step of the non-finite check), decided on the device without a host synchronisation. Returns the
    squared l2 norms of :math:`s`, :math:`b` and the new :math:`w` when ``track_norms`` is set, else an empty dict.
    """
    names = ("pseudo_grad", "momentum", "slow") if momentum_buffers is not None else ("pseudo_grad", "slow")
    squares = dict.fromkeys(names, 0.0) if track_norms else {}
    for i, (p, w) in enumerate(zip(params, slow)):
        fast = p.to(w.dtype)
        s = w - fast  # pseudo-gradient
        if momentum_buffers is None:
            new_w = torch.lerp(w, fast, lr)  # w + eta (p - w)
        else:
            b = momentum_buffers[i]
            new_b = momentum * b + s
            new_w = w - lr * (s + momentum * new_b) if nesterov else w - lr * new_b
            if finite is not None:
                new_b = torch.where(finite, new_b, b)
            if track_norms:
                squares["momentum"] = squares["momentum"] + new_b.square().sum()
            b.copy_(new_b)
        if finite is not None:
            new_w = torch.where(finite, new_w, w)
        if track_norms:
            squares["pseudo_grad"] = squares["pseudo_grad"] + s.square().sum()
            squares["slow"] = squares["slow"] + new_w.square().sum()
        w.copy_(new_w)
        p.copy_(new_w)  # p <- w
    return squares
