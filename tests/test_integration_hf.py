"""snoo.integrations.hf with a tiny random Llama on CPU (no download): Trainer evaluates SNOO's slow weights by
itself; with the EvaluationWeights callback its checkpoints, save_model() and the model train() leaves hold them too;
a fresh Trainer resuming from a checkpoint continues with the same losses and weights as an uninterrupted run; and
create_optimizer builds the inner optimizer Trainer would build. In a plain Accelerate loop with gradient
accumulation (fp32 and bf16 autocast) SNOO takes one inner step per optimizer step, the loop matches a hand-written
one bit for bit, and save_state/load_state resume it bit for bit."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: nothing here may touch the network

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import snoo

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    get_scheduler,
)

from snoo.integrations.hf import EvaluationWeights, create_optimizer

# K = 4 with evaluations and checkpoints at steps 5 and 6: in the middle of an outer cycle, where the slow weights
# (of the outer step at 4) differ from the fast ones, so each check below can tell the two apart
K = 4


@pytest.fixture(autouse=True)
def quiet_machine() -> Iterator[None]:
    """One thread (the model is far too small to gain from more), and a fresh Accelerate state per test: its
    singletons would otherwise carry one test's gradient accumulation or mixed precision into the next."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    torch.set_num_threads(threads)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(config)


def tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randint(64, (n, 16), generator=torch.Generator().manual_seed(seed))


class LanguageModelling(torch.utils.data.Dataset):
    """Random token sequences, each its own labels (LlamaForCausalLM shifts them)."""

    def __init__(self, n: int, seed: int) -> None:
        self.ids = tokens(n, seed)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def arguments(output_dir: Path, **overrides) -> TrainingArguments:
    settings = {
        "max_steps": 10,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 8,
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "seed": 0,
        "disable_tqdm": True,
    }
    return TrainingArguments(output_dir=str(output_dir), **{**settings, **overrides})


