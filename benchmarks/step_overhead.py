"""What SNOO costs per optimizer step, and how close its outer step is to the memory floor.

For a stack of square Linear layers (25 M parameters by default) with fixed random gradients, it times ``step()`` of
AdamW (foreach) alone, of SNOO around it at K=1 and K=20, of Lookahead, the outer step alone against a copy of the
same bytes (the floor: the outer step must read and write the parameters, slow weights and momentum), and the same
for ``pytorch_optimizer``'s Lookahead, a real peer (``pip install pytorch_optimizer`` for this benchmark only; it is
skipped when missing). It also reports each wrapper's extra memory. Prints a markdown table.

    python benchmarks/step_overhead.py [--width 1024] [--layers 24] [--rounds 15] [--threads N] [--device cpu]

Every contender is built first; then each round times every contender once, in turn (round-robin, the starting
contender rotating from round to round), over a whole number of outer cycles (20 calls of a step, so SNOO at K=20
does exactly one outer step in each sample). A machine that is busier in one stretch of the run slows all the
contenders of that round alike, and no contender always runs right after the same neighbour, so the order of
measuring cannot make a wrapper look faster than its own inner optimizer. Each ratio is the median, over rounds, of
the contender's time divided by its reference's time *in the same round*; the spread is the interquartile range.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

import snoo
from snoo.optim.snoo import outer_step

# the references, and the short name a ratio against each is given in
REFERENCES = {
    "AdamW (foreach) step": "AdamW",
    "copy of p, w, b once (memory floor)": "floor",
    "copy of p, w once (Lookahead's floor, floor2)": "floor2",
}
STEP_CALLS = 20  # calls per sample for a step: one cycle of K=20, and four of K=5
OUTER_CALLS = 5  # calls per sample for an outer step or a copy alone


@dataclass
class Contender:
    name: str
    fn: Callable[[], object]
    calls: int  # consecutive calls timed as one sample
    reference: str | None = None  # the contender its ratio is taken against (None: it is a reference)
    extra_memory: str = "-"
    seconds: list[float] = field(default_factory=list)  # per call, one sample per round


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


def paired_ratios(c: Contender, by_name: dict[str, Contender]) -> list[float]:
    ref = by_name[c.reference or c.name]
    return [a / b for a, b in zip(c.seconds, ref.seconds, strict=True)]


def state_bytes(opt: torch.optim.Optimizer, keys: set[str]) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for k, v in s.items() if k in keys)


def build_contenders(params: list[torch.nn.Parameter]) -> list[Contender]:
    def adamw() -> torch.optim.AdamW:
        return torch.optim.AdamW(params, lr=1e-4, foreach=True)

    param_bytes = sum(p.numel() * p.element_size() for p in params)
    base = "AdamW (foreach) step"
    contenders = [Contender(base, adamw().step, STEP_CALLS)]
    wrapped = [
        ("SNOO(AdamW) step, K=1", snoo.SNOO(adamw(), k=1)),
        ("SNOO(AdamW) step, K=20", snoo.SNOO(adamw(), k=20)),
        ("SNOO(AdamW) step, K=20, track_norms", snoo.SNOO(adamw(), k=20, track_norms=True)),
        ("snoo.Lookahead(AdamW) step, K=5", snoo.Lookahead(adamw(), k=5)),
    ]
    for name, opt in wrapped:
        contenders.append(Contender(name, opt.step, STEP_CALLS, base))

    # the outer step alone, against copying the bytes it must touch
    slow = [p.detach().clone() for p in params]
    momentum = [torch.zeros_like(p) for p in params]
    sources = [p.detach().clone() for p in params] + slow + momentum
    targets = [torch.empty_like(t) for t in sources]
    two = 2 * len(params)
    floor, floor2 = "copy of p, w, b once (memory floor)", "copy of p, w once (Lookahead's floor, floor2)"
    contenders += [
        Contender(floor, lambda: torch._foreach_copy_(targets, sources), OUTER_CALLS),
        Contender(
            "SNOO outer step alone (Nesterov)",
            lambda: outer_step(params, slow, momentum, lr=0.7, momentum=0.5, nesterov=True),
            OUTER_CALLS,
            floor,
        ),
        Contender(floor2, lambda: torch._foreach_copy_(targets[:two], sources[:two]), OUTER_CALLS),
        Contender(
            "Lookahead outer step alone (lerp + copy)",
            lambda: outer_step(params, slow, None, lr=0.5, momentum=0.0, nesterov=False),
            OUTER_CALLS,
            floor2,
        ),
    ]

    try:
        import pytorch_optimizer
    except ImportError:
        print("pytorch_optimizer is not installed: its Lookahead is left out (pip install pytorch_optimizer)")
    else:
        peer = pytorch_optimizer.Lookahead(adamw(), k=5, alpha=0.5)
        contenders.append(Contender("pytorch_optimizer.Lookahead(AdamW) step, K=5", peer.step, STEP_CALLS, base))
        peer.step()  # creates its slow weights
        contenders.append(
            Contender(
                "pytorch_optimizer.Lookahead outer step alone",
                lambda: peer.update(peer.param_groups[0]),
                OUTER_CALLS,
                floor2,
            )
        )
        contenders[-2].extra_memory = f"{state_bytes(peer, {'slow_params'}) / param_bytes:.1f}x params"

    return contenders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=15, help="samples per contender, taken round-robin")
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
    contenders = build_contenders(params)
    start = time.perf_counter()
    time_round_robin(contenders, args.rounds, dev)
    wall = time.perf_counter() - start

    wrappers = {c.name: c for c in contenders}
    for c in contenders:  # extra memory of the wrappers, now that warm-up has created their state
        opt = getattr(c.fn, "__self__", None)
        if isinstance(opt, snoo.SNOO):  # Lookahead is a SNOO without momentum
            c.extra_memory = f"{state_bytes(opt, {'slow', 'momentum'}) / param_bytes:.1f}x params"

    print(
        f"{n / 1e6:.1f} M parameters ({args.layers} x Linear({args.width}, {args.width})), {dev}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.rounds} rounds, round-robin, "
        f"{wall:.0f} s; medians, spread = interquartile range; ratios paired within each round\n"
    )
    print("| what | ms per call | spread (ms) | ratio | ratio spread | extra memory |")
    print("|---|---:|---:|---:|---:|---:|")
    for c in contenders:
        q1, q2, q3 = quartiles(c.seconds)
        r1, r2, r3 = quartiles(paired_ratios(c, wrappers))
        unit = REFERENCES[c.reference or c.name]
        print(
            f"| {c.name} | {q2 * 1e3:.1f} | {q1 * 1e3:.1f}-{q3 * 1e3:.1f} | {r2:.2f}x {unit} | "
            f"{r1:.2f}-{r3:.2f} | {c.extra_memory} |"
        )


if __name__ == "__main__":
    main()
