"""What one run is: ``TrainConfig``, the presets, the checks, the lr schedule and the run's identity.

The bottom of the lab: it imports the library and the model's config, never a module above it. Everything a run
depends on is a field of ``TrainConfig``; a preset fills the size-related fields. ``identity`` says which fields
make two runs the same run (what ``--resume`` must match); the others (where the files go, threads, loggers) change
no number.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snoo import spec
from snoo.lab.model import ModelConfig
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
    wandb: bool = False  # also log to Weights & Biases (WANDB_MODE=offline: into OUT/wandb, no network)
    progress: bool = True  # a tqdm bar, only when stderr is a terminal
    # hardware: "auto" takes a GPU, bf16 autocast and torch.compile when there is a GPU
    device: str = "auto"
    autocast: str = "auto"  # "auto", "bf16" or "off"
    compile: str = "auto"  # "auto", "on" or "off"
    # CPU threads for torch; 0: torch's default (one per core). 1 by measurement (docs/lab.md): on 2 cores shared
    # with other jobs, a `small` step took 0.39 s with 1 thread, 4.7 s with 0 and 5.3 s with 2
    threads: int = 1
    # several worker processes on this machine (workers.py, docs/distributed.md)
    workers: int = 1  # > 1: the run starts this many ranks under torchrun, each reading its own batches
    parallel: str = "diloco"  # "diloco": SNOO averages pseudo-gradients every K steps; "ddp": gradients every step
    reduce_dtype: str = "fp32"  # what the ranks average in: "fp32" or "bf16" (half the bytes)
    # DiLoCo: what each rank sends of its pseudo-gradient, all-gathered (SNOO's compression): "none" (an all-reduce
    # in reduce_dtype), "bf16", "int8" or "int4" (error feedback and scales: the SPEC's error_feedback and
    # compression_block)
    compression: str = "none"
    dist_timeout: float = 300.0  # seconds a rank waits for the others in a collective before the run stops
    # torchrun --max-restarts: when a rank dies, every rank restarts from the last checkpoint, up to this many times
    # (DiLoCo then also checkpoints at every outer step, so a failure loses at most the window in flight)
    max_restarts: int = 0
    # "on" (workers > 1, parallel=diloco, needs torchft): each rank is a torchft replica; a rank that dies is
    # restarted and heals from the others, which go on without it (docs/distributed.md)
    fault_tolerant: str = "off"

    @property
    def stages(self) -> list[spec.Stage]:
        """The optimizer's SPEC parsed into its stages, outermost first: parsed once for each value of ``optimizer``,
        and read from here by the checks, the build, the schedule and the run's records."""
        parsed = self.__dict__.get("_stages")
        if parsed is None or parsed[0] != self.optimizer:
            parsed = self.__dict__["_stages"] = (self.optimizer, tuple(spec.parse(self.optimizer)))
        return list(parsed[1])


#: fields that change no trained number, so a run may be resumed or kept with other values of them
NOT_IDENTITY = frozenset(
    {"out", "progress", "tensorboard", "wandb", "threads", "ckpt_every", "dist_timeout", "max_restarts"}
)
PARALLEL = ("diloco", "ddp")
REDUCE_DTYPES = ("fp32", "bf16")
COMPRESSIONS = ("none", "bf16", "int8", "int4")
CHOICES = {
    "tokenizer": ("byte", "bpe"),
    "flavour": ("llama", "gpt"),
    "schedule": ("cosine", "wsd", "constant"),
    "autocast": ("auto", "bf16", "off"),
    "compile": ("auto", "on", "off"),
    "parallel": PARALLEL,
    "reduce_dtype": REDUCE_DTYPES,
    "compression": COMPRESSIONS,
    "fault_tolerant": ("off", "on"),
}
AT_LEAST_ONE = (
    "n_layer",
    "n_head",
    "n_embd",
    "block_size",
    "steps",
    "batch_size",
    "grad_accum",
    "eval_every",
    "eval_batches",
    "log_every",
    "ckpt_every",
    "workers",
)

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
    # the default of `snoo compare`: 123K parameters, 1000 steps of 2,048 tokens = 16.6 tokens per parameter, about
    # compute-optimal length; AdamW's lr 4e-3 is the best of 2e-3 / 4e-3 / 8e-3 on two of the three built-in corpora
    # (docs/measuring.md, with the sweep and the command)
    "compare": dict(
        optimizer="adamw(lr=0.004)",
        n_layer=2,
        n_head=2,
        n_embd=64,
        block_size=128,
        batch_size=16,
        steps=1000,
        eval_every=100,
        eval_batches=8,
        log_every=10,
        ckpt_every=250,
    ),
    # about 0.9M parameters, 0.6 tokens per parameter: quick, and far from any real training regime
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

