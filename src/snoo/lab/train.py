"""Train one model with one optimizer, top to bottom: config, data, model, optimizer, loop, checkpoints.

Everything a run depends on is a field of ``TrainConfig``; a preset fills the size-related fields. A run directory
holds ``config.json``, ``metrics.jsonl`` (one JSON object per line), ``ckpt.pt`` (the latest good checkpoint,
written atomically) and ``result.json`` (written at the end). A run on several workers (``workers``, see
``workers.py``) is the same loop on every rank, with a sharded checkpoint ``ckpt.dcp`` in place of ``ckpt.pt``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from snoo import spec
from snoo.lab import workers
from snoo.lab.data import check_size, get_batch, limit_unique, load_corpus
from snoo.lab.model import GPT, ModelConfig
from snoo.optim import schedules


@dataclass
class TrainConfig:
    optimizer: str = "adamw"  # a SPEC (snoo.spec)
    # data
    data: str | None = None  # None: the standard library's source
    tokenizer: str = "byte"  # "byte" or "bpe"
    bpe_vocab: int = 4096
    unique_tokens: int | None = None  # train on only the first N tokens, repeated for several epochs
    # model (the preset sets these)
    flavour: str = "llama"
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 128
    tie_head: bool = True
    # loop
    steps: int = 500
    batch_size: int = 8
    grad_accum: int = 1
    schedule: str = "cosine"  # "cosine" (warm-up + cosine), "wsd" (warm-up, stable, decay) or "constant"
    warmup: float = 0.05  # fraction of the steps
    warmup_steps: int | None = None  # the warm-up in steps, when set (then ``warmup`` is not used)
    decay: float = 0.2  # wsd: fraction of the steps spent decaying to zero
    min_lr: float = 0.1  # cosine: the last lr as a fraction of the peak
    grad_clip: float = 1.0  # 0: off
    seed: int = 0
    # evaluation and logging
    eval_every: int = 50
    eval_batches: int = 8
    log_every: int = 10
    ckpt_every: int = 100
    out: str = "runs/train"
    tensorboard: bool = False
    progress: bool = True  # a tqdm bar, only when stderr is a terminal
    # hardware: "auto" takes a GPU, bf16 autocast and torch.compile when there is a GPU
    device: str = "auto"
    autocast: str = "auto"  # "auto", "bf16" or "off"
    compile: str = "auto"  # "auto", "on" or "off"
    threads: int = 0  # CPU threads for torch; 0: torch's default. 1 is far faster on a machine busy with other jobs
    # several worker processes on this machine (workers.py, docs/distributed.md)
    workers: int = 1  # > 1: the run starts this many ranks under torchrun, each reading its own batches
    parallel: str = "diloco"  # "diloco": SNOO averages pseudo-gradients every K steps; "ddp": gradients every step
    reduce_dtype: str = "fp32"  # what the ranks average in: "fp32" or "bf16" (half the bytes)
    dist_timeout: float = 300.0  # seconds a rank waits for the others in a collective before the run stops


PRESETS: dict[str, dict[str, Any]] = {
    # seconds, for tests
    "tiny": dict(
        n_layer=2,
        n_head=2,
        n_embd=32,
        block_size=32,
        batch_size=8,
        steps=40,
        eval_every=10,
        eval_batches=2,
        log_every=5,
        ckpt_every=10,
    ),
    # about 0.9M parameters; `snoo compare` with baseline budgets in under 10 minutes on 2 CPU cores
    "small": dict(
        n_layer=4,
        n_head=4,
        n_embd=128,
        block_size=128,
        batch_size=8,
        steps=500,
        eval_every=50,
        eval_batches=8,
        log_every=10,
        ckpt_every=100,
    ),
    # GPT-2 small (124M with GPT-2's 50304-token vocabulary, e.g. nanoGPT's openwebtext .bin); for a GPU
    "base": dict(
        flavour="gpt",
        n_layer=12,
        n_head=12,
        n_embd=768,
        block_size=1024,
        batch_size=16,
        grad_accum=4,
        steps=5000,
        warmup=0.04,
        eval_every=250,
        eval_batches=40,
        log_every=10,
        ckpt_every=500,
    ),
}


def make_config(preset: str = "small", **overrides: Any) -> TrainConfig:
    """Defaults, then the preset, then ``overrides`` (None values are ignored)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown config key {unknown[0]!r}; keys: {', '.join(sorted(names))}")
    cfg = TrainConfig(**{**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}})
    for f in dataclasses.fields(cfg):  # values from --set and config files arrive untyped
        value, default = getattr(cfg, f.name), f.default
        if default is None or value is None:
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not (
            number
            if isinstance(default, float)
            else isinstance(value, type(default)) and isinstance(value, bool) == isinstance(default, bool)
        ):
            raise ValueError(f"{f.name} must be {type(default).__name__}, got {value!r}")
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    spec.parse(cfg.optimizer)
    for name in ("steps", "batch_size", "grad_accum", "eval_every", "eval_batches", "log_every", "ckpt_every"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.threads < 0:
        raise ValueError(f"threads must be 0 (torch's default) or more, got {cfg.threads}")
    if cfg.schedule not in ("cosine", "wsd", "constant"):
        raise ValueError(f"schedule must be cosine, wsd or constant, got {cfg.schedule!r}")
    if cfg.warmup_steps is not None and cfg.warmup_steps < 0:
        raise ValueError(f"warmup_steps must be 0 or more, got {cfg.warmup_steps}")
    for name, value in (("warmup", cfg.warmup), ("decay", cfg.decay), ("min_lr", cfg.min_lr)):
        if not 0 <= value <= 1:
            raise ValueError(f"{name} is a fraction in [0, 1], got {value}")
    ModelConfig(n_head=cfg.n_head, n_embd=cfg.n_embd, flavour=cfg.flavour)  # its own checks
    lr_schedule(cfg)  # and the schedule's
    workers.check(cfg)


def lr_schedule(cfg: TrainConfig) -> Callable[[int], float]:
    """``s -> `` the inner lr of the step after ``s`` completed steps, as a fraction of the peak.

    Built from ``snoo.optim.schedules``: random access, so a resumed run gets exactly the lr it would have had.
    """
    warmup = round(cfg.warmup * cfg.steps) if cfg.warmup_steps is None else cfg.warmup_steps
    if cfg.schedule == "wsd":
        after = schedules.warmup_stable_decay(1.0, warmup, round(cfg.decay * cfg.steps), cfg.steps)
    elif cfg.schedule == "constant":
        after = schedules.constant(1.0)
    else:
        cosine = schedules.cosine(1.0, cfg.min_lr, max(1, cfg.steps - warmup))
        after = lambda s: cosine(s - warmup)  # noqa: E731
    if warmup == 0:
        return after
    ramp = schedules.linear_warmup(0.0, 1.0, warmup)
    return lambda s: ramp(s + 1) if s < warmup else after(s)


EVAL_SEED = 0  # the held-out batches do not depend on the run's seed


class Diverged(RuntimeError):
    pass


def _replace_atomically(path: Path, write: Callable[[Path], Any]) -> None:
    """Write to a temporary file beside ``path``, then rename it: a crash leaves the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _atomic_save(obj: Any, path: Path) -> None:
    _replace_atomically(path, lambda tmp: torch.save(obj, tmp))


def write_json(obj: Any, path: Path) -> None:
    _replace_atomically(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _modes(opt: torch.optim.Optimizer) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """(to evaluation weights, back to training weights); a plain torch optimizer has only one set."""
    return getattr(opt, "eval", lambda: None), getattr(opt, "train", lambda: None)


@torch.no_grad()
def evaluate(model: GPT, opt: torch.optim.Optimizer, batches: list, amp: Any) -> tuple[float, float]:
    """Mean loss over the held-out batches and the total l2 norm of the weights, both at the evaluation weights."""
    to_eval, to_train = _modes(opt)
    to_eval()
    model.eval()
    with amp():
        loss = sum(model(x, y).item() for x, y in batches) / len(batches)
    norm = math.sqrt(sum(p.float().pow(2).sum().item() for p in model.parameters()))
    model.train()
    to_train()
    return loss, norm


def _device(cfg: TrainConfig, world: workers.World) -> torch.device:
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    if world.size > 1 and device.type == "cuda":
        return torch.device("cuda", world.local_rank)
    return device


def _check_resumable(cfg: TrainConfig) -> None:
    """A run continues only from a checkpoint of its own kind: one process (``ckpt.pt``) or the same workers."""
    out = Path(cfg.out)
    sharded, single = workers.latest_checkpoint(out), (out / "ckpt.pt").exists()
    if cfg.workers == 1 and sharded and not single:
        saved = workers.progress(sharded)
        raise ValueError(
            f"{sharded} was written by a run on {saved['workers']} workers: resume it with --workers {saved['workers']}"
        )
    if cfg.workers > 1 and not sharded and single:
        raise ValueError(f"{out / 'ckpt.pt'} was written by a run without workers: resume it without --workers")
    if cfg.workers > 1 and sharded:
        saved = workers.progress(sharded)
        if (saved["workers"], saved["parallel"]) != (cfg.workers, cfg.parallel):
            raise ValueError(
                f"{sharded} was written by a run with workers={saved['workers']}, parallel={saved['parallel']}: "
                f"resume it with the same, or start afresh without --resume"
            )


def snapshot_name(step: int) -> str:
    """The file a run keeps its checkpoint of ``step`` in, besides ``ckpt.pt`` (``train(..., snapshots=...)``)."""
    return f"ckpt-{step}.pt"


def train(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    callback: Callable[[int, float], None] | None = None,
    snapshots: Sequence[int] = (),
) -> dict:
    """Run (or continue) one training run; returns what ``result.json`` holds.

    ``callback(step, loss)`` is called after every optimizer step (tests use it to interrupt a run). ``snapshots``:
    steps after which the run also keeps its checkpoint as :func:`snapshot_name` (the WSD ladder branches from them).
    A non-finite loss stops the run before the step that would have used it: the last checkpoint stays good.
    With ``cfg.workers > 1`` this process launches the ranks under torchrun and waits for them; under torchrun, it is
    one of the ranks.
    """
    world = workers.World.from_env()
    if cfg.workers > 1 and not world.launched:
        validate(cfg)
        if callback is not None:
            raise ValueError("callback runs in this process, not in the ranks that a run with workers > 1 starts")
        if resume:
            _check_resumable(cfg)  # here, before any rank starts
        return workers.launch(cfg, resume=resume)
    cfg = workers.adopt(cfg, world)
    validate(cfg)
    if world.size == 1:
        return _train(cfg, world, resume, callback, snapshots)
    workers.init_process_group(cfg, world, _device(cfg, world))
    try:
        return _train(cfg, world, resume, callback, snapshots)
    finally:
        torch.distributed.destroy_process_group()


def _train(
    cfg: TrainConfig,
    world: workers.World,
    resume: bool,
    callback: Callable[[int, float], None] | None,
    snapshots: Sequence[int],
) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = _device(cfg, world)
    cuda = device.type == "cuda"
    use_bf16 = cfg.autocast == "bf16" or (cfg.autocast == "auto" and cuda and torch.cuda.is_bf16_supported())
    distributed, main = world.size > 1, world.rank == 0  # rank 0 writes the files
    diloco, ddp = distributed and cfg.parallel == "diloco", distributed and cfg.parallel == "ddp"

    def amp() -> contextlib.AbstractContextManager:
        return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()

    # data: every train batch is a function of (seed, step, rank); the eval batches are one fixed set for every seed,
    # so a spread over seeds is the training's, not that of different held-out text
    corpus = load_corpus(cfg.data, cfg.tokenizer, cfg.bpe_vocab)
    check_size(corpus, cfg.block_size, cfg.data)
    train_tokens = limit_unique(corpus.train, cfg.unique_tokens)
    check_size(dataclasses.replace(corpus, train=train_tokens), cfg.block_size, cfg.data)
    eval_batches = [
        tuple(t.to(device) for t in get_batch(corpus.val, cfg.batch_size, cfg.block_size, EVAL_SEED, -1 - i))
        for i in range(cfg.eval_batches)
    ]

    # model and optimizer: the init depends on the seed only, so every optimizer (and every rank) starts from the
    # same weights
    torch.manual_seed(cfg.seed)
    model_cfg = ModelConfig(
        vocab_size=corpus.vocab_size,
        block_size=cfg.block_size,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_embd=cfg.n_embd,
        flavour=cfg.flavour,
        tie_head=cfg.tie_head,
    )
    model = GPT(model_cfg).to(device)
    opt = workers.build_optimizer(cfg, model) if distributed else spec.build(cfg.optimizer, model, track_norms=True)
    for group in opt.param_groups:
        group["initial_lr"] = group["lr"]  # the schedule scales each group's own lr (torch's name for the peak)
    schedule = lr_schedule(cfg)
    net, gradient_bytes = workers.wrap_ddp(cfg, model, device) if ddp else (model, None)
    forward = torch.compile(net) if cfg.compile == "on" or (cfg.compile == "auto" and cuda) else net

    def sent() -> int:  # bytes this rank put into the all-reduces of gradients (DDP) or pseudo-gradients (DiLoCo)
        return gradient_bytes.sent if gradient_bytes else getattr(opt, "communicated_bytes", 0)

    step, wall = 0, 0.0
    ckpt_path, metrics_path = out / (workers.CHECKPOINT if distributed else "ckpt.pt"), out / "metrics.jsonl"
    if resume:
        _check_resumable(cfg)
    if resume and distributed:
        progress = workers.load_checkpoint(out, model, opt, world, diloco)
        if progress is not None:
            step, wall = progress["step"], progress["wall"]
            if gradient_bytes:
                gradient_bytes.sent = progress["communicated_bytes"]
            else:
                opt.communicated_bytes = progress["communicated_bytes"]
    elif resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        step, wall = ckpt["step"], ckpt["wall"]
    if main and step > 0:
        # keep what was logged up to the checkpoint; the loop logs the eval at `step` again
        kept = [
            m for m in read_metrics(metrics_path) if m["step"] < step or (m["step"] == step and "val_loss" not in m)
        ]
        metrics_path.write_text("".join(json.dumps(m) + "\n" for m in kept))
    elif main and metrics_path.exists():
        metrics_path.unlink()
    info = {
        "config": dataclasses.asdict(cfg),
        "optimizer": spec.resolved(cfg.optimizer),
        "corpus": corpus.info,
        "params": model.num_params(),
        "torch": torch.__version__,
        "device": str(device),
        "bf16": use_bf16,
    }
    if main:
        write_json(info, out / "config.json")

    writer = None
    if cfg.tensorboard and main:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ImportError("--tensorboard needs the `tensorboard` package: pip install tensorboard") from None
        writer = SummaryWriter(str(out / "tb"))
    bar = None
    if cfg.progress and main and sys.stderr.isatty() and "PYTEST_CURRENT_TEST" not in os.environ:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=step, desc=spec.canonical(cfg.optimizer), dynamic_ncols=True)

    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum * world.size  # over all the workers
    log = metrics_path.open("a") if main else None

    def emit(record: dict) -> None:
        if log is None:
            return
        record = {"step": step, "tokens": step * tokens_per_step, "time": round(wall, 3), **record}
        log.write(json.dumps(record) + "\n")
        log.flush()
        if writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    writer.add_scalar(key, value, step)

    status, message, last_val, last_norm = "ok", "", math.nan, math.nan
    t0 = time.perf_counter()
    try:
        while True:
            if step % cfg.eval_every == 0 or step == cfg.steps:
                last_val, last_norm = evaluate(model, opt, eval_batches, amp)
                emit({"val_loss": last_val, "weight_norm": last_norm})
            if step == cfg.steps:
                break
            if distributed:
                workers.fault_point(world, step)

            factor = schedule(step)
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * factor
            loss_sum = 0.0
            for micro in range(cfg.grad_accum):
                index = world.batch_index(step * cfg.grad_accum + micro)
                x, y = get_batch(train_tokens, cfg.batch_size, cfg.block_size, cfg.seed, index)
                # DDP averages the gradients once, after the last micro-batch
                with net.no_sync() if ddp and micro < cfg.grad_accum - 1 else contextlib.nullcontext():
                    with amp():
                        loss = forward(x.to(device), y.to(device)) / cfg.grad_accum
                    loss.backward()
                loss_sum += loss.item()
            if not math.isfinite(loss_sum):
                raise Diverged(
                    f"loss is {loss_sum} at step {step}: the run diverged; "
                    f"the last good checkpoint is {ckpt_path} (try a lower lr)"
                )
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            wall += time.perf_counter() - t0
            t0 = time.perf_counter()

            if step % cfg.log_every == 0:
                outer = {f"outer/{k}": float(v) for k, v in getattr(opt, "outer_norms", {}).items()}
                emit({"train_loss": loss_sum, "lr": opt.param_groups[0]["lr"], **outer})
            if step % cfg.ckpt_every == 0 or step == cfg.steps or step in snapshots:
                if not torch.stack([p.isfinite().all() for p in model.parameters()]).all():
                    raise Diverged(
                        f"non-finite weights after step {step}: the run diverged; the last good "
                        f"checkpoint is {ckpt_path} (try a lower lr)"
                    )
                if distributed:
                    progress = dict(
                        step=step, wall=wall, workers=world.size, parallel=cfg.parallel, communicated_bytes=sent()
                    )
                    workers.save_checkpoint(out, model, opt, world, diloco, progress)
                else:
                    _atomic_save(
                        {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "wall": wall},
                        ckpt_path,
                    )
                    if step in snapshots:
                        shutil.copyfile(ckpt_path, out / snapshot_name(step))
                t0 = time.perf_counter()  # checkpoint I/O is not training time
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{tokens_per_step / max(wall, 1e-9) * step:.0f}")
            if callback is not None:
                callback(step, loss_sum)
    except Diverged as e:
        status, message = "diverged", str(e)
        emit({"diverged": message})
    finally:
        if log is not None:
            log.close()
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()

    result = {
        "optimizer": cfg.optimizer,
        "spec": spec.canonical(cfg.optimizer),
        "seed": cfg.seed,
        "steps": cfg.steps,
        "status": status,
        "final_val_loss": last_val if status == "ok" else None,
        "weight_norm": last_norm if status == "ok" else None,
        "tokens": step * tokens_per_step,
        "wall_time": round(wall, 3),
        "workers": world.size,
        "parallel": cfg.parallel if distributed else None,
        "communicated_bytes_per_step": sent() / step if step else 0.0,
        "python": corpus.info["python"],
        "corpus_sha256": corpus.info["sha256"],
    }
    if status != "ok":
        result["message"] = message
    if main:
        write_json(result, out / "result.json")
    return result
