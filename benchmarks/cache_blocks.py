"""The two constants of SNOO's CPU outer step in blocks (``snoo.optim.outer.cache_blocks``), measured.

1. Block size (``CPU_BLOCK_ELEMENTS``): the outer step (Nesterov, with the non-finite check's read) over a stack of
   1024 x 1024 float32 tensors, 100 MB per tensor list by default, cut into blocks of 2^k elements per list, against
   the same step over whole tensors and against the memory floor (one copy of ``p``, ``w`` and ``b``).
2. Where blocks start to pay (``CPU_BLOCKS_FROM``): the same step in blocks against over whole tensors, for lists of
   4 to 128 MiB, made of a few large tensors or of many small ones.

Each row is the median of ``--rounds`` calls, taken round-robin with its reference (interleaved, so that a busier
stretch of the machine slows both). Prints markdown tables.

    python benchmarks/cache_blocks.py [--threads 1] [--rounds 9] [--powers 17,18,19,20,21] [--layers 24]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable

import torch

from snoo.optim import outer
from snoo.optim.outer import all_finite, outer_step
from step_overhead import Contender, time_round_robin  # this directory, as when run as a script


def state(shapes: list[tuple[int, ...]]) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Fast weights ``p``, slow weights ``w`` near them, and momentum ``b``."""
    torch.manual_seed(0)
    p = [torch.randn(s) for s in shapes]
    return p, [t + 0.01 * torch.randn_like(t) for t in p], [0.1 * torch.randn_like(t) for t in p]


def outer_call(lists: tuple[list[torch.Tensor], ...], elements: int | None) -> Callable[[], None]:
    """One outer step as SNOO's ``step()`` takes it (the check's read, then the step), in blocks of ``elements``
    per list, or over whole tensors (``None``)."""
    p, w, b = lists

    def call() -> None:
        saved = outer.CPU_BLOCK_ELEMENTS, outer.CPU_BLOCKS_FROM
        outer.CPU_BLOCK_ELEMENTS, outer.CPU_BLOCKS_FROM = (1, sys.maxsize) if elements is None else (elements, 0)
        try:
            all_finite([p])
            outer_step(p, w, b, lr=0.7, momentum=0.5, nesterov=True)
        finally:
            outer.CPU_BLOCK_ELEMENTS, outer.CPU_BLOCKS_FROM = saved

    return call


def medians(calls: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Milliseconds per call, the median over rounds of ``step_overhead``'s round-robin (the first rotating)."""
    contenders = [Contender(name, fn, 1) for name, fn in calls.items()]
    time_round_robin(contenders, rounds, "cpu")
    return {c.name: 1e3 * statistics.median(c.seconds) for c in contenders}


def block_sizes(layers: int, powers: list[int], rounds: int) -> None:
    lists = state([(1024, 1024)] * layers)
    copies = [torch.empty_like(t) for ts in lists for t in ts]
    sources = [t for ts in lists for t in ts]
    calls: dict[str, Callable[[], object]] = {"floor": lambda: torch._foreach_copy_(copies, sources)}
    calls["whole tensors"] = outer_call(lists, None)
    calls.update({f"blocks of 2^{k}": outer_call(lists, 1 << k) for k in powers})
    ms = medians(calls, rounds)
    mib = sum(t.numel() for t in lists[0]) * 4 / 2**20
    print(f"\n{layers} x 1024 x 1024 float32, {mib:.0f} MiB per list: the outer step with the check, over the floor\n")
    print("| how | ms | / floor |\n|---|---:|---:|")
    for name, value in ms.items():
        print(f"| {name} | {value:.1f} | {value / ms['floor']:.2f}x |")


#: (tensors, elements each) of the lists in the threshold sweep: 4 to 128 MiB of large tensors, 4 to 61 of small
THRESHOLD_CASES = [
    *((8, 1 << k) for k in (17, 18, 19)),
    *((n, 1 << 19) for n in (16, 32, 64)),
    *((n, 1000) for n in (1000, 4000, 16000)),
]


def thresholds(rounds: int, cases: list[tuple[int, int]] = THRESHOLD_CASES) -> None:
    print(
        f"\nin blocks of 2^{outer.CPU_BLOCK_ELEMENTS.bit_length() - 1} against whole tensors, by the size of a list\n"
    )
    print("| list | MiB per list | blocks, ms | whole, ms | blocks / whole |\n|---|---:|---:|---:|---:|")
    for n, size in cases:
        lists = state([(size,)] * n)
        ms = medians({"blocks": outer_call(lists, outer.CPU_BLOCK_ELEMENTS), "whole": outer_call(lists, None)}, rounds)
        print(
            f"| {n} x {size} | {n * size * 4 / 2**20:.0f} | {ms['blocks']:.2f} | {ms['whole']:.2f} | "
            f"{ms['blocks'] / ms['whole']:.2f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--layers", type=int, default=24, help="1024 x 1024 tensors per list in the block sweep")
    parser.add_argument("--powers", default="17,18,19,20,21", help="block sizes to sweep, as powers of two")
    args = parser.parse_args()
    if args.rounds < 1 or args.layers < 1:
        parser.error("--rounds and --layers must be at least 1")
    try:
        powers = [int(k) for k in args.powers.split(",") if k.strip()]
    except ValueError:
        parser.error(f"--powers takes integers, e.g. 17,18,19; got {args.powers!r}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; CPU_BLOCK_ELEMENTS = "
        f"2^{outer.CPU_BLOCK_ELEMENTS.bit_length() - 1}, CPU_BLOCKS_FROM = 2^{outer.CPU_BLOCKS_FROM.bit_length() - 1}; "
        f"medians of {args.rounds} interleaved rounds"
    )
    block_sizes(args.layers, powers, args.rounds)
    thresholds(args.rounds)


if __name__ == "__main__":
    main()