_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "None": type(None)}


def make_config(preset: str = "small", **overrides: Any) -> TrainConfig:
    """Defaults, then the preset, then ``overrides`` (None values are ignored)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(_unknown_key(unknown[0], overrides, names))
    cfg = TrainConfig(**{**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}})
    validate(cfg)
    return cfg


def _unknown_key(key: str, overrides: dict[str, Any], names: set[str]) -> str:
    message = f"unknown config key {key!r}; keys: {', '.join(sorted(names))}"
    base = spec.parse(str(overrides.get("optimizer") or TrainConfig.optimizer))[-1]
    if key in base.params:  # an optimizer setting: it belongs in the SPEC
        message = (
            f"unknown config key {key!r}: it is a setting of the optimizer, which goes in its SPEC, e.g. "
            f'--optimizer "{base.name}({key}={overrides[key]})"; config keys: {", ".join(sorted(names))}'
        )
    return message


def _check_types(cfg: TrainConfig) -> None:
    """Values from --set and config files arrive untyped: each must be of its field's annotated type."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        allowed = tuple(_TYPES[t.strip()] for t in str(f.type).split("|"))
        if isinstance(value, bool) and bool not in allowed:
            ok = False
        elif float in allowed and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        else:
            ok = isinstance(value, allowed)
        if not ok:
            kind = " or ".join(t.strip() for t in str(f.type).split("|"))
            raise ValueError(f"{f.name} must be {kind}, got {value!r}")


def validate(cfg: TrainConfig) -> None:
    """Every field's type and range, the SPEC, the model's shape, the schedule and the distributed settings: a bad
    value is a ``ValueError`` that names it, before anything runs."""
    _check_types(cfg)
    _ = cfg.stages  # parsed here, with the SPEC's own checks
    for name in AT_LEAST_ONE:
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    for name, choices in CHOICES.items():
        if getattr(cfg, name) not in choices:
            listed = f"{', '.join(choices[:-1])} or {choices[-1]}"
            raise ValueError(f"{name} must be {listed}, got {getattr(cfg, name)!r}")
    cores = os.cpu_count() or 1
    if not 0 <= cfg.threads <= cores:
        raise ValueError(f"threads must be 0 (torch's default) to {cores} (this machine's cores), got {cfg.threads}")
    ModelConfig(n_head=cfg.n_head, n_embd=cfg.n_embd, flavour=cfg.flavour)  # its own checks
    if cfg.tokenizer == "bpe" and cfg.bpe_vocab < 257:
        raise ValueError(f"bpe_vocab must be at least 257 (the 256 bytes and one merge), got {cfg.bpe_vocab}")
    if cfg.unique_tokens is not None and cfg.unique_tokens < 1:
        raise ValueError(f"unique_tokens must be positive, got {cfg.unique_tokens}")
    if cfg.data is not None and not cfg.data:
        raise ValueError("data must be a path (or left out for the standard library's source), got ''")
    if not cfg.out:
        raise ValueError("out must be a directory, got ''")
    _check_out_outside_data(cfg)
    if cfg.warmup_steps is not None and (
        isinstance(cfg.warmup_steps, bool) or not isinstance(cfg.warmup_steps, int) or cfg.warmup_steps < 0
    ):
        raise ValueError(f"warmup_steps must be a whole number of steps, 0 or more, got {cfg.warmup_steps!r}")
    for name, value in (("warmup", cfg.warmup), ("decay", cfg.decay), ("min_lr", cfg.min_lr)):
        if not 0 <= value <= 1:
            raise ValueError(f"{name} is a fraction in [0, 1], got {value}")
    if not 0 <= cfg.grad_clip < float("inf"):
        raise ValueError(f"grad_clip must be 0 (off) or a positive number, got {cfg.grad_clip}")
    if not 0 < cfg.dist_timeout < float("inf"):
        raise ValueError(f"dist_timeout must be a positive number of seconds, got {cfg.dist_timeout}")
    if isinstance(cfg.max_restarts, bool) or not isinstance(cfg.max_restarts, int) or cfg.max_restarts < 0:
        raise ValueError(f"max_restarts must be a whole number, 0 or more, got {cfg.max_restarts!r}")
    if cfg.workers > 1:
        _check_workers(cfg)
    elif cfg.max_restarts:
        raise ValueError("max_restarts restarts the ranks of a run on several workers: set workers > 1")
    elif cfg.fault_tolerant == "on":
        raise ValueError("fault_tolerant=on keeps a run on several workers going when one dies: set workers > 1")
    elif cfg.compression != "none":
        raise ValueError(f"compression={cfg.compression} compresses what DiLoCo's workers send: set workers > 1")
    _check_device(cfg.device)
    lr_schedule(cfg)  # the schedule's own checks


