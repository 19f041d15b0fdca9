"""Optimizer-state bytes and mean step time of the inner optimizers (and each under SNOO) on one small transformer.

    python benchmarks/optimizer_memory.py              # CPU defaults, one thread: about 20 seconds
    python benchmarks/optimizer_memory.py --device cuda --dim 1024 --layers 8 --vocab 32768

Gradients are random and set once, so the time is the optimizer's ``step()`` alone (no forward or backward).
State bytes count every tensor in ``optimizer.state_dict()["state"]`` (what a checkpoint holds).
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import snoo

try:
    from snoo import SNOO
except ImportError:  # the wrapper is optional here: without it the SNOO rows are left out
    SNOO = None  # type: ignore[assignment,misc]


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.mlp_norm = nn.RMSNorm(dim)
        self.up = nn.Linear(dim, 4 * dim, bias=False)
        self.down = nn.Linear(4 * dim, dim, bias=False)


class TransformerLike(nn.Module):
    """The parameter shapes of a LLaMA-style language model (the forward pass is not needed here)."""

    def __init__(self, vocab: int, dim: int, layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(layers))
        self.norm = nn.RMSNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)


def state_bytes(opt: torch.optim.Optimizer) -> int:
    seen: set[int] = set()
    total = 0

    def walk(value: Any) -> None:
        nonlocal total
        if isinstance(value, torch.Tensor):
            key = value.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += value.untyped_storage().nbytes()
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list | tuple):
            for v in value:
                walk(v)

    walk(opt.state_dict()["state"])
    return total


def measure(model: nn.Module, opt: torch.optim.Optimizer, steps: int, warmup: int, device: torch.device) -> float:
    """Mean seconds per ``step()``, after ``warmup`` steps (which also allocate the state)."""
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.mean(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40, help="timed steps per optimizer (two SNOO cycles at k=20)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--k", type=int, default=20, help="SNOO's inner steps per outer step")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads on CPU (0: torch's default); 1 is steadiest"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    torch.manual_seed(0)
    model = TransformerLike(args.vocab, args.dim, args.layers).to(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-2
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    def groups() -> list[dict[str, Any]]:
        return snoo.param_groups(model)

    inner: dict[str, Callable[[], torch.optim.Optimizer]] = {
        "AdamW (foreach)": lambda: torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True),
        "AdamW (loop)": lambda: torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False),
        "MuonAdamW": lambda: snoo.MuonAdamW(groups()),
        "SCALE (foreach)": lambda: snoo.SCALE(groups(), foreach=True),
        "SCALE (loop)": lambda: snoo.SCALE(groups(), foreach=False),
        "SGD-LL (foreach)": lambda: snoo.SGDLL(groups(), foreach=True),
        "SGD-LL (loop)": lambda: snoo.SGDLL(groups(), foreach=False),
    }
    rows: list[tuple[str, Callable[[], torch.optim.Optimizer]]] = list(inner.items())
    if SNOO is not None:
        for name in ("AdamW (foreach)", "MuonAdamW", "SCALE (foreach)", "SGD-LL (foreach)"):
            make = inner[name]
            rows.append((f"SNOO(k={args.k}) + {name}", lambda make=make: SNOO(make(), k=args.k)))

    n_params = sum(p.numel() for p in model.parameters())
    threads = torch.get_num_threads() if device.type == "cpu" else "-"
    print(
        f"model: vocab {args.vocab}, dim {args.dim}, {args.layers} layers, {n_params / 1e6:.2f}M parameters "
        f"({param_bytes / 2**20:.1f} MiB); device {device}, threads {threads}; "
        f"mean of {args.steps} steps after {args.warmup}\n"
    )
    print("| optimizer | state MiB | state / params | step ms |")
    print("|---|---:|---:|---:|")
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    for name, make in rows:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(initial[n])
        opt = make()
        seconds = measure(model, opt, args.steps, args.warmup, device)
        size = state_bytes(opt)
        print(f"| {name} | {size / 2**20:.1f} | {size / param_bytes:.2f} | {seconds * 1e3:.2f} |")
        del opt


if __name__ == "__main__":
    main()
