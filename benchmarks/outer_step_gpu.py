"""SNOO's outer step on a GPU against the memory floor, and what it costs a real training step.

For the parameters of GPT-2 small (the lab's ``gpt`` flavour at 12 x 768, 50304-token vocabulary, tied head: 124M
parameters), with float32 parameters and with bf16 parameters (float32 slow weights and momentum), CUDA events time:

- a device-to-device copy of the bytes the outer step must read and write (parameters, slow weights, momentum): the
  floor; and of the parameters and slow weights only, Lookahead's floor;
- the outer step as SNOO runs it (``snoo.optim.snoo.outer_step``: a few ``torch._foreach_*`` passes), Nesterov, and
  Lookahead's (lerp and copy);
- with ``--fused`` (timed last), the same ``outer_step`` under ``torch.compile`` (Inductor fuses the passes), with its
  difference to the foreach result: the measurement that decides whether a fused kernel is worth adding to the
  library;
- one training step of that model (forward and backward under bf16 autocast, ``torch.compile``\\d unless
  ``--no-compile``, AdamW), at the lab's ``base`` micro-batch (16 x 1024 tokens), and the outer step amortised over
  K=20 such steps as a share of it (a real step of the lab's ``base`` preset accumulates 4 micro-batches, so this
  share is an upper bound).

Prints markdown tables. Targets (issue 14): the outer step at most 1.3x the floor, and under 0.5% of a training step
at K=20. ``--quick`` runs a tiny model on the CPU in seconds (what the test suite runs, so that this script does not
rot); its numbers mean nothing.

    PYTHONPATH=src python benchmarks/outer_step_gpu.py [--fused] [--repeats 20] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from snoo.optim.snoo import outer_step


def timer(device: torch.device) -> Callable[[Callable[[], object], int], float]:
    """``measure(fn, repeats)``: the median milliseconds of one call, after two warm-up calls; CUDA events on a GPU."""

    def measure(fn: Callable[[], object], repeats: int) -> float:
        for _ in range(2):
            fn()
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return measure


def gpt2_small(quick: bool, device: torch.device) -> torch.nn.Module:
    """GPT-2 small as the lab builds it for ``--preset base`` (a tiny one with ``quick``)."""
    from snoo.lab.model import GPT, ModelConfig

    if quick:
        cfg = ModelConfig(vocab_size=256, block_size=32, n_layer=2, n_head=2, n_embd=32, flavour="gpt")
    else:
        cfg = ModelConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768, flavour="gpt")
    torch.manual_seed(0)
    return GPT(cfg).to(device)


def nbytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def state_for(params: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Float32 slow weights and momentum for ``params``, as SNOO keeps them."""
    slow = [p.detach().to(torch.float32, copy=True) for p in params]
    return slow, [torch.zeros_like(w) for w in slow]


def outer_step_rows(params: list[torch.Tensor], measure: Callable, repeats: int) -> list[tuple[str, float, str]]:
    """Rows (what, ms, ratio) for one parameter dtype; the second is SNOO's outer step."""
    slow, momentum = state_for(params)
    sources = params + slow + momentum
    targets = [torch.empty_like(t) for t in sources]
    two = len(params) * 2
    moved = 2 * nbytes(sources)  # read once and written once
    rows: list[tuple[str, float, str]] = []

    floor = measure(lambda: torch._foreach_copy_(targets, sources), repeats)
    rows.append(
        (f"copy of p, w, b (floor, {moved / 1e9:.2f} GB moved)", floor, f"1.00x, {moved / floor / 1e6:.0f} GB/s")
    )
    snoo_ms = measure(lambda: outer_step(params, slow, momentum, lr=0.7, momentum=0.5, nesterov=True), repeats)
    rows.append(("SNOO outer step (foreach, Nesterov)", snoo_ms, f"{snoo_ms / floor:.2f}x floor"))
    floor2 = measure(lambda: torch._foreach_copy_(targets[:two], sources[:two]), repeats)
    rows.append(("copy of p, w (Lookahead's floor2)", floor2, "1.00x floor2"))
    look = measure(lambda: outer_step(params, slow, None, lr=0.5, momentum=0.0, nesterov=False), repeats)
    rows.append(("Lookahead outer step (lerp + copy)", look, f"{look / floor2:.2f}x floor2"))
    return rows