def _check_out_outside_data(cfg: TrainConfig) -> None:
    """Refuse an ``out`` inside the directory that ``data`` reads (a directory, or a glob's fixed part): each run
    would train on the files the runs before it wrote."""
    if cfg.data is None:
        return
    fixed = re.split(r"[*?[]", cfg.data, maxsplit=1)[0]
    if fixed != cfg.data:  # a glob: the directory its fixed part names
        root = Path(fixed) if fixed.endswith(os.sep) else Path(fixed).parent
    elif Path(cfg.data).is_dir():
        root = Path(cfg.data)
    else:
        return
    root, out = root.resolve(), Path(cfg.out).resolve()
    if out == root or root in out.parents:
        raise ValueError(
            f"--out {cfg.out} is inside --data {cfg.data}: the runs would train on the files written there; choose "
            f"an --out outside the data"
        )


def _check_device(device: str) -> None:
    import torch

    if device == "auto":
        return
    if not re.fullmatch(r"cpu|cuda(:\d+)?|mps", device):
        raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device}: this torch has no CUDA device here; use --device cpu (or auto)")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise ValueError(f"device {device}: this machine has {torch.cuda.device_count()} CUDA devices")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device mps: this torch has no MPS device here; use --device cpu (or auto)")


def _check_workers(cfg: TrainConfig) -> None:
    if cfg.parallel == "diloco" and not spec.accepts(cfg.stages[0], "process_group"):
        raise ValueError(
            f"parallel=diloco averages the pseudo-gradients of a SNOO outer stage, and "
            f"{spec.canonical(cfg.stages)!r} has none: its outermost stage takes no process group; use a SPEC that "
            f"starts with snoo or lookahead (e.g. snoo-adamw), or --set parallel=ddp"
        )
    if cfg.compression != "none":
        _check_compression(cfg)
    if cfg.device.startswith("cuda:"):
        raise ValueError(
            f"with workers > 1 each rank takes the GPU cuda:LOCAL_RANK: set device to cuda, not {cfg.device}"
        )
    if cfg.fault_tolerant == "on":
        if cfg.max_restarts:
            raise ValueError("fault_tolerant=on restarts a rank that dies on its own: leave max_restarts at 0")
        if cfg.parallel != "diloco":
            raise ValueError("fault_tolerant=on is for parallel=diloco (SNOO's outer step on torchft), not ddp")
        from snoo.integrations.torchft import FaultTolerantSNOO, require_torchft

        require_torchft()
        outer = cfg.stages[0]
        unknown = sorted(set(outer.params) - set(inspect.signature(FaultTolerantSNOO).parameters))
        if unknown:
            raise ValueError(
                f"fault_tolerant=on builds snoo.integrations.torchft.FaultTolerantSNOO from the settings of the "
                f"outermost stage, and it takes no {', '.join(unknown)} of {outer.name}: give that stage as snoo "
                f"(lookahead(k=K,alpha=A) is snoo(k=K,lr=A,momentum=0,nesterov=false))"
            )


