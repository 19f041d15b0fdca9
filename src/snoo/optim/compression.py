r"""Low-bit pseudo-gradients for DiLoCo: quantizers, error feedback, and the exchange that suits quantized data.

A rank sends :math:`Q(x + e)` instead of :math:`x` and keeps the error :math:`e \leftarrow (x + e) - Q(x + e)` for
its next outer step (error feedback, as in MuLoCo, arXiv 2505.23725), so what rounding drops is sent later instead
of lost. :math:`Q` is one of:

- ``"bf16"``: :math:`x` rounded to bfloat16 (2 bytes per value, no scales);
- ``"int8"`` / ``"int4"``: symmetric integers :math:`c = \mathrm{round}(x / \sigma)`, clamped to
  :math:`[-q, q]` with :math:`q = 127` or :math:`7`, and one float32 scale :math:`\sigma = \max|x| / q` per row (the
  first dimension; a 1-D tensor is one row) or per block of ``block`` consecutive elements; int4 codes travel two
  to a byte. :math:`Q(x) = \sigma c`.

Quantized values cannot be summed by an all-reduce without decoding them, so each rank *all-gathers* the codes and
scales of every rank (two ``all_gather`` calls per exchange), decodes them and takes the mean locally, adding the
ranks in rank order: every rank gets the same bits.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from snoo.optim.collectives import InFlight, failed_collective
from snoo.optim.tensors import local

#: The values of ``SNOO(compression=...)``, with the largest code of each integer format.
COMPRESSIONS = {"bf16": None, "int8": 127, "int4": 7}


class Compression(NamedTuple):
    """A quantizer: ``kind`` one of :data:`COMPRESSIONS`, ``block`` the elements per scale (``None``: a row)."""

    kind: str
    block: int | None = None

    @property
    def qmax(self) -> int | None:
        return COMPRESSIONS[self.kind]


def rows(x: torch.Tensor, block: int | None) -> torch.Tensor:
    """``x`` as a 2-D tensor with one scale per row: its rows (first dimension), or blocks of ``block`` elements of
    it flattened, the last one padded with zeros."""
    if block is None:
        return x.reshape(x.shape[0] if x.dim() >= 2 else 1, -1)
    flat = x.reshape(-1)
    pad = -flat.numel() % block
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, block) if pad else flat.view(-1, block)


def quantize(x: torch.Tensor, qmax: int, block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Symmetric integer codes of ``x`` (int8, one per row of :func:`rows`) and their float32 scales:
    :math:`\sigma = \max|x| / q`, :math:`c = \mathrm{clamp}(\mathrm{round}(x / \sigma), -q, q)`; a row of zeros
    gets :math:`\sigma = 0, c = 0`."""
    r = rows(x.float(), block)
    scales = r.abs().amax(dim=1) / qmax
    codes = torch.round(r / torch.where(scales > 0, scales, 1.0)[:, None]).clamp_(-qmax, qmax)
    return codes.to(torch.int8), scales


def dequantize(codes: torch.Tensor, scales: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """:math:`\\sigma c` from :func:`quantize`'s output, shaped and typed like ``like``."""
    out = codes.to(torch.float32) * scales[:, None]
    return out.reshape(-1)[: like.numel()].view(like.shape).to(like.dtype)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Codes in [-7, 7] (int8, flat) two to a byte (uint8), the first in the low four bits."""
    nibbles = (codes.to(torch.int16) + 8).to(torch.uint8)
    if nibbles.numel() % 2:
        nibbles = torch.cat([nibbles, nibbles.new_full((1,), 8)])
    pairs = nibbles.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack_int4(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The inverse of :func:`pack_int4`: ``numel`` int8 codes."""
    nibbles = torch.stack([packed & 15, packed >> 4], dim=1).reshape(-1)[:numel]
    return nibbles.to(torch.int8) - 8


def _encode(x: list[torch.Tensor], compression: Compression) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """The flat codes and scales this rank sends for ``x``, and what they decode to (per tensor)."""
    if compression.qmax is None:
        wire = [t.to(torch.bfloat16) for t in x]
        return torch.cat([w.reshape(-1) for w in wire]), torch.zeros(0), [w.to(t.dtype) for w, t in zip(wire, x)]
    coded = [quantize(t, compression.qmax, compression.block) for t in x]
    decoded = [dequantize(c, s, t) for (c, s), t in zip(coded, x)]
    codes = torch.cat([c.reshape(-1) for c, _ in coded])
    if compression.kind == "int4":
        codes = pack_int4(codes)
    return codes, torch.cat([s for _, s in coded]), decoded


def _decode(codes: torch.Tensor, scales: torch.Tensor, like: list[torch.Tensor], compression: Compression):
    """What one rank's flat codes and scales stand for, one tensor per tensor of ``like``."""
    if compression.qmax is None:
        return [v.view(t.shape).to(t.dtype) for v, t in zip(torch.split(codes, [t.numel() for t in like]), like)]
    sizes = [rows(t, compression.block).shape for t in like]
    if compression.kind == "int4":
        codes = unpack_int4(codes, sum(r * c for r, c in sizes))
    code_parts = torch.split(codes, [r * c for r, c in sizes])
    scale_parts = torch.split(scales, [r for r, _ in sizes])
    return [dequantize(c.view(size), s, t) for c, s, size, t in zip(code_parts, scale_parts, sizes, like)]


@torch.no_grad()
def start_compressed_mean_(
    tensors: list[torch.Tensor],
    errors: list[torch.Tensor] | None,
    compression: Compression,
    process_group: dist.ProcessGroup,
    *,
    what: str = "tensors",
) -> InFlight:
    r"""Start replacing each tensor :math:`x_r` (on rank :math:`r`) by :math:`\frac{1}{N}\sum_r Q(x_r + e_r)` over
    the :math:`N` ranks of ``process_group``, sent as codes and scales with two asynchronous ``all_gather`` calls;
    the tensors hold the mean once the returned :class:`snoo.optim.collectives.InFlight` is waited for.

    ``errors`` (:math:`e_r`, one tensor per tensor, or ``None`` for no error feedback) are updated at once to
    :math:`(x_r + e_r) - Q(x_r + e_r)`. Every rank must pass tensors of the same shapes, dtypes and order.
    DTensors are compressed through their local shards (a row of a shard is a row of the tensor under FSDP2).
    """
    world = dist.get_world_size(process_group)
    x = [local(t) for t in tensors]
    if errors is not None:
        torch._foreach_add_(x, [local(e) for e in errors])  # x + e
    codes, scales, decoded = _encode(x, compression)
    if errors is not None:
        torch._foreach_copy_([local(e) for e in errors], torch._foreach_sub(x, decoded))  # e <- (x + e) - Q(x + e)
    gathered_codes = [torch.empty_like(codes) for _ in range(world)]
    gathered_scales = [torch.empty_like(scales) for _ in range(world)]
    try:
        works = [dist.all_gather(gathered_codes, codes, group=process_group, async_op=True)]
        if scales.numel():
            works.append(dist.all_gather(gathered_scales, scales, group=process_group, async_op=True))
    except Exception as e:
        raise failed_collective(what, world, e) from e

    def finish() -> None:
        total = _decode(gathered_codes[0], gathered_scales[0], x, compression)
        for r in range(1, world):  # in rank order, so that every rank adds the same numbers the same way
            torch._foreach_add_(total, _decode(gathered_codes[r], gathered_scales[r], x, compression))
        torch._foreach_div_(total, world)
        torch._foreach_copy_(x, total)

    return InFlight(
        works, finish, sent=codes.numel() * codes.element_size() + scales.numel() * 4, what=what, world=world
    )
