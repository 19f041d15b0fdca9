"""SNOO in a plain Accelerate loop: gradient accumulation, bf16 autocast, evaluation on the slow weights, a checkpoint
that resumes exactly, and export.

    python examples/accelerate_loop.py

A tiny Llama, built from a config (nothing is downloaded), learns a made-up language where every token is followed
by one of two tokens (best possible loss ln 2 = 0.69). Each optimizer step accumulates 4 micro-batches; Accelerate's
optimizer wrapper skips ``step()`` on the other 3, so SNOO's K counts optimizer steps, not micro-batches: the slow
and fast weights evaluate the same right after optimizer steps 24 and 48, where outer steps 3 and 6 just ran
(micro-batches 96 and 192), and differ in between (early on the slow weights lag behind). The script saves its state
in the middle of the run, finishes, then restarts from the saved state with a model initialised differently and
checks that it ends exactly where the uninterrupted run ended.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: nothing here needs the network

import math
import tempfile
from pathlib import Path

import torch

try:
    from accelerate import Accelerator, DataLoaderConfiguration
    from transformers import LlamaConfig, LlamaForCausalLM, get_scheduler
    from transformers.utils import logging
except ImportError as missing:
    name = missing.name or getattr(missing.__cause__, "name", None)  # snoo.integrations re-raises with a cause
    raise SystemExit(
        f'{Path(__file__).name} needs the integrations extra ({name} is missing): pip install -e ".[integrations]"'
    ) from None

import snoo

VOCAB, LENGTH, BATCH = 64, 32, 8
ACCUMULATE, K = 4, 8  # micro-batches per optimizer step; optimizer steps per outer step
STEPS = 48  # optimizer steps: 6 outer steps, 192 micro-batches
REPORT_EVERY = 12  # optimizer steps; 12 and 36 fall in the middle of an outer cycle, 24 and 48 on an outer step
CUT = 20  # the optimizer step after which the state is saved, in the middle of an outer cycle


def bigram_tokens(n: int, seed: int) -> torch.Tensor:
    """Sequences of a language where each token is followed by one of two tokens, each with probability 1/2."""
    successors = torch.randint(VOCAB, (VOCAB, 2), generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    ids = torch.empty(n, LENGTH, dtype=torch.long)
    ids[:, 0] = torch.randint(VOCAB, (n,), generator=g)
    for t in range(1, LENGTH):
        ids[:, t] = successors[ids[:, t - 1], torch.randint(2, (n,), generator=g)]
    return ids


def build(accelerator: Accelerator, seed: int) -> tuple:
    """Model (initialised with ``seed``), SNOO around AdamW, a cosine schedule and a shuffled loader, prepared."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=LENGTH,
    )
    model = LlamaForCausalLM(config)
    inner = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    opt = snoo.SNOO(inner, k=K, lr=0.7, momentum=0.5)
    # built on SNOO, whose param_groups are AdamW's: it moves AdamW's lr. Accelerate steps it once per optimizer step.
    sched = get_scheduler("cosine", opt, num_warmup_steps=4, num_training_steps=STEPS)
    loader = torch.utils.data.DataLoader(bigram_tokens(STEPS * ACCUMULATE * BATCH, seed=1), BATCH, shuffle=True)
    return accelerator.prepare(model, opt, sched, loader)


def loss_on(model: torch.nn.Module, ids: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    model.train()
    return loss


def train(accelerator, model, opt, sched, loader, first_step: int, save_to: Path | None = None) -> list[float]:
    """Optimizer steps ``first_step + 1`` to ``STEPS``; returns the mean micro-batch loss of each. Reports the eval
    loss of the slow and fast weights every ``REPORT_EVERY`` steps, and saves the state after step ``CUT`` if asked."""
    eval_ids = bigram_tokens(64, seed=2).to(accelerator.device)
    batches = accelerator.skip_first_batches(loader, first_step * ACCUMULATE) if first_step else loader
    losses, micro_losses = [], []
    for ids in batches:
        with accelerator.accumulate(model):
            loss = model(input_ids=ids, labels=ids).loss
            accelerator.backward(loss)
            opt.step()  # SNOO's step only when the gradients of ACCUMULATE micro-batches are in
            sched.step()
            opt.zero_grad()
        micro_losses.append(loss.item())
        if not accelerator.sync_gradients:
            continue
        losses.append(sum(micro_losses) / len(micro_losses))
        micro_losses = []
        step = first_step + len(losses)
        if step % REPORT_EVERY == 0:
            opt.eval()  # the slow weights into the model (AcceleratedOptimizer passes it on to SNOO)
            slow = loss_on(model, eval_ids)
            opt.train()  # the fast weights back, bit for bit
            fast = loss_on(model, eval_ids)
            print(
                f"  step {step:2d} ({step * ACCUMULATE:3d} micro-batches): train loss {losses[-1]:.3f}; "
                f"eval loss {slow:.3f} on the slow weights, {fast:.3f} on the fast ones"
            )
        if step == CUT and save_to is not None:
            opt.eval()  # so that the checkpoint's model.safetensors holds the slow weights
            accelerator.save_state(save_to)
            opt.train()
            print(f"  step {step:2d}: state saved (model: slow weights; optimizer: fast weights, mode eval)")
    return losses


def main() -> None:
    torch.set_num_threads(1)  # the model is tiny: more threads only add overhead
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    accelerator = Accelerator(
        gradient_accumulation_steps=ACCUMULATE,
        mixed_precision="bf16",  # autocast: on CPU too, with a recent torch
        # the seedable sampler draws each epoch's order from data_seed and the epoch alone, so that load_state and
        # skip_first_batches give a resumed run the batches it would have seen
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=0),
    )
    with tempfile.TemporaryDirectory(prefix="snoo-accelerate-") as tmp:
        state = Path(tmp) / "state"
        print(
            f"{STEPS} optimizer steps of {ACCUMULATE} micro-batches, SNOO(AdamW) with K={K}, bf16 autocast, on "
            f"{accelerator.device}; the best possible loss is {math.log(2):.3f}"
        )
        model, opt, sched, loader = build(accelerator, seed=0)
        losses = train(accelerator, model, opt, sched, loader, first_step=0, save_to=state)
        opt.eval()  # from here on, the model holds the slow weights
        final = [p.detach().clone() for p in model.parameters()]
        accelerator.unwrap_model(model).save_pretrained(Path(tmp) / "export")

        print(f"\nRestarting from the state saved after step {CUT}, around a model initialised differently")
        accelerator.free_memory(model, opt, sched, loader)  # forget the first run's objects and step count
        model, opt, sched, loader = build(accelerator, seed=1)
        accelerator.load_state(state)
        opt.train()  # the state was saved in eval mode: put the fast weights back before training
        resumed = train(accelerator, model, opt, sched, loader, first_step=CUT)
        opt.eval()
        same_weights = all(torch.equal(a, b) for a, b in zip(model.parameters(), final))
        print(f"  the same losses after step {CUT}: {resumed == losses[CUT:]}; the same final weights: {same_weights}")

        reloaded = LlamaForCausalLM.from_pretrained(Path(tmp) / "export")
        same_export = all(torch.equal(a, b.cpu()) for a, b in zip(reloaded.parameters(), final))
        print(f"\nsave_pretrained() after opt.eval(), then from_pretrained: the slow weights {same_export}")


if __name__ == "__main__":
    main()
