"""SNOO in Hugging Face Trainer: evaluate and save the slow weights, resume exactly, export the model.

    python examples/hf_trainer.py

A tiny Llama, built from a config (nothing is downloaded), learns a made-up language: every token is followed by
one of two tokens, so the best possible loss is ln 2 = 0.69. ``create_optimizer`` wraps the AdamW that Trainer would
build in SNOO; the ``EvaluationWeights`` callback makes Trainer's checkpoints and final model hold the slow weights
(Trainer already evaluates them). The script then resumes from a checkpoint in a fresh Trainer and checks that it
logs the same losses and ends on the same weights, and reloads the exported model with ``from_pretrained``.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: nothing here needs the network

import math
import tempfile
from pathlib import Path

import torch

try:
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        PrinterCallback,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )
    from transformers.utils import logging

    from snoo.integrations.hf import EvaluationWeights, create_optimizer
except ImportError as missing:
    name = missing.name or getattr(missing.__cause__, "name", None)  # snoo.integrations re-raises with a cause
    raise SystemExit(
        f'{Path(__file__).name} needs the integrations extra ({name} is missing): pip install -e ".[integrations]"'
    ) from None

VOCAB, LENGTH = 64, 32
# 64 steps = 8 outer steps of K = 8. Trainer evaluates at steps 25 and 50 and checkpoints at 30 and 60: all in the
# middle of an outer cycle, where the slow weights (those of the last outer step) differ from the fast ones. A real run
# should end on an outer step, as this one does: the fast weights' progress after the last one is not in the slow ones.
STEPS, K = 64, 8
EVAL_EVERY, SAVE_EVERY = 25, 30
LOG_EVERY = 10  # divides SAVE_EVERY, so that a run resumed from a checkpoint logs the means over the same steps


class Bigrams(torch.utils.data.Dataset):
    """Sequences of a language where each token is followed by one of two tokens, each with probability 1/2."""

    def __init__(self, n: int, seed: int) -> None:
        successors = torch.randint(VOCAB, (VOCAB, 2), generator=torch.Generator().manual_seed(0))
        g = torch.Generator().manual_seed(seed)
        ids = torch.empty(n, LENGTH, dtype=torch.long)
        ids[:, 0] = torch.randint(VOCAB, (n,), generator=g)
        for t in range(1, LENGTH):
            ids[:, t] = successors[ids[:, t - 1], torch.randint(2, (n,), generator=g)]
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=LENGTH,
    )
    return LlamaForCausalLM(config)


class ShowWeights(TrainerCallback):
    """Says which weights the model holds when Trainer evaluates it and when it has written a checkpoint: SNOO's slow
    ones or the fast ones (the optimizer keeps both while in eval mode)."""

    def on_evaluate(self, args, state, control, model=None, optimizer=None, metrics=None, **kwargs):
        print(f"  step {state.global_step:2d}: eval_loss {metrics['eval_loss']:.3f} {held(model, optimizer)}")

    def on_save(self, args, state, control, model=None, optimizer=None, **kwargs):
        print(f"  step {state.global_step:2d}: checkpoint written {held(model, optimizer)}")


def held(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> str:
    params = list(model.parameters())
    if not all(torch.equal(p, optimizer.state[p]["slow"]) for p in params):
        return "on the FAST weights"
    gap = max((p - optimizer.state[p]["fast"]).abs().max().item() for p in params)
    return f"on the slow weights (max |slow - fast| = {gap:.4f})"


def build(output_dir: Path, seed: int) -> Trainer:
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=STEPS,
        per_device_train_batch_size=16,
        learning_rate=3e-3,
        weight_decay=0.1,
        warmup_steps=8,
        logging_steps=LOG_EVERY,
        eval_strategy="steps",
        eval_steps=EVAL_EVERY,
        save_strategy="steps",
        save_steps=SAVE_EVERY,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    model = tiny_llama(seed)
    opt = create_optimizer(model, args, k=K, outer_lr=0.7, outer_momentum=0.5)  # SNOO around Trainer's AdamW
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Bigrams(2048, seed=1),
        eval_dataset=Bigrams(64, seed=2),
        optimizers=(opt, None),  # Trainer builds its linear schedule with warm-up on opt: it moves AdamW's lr
        callbacks=[EvaluationWeights(), ShowWeights()],
    )
    trainer.remove_callback(PrinterCallback)  # this script prints what it wants to show
    return trainer


def training_losses(trainer: Trainer) -> dict[int, float]:
    return {log["step"]: log["loss"] for log in trainer.state.log_history if "loss" in log}


def main() -> None:
    torch.set_num_threads(1)  # the model is tiny: more threads only add overhead
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="snoo-hf-trainer-") as tmp:
        out = Path(tmp)

        print(f"Training {STEPS} steps of SNOO(AdamW), K={K}; the best possible loss is {math.log(2):.3f}")
        trainer = build(out / "run", seed=0)
        trainer.train()
        losses = training_losses(trainer)
        print("  training loss:", ", ".join(f"{loss:.3f} (step {step})" for step, loss in losses.items()))
        final = [p.detach().clone() for p in trainer.model.parameters()]  # the slow weights: the callback's eval()

        print(f"\nResuming from the checkpoint of step {SAVE_EVERY} in a fresh Trainer, around another initialisation")
        resumed = build(out / "resumed", seed=1)
        resumed.train(resume_from_checkpoint=str(out / "run" / f"checkpoint-{SAVE_EVERY}"))
        after_cut = {step: loss for step, loss in losses.items() if step > SAVE_EVERY}
        same_losses = {step: training_losses(resumed)[step] for step in after_cut} == after_cut
        same_weights = all(torch.equal(a, b) for a, b in zip(resumed.model.parameters(), final))
        print(f"  the same losses after step {SAVE_EVERY}: {same_losses}; the same final weights: {same_weights}")

        trainer.save_model(str(out / "export"))
        reloaded = LlamaForCausalLM.from_pretrained(str(out / "export"))
        same_export = all(torch.equal(a, b) for a, b in zip(reloaded.parameters(), final))
        eval_ids = Bigrams(64, seed=2).ids
        with torch.no_grad():
            eval_loss = reloaded(input_ids=eval_ids, labels=eval_ids).loss.item()
        print(f"\nsave_model(), then from_pretrained: the slow weights {same_export}, eval loss {eval_loss:.3f}")


if __name__ == "__main__":
    main()
