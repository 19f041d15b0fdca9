"""Which training regime a CPU can reach: tokens per second of the lab's model at several sizes, and the tokens per
parameter a default `snoo compare` (three seeds, WSD ladder, two optimizers, `--jobs 2`) reaches in ten minutes.

One training step (forward, backward, clip, AdamW) of the lab's GPT on byte-level batches of the default corpus,
one CPU thread per process, as `--jobs 2` runs it; the median of ``--repeats`` timings of ``--steps`` steps after a
warm-up of as many steps. Run it on a quiet machine: every figure is per process, and two processes share two cores.

    python benchmarks/regime.py [--sizes 1x64,2x64,3x64,4x64,4x96,4x128] [--batch 16] [--block 128] [--minutes 10]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import statistics
from collections.abc import Callable

import torch

from snoo import spec
from snoo.lab import scaling
from snoo.lab.data import get_batch, load_corpus
from snoo.lab.ladder import BUDGETS
from snoo.lab.model import GPT, ModelConfig
from step_overhead import Contender, time_round_robin

#: a default compare in runs of its 1x length: per seed the WSD ladder (2.5 + 0.2 * (1 + 1.25 + 1.5 + 2)) and SNOO
RUNS_PER_SEED = max(BUDGETS) + 0.2 * sum(b for b in BUDGETS if b != max(BUDGETS))
RUNS_PER_SEED += 1


def train_step(
    layers: int, width: int, batch: int, block: int, tokens: torch.Tensor, bf16: bool = False
) -> tuple[Callable[[], None], GPT]:
    """One training step of the lab's GPT per call, each on the next batch, as ``snoo.lab.train`` takes it: forward
    and loss (under bf16 autocast with ``bf16``), backward, gradient clipping, the lab's AdamW (``spec.build``)."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=256, block_size=block, n_layer=layers, n_head=max(1, width // 32), n_embd=width)
    model = GPT(cfg)
    opt = spec.build("adamw", model)
    amp = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    step = itertools.count()

    def run() -> None:
        x, y = get_batch(tokens, batch, block, 0, next(step))
        with amp():
            loss = model(x, y)
        loss.backward()
        loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return run, model


def step_seconds(
    layers: int, width: int, batch: int, block: int, steps: int, repeats: int, tokens: torch.Tensor
) -> tuple[float, int]:
    run, model = train_step(layers, width, batch, block, tokens)
    timed = Contender(f"{layers}x{width}", run, steps)
    time_round_robin([timed], repeats, "cpu")
    return statistics.median(timed.seconds), model.num_params()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1x64,2x64,3x64,4x64,4x96,4x128")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    tokens = load_corpus().train
    per_step = args.batch * args.block
    runs = RUNS_PER_SEED * args.seeds
    print(
        f"one thread per process; a default compare = {runs:.3g} runs of its 1x length ({args.seeds} seeds), "
        f"{args.jobs} at a time, in {args.minutes:g} minutes\n"
    )
    print("| model | params | ms per step | tokens/s | tokens per run in budget | tokens per parameter |")
    print("|---|---|---|---|---|---|")
    for layers, width in scaling.parse_sizes(args.sizes):
        seconds, params = step_seconds(layers, width, args.batch, args.block, args.steps, args.repeats, tokens)
        rate = per_step / seconds
        run_tokens = rate * args.minutes * 60 * args.jobs / runs
        print(
            f"| {layers}x{width} | {params:,} | {seconds * 1e3:.1f} | {rate:,.0f} | {run_tokens:,.0f} "
            f"| {run_tokens / params:.3g} |"
        )


if __name__ == "__main__":
    main()
