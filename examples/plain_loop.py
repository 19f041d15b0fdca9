"""SNOO in your own training loop: AdamW inside, a warm-up + cosine LR schedule, evaluation on the slow weights,
a checkpoint mid-run, and a resume that ends exactly where the uninterrupted run ends.

    python examples/plain_loop.py [--steps 300] [--out DIR]

A small next-byte model (8 bytes of context, an MLP) learns the source of a few modules of Python's standard
library; the last tenth of the text is held out. Only the library is needed (no extra). What SNOO changes in a loop:

1. build the inner optimizer as before and wrap it: ``opt = snoo.SNOO(inner, k=20, ...)``;
2. build the LR scheduler on ``opt`` (its ``param_groups`` are AdamW's, so it moves AdamW's lr);
3. around every evaluation, ``opt.eval()`` puts the slow weights into the model and ``opt.train()`` puts the fast
   ones back bit for bit; save the model for use between the two.

The script trains for ``--steps`` steps, saving a checkpoint halfway (in the middle of a cycle of K steps), then
builds everything afresh from a different initialisation, loads the checkpoint, trains the second half and checks
that the final weights are the same, bit for bit.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import textwrap
from pathlib import Path

import torch
from torch import nn

import snoo

CONTEXT, BATCH, K = 8, 64, 20
WARMUP = 30  # steps of linear warm-up of the inner lr
EVAL_EVERY = 50  # steps; 50, 150, 250 fall in the middle of a cycle of K, where slow and fast weights differ


def corpus() -> tuple[torch.Tensor, torch.Tensor]:
    """The bytes of a few standard-library modules, split 90/10 into training and validation text."""
    text = b"".join(Path(module.__file__).read_bytes() for module in (json, textwrap, argparse))
    data = torch.tensor(list(text), dtype=torch.long)
    cut = len(data) * 9 // 10
    return data[:cut], data[cut:]


def batch(data: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch ``step``: the same in every run, so a resumed run sees exactly the batches the first one saw."""
    g = torch.Generator().manual_seed(step)
    starts = torch.randint(len(data) - CONTEXT, (BATCH,), generator=g)
    windows = torch.stack([data[s : s + CONTEXT + 1] for s in starts.tolist()])
    return windows[:, :CONTEXT], windows[:, CONTEXT]


class NextByte(nn.Module):
    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, 16)
        self.mlp = nn.Sequential(nn.Linear(CONTEXT * 16, width), nn.GELU(), nn.Linear(width, 256))

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.embed(context).flatten(1))


def build(seed: int, steps: int) -> tuple[NextByte, snoo.SNOO, torch.optim.lr_scheduler.LambdaLR]:
    torch.manual_seed(seed)
    model = NextByte()
    inner = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    opt = snoo.SNOO(inner, k=K, lr=0.7, momentum=0.5)

    def lr_factor(step: int) -> float:
        if step < WARMUP:
            return (step + 1) / WARMUP
        return 0.5 * (1 + math.cos(math.pi * (step - WARMUP) / max(1, steps - WARMUP)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)  # on opt: moves AdamW's lr
    return model, opt, sched


@torch.no_grad()
def evaluate(model: nn.Module, data: torch.Tensor) -> float:
    """Mean next-byte cross-entropy (nats) on 8 fixed batches of the validation text."""
    batches = [batch(data, -1 - i) for i in range(8)]  # negative steps: batches no training step draws
    return sum(nn.functional.cross_entropy(model(x), y).item() for x, y in batches) / len(batches)


def train(
    model: NextByte,
    opt: snoo.SNOO,
    sched: torch.optim.lr_scheduler.LambdaLR,
    data: tuple[torch.Tensor, torch.Tensor],
    steps: range,
    checkpoint: Path | None = None,
    save_at: int | None = None,
) -> None:
    train_text, val_text = data
    for step in steps:
        x, y = batch(train_text, step)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()  # every K-th call also runs SNOO's outer step
        sched.step()
        opt.zero_grad()
        done = step + 1
        if done % EVAL_EVERY == 0 or done == steps.stop:
            opt.eval()  # the slow weights: the ones to evaluate and to save for use
            slow = evaluate(model, val_text)
            opt.train()  # the fast weights again, bit for bit
            fast = evaluate(model, val_text)
            print(f"step {done:4d}  train {loss.item():.3f}  val: slow weights {slow:.3f}, fast weights {fast:.3f}")
        if checkpoint is not None and done == save_at:
            state = {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "step": done}
            torch.save(state, checkpoint)
            print(f"step {done:4d}  saved {checkpoint.name} (step {done % K} of a cycle of {K})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", type=Path, default=None, help="where to write the files (default: a temp folder)")
    args = parser.parse_args()
    if args.steps < 2 * K:
        parser.error(f"--steps must be at least {2 * K} (two cycles of K={K})")
    torch.set_num_threads(1)
    data = corpus()
    save_at = args.steps // 2 // K * K + K // 2  # in the middle of a cycle, where slow and fast weights differ

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        checkpoint = out / "ckpt.pt"

        model, opt, sched = build(seed=0, steps=args.steps)
        train(model, opt, sched, data, range(args.steps), checkpoint, save_at)
        opt.eval()  # end of training: the slow weights into the model, then save it for use
        torch.save(model.state_dict(), out / "model.pt")
        final = [p.detach().clone() for p in model.parameters()]
        kept = "" if args.out else " (a temporary folder, removed at exit: --out DIR keeps the files)"
        print(f"saved {out / 'model.pt'}{kept}: the slow weights, val loss {evaluate(model, data[1]):.3f}")

        # a fresh process would do this: build the same model, optimizer and scheduler, then load
        model, opt, sched = build(seed=1, steps=args.steps)  # another initialisation: the checkpoint overwrites it
        state = torch.load(checkpoint, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        print(f"resumed from {checkpoint.name} at step {state['step']}")
        train(model, opt, sched, data, range(state["step"], args.steps))
        opt.eval()
        same = all(torch.equal(a, b) for a, b in zip(model.parameters(), final, strict=True))
        print(f"the resumed run ends on exactly the same slow weights: {same}")
        if not same:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
