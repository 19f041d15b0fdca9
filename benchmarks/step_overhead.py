"""What SNOO costs per optimizer step, and how close its outer step is to the memory floor and to its peers.

For a stack of square Linear layers (25 M parameters by default) with fixed random gradients, in one run:

- ``step()`` of AdamW (foreach) alone, of SNOO around it at K = 1, 5, 20 and 100 (and K=20 with ``fused=True``
  and with ``track_norms``; and at K=10^9, the steps between outer steps alone), of ``snoo.Lookahead`` and of
  ``pytorch_optimizer``'s Lookahead at K=5;
- the outer step alone against a copy of the bytes it must touch (the floor: parameters, slow weights, momentum;
  floor2: parameters and slow weights), as ``step()`` runs it around an inner optimizer that does nothing (so the
  non-finite check, the plans and the checks before the step are in): foreach, foreach with
  ``skip_nonfinite=False``, foreach on CPU without the cache blocks (``snoo.optim.outer.cache_blocks``), fused;
  the bare foreach function ``outer_step``; the authors' approach (the slow weights as tensors stepped by
  ``torch.optim.SGD(nesterov=True)`` on the gradient ``w - p``, then ``p <- w``);
  Lookahead's, foreach and fused, against ``pytorch_optimizer.Lookahead``'s (``pip install pytorch_optimizer`` for
  this benchmark only; its rows are left out, with a message, when it is missing);
- the amortised cost of the outer step at K = 1, 5, 20, 100 over the AdamW step: measured (SNOO(AdamW)'s step at
  that K against AdamW's, paired) and from the outer step alone (its time / K / AdamW's step time, paired).

It also reports each wrapper's extra memory and how long the fused outer steps took to compile (their first call).
Prints markdown tables.

    python benchmarks/step_overhead.py [--width 1024] [--layers 24] [--rounds 11] [--threads N] [--device cpu]
                                       [--no-fused]

The block size and where blocks start (``snoo.optim.outer.CPU_BLOCK_ELEMENTS``, ``CPU_BLOCKS_FROM``) are swept by
``benchmarks/cache_blocks.py``.

Every contender is built first; then each round times every contender once, in turn (round-robin, the starting
contender rotating from round to round), over a whole number of outer cycles (20 calls of a step, 100 for K=100, so
SNOO at K=20 does exactly one outer step in each sample). A machine that is busier in one stretch of the run slows
all the contenders of that round alike, and no contender always runs right after the same neighbour, so the order of
measuring cannot make a wrapper look faster than its own inner optimizer. Each ratio is the median, over rounds, of
the contender's time divided by its reference's time *in the same round*; the spread is the interquartile range.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

import snoo
from snoo.optim import outer
from snoo.optim.outer import outer_step

# the references, and the short name a ratio against each is given in
REFERENCES = {
    "AdamW (foreach) step": "AdamW",
    "copy of p, w, b once (memory floor)": "floor",
    "copy of p, w once (Lookahead's floor, floor2)": "floor2",
}
STEP_CALLS = 20  # calls per sample for a step: one cycle of K=20, and four of K=5
OUTER_CALLS = 5  # calls per sample for an outer step or a copy alone
AMORTISED_KS = (1, 5, 20, 100)
BASE = "AdamW (foreach) step"
FLOOR, FLOOR2 = "copy of p, w, b once (memory floor)", "copy of p, w once (Lookahead's floor, floor2)"
AUTHORS = "authors' outer step (slow weights stepped by SGD(nesterov=True))"
PEER_OUTER = "pytorch_optimizer.Lookahead outer step alone"
UNBLOCKED = "SNOO outer step in step() (foreach, without cache blocks)"
BETWEEN = "SNOO(AdamW) step between outer steps (K=10^9)"


def snoo_step_name(k: int, fused: bool = False) -> str:
    return f"SNOO(AdamW) step, K={k}" + (", fused" if fused else "")


def outer_name(what: str, how: str) -> str:
    """The row of an outer step as ``step()`` runs it (around an inner optimizer that does nothing)."""
    return f"{what} outer step in step() ({how})"


class Still(torch.optim.Optimizer):
    """An inner optimizer that does nothing, so that a wrapper's ``step()`` at K=1 is its outer step alone."""

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        super().__init__(params, {"lr": 0.0})

    def step(self, closure: Callable[[], float] | None = None) -> None:  # type: ignore[override]
        return None


