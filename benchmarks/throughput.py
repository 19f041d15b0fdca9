"""The lab at the machine's limit: how close a training step of the lab's model comes to one CPU core's matmul peak
at the model's own shapes, in fp32 and bf16, and whether two runs of one thread beat one run of two threads.

For the lab's GPT at several sizes (built and stepped as ``benchmarks/regime.py`` does: llama flavour, byte
vocabulary, batches of the default corpus; forward and loss, backward, clipping, the lab's AdamW), on one thread:

- **FLOPs per token**: the matrix-product FLOPs of one training step, ``snoo.lab.model.training_flops_per_token``
  (``torch.utils.flop_counter.FlopCounterMode``): ``6 N`` for the ``N`` weights of the Linear layers and ``14 L T C``
  for attention (dense ``T x T``; the backward kernel computes the scores again). Norms, activations, the loss and
  the optimizer are not FLOPs here, only time.
- **tokens/s** of the training step, and the **achieved GFLOP/s** = FLOPs per token x tokens/s.
- **peak**: every matrix product the step runs through ``mm`` / ``addmm`` / ``bmm`` (the Linear layers, forward and
  backward), recorded with its shapes and strides, then run alone on fresh tensors of those shapes: its GFLOP/s is
  what this core does on the step's own products. Attention's products run inside a fused kernel and are not among
  them (their FLOPs do count in the achieved figure).
- the same in **bf16**: the step under ``torch.autocast("cpu", dtype=torch.bfloat16)``, the products in bf16.

The machine may be busy: within each round every contender (step and products, fp32 and bf16) is timed once, in
turn, the first one rotating (``step_overhead.time_round_robin``); a figure is the median over rounds, and each ratio
(achieved / peak, bf16 / fp32) the median of the ratios *within* a round, so a busy stretch slows both sides alike.

Threads: at one size (``--parallel-size``) the tokens/s of one run with 1 thread, one run with 2 threads and two
runs with 1 thread each at the same time (their tokens together), in forked processes, the order alternating from
round to round; the ratios are again within a round.

    python benchmarks/throughput.py [--sizes 2x32,2x64,3x96,4x128,4x192] [--rounds 5] [--parallel-size 4x128]
    python benchmarks/throughput.py --sizes '' --rounds 3    # the threads measurement alone
    python benchmarks/throughput.py --quick    # a smoke run of a few seconds (the tests run it)
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time
from collections.abc import Callable
from multiprocessing.connection import Connection

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import bmm_flop, mm_flop

from regime import train_step
from snoo.lab import scaling
from snoo.lab.data import load_corpus
from snoo.lab.model import training_flops_per_token
from step_overhead import Contender, quartiles, time_round_robin

aten = torch.ops.aten
Product = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[int, ...]]  # shapes and strides of a, b


class RecordProducts(TorchDispatchMode):
    """Records the operands (shape, stride) of every mm / addmm / bmm that runs under it."""

    def __init__(self) -> None:
        super().__init__()
        self.products: list[Product] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (aten.mm, aten.bmm, aten.addmm):
            a, b = args[1:3] if func.overloadpacket is aten.addmm else args[:2]
            self.products.append((tuple(a.shape), tuple(b.shape), a.stride(), b.stride()))
        return func(*args, **(kwargs or {}))


def step_products(step: Callable[[], None]) -> list[Product]:
    """The matrix products one call of ``step`` runs."""
    with RecordProducts() as recorder:
        step()
    return recorder.products


def product_flops(products: list[Product]) -> int:
    return sum((mm_flop if len(a) == 2 else bmm_flop)(a, b) for a, b, _, _ in products)


def replay(products: list[Product], dtype: torch.dtype) -> Callable[[], None]:
    """Runs ``products`` alone, on tensors of their shapes and strides in ``dtype``."""
    operands = [
        (torch.empty_strided(a, sa, dtype=dtype).normal_(), torch.empty_strided(b, sb, dtype=dtype).normal_())
        for a, b, sa, sb in products
    ]

    def run() -> None:
        for a, b in operands:
            torch.mm(a, b) if a.dim() == 2 else torch.bmm(a, b)

    return run


def gflops(flops: float, seconds: list[float]) -> float:
    return flops / statistics.median(seconds) / 1e9


def within(numerator: Contender, denominator: Contender, scale: float = 1.0) -> tuple[float, float, float]:
    """Quartiles over rounds of ``scale * denominator's time / numerator's time``, paired within each round."""
    return quartiles([scale * d / n for n, d in zip(numerator.seconds, denominator.seconds, strict=True)])


def measure_size(
    layers: int, width: int, batch: int, block: int, tokens: torch.Tensor, rounds: int, bf16: bool
) -> dict[str, object]:
    step32, model = train_step(layers, width, batch, block, tokens)
    products = step_products(step32)
    per_token = training_flops_per_token(model)
    step_flops, linear_flops = per_token * batch * block, product_flops(products)
    contenders = [Contender("step fp32", step32, 1), Contender("products fp32", replay(products, torch.float32), 1)]
    if bf16:
        contenders += [
            Contender("step bf16", train_step(layers, width, batch, block, tokens, bf16=True)[0], 1),
            Contender("products bf16", replay(products, torch.bfloat16), 1),
        ]
    time_round_robin(contenders, rounds, "cpu")
    by_name = {c.name: c for c in contenders}
    row: dict[str, object] = {
        "model": f"{layers}x{width}",
        "params": model.num_params(),
        "flops_per_token": per_token,
        "attention_share": 1 - linear_flops / step_flops,
    }
    for precision in ("fp32", "bf16") if bf16 else ("fp32",):
        step, alone = by_name[f"step {precision}"], by_name[f"products {precision}"]
        row[precision] = {
            "tokens_per_s": batch * block / statistics.median(step.seconds),
            "achieved": gflops(step_flops, step.seconds),
            "peak": gflops(linear_flops, alone.seconds),
            # achieved / peak in each round: (step_flops / t_step) / (linear_flops / t_alone)
            "of_peak": within(step, alone, step_flops / linear_flops),
        }
    if bf16:
        row["bf16_speed"] = within(by_name["step bf16"], by_name["step fp32"])  # fp32 time / bf16 time
    return row


def _worker(conn: Connection, layers: int, width: int, batch: int, block: int, tokens: torch.Tensor, threads: int):
    """A run in its own process: waits for a number of steps, trains them, answers with the seconds taken."""
    torch.set_num_threads(threads)
    step, _ = train_step(layers, width, batch, block, tokens)
    step()
    conn.send(0.0)
    while steps := conn.recv():
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        conn.send(time.perf_counter() - t0)


#: the threads measurement: each way of using the cores, as the threads of each of its runs
LAYOUTS = {"1 run x 1 thread": (1,), "1 run x 2 threads": (2,), "2 runs x 1 thread": (1, 1)}


def measure_threads(
    layers: int, width: int, batch: int, block: int, tokens: torch.Tensor, steps: int, rounds: int
) -> dict[str, list[float]]:
    """Tokens/s of each of ``LAYOUTS`` (its runs' tokens together), one sample per round, the order rotating."""
    fork = multiprocessing.get_context("fork")  # the workers start from this process's imports, in a second

    def start(threads: int) -> tuple[Connection, multiprocessing.process.BaseProcess]:
        here, there = fork.Pipe()
        args = (there, layers, width, batch, block, tokens, threads)
        process = fork.Process(target=_worker, args=args, daemon=True)
        process.start()
        return here, process

    workers = {name: [start(threads) for threads in layout] for name, layout in LAYOUTS.items()}
    for pipes in workers.values():
        for here, _ in pipes:
            here.recv()  # built and warmed up
    rates: dict[str, list] = {name: [] for name in workers}
    names = list(workers)
    try:
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                t0 = time.perf_counter()
                for here, _ in workers[name]:
                    here.send(steps)
                for here, _ in workers[name]:
                    here.recv()
                rates[name].append(len(workers[name]) * steps * batch * block / (time.perf_counter() - t0))
    finally:
        for pipes in workers.values():
            for here, process in pipes:
                here.send(0)
                process.join()
    return rates


def _fmt(q: tuple[float, float, float]) -> str:
    return f"{q[1]:.2f} ({q[0]:.2f}-{q[2]:.2f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="2x32,2x64,3x96,4x128,4x192", help="LAYERSxWIDTH,... ('': none)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-bf16", dest="bf16", action="store_false", help="fp32 only")
    ap.add_argument("--parallel-size", default="4x128", help="the size of the threads measurement; '' to skip it")
    ap.add_argument("--parallel-steps", type=int, default=1, help="steps per sample of the threads measurement")
    ap.add_argument("--quick", action="store_true", help="a smoke run of a few seconds: tiny sizes, two rounds")
    args = ap.parse_args()
    if args.quick:
        args.sizes, args.batch, args.block, args.rounds = "1x32,2x32", 2, 32, 2
        args.parallel_size, args.parallel_steps = "1x32", 1
    torch.set_num_threads(1)
    tokens = load_corpus().train
    print(
        f"one thread, batch {args.batch} x block {args.block}, median over {args.rounds} rounds (ratios: median within "
        f"a round, interquartile range in brackets); CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"torch {torch.__version__}\n"
    )
    precisions = ("fp32", "bf16") if args.bf16 else ("fp32",)
    columns = ["model", "params", "MFLOP/token", "attention FLOPs"]
    for p in precisions:
        columns += [f"{p} tokens/s", f"{p} GFLOP/s", f"{p} peak GFLOP/s", f"{p} of peak"]
    columns += ["bf16 speed / fp32"] if args.bf16 else []
    sizes = scaling.parse_sizes(args.sizes) if args.sizes else []
    if sizes:
        print("| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|")
    for layers, width in sizes:
        row = measure_size(layers, width, args.batch, args.block, tokens, args.rounds, args.bf16)
        line = (
            f"| {row['model']} | {row['params']:,} | {row['flops_per_token'] / 1e6:.3g} "
            f"| {row['attention_share']:.0%} |"
        )
        for p in precisions:
            r = row[p]
            line += f" {r['tokens_per_s']:,.0f} | {r['achieved']:.1f} | {r['peak']:.1f} | {_fmt(r['of_peak'])} |"
        print(line + (f" {_fmt(row['bf16_speed'])} |" if args.bf16 else ""), flush=True)
    if not args.parallel_size:
        return
    ((layers, width),) = scaling.parse_sizes(args.parallel_size)
    rates = measure_threads(layers, width, args.batch, args.block, tokens, args.parallel_steps, args.rounds)
    base = rates["1 run x 1 thread"]
    print(f"\n{layers}x{width}: tokens/s of all runs together, {args.parallel_steps} steps per sample\n")
    print("| how | tokens/s | against 1 run x 1 thread |\n|---|---|---|")
    for name, values in rates.items():
        ratio = quartiles([v / b for v, b in zip(values, base, strict=True)])
        print(f"| {name} | {statistics.median(values):,.0f} | {_fmt(ratio)} |")
    two = quartiles([a / b for a, b in zip(rates["2 runs x 1 thread"], rates["1 run x 2 threads"], strict=True)])
    print(f"\n2 runs x 1 thread against 1 run x 2 threads: {_fmt(two)}")


if __name__ == "__main__":
    main()
