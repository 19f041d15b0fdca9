"""SNOO's outer step on a GPU against the memory floor, and what it costs a real training step.

For the parameters of GPT-2 small (the lab's ``gpt`` flavour at 12 x 768, 50304-token vocabulary, tied head: 124M
parameters), with float32 parameters and with bf16 parameters (float32 slow weights and momentum), CUDA events time:

- a device-to-device copy of the bytes the outer step must read and write (parameters, slow weights, momentum): the
  floor; and of the parameters and slow weights only, Lookahead's floor;
- the outer step: the bare foreach function (``snoo.optim.outer.outer_step``), and as SNOO's ``step()`` runs it
  around an inner optimizer that does nothing (foreach, foreach with ``skip_nonfinite=False``, and with
  ``--fused`` the compiled ``fused=True`` path, with its compile time and its largest difference to the foreach
  result); the authors' approach (slow weights stepped by ``torch.optim.SGD(nesterov=True)``); Lookahead's outer
  step, foreach and fused, and ``pytorch_optimizer.Lookahead``'s when it is installed (left out with a message
  when not);
- one training step of that model (forward and backward under bf16 autocast, ``torch.compile``\\d unless
  ``--no-compile``, AdamW), at the lab's ``base`` micro-batch (16 x 1024 tokens), and the outer step amortised over
  K = 1, 5, 20, 100 such steps as a share of it (a real step of the lab's ``base`` preset accumulates 4
  micro-batches, so this share is an upper bound).

Prints markdown tables. Targets (issues 14, 25): the fused outer step at most 1.3x the floor, and under 0.5% of a
training step at K=20. ``--quick`` runs a tiny model on the CPU in seconds (what the test suite runs, so that this
script does not rot); its numbers mean nothing.

    PYTHONPATH=src python benchmarks/outer_step_gpu.py [--fused] [--repeats 20] [--quick]

A ratio here is of two medians taken one after the other (CUDA events on a quiet GPU are steady); on a shared CPU
use ``benchmarks/step_overhead.py``, which pairs its ratios within interleaved rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import snoo
from snoo.optim.outer import outer_step
from step_overhead import Still, authors_outer_step  # this directory, as when run as a script

AMORTISED_KS = (1, 5, 20, 100)


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


def outer_step_rows(
    params: list[torch.Tensor], measure: Callable, repeats: int, fused: bool
) -> list[tuple[str, float, str]]:
    """Rows (what, ms, ratio) for one parameter dtype; those named "SNOO outer step in step() (...)" are what the
    amortised table takes."""
    for p in params:  # the wrappers take the outer step of trainable parameters that got a gradient in the cycle
        p.requires_grad_(True)
        p.grad = torch.zeros_like(p)
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

    in_step: list[tuple[str, str, dict, float, str]] = [
        ("SNOO", "foreach", {}, floor, "floor"),
        ("SNOO", "foreach, skip_nonfinite=False", {"skip_nonfinite": False}, floor, "floor"),
        ("snoo.Lookahead", "foreach", {}, floor2, "floor2"),
    ]
    if fused:
        in_step += [
            ("SNOO", "fused", {"fused": True}, floor, "floor"),
            ("snoo.Lookahead", "fused", {"fused": True}, floor2, "floor2"),
        ]
    for what, how, kwargs, reference, unit in in_step:
        kind = snoo.SNOO if what == "SNOO" else snoo.Lookahead
        opt = kind(Still(params), k=1, **kwargs)
        name = f"{what} outer step in step() ({how})"
        if opt.fused:
            name += f"; {compile_and_compare(kind, opt, params)}"
        ms = measure(opt.step, repeats)
        rows.append((name, ms, f"{ms / reference:.2f}x {unit}"))
        del opt
    authors = measure(authors_outer_step(params, lr=0.7, momentum=0.5), repeats)
    rows.append(
        ("authors' outer step (slow weights stepped by SGD(nesterov=True))", authors, f"{authors / floor:.2f}x floor")
    )
    try:
        import pytorch_optimizer
    except ImportError:
        print("pytorch_optimizer is not installed: its Lookahead is left out (pip install pytorch_optimizer)\n")
    else:
        peer = pytorch_optimizer.Lookahead(Still(params), k=1, alpha=0.5)
        peer.step()  # creates its slow weights (in the parameters' dtype)
        ms = measure(lambda: peer.update(peer.param_groups[0]), repeats)
        rows.append(("pytorch_optimizer.Lookahead outer step", ms, f"{ms / floor2:.2f}x floor2"))
    return rows


def compile_and_compare(kind: type[snoo.SNOO], opt: snoo.SNOO, params: list[torch.Tensor]) -> str:
    """Take ``opt``'s first (compiling) outer step; then, from fast weights moved by the same noise, one more beside
    the foreach path's from the same tensors. Says how long the first took and the largest difference of the slow
    weights of the second, relative to the largest slow weight."""
    copies = [p.detach().clone().requires_grad_() for p in params]
    for copy, p in zip(copies, params):
        copy.grad = p.grad
    t0 = time.perf_counter()
    opt.step()
    if params[0].device.type == "cuda":
        torch.cuda.synchronize(params[0].device)
    seconds = time.perf_counter() - t0
    foreach = kind(Still(copies), k=1)
    foreach.step()  # its state: the same slow weights
    generator = torch.Generator(params[0].device).manual_seed(0)
    for p, copy in zip(params, copies):
        noise = torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype) * 0.01
        p.add_(noise)
        copy.add_(noise)
    opt.step()
    foreach.step()
    got = [opt.state[p]["slow"] for p in params]
    want = [foreach.state[p]["slow"] for p in copies]
    scale = max(w.abs().max().item() for w in want)
    error = max((a - b).abs().max().item() for a, b in zip(got, want)) / scale
    return f"compiled in {seconds:.0f} s, max diff to foreach {error:.1e} of max abs w"


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
    parser.add_argument("--fused", action="store_true", help="also time SNOO's fused=True path (compiles first)")
    parser.add_argument("--no-compile", action="store_true", help="time the training step eagerly")
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
            tables[dtype] = outer_step_rows(parameters(dtype), measure, repeats, args.fused)
            print_table(f"{kind(dtype)} parameters, float32 state", tables[dtype])
            if device.type == "cuda":
                torch.cuda.empty_cache()

    compile = device.type == "cuda" and not args.no_compile
    step_ms = training_step_ms(model, device, measure, max(3, repeats // 4), compile, args.quick)
    tokens = "2 x 32" if args.quick else "16 x 1024"
    how = "bf16 autocast, compiled" if compile else ("bf16 autocast, eager" if device.type == "cuda" else "eager")
    ks = ", ".join(str(k) for k in AMORTISED_KS if k != 20)
    print(
        f"### amortised at K=20 and at K = {ks}: one training step ({tokens} tokens, {how}, AdamW) = {step_ms:.1f} ms\n"
    )
    print("| parameters | outer step | ms | " + " | ".join(f"K={k}" for k in AMORTISED_KS) + " |")
    print("|---|---|---:|" + "---:|" * len(AMORTISED_KS))
    prefix = "SNOO outer step in step() ("
    for dtype in dtypes:
        for what, ms, _ in tables[dtype]:
            if what.startswith(prefix) and "skip_nonfinite" not in what:
                path = what[len(prefix) :].split(")")[0].split(";")[0]
                shares = " | ".join(f"{100 * ms / k / step_ms:.3f}%" for k in AMORTISED_KS)
                print(f"| {kind(dtype)} | {path} | {ms:.3f} | {shares} |")
    print(flush=True)


if __name__ == "__main__":
    main()
