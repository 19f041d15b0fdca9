"""Train one model with one optimizer, top to bottom: data, model, optimizer, resume, the loop, the result.

Everything a run depends on is a field of ``TrainConfig`` (``config.py``). A run directory holds ``config.json``,
``metrics.jsonl`` (one JSON object per line), ``ckpt.pt`` (the latest good checkpoint, written atomically) and
``result.json`` (written at the end); ``checkpoint.py`` says which run may write or continue there. Under torchrun
(``launch.py``) this is one rank of several, with a sharded checkpoint ``ckpt.dcp`` in place of ``ckpt.pt``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from snoo import spec
from snoo.lab import checkpoint, workers
from snoo.lab.checkpoint import Progress
from snoo.lab.config import TrainConfig, identity, lr_schedule, model_config, validate
from snoo.lab.data import Corpus, check_size, get_batch, limit_unique, load_corpus
from snoo.lab.logs import RunLog
from snoo.lab.model import GPT
from snoo.lab.workers import World

EVAL_SEED = 0  # the held-out batches do not depend on the run's seed
Batches = list[tuple[torch.Tensor, torch.Tensor]]


class Diverged(RuntimeError):
    pass


class Stopped(BaseException):
    """SIGTERM reached a run in one process: it saved its checkpoint at the step it had just finished and stopped.

    A ``BaseException``, as ``KeyboardInterrupt`` is, so that no ``except Exception`` on its way out keeps it."""


@contextlib.contextmanager
def _sigterm_stops_after_the_step(enabled: bool) -> Iterator[list[int]]:
    """While the loop runs, SIGTERM (a scheduler's preemption, ``kill``) is noted in the list this yields instead of
    ending the process where it stands: the loop then checkpoints the step it is on and raises :class:`Stopped`.
    Nothing outside the main thread (where no handler can be set), nor where ``enabled`` is false."""
    asked: list[int] = []
    installed = False
    if enabled:
        try:
            previous = signal.signal(signal.SIGTERM, lambda signum, frame: asked.append(signum))
            installed = True
        except ValueError:  # not the main thread
            pass
    try:
        yield asked
    finally:
        if installed:
            signal.signal(signal.SIGTERM, previous)


def train(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    callback: Callable[[int, float], None] | None = None,
    claim: bool = True,
    snapshots: Sequence[int] = (),
    start_from: Path | None = None,
) -> dict:
    """Run (or continue) one training run in this process; returns what ``result.json`` holds.

    ``callback(step, loss)`` is called after every optimizer step (tests use it to interrupt a run). A non-finite
    loss stops the run before the step that would have used it: the last checkpoint stays good. Under torchrun this
    is one rank; ``snoo.lab.launch.run`` starts the ranks of a run with ``workers > 1``. ``claim=False``: the caller
    holds ``OUT``'s lock and checked the directory (the process that launched the ranks).

    ``snapshots``: steps after which the run also keeps its checkpoint as ``checkpoint.snapshot_name(step)``.
    ``start_from``: such a snapshot of another run whose schedule this run shares up to the snapshot's step (a WSD
    ladder's trunk): a run with no checkpoint of its own starts from there, with the trunk's metrics up to it, and
    ends bit for bit where it would have from scratch. Both are for runs in one process.
    """
    if (snapshots or start_from is not None) and cfg.workers > 1:
        raise ValueError("snapshots and start_from are for runs in one process, not on several workers")
    world = World.from_env()
    if cfg.workers > 1 and not world.launched:
        raise ValueError("a run with workers > 1 starts its ranks with snoo.lab.launch.run, not train")
    cfg = workers.adopt(cfg, world)
    validate(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = workers.device(cfg, world)
    owner = claim and world.rank == 0  # rank 0 writes the files
    with checkpoint.claimed(Path(cfg.out), fresh=not resume) if owner else contextlib.nullcontext():
        if owner and resume:
            checkpoint.check_kind(cfg)
        with workers.process_group(cfg, world, device):
            return _train(cfg, world, device, resume, callback, snapshots, start_from)


def _train(
    cfg: TrainConfig,
    world: World,
    device: torch.device,
    resume: bool,
    callback: Callable[[int, float], None] | None,
    snapshots: Sequence[int],
    start_from: Path | None,
) -> dict:
    out, main, amp = Path(cfg.out), world.rank == 0, _autocast(cfg, device)
    corpus, train_tokens, eval_batches = _data(cfg, device)
    model, opt = _model_and_optimizer(cfg, corpus, world, device)
    net, gradient_bytes = workers.wrap_ddp(cfg, model, device) if _ddp(cfg, world) else (model, None)
    forward = torch.compile(net) if cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda") else net
    run = identity(cfg, corpus.info["sha256"])
    at = _resume(cfg, world, model, opt, gradient_bytes, run, device) if resume else Progress()
    if cfg.fault_tolerant == "on":
        at.step = opt.inner_steps  # a restarted rank healed from the live ones: it goes on from their step
    if at.step == 0 and start_from is not None:
        try:
            at = checkpoint.load_branch(start_from, model, opt, cfg, run, device, out / "metrics.jsonl")
        except checkpoint.Damaged as e:  # a branch is a shortcut: from scratch, it ends where it would have
            print(
                f"snoo: {start_from} {e.why}: {out.name} trains from scratch instead, to the same end", file=sys.stderr
            )
    info = _info(cfg, corpus, model, device, run)
    if main:
        checkpoint.write_json(info, out / "config.json")
    schedule, tokens_per_step = lr_schedule(cfg), cfg.batch_size * cfg.block_size * cfg.grad_accum * world.size
    status, message, val, norm = "ok", "", math.nan, math.nan
    # a fault-tolerant run heals a restarted rank from the live ones instead of a checkpoint
    checkpoints = cfg.fault_tolerant == "off"
    # under torchrun (several ranks) the elastic agent stops the ranks on SIGTERM
    stoppable = _sigterm_stops_after_the_step(checkpoints and world.size == 1)
    with (
        stoppable as asked,
        RunLog(cfg, out, enabled=main, step=at.step, tokens_per_step=tokens_per_step, info=info) as log,
    ):
        t0 = time.perf_counter()
        try:
            while True:
                if at.step % cfg.eval_every == 0 or at.step >= cfg.steps:
                    val, norm = evaluate(model, opt, eval_batches, amp)
                    log.emit(at.step, at.wall, {"val_loss": val, "weight_norm": norm})
                if at.step >= cfg.steps:
                    break
                if world.size > 1:
                    workers.fault_point(world, at.step)
                for group in opt.param_groups:
                    group["lr"] = group["initial_lr"] * schedule(at.step)
                loss = _step(cfg, world, at.step, net, forward, model, opt, train_tokens, device, amp)
                if not math.isfinite(loss):
                    raise Diverged(f"loss is {loss} at step {at.step}: the run diverged; {_last_good(out, world)}")
                at.step += 1
                at.wall += time.perf_counter() - t0
                t0 = time.perf_counter()
                if cfg.fault_tolerant == "on" and opt.outer_steps and opt.outer_steps[-1]["inner_step"] == at.step:
                    log.emit(at.step, at.wall, {"quorum": opt.outer_steps[-1]})  # who averaged, and the vote
                if at.step % cfg.log_every == 0:
                    outer = {f"outer/{k}": v for k, v in _outer_norms(opt, at).items()}
                    log.emit(at.step, at.wall, {"train_loss": loss, "lr": opt.param_groups[0]["lr"], **outer})
                stop = bool(asked)  # read once: a SIGTERM from here on stops the run after the next step
                if checkpoints and (stop or _checkpoint_due(cfg, opt, at.step, snapshots)):
                    _save(out, model, opt, world, cfg, at, run, gradient_bytes, snapshots)
                    t0 = time.perf_counter()  # checkpoint I/O is not training time
                log.advance(at.step, at.wall, loss)
                if stop:
                    raise Stopped(
                        f"stopped by SIGTERM after step {at.step} of {cfg.steps}: its checkpoint is saved; continue "
                        "with --resume"
                    )
                if callback is not None:
                    callback(at.step, loss)
        except Diverged as e:
            status, message = "diverged", str(e)
            log.emit(at.step, at.wall, {"diverged": message})
    result = _result(cfg, world, corpus, info, at, status, message, val, norm, _sent(opt, gradient_bytes))
    if main:
        checkpoint.write_json(result, out / "result.json")
    return result


# ---------------------------------------------------------------------------------------------- the pieces


def _checkpoint_due(cfg: TrainConfig, opt: torch.optim.Optimizer, step: int, snapshots: Sequence[int]) -> bool:
    """Whether the loop checkpoints after ``step``: every ``ckpt_every`` steps, at the end, at a snapshot's step,
    and after each outer step of DiLoCo with ``max_restarts`` (a restarted rank continues from the last checkpoint)."""
    outer_step = cfg.max_restarts > 0 and cfg.parallel == "diloco" and step % opt.k == 0
    return step % cfg.ckpt_every == 0 or step == cfg.steps or step in snapshots or outer_step


def _save(
    out: Path,
    model: GPT,
    opt: torch.optim.Optimizer,
    world: World,
    cfg: TrainConfig,
    at: Progress,
    run: dict,
    gradient_bytes: workers.GradientBytes | None,
    snapshots: Sequence[int],
) -> None:
    """Checkpoint the run at ``at.step`` (and keep a copy at a snapshot's step); non-finite weights are
    :class:`Diverged` instead, so that the last checkpoint stays a good one."""
    if not torch.stack([p.isfinite().all() for p in model.parameters()]).all():
        raise Diverged(f"non-finite weights after step {at.step}: the run diverged; {_last_good(out, world)}")
    at.communicated_bytes, at.outer_norms = _sent(opt, gradient_bytes), _outer_norms(opt, at)
    checkpoint.save(out, model, opt, world, cfg, at, run)
    if at.step in snapshots:
        checkpoint.keep_snapshot(out, at.step)


def _bf16(cfg: TrainConfig, device: torch.device) -> bool:
    cuda = device.type == "cuda"
    return cfg.autocast == "bf16" or (cfg.autocast == "auto" and cuda and torch.cuda.is_bf16_supported())


def _autocast(cfg: TrainConfig, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    bf16 = _bf16(cfg, device)
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def _data(cfg: TrainConfig, device: torch.device) -> tuple[Corpus, torch.Tensor, Batches]:
    """The corpus, the train tokens, and the eval batches: one fixed set for every seed, so a spread over seeds is
    the training's, not that of different held-out text. Every train batch is a function of (seed, step, rank)."""
    corpus = load_corpus(cfg.data, cfg.tokenizer, cfg.bpe_vocab)
    check_size(corpus, cfg.block_size, cfg.data)
    train_tokens = limit_unique(corpus.train, cfg.unique_tokens)
    check_size(dataclasses.replace(corpus, train=train_tokens), cfg.block_size, cfg.data)
    eval_batches = [
        (x.to(device), y.to(device))
        for x, y in (
            get_batch(corpus.val, cfg.batch_size, cfg.block_size, EVAL_SEED, -1 - i) for i in range(cfg.eval_batches)
        )
    ]
    return corpus, train_tokens, eval_batches


def _model_and_optimizer(
    cfg: TrainConfig, corpus: Corpus, world: World, device: torch.device
) -> tuple[GPT, torch.optim.Optimizer]:
    """The init depends on the seed only, so every optimizer (and every rank) starts from the same weights."""
    torch.manual_seed(cfg.seed)
    model = GPT(model_config(cfg, corpus.vocab_size)).to(device)
    distributed = world.size > 1
    opt = workers.build_optimizer(cfg, model) if distributed else spec.build(cfg.stages, model, track_norms=True)
    for group in opt.param_groups:
        group["initial_lr"] = group["lr"]  # the schedule scales each group's own lr (torch's name for the peak)
    return model, opt


def _ddp(cfg: TrainConfig, world: World) -> bool:
    return world.size > 1 and cfg.parallel == "ddp"


def _resume(
    cfg: TrainConfig,
    world: World,
    model: GPT,
    opt: torch.optim.Optimizer,
    gradient_bytes: workers.GradientBytes | None,
    run: dict,
    device: torch.device,
) -> Progress:
    """Load the checkpoint (if there is one yet) and cut ``metrics.jsonl`` back to it."""
    out = Path(cfg.out)
    at = checkpoint.load(out, model, opt, world, cfg, run, device) or Progress()
    if gradient_bytes is not None:
        gradient_bytes.sent = at.communicated_bytes
    elif hasattr(opt, "communicated_bytes"):
        opt.communicated_bytes = at.communicated_bytes
    if world.rank == 0:
        checkpoint.keep_metrics_until(out / "metrics.jsonl", at.step)
    return at


def _step(
    cfg: TrainConfig,
    world: World,
    step: int,
    net: torch.nn.Module,
    forward: Callable,
    model: GPT,
    opt: torch.optim.Optimizer,
    tokens: torch.Tensor,
    device: torch.device,
    amp: Callable[[], contextlib.AbstractContextManager],
) -> float:
    """One optimizer step over ``grad_accum`` micro-batches; the summed loss, or non-finite with no step taken."""
    loss_sum = 0.0
    for micro in range(cfg.grad_accum):
        x, y = get_batch(
            tokens, cfg.batch_size, cfg.block_size, cfg.seed, world.batch_index(step * cfg.grad_accum + micro)
        )
        # DDP averages the gradients once, after the last micro-batch
        with net.no_sync() if _ddp(cfg, world) and micro < cfg.grad_accum - 1 else contextlib.nullcontext():
            with amp():
                loss = forward(x.to(device), y.to(device)) / cfg.grad_accum
            loss.backward()
        loss_sum += loss.item()
    if math.isfinite(loss_sum):
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
    opt.zero_grad(set_to_none=True)
    return loss_sum


def _modes(opt: torch.optim.Optimizer) -> tuple[Callable[[], object], Callable[[], object]]:
    """(to evaluation weights, back to training weights); a plain torch optimizer has only one set."""
    return getattr(opt, "eval", lambda: None), getattr(opt, "train", lambda: None)


@torch.no_grad()
def evaluate(
    model: GPT, opt: torch.optim.Optimizer, batches: Batches, amp: Callable[[], contextlib.AbstractContextManager]
) -> tuple[float, float]:
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


def _sent(opt: torch.optim.Optimizer, gradient_bytes: workers.GradientBytes | None) -> int:
    """Bytes this rank put into the all-reduces of gradients (DDP) or pseudo-gradients (DiLoCo)."""
    return gradient_bytes.sent if gradient_bytes else getattr(opt, "communicated_bytes", 0)


def _outer_norms(opt: torch.optim.Optimizer, at: Progress) -> dict[str, float]:
    """SNOO's norms after its latest outer step; right after a resume, before the next one, the checkpoint's."""
    return {k: float(v) for k, v in getattr(opt, "outer_norms", {}).items()} or at.outer_norms


def _last_good(out: Path, world: World) -> str:
    path = out / (checkpoint.SHARDED if world.size > 1 else checkpoint.CHECKPOINT)
    return f"the last good checkpoint is {path} (try a lower lr)"


def _info(cfg: TrainConfig, corpus: Corpus, model: GPT, device: torch.device, run: dict) -> dict:
    """What ``config.json`` holds: the settings, the resolved optimizer, the corpus, the regime, the run's identity."""
    params, body = model.num_params(), model.num_params(embeddings=False)
    tokens = cfg.steps * cfg.batch_size * cfg.block_size * cfg.grad_accum * cfg.workers
    return {
        "config": dataclasses.asdict(cfg),
        "spec": spec.canonical(cfg.stages),
        "optimizer": spec.resolved(cfg.stages),
        "corpus": corpus.info,
        **_regime(params, body, tokens),
        "torch": torch.__version__,
        "device": str(device),
        "bf16": _bf16(cfg, device),
        "run": run,
    }


def _regime(params: int, params_non_embedding: int, tokens: int) -> dict:
    """Tokens per parameter: the regime a result holds in (compute-optimal pre-training is about 20)."""
    return {
        "params": params,
        "params_non_embedding": params_non_embedding,
        "tokens_planned": tokens,
        "tokens_per_param": tokens / params,
        "tokens_per_non_embedding_param": tokens / params_non_embedding,
    }


def _result(
    cfg: TrainConfig,
    world: World,
    corpus: Corpus,
    info: dict,
    at: Progress,
    status: str,
    message: str,
    val: float,
    norm: float,
    sent: int,
) -> dict:
    tokens = at.step * cfg.batch_size * cfg.block_size * cfg.grad_accum * world.size
    result = {
        "optimizer": cfg.optimizer,
        "spec": spec.canonical(cfg.stages),
        "seed": cfg.seed,
        "steps": cfg.steps,
        "status": status,
        "final_val_loss": val if status == "ok" else None,
        "weight_norm": norm if status == "ok" else None,
        "tokens": tokens,
        **{
            k: v
            for k, v in _regime(info["params"], info["params_non_embedding"], tokens).items()
            if k != "tokens_planned"
        },
        "wall_time": round(at.wall, 3),
        "workers": world.size,
        "parallel": cfg.parallel if world.size > 1 else None,
        "communicated_bytes_per_step": sent / at.step if at.step else 0.0,
        "python": corpus.info["python"],
        "corpus_sha256": corpus.info["sha256"],
    }
    if status != "ok":
        result["message"] = message
    return result