class Record(TrainerCallback):
    """What this process's Trainer logged and evaluated: the training loss of each step, and at each evaluation the
    weights evaluated beside SNOO's slow and fast weights at that moment."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}
        self.evaluated: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "loss" in logs:
            self.losses[state.global_step] = logs["loss"]

    def on_evaluate(self, args, state, control, model=None, optimizer=None, **kwargs):
        saved = optimizer.state_dict()  # in eval mode here: Trainer's evaluation_loop called optimizer.eval()
        slow, fast = (snoo_state(saved, optimizer, model, name) for name in ("slow", "fast"))
        self.evaluated.append((weights(model), slow, fast))


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def snoo_state(saved: dict, opt: torch.optim.Optimizer, model: torch.nn.Module, name: str) -> dict[str, torch.Tensor]:
    """SNOO's ``name`` tensors ("slow", "fast") in a state dict of ``opt``, by parameter name (a state dict keys them
    by position in ``opt.param_groups``)."""
    names = {p: n for n, p in model.named_parameters()}
    order = [names[p] for group in opt.param_groups for p in group["params"]]
    key = f"snoo.{name}"
    return {order[i]: entry[key].clone() for i, entry in saved["state"].items() if key in entry}


def equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    assert a.keys() == b.keys()
    return all(torch.equal(a[n], b[n]) for n in a)


# -- Trainer ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("callback", [True, False], ids=["EvaluationWeights", "Trainer-alone"])
def test_trainer_evaluates_the_slow_weights_and_the_callback_saves_them(tmp_path, callback):
    """Trainer's evaluation_loop calls optimizer.eval(), so every evaluation sees the slow weights, with or without
    the callback. A checkpoint with no evaluation just before it (step 6) holds the slow weights only with the
    callback; Trainer alone saves the fast ones there. At step 10 Trainer evaluates, then saves: slow either way."""
    model = tiny_llama()
    args = arguments(tmp_path, eval_strategy="steps", eval_steps=5, save_strategy="steps", save_steps=6)
    opt = create_optimizer(model, args, k=K)
    record = Record()
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=LanguageModelling(64, seed=1),
        eval_dataset=LanguageModelling(8, seed=2),
        optimizers=(opt, None),
        callbacks=[record, EvaluationWeights()] if callback else [record],
    )
    trainer.train()

    assert len(record.evaluated) == 2  # steps 5 and 10
    for evaluated, slow, fast in record.evaluated:
        assert equal(evaluated, slow) and not equal(evaluated, fast)
    for step, saves_slow in ((6, callback), (10, True)):
        checkpoint = tmp_path / f"checkpoint-{step}"
        saved_model = load_file(checkpoint / "model.safetensors")
        saved_opt = torch.load(checkpoint / "optimizer.pt", weights_only=True)
        assert equal(saved_model, snoo_state(saved_opt, opt, model, "slow")) == saves_slow, f"checkpoint {step}"
        if saves_slow:  # the fast weights are in the optimizer's state, to resume from
            assert not equal(saved_model, snoo_state(saved_opt, opt, model, "fast"))
    # the scheduler Trainer built on opt moved the inner optimizer's lr: linear decay to 0 at max_steps
    assert [group["lr"] for group in opt.param_groups] == [0.0, 0.0]


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_trainer_resumes_from_a_checkpoint_exactly_and_ends_on_the_slow_weights(tmp_path, bf16):
    """Three runs of 14 optimizer steps (2 micro-batches each, 5 steps an epoch, shuffled by Trainer's sampler), all
    with EvaluationWeights: one straight; one that saves every 6 steps; and a fresh Trainer, around a model
    initialised differently, resuming from the checkpoint of step 6. They log the same losses at every step they run
    and end with the same slow and fast weights, bit for bit, the model holding the slow ones. The checkpoint's
    model holds the slow weights, so the resumed run gets its fast weights back from the optimizer's state. With an
    explicit optimizer and scheduler, not the helper."""
    steps, cut = 14, 6

    def run(directory: str, seed: int, save: bool, resume: Path | None = None) -> tuple:
        model = tiny_llama(seed)
        args = arguments(
            tmp_path / directory,
            max_steps=steps,
            gradient_accumulation_steps=2,
            save_strategy="steps" if save else "no",
            save_steps=cut,
            bf16=bf16,
        )
        opt = snoo.SNOO(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1), k=K)
        sched = get_scheduler("cosine", opt, num_warmup_steps=2, num_training_steps=steps)
        record = Record()
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=LanguageModelling(40, seed=1),
            optimizers=(opt, sched),
            callbacks=[record, EvaluationWeights()],
        )
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        saved = opt.state_dict()
        slow, fast = (snoo_state(saved, opt, model, name) for name in ("slow", "fast"))
        assert equal(weights(model), slow) and not equal(slow, fast)
        return trainer, slow, fast, record.losses

    _, slow, fast, losses = run("straight", 0, save=False)
    assert sorted(losses) == list(range(1, steps + 1))

    trainer, *ends, saving_losses = run("saving", 0, save=True)
    assert saving_losses == losses  # saving in eval mode does not disturb the run
    assert all(equal(a, b) for a, b in zip(ends, (slow, fast)))
    trainer.save_model(tmp_path / "final")
    assert equal(load_file(tmp_path / "final" / "model.safetensors"), slow)

    checkpoint = tmp_path / "saving" / f"checkpoint-{cut}"
    saved_opt = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert saved_opt["param_groups"][0]["snoo"]["training"] is False
    assert not equal(
        load_file(checkpoint / "model.safetensors"), snoo_state(saved_opt, trainer.optimizer, trainer.model, "fast")
    )

    _, *ends, resumed_losses = run("resumed", 1, save=True, resume=checkpoint)
    assert resumed_losses == {step: loss for step, loss in losses.items() if step > cut}
    assert all(equal(a, b) for a, b in zip(ends, (slow, fast)))


def test_trainer_loads_the_best_checkpoint_at_the_end(tmp_path):
    """With load_best_model_at_end, the model after train() is the best checkpoint's (slow) weights: the callback's
    eval() at the end does not overwrite them with the last slow weights."""
    model = tiny_llama()
    args = arguments(
        tmp_path,
        learning_rate=3e-2,
        eval_strategy="steps",
        eval_steps=3,
        save_strategy="steps",
        save_steps=3,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
    )
    opt = snoo.SNOO(torch.optim.AdamW(model.parameters(), lr=3e-2), k=K)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=LanguageModelling(64, seed=1),
        eval_dataset=LanguageModelling(8, seed=2),
        optimizers=(opt, None),
        callbacks=[EvaluationWeights()],
    )
    trainer.train()
    best = Path(trainer.state.best_model_checkpoint)
    assert best.name == "checkpoint-3"  # at this lr the eval loss rises: the best is not the last
    assert equal(weights(model), load_file(best / "model.safetensors"))
    assert not equal(weights(model), snoo_state(opt.state_dict(), opt, model, "slow"))


@pytest.mark.parametrize("optim", ["adamw_torch_fused", "adamw_torch", "sgd"])
def test_create_optimizer_wraps_the_optimizer_trainer_would_build(tmp_path, optim):
    """Same class, same parameter groups (no decay on biases and norm weights), same hyperparameters as the
    optimizer the installed Trainer builds from the same arguments; SNOO's own from the keywords."""
    model = tiny_llama()
    model.model.embed_tokens.weight.requires_grad_(False)  # frozen: in neither group, as in Trainer's
    args = arguments(
        tmp_path, optim=optim, learning_rate=3e-3, adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-7, weight_decay=0.1
    )
    opt = create_optimizer(model, args, k=7, outer_lr=0.6, outer_momentum=0.3, nesterov=False)
    reference = Trainer(model=model, args=args).create_optimizer()

    assert type(opt.inner) is type(reference)
    assert len(opt.param_groups) == len(reference.param_groups) == 2
    for group, expected in zip(opt.param_groups, reference.param_groups):
        assert [id(p) for p in group["params"]] == [id(p) for p in expected["params"]]
        assert {k: v for k, v in group.items() if k in expected and k != "params"} == {
            k: v for k, v in expected.items() if k != "params"
        }
        assert (group["outer_lr"], group["outer_momentum"], group["outer_nesterov"]) == (0.6, 0.3, False)
    assert opt.k == 7
    names = {p: n for n, p in model.named_parameters()}
    decayed, not_decayed = ([names[p] for p in group["params"]] for group in opt.param_groups)
    assert "model.layers.0.self_attn.q_proj.weight" in decayed and "lm_head.weight" in decayed
    assert "model.norm.weight" in not_decayed and "model.layers.0.input_layernorm.weight" in not_decayed
    assert "model.embed_tokens.weight" not in decayed + not_decayed


def test_create_optimizer_refuses_what_it_cannot_build(tmp_path, monkeypatch):
    model, args = tiny_llama(), arguments(tmp_path)
    with pytest.raises(TypeError, match=r"model must be an nn\.Module"):
        create_optimizer(model.state_dict(), args)
    with pytest.raises(TypeError, match=r"args must be a transformers\.TrainingArguments"):
        create_optimizer(model, {"learning_rate": 1e-3})
    with pytest.raises(ValueError, match="inner steps per outer step"):  # SNOO's own checks
        create_optimizer(model, args, k=0)
    # what Trainer gets for GaLore, LOMO or layer-wise optimizers (their own parameters) and for factories (Muon)
    for built in ((torch.optim.AdamW, {"params": [], "lr": 1e-3}), (lambda: None, {})):
        monkeypatch.setattr(Trainer, "get_optimizer_cls_and_kwargs", staticmethod(lambda args, model, b=built: b))
        with pytest.raises(ValueError, match="chooses its own parameters"):
            create_optimizer(model, args)

    class WithModes(torch.optim.SGD):  # what Trainer gets for the schedule-free optimizers
        def train(self) -> None: ...

        def eval(self) -> None: ...

    monkeypatch.setattr(Trainer, "get_optimizer_cls_and_kwargs", staticmethod(lambda args, model: (WithModes, {})))
    with pytest.raises(ValueError, match=r"train\(\) and eval\(\) modes of its own"):
        create_optimizer(model, args)


def test_evaluation_weights_refuses_an_optimizer_without_eval(tmp_path):
    trainer = Trainer(
        model=tiny_llama(),
        args=arguments(tmp_path, max_steps=1),
        train_dataset=LanguageModelling(8, seed=1),
        callbacks=[EvaluationWeights()],
    )
    with pytest.raises(TypeError, match="EvaluationWeights needs an optimizer with train"):
        trainer.train()


# -- Accelerate -------------------------------------------------------------------------------------------------------

ACCUMULATE = 4  # micro-batches per optimizer step


def prepared(mixed_precision: str, seed: int = 0) -> tuple:
    """A fresh Accelerator with gradient accumulation, and the model (initialised with ``seed``), SNOO, a shuffled
    loader and a scheduler, prepared. The seedable sampler with a fixed ``data_seed`` makes the order of the batches a
    function of that seed and the epoch alone, so that ``load_state`` + ``skip_first_batches`` can resume it."""
    # as in a new process: a test that builds a second Accelerator must not inherit the first one's state
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    accelerator = Accelerator(
        gradient_accumulation_steps=ACCUMULATE,
        mixed_precision=mixed_precision,
        cpu=True,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=7),
    )
    model = tiny_llama(seed)
    opt = snoo.SNOO(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1), k=K)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda n: 1 / (1 + 0.1 * n))
    loader = torch.utils.data.DataLoader(tokens(64, seed=1), batch_size=2, shuffle=True)
    return accelerator, *accelerator.prepare(model, opt, loader, sched)