@dataclass
class Contender:
    name: str
    fn: Callable[[], object]
    calls: int  # consecutive calls timed as one sample
    reference: str | None = None  # the contender its ratio is taken against (None: it is a reference)
    extra_memory: str = "-"
    seconds: list[float] = field(default_factory=list)  # per call, one sample per round


def authors_outer_step(params: list[torch.Tensor], lr: float, momentum: float) -> Callable[[], None]:
    """The authors' approach to SNOO's outer step: slow weights as tensors of their own (float32), stepped by
    ``torch.optim.SGD(nesterov=True)`` on the gradient ``w - p``, then ``p <- w``."""
    slow = [torch.nn.Parameter(p.detach().float()) for p in params]
    sgd = torch.optim.SGD(slow, lr=lr, momentum=momentum, nesterov=True, foreach=True)

    @torch.no_grad()
    def step() -> None:
        for w, g in zip(slow, torch._foreach_sub(slow, [p.float() for p in params])):
            w.grad = g
        sgd.step()
        torch._foreach_copy_(params, slow)

    return step


def without_blocks(fn: Callable[[], object]) -> Callable[[], None]:
    """``fn`` with the CPU outer step over whole tensors (no ``cache_blocks``)."""

    def call() -> None:
        saved, outer.CPU_BLOCKS_FROM = outer.CPU_BLOCKS_FROM, sys.maxsize
        try:
            fn()
        finally:
            outer.CPU_BLOCKS_FROM = saved

    return call


def make_params(width: int, layers: int, device: str) -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.Linear(width, width) for _ in range(layers))).to(device)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    return params


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_round_robin(contenders: list[Contender], rounds: int, device: str) -> None:
    """Fill each contender's ``seconds`` with one sample per round, the contenders taking turns within each round."""
    for c in contenders:  # warm-up: allocations, lazy optimizer state, the first outer step
        for _ in range(c.calls):
            c.fn()
    sync(device)
    for r in range(rounds):
        start = r % len(contenders)
        for c in contenders[start:] + contenders[:start]:
            sync(device)
            t0 = time.perf_counter()
            for _ in range(c.calls):
                c.fn()
            sync(device)
            c.seconds.append((time.perf_counter() - t0) / c.calls)


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def paired_ratios(c: Contender, by_name: dict[str, Contender], reference: str | None = None) -> list[float]:
    """``c``'s time over its reference's (or ``reference``'s), round by round."""
    ref = by_name[reference or c.reference or c.name]
    return [a / b for a, b in zip(c.seconds, ref.seconds, strict=True)]


def state_bytes(opt: torch.optim.Optimizer, keys: set[str]) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for k, v in s.items() if k in keys)