def _check_compression(cfg: TrainConfig) -> None:
    if cfg.parallel != "diloco" or cfg.fault_tolerant == "on":
        raise ValueError(
            f"compression={cfg.compression} compresses DiLoCo's pseudo-gradients: it needs parallel=diloco and "
            f"fault_tolerant=off"
        )
    if cfg.reduce_dtype != "fp32":
        raise ValueError(
            f"compression={cfg.compression} sends its own format: leave reduce_dtype at fp32, not {cfg.reduce_dtype}"
        )
    if not spec.accepts(cfg.stages[0], "compression"):
        raise ValueError(
            f"compression={cfg.compression}: the outermost stage {cfg.stages[0].name} of "
            f"{spec.canonical(cfg.stages)!r} takes no compression; give it as snoo"
        )


def model_config(cfg: TrainConfig, vocab_size: int) -> ModelConfig:
    """The model ``cfg`` trains, for a corpus of ``vocab_size`` tokens."""
    return ModelConfig(
        vocab_size=vocab_size,
        block_size=cfg.block_size,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_embd=cfg.n_embd,
        flavour=cfg.flavour,
        tie_head=cfg.tie_head,
    )


def identity(cfg: TrainConfig, corpus_sha256: str) -> dict[str, Any]:
    """What makes two runs the same run: every field but ``NOT_IDENTITY``, the optimizer with its defaults filled
    in, and the data by its contents (``corpus_sha256``), not by its path."""
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_IDENTITY and k != "data"}
    stages = spec.resolved(cfg.stages)
    full = "+".join(f"{st.pop('name')}({','.join(f'{k}={v!r}' for k, v in st.items())})" for st in stages)
    return {**fields, "optimizer": full, "corpus": corpus_sha256}


def _stages(full: str) -> list[tuple[str, dict[str, Any]]]:
    """``identity``'s optimizer, ``name(k=v,...)+...``, back into (name, settings) per stage."""
    out = []
    for stage in full.split("+"):
        name, _, rest = stage.partition("(")
        pairs = (item.split("=", 1) for item in rest.rstrip(")").split(",") if item)
        out.append((name, {k: ast.literal_eval(v) for k, v in pairs}))
    return out


def _same_optimizer(saved: str, wanted: str) -> bool:
    """Whether two of ``identity``'s optimizers are the same, a setting that ``saved`` predates (a keyword the
    optimizer gained since, such as SNOO's ``fused``) counting as its default, as a field of the config does."""
    if saved == wanted:
        return True
    try:
        old, new = _stages(saved), _stages(wanted)
    except (ValueError, SyntaxError):  # not of identity's making
        return False
    if [name for name, _ in old] != [name for name, _ in new] or any(n not in spec.NAMES for n, _ in new):
        return False
    return all(
        {**spec.NAMES[name].defaults, **before} == {**spec.NAMES[name].defaults, **after}
        for (name, before), (_, after) in zip(old, new)
    )


def differences(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """``key: saved -> wanted`` for each identity field that differs (a field ``saved`` predates: its default; so
    too a setting of the optimizer)."""
    defaults = {k: v for k, v in dataclasses.asdict(TrainConfig()).items() if k not in NOT_IDENTITY}
    changed = []
    for k, v in wanted.items():
        before = saved.get(k, defaults.get(k))
        same = _same_optimizer(before, v) if k == "optimizer" and isinstance(before, str) else before == v
        if not same:
            changed.append(f"{k} {before!r} -> {v!r}")
    return changed


def lr_schedule(cfg: TrainConfig) -> Callable[[int], float]:
    """``s -> `` the inner lr of the step after ``s`` completed steps, as a fraction of the peak.

    Built from ``snoo.optim.schedules``: random access, so a resumed run gets exactly the lr it would have had. A
    schedule-free optimizer (``spec.is_schedule_free``) gets the warm-up and then a constant lr, whatever the schedule.
    """
    warmup = round(cfg.warmup * cfg.steps) if cfg.warmup_steps is None else cfg.warmup_steps
    if cfg.schedule == "constant" or spec.is_schedule_free(cfg.stages):
        after = schedules.constant(1.0)
    elif cfg.schedule == "wsd":
        after = schedules.warmup_stable_decay(1.0, warmup, round(cfg.decay * cfg.steps), cfg.steps)
    else:
        cosine = schedules.cosine(1.0, cfg.min_lr, max(1, cfg.steps - warmup))
        after = lambda s: cosine(s - warmup)  # noqa: E731
    if warmup == 0:
        return after
    ramp = schedules.linear_warmup(0.0, 1.0, warmup)
    return lambda s: ramp(s + 1) if s < warmup else after(s)