def train(accelerator, model, opt, loader, sched, stop: int, start: int = 0, after_each=None) -> list[float]:
    """Micro-batches ``start + 1`` to ``stop`` of the usual Accelerate loop; returns their losses."""
    losses = []
    batches = accelerator.skip_first_batches(loader, start) if start else loader
    for micro_batch, ids in enumerate(batches, start=start + 1):
        with accelerator.accumulate(model):
            loss = model(input_ids=ids, labels=ids).loss
            accelerator.backward(loss)
            opt.step()  # AcceleratedOptimizer: SNOO's step only when the gradients are synchronised
            sched.step()
            opt.zero_grad()
        losses.append(loss.item())
        if after_each:
            after_each(micro_batch, ids)
        if micro_batch == stop:
            return losses
    raise AssertionError(f"the loader ran out before micro-batch {stop}")


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_accelerate_accumulation_steps_snoo_once_per_optimizer_step(mixed_precision):
    """With 4 micro-batches per optimizer step SNOO counts optimizer steps: its step count is micro-batches // 4 and
    the first outer step moves the slow weights at micro-batch 4K, not K. The prepared loop takes the very steps of
    a hand-written one (loss / 4 backward per micro-batch, step every 4), in bf16 autocast too; and eval()/train()
    through AcceleratedOptimizer swap the slow weights in and the fast ones back."""
    accelerator, model, opt, loader, sched = prepared(mixed_precision)
    initial = weights(model)
    batches, step_counts, slow = [], [], []

    def look(micro_batch: int, ids: torch.Tensor) -> None:
        batches.append(ids)
        saved = opt.state_dict()
        step_counts.append(saved["param_groups"][0]["snoo"]["inner_steps"])
        slow.append(snoo_state(saved, opt, model, "slow"))

    micro_batches = 5 * ACCUMULATE  # 5 optimizer steps: one outer step (at 4), then mid-cycle
    losses = train(accelerator, model, opt, loader, sched, micro_batches, after_each=look)
    assert step_counts == [n // ACCUMULATE for n in range(1, micro_batches + 1)]
    first_outer = K * ACCUMULATE
    assert all(equal(slow[n - 1], initial) for n in range(ACCUMULATE, first_outer))
    assert not equal(slow[first_outer - 1], initial)

    reference = tiny_llama()
    ref_opt = snoo.SNOO(torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1), k=K)
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref_opt, lambda n: 1 / (1 + 0.1 * n))
    ref_losses = []
    for n, ids in enumerate(batches, start=1):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed_precision == "bf16"):
            loss = reference(input_ids=ids, labels=ids).loss
        (loss / ACCUMULATE).backward()
        if n % ACCUMULATE == 0:
            ref_opt.step()
            ref_sched.step()
            ref_opt.zero_grad()
        ref_losses.append(loss.item())
    assert losses == ref_losses
    assert equal(weights(model), weights(reference))

    fast = weights(model)
    opt.eval()
    assert equal(weights(model), snoo_state(opt.state_dict(), opt, model, "slow")) and not equal(weights(model), fast)
    opt.train()
    assert equal(weights(model), fast)