def build_contenders(params: list[torch.nn.Parameter], fused: bool) -> tuple[list[Contender], dict[str, float]]:
    """The contenders, and the seconds each fused outer step took to compile (its first call)."""

    def adamw() -> torch.optim.AdamW:
        return torch.optim.AdamW(params, lr=1e-4, foreach=True)

    param_bytes = sum(p.numel() * p.element_size() for p in params)
    contenders = [Contender(BASE, adamw().step, STEP_CALLS)]
    wrapped = [
        (snoo_step_name(1), snoo.SNOO(adamw(), k=1), STEP_CALLS),
        (snoo_step_name(20), snoo.SNOO(adamw(), k=20), STEP_CALLS),
        ("SNOO(AdamW) step, K=20, track_norms", snoo.SNOO(adamw(), k=20, track_norms=True), STEP_CALLS),
        ("snoo.Lookahead(AdamW) step, K=5", snoo.Lookahead(adamw(), k=5), STEP_CALLS),
    ]
    later = [(snoo_step_name(k), snoo.SNOO(adamw(), k=k), max(STEP_CALLS, k)) for k in AMORTISED_KS if k not in (1, 20)]
    # the steps between outer steps alone: what SNOO adds to an inner step (its checks, its count), nothing else
    later.append((BETWEEN, snoo.SNOO(adamw(), k=10**9), STEP_CALLS))
    if fused:
        later.append((snoo_step_name(20, fused=True), snoo.SNOO(adamw(), k=20, fused=True), STEP_CALLS))
    for name, opt, calls in wrapped:
        contenders.append(Contender(name, opt.step, calls, BASE))

    # the outer step alone, against copying the bytes it must touch
    slow = [p.detach().clone() for p in params]
    momentum = [torch.zeros_like(p) for p in params]
    sources = [p.detach().clone() for p in params] + slow + momentum
    targets = [torch.empty_like(t) for t in sources]
    two = 2 * len(params)
    contenders += [
        Contender(FLOOR, lambda: torch._foreach_copy_(targets, sources), OUTER_CALLS),
        Contender(
            "SNOO outer step alone (Nesterov)",
            lambda: outer_step(params, slow, momentum, lr=0.7, momentum=0.5, nesterov=True),
            OUTER_CALLS,
            FLOOR,
        ),
        Contender(FLOOR2, lambda: torch._foreach_copy_(targets[:two], sources[:two]), OUTER_CALLS),
        Contender(
            "Lookahead outer step alone (lerp + copy)",
            lambda: outer_step(params, slow, None, lr=0.5, momentum=0.0, nesterov=False),
            OUTER_CALLS,
            FLOOR2,
        ),
    ]
    for name, opt, calls in later:  # after the rows of earlier versions of this benchmark, which keep their order
        contenders.append(Contender(name, opt.step, calls, BASE))
    outer_rows = [
        (outer_name("SNOO", "foreach"), snoo.SNOO(Still(params), k=1), FLOOR),
        (
            outer_name("SNOO", "foreach, skip_nonfinite=False"),
            snoo.SNOO(Still(params), k=1, skip_nonfinite=False),
            FLOOR,
        ),
        (outer_name("snoo.Lookahead", "foreach"), snoo.Lookahead(Still(params), k=1), FLOOR2),
        (
            outer_name("snoo.Lookahead", "foreach, skip_nonfinite=False"),
            snoo.Lookahead(Still(params), k=1, skip_nonfinite=False),
            FLOOR2,
        ),
    ]
    if fused:
        outer_rows += [
            (outer_name("SNOO", "fused"), snoo.SNOO(Still(params), k=1, fused=True), FLOOR),
            (outer_name("snoo.Lookahead", "fused"), snoo.Lookahead(Still(params), k=1, fused=True), FLOOR2),
        ]
    compile_seconds = {}
    for name, opt, reference in outer_rows:
        if opt.fused:
            t0 = time.perf_counter()
            opt.step()  # compiles
            compile_seconds[name] = time.perf_counter() - t0
        contenders.append(Contender(name, opt.step, OUTER_CALLS, reference))
    if params[0].device.type == "cpu":
        plain = without_blocks(snoo.SNOO(Still(params), k=1).step)
        contenders.append(Contender(UNBLOCKED, plain, OUTER_CALLS, FLOOR))

    contenders.append(Contender(AUTHORS, authors_outer_step(params, lr=0.7, momentum=0.5), OUTER_CALLS, FLOOR))

    try:
        import pytorch_optimizer
    except ImportError:
        print("pytorch_optimizer is not installed: its Lookahead is left out (pip install pytorch_optimizer)\n")
    else:
        peer = pytorch_optimizer.Lookahead(adamw(), k=5, alpha=0.5)
        contenders.append(Contender("pytorch_optimizer.Lookahead(AdamW) step, K=5", peer.step, STEP_CALLS, BASE))
        peer.step()  # creates its slow weights
        contenders[-1].extra_memory = f"{state_bytes(peer, {'slow_params'}) / param_bytes:.1f}x params"
        contenders.append(Contender(PEER_OUTER, lambda: peer.update(peer.param_groups[0]), OUTER_CALLS, FLOOR2))

    return contenders, compile_seconds


def comparisons(by_name: dict[str, Contender]) -> list[tuple[str, str, str]]:
    """(what, contender, reference) of the ratios the issue's goals name, for the contenders this run has."""
    rows = [
        ("SNOO outer step / floor, foreach", outer_name("SNOO", "foreach"), FLOOR),
        (
            "SNOO outer step / floor, foreach, skip_nonfinite=False",
            outer_name("SNOO", "foreach, skip_nonfinite=False"),
            FLOOR,
        ),
        ("SNOO outer step / floor, foreach without cache blocks", UNBLOCKED, FLOOR),
        ("SNOO outer step / floor, fused", outer_name("SNOO", "fused"), FLOOR),
        ("SNOO outer step / authors' approach, foreach", outer_name("SNOO", "foreach"), AUTHORS),
        ("SNOO outer step / authors' approach, fused", outer_name("SNOO", "fused"), AUTHORS),
        ("authors' approach / floor", AUTHORS, FLOOR),
        ("snoo.Lookahead outer step / floor2, foreach", outer_name("snoo.Lookahead", "foreach"), FLOOR2),
        ("snoo.Lookahead outer step / floor2, fused", outer_name("snoo.Lookahead", "fused"), FLOOR2),
        (
            "snoo.Lookahead outer step / pytorch_optimizer's, foreach",
            outer_name("snoo.Lookahead", "foreach"),
            PEER_OUTER,
        ),
        ("snoo.Lookahead outer step / pytorch_optimizer's, fused", outer_name("snoo.Lookahead", "fused"), PEER_OUTER),
        (
            "snoo.Lookahead outer step / pytorch_optimizer's, foreach, skip_nonfinite=False",
            outer_name("snoo.Lookahead", "foreach, skip_nonfinite=False"),
            PEER_OUTER,
        ),
        ("pytorch_optimizer's Lookahead outer step / floor2", PEER_OUTER, FLOOR2),
    ]
    return [row for row in rows if row[1] in by_name and row[2] in by_name]