def fused_row(params: list[torch.Tensor], floor_ms: float, measure: Callable, repeats: int) -> tuple[str, float, str]:
    """``outer_step`` under ``torch.compile`` (Inductor fuses its passes into few kernels), with its largest difference
    to the foreach result after one step from the same tensors."""
    slow, momentum = state_for(params)
    compiled = torch.compile(outer_step)
    check = [[t.detach().clone() for t in ts] for ts in (params, slow, momentum)]
    want = [[t.detach().clone() for t in ts] for ts in (params, slow, momentum)]
    t0 = time.perf_counter()
    compiled(*check, lr=0.7, momentum=0.5, nesterov=True)
    seconds = time.perf_counter() - t0
    outer_step(*want, lr=0.7, momentum=0.5, nesterov=True)
    error = max((a.float() - b.float()).abs().max().item() for x, y in zip(check, want) for a, b in zip(x, y))
    del check, want
    ms = measure(lambda: compiled(params, slow, momentum, lr=0.7, momentum=0.5, nesterov=True), repeats)
    what = f"SNOO outer step, torch.compile'd (compiled in {seconds:.0f} s; max diff to foreach {error:.1e})"
    return what, ms, f"{ms / floor_ms:.2f}x floor"


def print_table(title: str, rows: list[tuple[str, float, str]]) -> None:
    print(f"### {title}\n\n| what | ms | ratio |\n|---|---:|---:|")
    for what, ms, ratio in rows:
        print(f"| {what} | {ms:.3f} | {ratio} |")
    print(flush=True)


def training_step_ms(
    model: torch.nn.Module, device: torch.device, measure: Callable, repeats: int, compile: bool, quick: bool
) -> float:
    batch, block = (2, 32) if quick else (16, 1024)
    vocab = model.cfg.vocab_size
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (batch, block), generator=g).to(device)
    y = torch.randint(0, vocab, (batch, block), generator=g).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    forward = torch.compile(model) if compile else model
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = forward(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return measure(step, repeats)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--fused", action="store_true", help="also time outer_step under torch.compile")
    parser.add_argument("--no-compile", action="store_true", help="time the training step eagerly")
    parser.add_argument("--k", type=int, default=20, help="inner steps per outer step for the amortised cost")
    parser.add_argument("--quick", action="store_true", help="a tiny model on the CPU, to check the script runs")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.quick or not torch.cuda.is_available() else "cuda")
    repeats = 2 if args.quick else args.repeats
    if args.quick:
        torch.set_num_threads(1)  # tiny tensors: a second thread only waits, and a busy machine makes it crawl
    measure = timer(device)
    model = gpt2_small(args.quick, device)
    n = sum(p.numel() for p in model.parameters())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{n / 1e6:.1f}M parameters ({len(list(model.parameters()))} tensors), {name}, torch {torch.__version__}")
    print(f"median of {repeats} calls, CUDA events\n" if device.type == "cuda" else f"median of {repeats} calls\n")

    def parameters(dtype: torch.dtype) -> list[torch.Tensor]:
        return [p.detach().to(dtype, copy=True) for p in model.parameters()]

    def kind(dtype: torch.dtype) -> str:
        return str(dtype).removeprefix("torch.")

    dtypes = (torch.float32, torch.bfloat16)
    tables = {}
    with torch.no_grad():
        for dtype in dtypes:
            tables[dtype] = outer_step_rows(parameters(dtype), measure, repeats)
            print_table(f"{kind(dtype)} parameters, float32 state", tables[dtype])
            if device.type == "cuda":
                torch.cuda.empty_cache()

    compile = device.type == "cuda" and not args.no_compile
    step_ms = training_step_ms(model, device, measure, max(3, repeats // 4), compile, args.quick)
    tokens = "2 x 32" if args.quick else "16 x 1024"
    how = "bf16 autocast, compiled" if compile else ("bf16 autocast, eager" if device.type == "cuda" else "eager")
    print(f"### amortised at K={args.k}: one training step ({tokens} tokens, {how}, AdamW) = {step_ms:.1f} ms\n")
    print("| parameters | outer step ms | per inner step ms | share of a training step |\n|---|---:|---:|---:|")
    for dtype in dtypes:
        ms = tables[dtype][1][1]
        print(f"| {kind(dtype)} | {ms:.3f} | {ms / args.k:.4f} | {100 * ms / args.k / step_ms:.3f}% |")
    print(flush=True)

    if args.fused and not args.quick:  # last: compiling takes a while, and the tables above are out already
        with torch.no_grad():
            for dtype in dtypes:
                try:
                    row = fused_row(parameters(dtype), tables[dtype][0][1], measure, repeats)
                except Exception as e:  # a failure to compile is a result too; the tables above stand
                    row = (f"torch.compile'd outer step failed: {type(e).__name__}: {e}"[:300], float("nan"), "-")
                print_table(f"{kind(dtype)} parameters, fused", [row])


if __name__ == "__main__":
    main()
