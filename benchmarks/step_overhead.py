"""What SNOO costs per optimizer step, and how close its outer step is to the memory floor.

For a stack of square Linear layers (25 M parameters by default) with fixed random gradients, it times ``step()`` of
AdamW (foreach) alone, of SNOO around it at K=1 and K=20, of Lookahead, the outer step alone against a copy of the
same bytes (the floor: the outer step must read and write the parameters, slow weights and momentum), and the same
for ``pytorch_optimizer``'s Lookahead, a real peer (``pip install pytorch_optimizer`` for this benchmark only; it is
skipped when missing). It also reports each wrapper's extra memory. Prints a markdown table; all ratios are against
AdamW's step or the copy measured in the same run.

    python benchmarks/step_overhead.py [--width 1024] [--layers 24] [--repeats 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import snoo
from snoo.optim.snoo import outer_step


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


def seconds_per_call(fn: Callable[[], object], calls: int, repeats: int, device: str) -> float:
    """Median over ``repeats`` of the mean time of ``calls`` consecutive calls (after one warm-up round)."""
    times = []
    for r in range(repeats + 1):
        sync(device)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync(device)
        if r:  # round 0 warms up allocations and lazy state
            times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


def state_bytes(opt: torch.optim.Optimizer, keys: set[str]) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for k, v in s.items() if k in keys)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    dev, reps = args.device, args.repeats

    def adamw(params: list[torch.nn.Parameter]) -> torch.optim.AdamW:
        return torch.optim.AdamW(params, lr=1e-4, foreach=True)

    params = make_params(args.width, args.layers, dev)
    n = sum(p.numel() for p in params)
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    rows: list[tuple[str, float, str, str]] = []  # name, seconds, ratio text, extra memory text

    base = seconds_per_call(adamw(params).step, 20, reps, dev)
    rows.append(("AdamW (foreach) step", base, "1.00x AdamW", "-"))

    for k in (1, 20):
        opt = snoo.SNOO(adamw(params), k=k)
        t = seconds_per_call(opt.step, 20, reps, dev)
        extra = state_bytes(opt, {"slow", "momentum"}) / param_bytes
        rows.append((f"SNOO(AdamW) step, K={k}", t, f"{t / base:.2f}x AdamW", f"{extra:.1f}x params"))
    opt = snoo.SNOO(adamw(params), k=20, track_norms=True)
    t = seconds_per_call(opt.step, 20, reps, dev)
    rows.append(("SNOO(AdamW) step, K=20, track_norms", t, f"{t / base:.2f}x AdamW", "2.0x params"))
    opt = snoo.Lookahead(adamw(params), k=5)
    t = seconds_per_call(opt.step, 20, reps, dev)
    extra = state_bytes(opt, {"slow", "momentum"}) / param_bytes
    rows.append(("snoo.Lookahead(AdamW) step, K=5", t, f"{t / base:.2f}x AdamW", f"{extra:.1f}x params"))

    # the outer step alone, against copying the bytes it must touch
    slow = [p.detach().clone() for p in params]
    momentum = [torch.zeros_like(p) for p in params]
    sources = [p.detach().clone() for p in params] + slow + momentum
    targets = [torch.empty_like(t) for t in sources]
    floor = seconds_per_call(lambda: torch._foreach_copy_(targets, sources), 5, reps, dev)
    rows.append(("copy of p, w, b once (memory floor)", floor, "1.00x floor", "-"))
    t = seconds_per_call(lambda: outer_step(params, slow, momentum, lr=0.7, momentum=0.5, nesterov=True), 5, reps, dev)
    rows.append(("SNOO outer step alone (Nesterov)", t, f"{t / floor:.2f}x floor", "-"))
    two = 2 * len(params)
    floor2 = seconds_per_call(lambda: torch._foreach_copy_(targets[:two], sources[:two]), 5, reps, dev)
    rows.append(("copy of p, w once (Lookahead's floor, floor2)", floor2, "1.00x floor2", "-"))
    t = seconds_per_call(lambda: outer_step(params, slow, None, lr=0.5, momentum=0.0, nesterov=False), 5, reps, dev)
    rows.append(("Lookahead outer step alone (lerp + copy)", t, f"{t / floor2:.2f}x floor2", "-"))

    try:
        import pytorch_optimizer
    except ImportError:
        rows.append(("pytorch_optimizer.Lookahead", float("nan"), "not installed", "-"))
    else:
        peer = pytorch_optimizer.Lookahead(adamw(params), k=5, alpha=0.5)
        t = seconds_per_call(peer.step, 20, reps, dev)
        extra = state_bytes(peer, {"slow_params"}) / param_bytes
        rows.append(
            ("pytorch_optimizer.Lookahead(AdamW) step, K=5", t, f"{t / base:.2f}x AdamW", f"{extra:.1f}x params")
        )
        peer.step()  # creates its slow weights
        t = seconds_per_call(lambda: peer.update(peer.param_groups[0]), 5, reps, dev)
        rows.append(("pytorch_optimizer.Lookahead outer step alone", t, f"{t / floor2:.2f}x floor2", "-"))

    print(
        f"{n / 1e6:.1f} M parameters ({args.layers} x Linear({args.width}, {args.width})), {dev}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {reps} rounds\n"
    )
    print("| what | ms per call | ratio | extra memory |")
    print("|---|---:|---:|---:|")
    for name, seconds, ratio, extra in rows:
        print(f"| {name} | {seconds * 1e3:.1f} | {ratio} | {extra} |")


if __name__ == "__main__":
    main()