def amortised(by_name: dict[str, Contender], fused: bool) -> list[tuple[str, list[float | None]]]:
    """Per path, the overhead over AdamW's step at each K: (measured, from the outer step alone) medians, in %."""
    base = by_name[BASE].seconds
    rows = []
    measured = [
        statistics.median(paired_ratios(by_name[name], by_name, BASE)) - 1 if name in by_name else None
        for name in map(snoo_step_name, AMORTISED_KS)
    ]
    rows.append(("SNOO(AdamW) step at K / AdamW step - 1, measured", measured))
    for how in ("foreach", "fused") if fused else ("foreach",):
        alone = by_name[outer_name("SNOO", how)].seconds
        rows.append(
            (
                f"outer step ({how}) / K / AdamW step",
                [statistics.median(o / k / b for o, b in zip(alone, base)) for k in AMORTISED_KS],
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=11, help="samples per contender, taken round-robin")
    parser.add_argument("--no-fused", action="store_true", help="leave out fused=True (no compiling)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dev = args.device

    params = make_params(args.width, args.layers, dev)
    n = sum(p.numel() for p in params)
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    contenders, compile_seconds = build_contenders(params, fused=not args.no_fused)
    start = time.perf_counter()
    time_round_robin(contenders, args.rounds, dev)
    wall = time.perf_counter() - start

    by_name = {c.name: c for c in contenders}
    skipped = 0
    for c in contenders:  # extra memory of the wrappers, now that warm-up has created their state
        opt = getattr(c.fn, "__self__", None)
        if isinstance(opt, snoo.SNOO):  # Lookahead is a SNOO without momentum
            skipped += opt.skipped_outer_steps
            if isinstance(opt.inner, torch.optim.AdamW):
                c.extra_memory = f"{state_bytes(opt, {'slow', 'momentum'}) / param_bytes:.1f}x params"
    if skipped:  # a skipped outer step is a cheaper one: the timings would flatter the wrappers
        print(f"WARNING: {skipped} outer steps were skipped as non-finite: the outer-step rows do not hold\n")

    print(
        f"{n / 1e6:.1f} M parameters ({args.layers} x Linear({args.width}, {args.width})), {dev}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.rounds} rounds, round-robin, "
        f"{wall:.0f} s; medians, spread = interquartile range; ratios paired within each round\n"
    )
    print("| what | ms per call | spread (ms) | ratio | ratio spread | extra memory |")
    print("|---|---:|---:|---:|---:|---:|")
    for c in contenders:
        q1, q2, q3 = quartiles(c.seconds)
        r1, r2, r3 = quartiles(paired_ratios(c, by_name))
        unit = REFERENCES.get(c.reference or c.name, "floor")
        print(
            f"| {c.name} | {q2 * 1e3:.1f} | {q1 * 1e3:.1f}-{q3 * 1e3:.1f} | {r2:.2f}x {unit} | "
            f"{r1:.2f}-{r3:.2f} | {c.extra_memory} |"
        )
    print("\n| outer step, paired within each round | ratio | spread |\n|---|---:|---:|")
    for what, name, reference in comparisons(by_name):
        r1, r2, r3 = quartiles(paired_ratios(by_name[name], by_name, reference))
        print(f"| {what} | {r2:.2f}x | {r1:.2f}-{r3:.2f} |")
    print("\n| amortised over AdamW's step | " + " | ".join(f"K={k}" for k in AMORTISED_KS) + " |")
    print("|---|" + "---:|" * len(AMORTISED_KS))
    for what, values in amortised(by_name, fused=not args.no_fused):
        cells = ["-" if v is None else f"{100 * v:+.1f}%" for v in values]
        print(f"| {what} | " + " | ".join(cells) + " |")
    for name, seconds in compile_seconds.items():
        print(f"\n{name}: compiled in {seconds:.0f} s (its first call)", end="")
    print()


if __name__ == "__main__":
    main()