def test_accelerate_save_state_in_eval_mode_resumes_exactly(tmp_path):
    """save_state after opt.eval() writes the slow weights as the model and the fast ones in the optimizer's state;
    load_state into freshly built objects (another initialisation), opt.train() and skip_first_batches continue the
    run with the losses and weights of an uninterrupted one, bit for bit (bf16 autocast, shuffled batches)."""
    stop, cut = 7 * ACCUMULATE, 3 * ACCUMULATE  # saved after optimizer step 3: mid-cycle

    accelerator, model, opt, loader, sched = prepared("bf16")
    losses = train(accelerator, model, opt, loader, sched, stop)
    uninterrupted = weights(model)

    accelerator, model, opt, loader, sched = prepared("bf16")
    first = train(accelerator, model, opt, loader, sched, cut)
    opt.eval()
    accelerator.save_state(tmp_path / "state")
    saved = opt.state_dict()
    written = load_file(tmp_path / "state" / "model.safetensors")
    assert equal(written, snoo_state(saved, opt, model, "slow")) and not equal(
        written, snoo_state(saved, opt, model, "fast")
    )

    accelerator, model, opt, loader, sched = prepared("bf16", seed=1)
    accelerator.load_state(tmp_path / "state")
    opt.train()
    rest = train(accelerator, model, opt, loader, sched, stop, start=cut)
    assert first + rest == losses
    assert equal(weights(model), uninterrupted)
