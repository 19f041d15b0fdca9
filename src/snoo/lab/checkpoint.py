"""A run directory's files: claimed by one run at a time, written atomically, read back only when they check out.

- ``claimed(out)``: an advisory lock (``OUT/.lock``, ``fcntl.flock``) for as long as a run writes there. A second
  run into the same directory is refused with one line; the kernel drops the lock of a process that died, so a
  killed run never blocks the next one. A fresh run (no ``--resume``) into a directory that holds an earlier run
  is refused too, so nothing is overwritten.
- ``write_json``, ``atomic_save``: a temporary file beside the target, then a rename: a crash leaves the old file or
  the new one, and a full disk an ``OSError`` naming the file, with no temporary file left. ``read_metrics`` reads
  ``metrics.jsonl``, forgiving a last line torn by a crash.
- Nothing is written through a symbolic link: a directory holding one is refused (``refuse_links``), the lock and
  ``metrics.jsonl`` are opened with ``O_NOFOLLOW``, and a temporary file is created anew with ``O_EXCL``.
- ``save``/``load``: one checkpoint per run, ``ckpt.pt`` (one process) or ``ckpt.dcp`` (a
  ``torch.distributed.checkpoint`` directory, several ranks). Each records the run's identity
  (``config.identity``) and the progress (step, wall time, bytes sent, SNOO's last outer norms); ``load`` refuses a
  checkpoint of another run, a damaged one (``ckpt.pt`` carries a sha256 of its contents) and one that does not fit
  the model, each with one line, before anything is changed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TextIO

import torch
import torch.distributed as dist
from torch import nn

from snoo.lab.config import TrainConfig, differences
from snoo.lab.workers import World

try:
    import fcntl
except ImportError:  # Windows: no lock
    fcntl = None  # type: ignore[assignment]

NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # POSIX: open() refuses a symbolic link instead of following it
CHECKPOINT = "ckpt.pt"  # one process
SHARDED = "ckpt.dcp"  # several ranks
CHECKPOINT_KEYS = {"model", "optimizer", "step", "sha256"}  # what every checkpoint of this lab holds
PROGRESS = "progress.json"  # written into a sharded checkpoint last: its presence says the checkpoint is whole
LOCK = ".lock"
LOGGER_DIRS = ("tb", "wandb")  # what TensorBoard and Weights & Biases write, links of their own included
#: what a run leaves in its directory; one of them there means a fresh run would overwrite an earlier one
RUN_FILES = ("config.json", "metrics.jsonl", CHECKPOINT, SHARDED, f"{SHARDED}.old", "result.json")


@dataclass
class Progress:
    """Where a run stands, saved with its checkpoint."""

    step: int = 0
    wall: float = 0.0  # training seconds so far (checkpoints and evaluations not counted)
    communicated_bytes: int = 0  # what this rank has put into all-reduces
    outer_norms: dict[str, float] = field(default_factory=dict)  # SNOO's latest, logged until the next outer step


# ---------------------------------------------------------------------------------------------- the directory


@contextlib.contextmanager
def claimed(out: Path, *, fresh: bool, earlier: tuple[str, ...] = RUN_FILES) -> Iterator[None]:
    """Hold ``OUT``'s lock while the block runs; with ``fresh``, refuse a directory holding any of ``earlier``."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a directory: choose a directory")
    refuse_links(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT | NOFOLLOW, 0o644)
    except OSError as e:
        raise ValueError(f"--out {out}: cannot write there ({e.strerror}): choose another directory") from None
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
                raise ValueError(
                    f"{out} is in use by another run (process {holder}): wait for it to end, or choose another --out"
                ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        found = [name for name in earlier if (out / name).exists()]
        if fresh and found:
            raise ValueError(
                f"{out} holds an earlier run ({', '.join(found)}): continue it with --resume, or choose a new --out"
            )
        yield
    finally:
        os.close(fd)  # and with it the lock


# ---------------------------------------------------------------------------------------------- files


def replace_atomically(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """``write`` into a new temporary file beside ``path``, then rename it over ``path``: a crash leaves the old file
    or the new one. The temporary file is created afresh (what a crash left there, or a link planted there, is
    removed first, never followed). A write that fails (a full disk) removes it and is an ``OSError`` that names
    ``path``; the old file stays."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW, 0o644), "wb") as f:
            write(f)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # RuntimeError: torch.save's writer, e.g. "unexpected pos" on a full disk
        tmp.unlink(missing_ok=True)
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().split("\n")[0]
        code = getattr(e, "errno", None) or errno.EIO
        full = isinstance(e, RuntimeError) or code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
        then = "make room (is the disk full?)" if full else "make it writable, or choose another --out,"
        failed = OSError(f"cannot write {path} ({why}): the file there is as it was; {then} and continue with --resume")
        failed.errno = code
        raise failed from None


def atomic_save(obj: Any, path: Path) -> None:
    replace_atomically(path, lambda f: torch.save(obj, f))


def write_text(text: str, path: Path) -> None:
    replace_atomically(path, lambda f: f.write(text.encode()))


def write_json(obj: Any, path: Path) -> None:
    write_text(json.dumps(obj, indent=2) + "\n", path)


def open_to_append(path: Path) -> TextIO:
    """``path`` opened to append text, created if missing; a symbolic link there is refused, not followed."""
    try:
        return os.fdopen(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | NOFOLLOW, 0o644), "a")
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ValueError(f"{path} is a symbolic link: runs never write through one; remove it") from None
        raise


def refuse_links(out: Path) -> None:
    """Refuse a directory that holds a symbolic link, or whose subdirectories do (the loggers' own aside): a run or
    a summary writing there could write through it into a file elsewhere."""
    if not out.is_dir():
        return
    entries = list(out.iterdir())
    below = [e for d in entries if d.is_dir() and not d.is_symlink() and d.name not in LOGGER_DIRS for e in d.iterdir()]
    link = next((p for p in entries + below if p.is_symlink()), None)
    if link is not None:
        raise ValueError(
            f"{link} is a symbolic link: runs never write through one, and {out} holds it; remove it, or choose "
            f"another --out"
        )


def read_json(path: Path) -> dict:
    """A JSON object from ``path``; anything else is a ``ValueError`` that names the file."""
    try:
        value = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is damaged ({e}): delete it, or choose a new --out") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} is damaged (not a JSON object): delete it, or choose a new --out")
    return value


def read_metrics(path: Path) -> list[dict]:
    """The records of ``metrics.jsonl``; a last line without its newline (a crash mid-write) is dropped."""
    if not path.exists():
        return []
    text = path.read_text(errors="replace")
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines):  # no newline after it: torn by a crash
                break
            raise ValueError(f"{path}, line {number}, is damaged ({e}): delete the line, or start afresh") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ValueError(f"{path}, line {number}, is not a metrics record: delete the line, or start afresh")
        records.append(record)
    return records


def keep_metrics_until(path: Path, step: int) -> None:
    """Keep what was logged up to a checkpoint at ``step``; the loop logs the evaluation at ``step`` again."""
    kept = [m for m in read_metrics(path) if m["step"] < step or (m["step"] == step and "val_loss" not in m)]
    write_text("".join(json.dumps(m) + "\n" for m in kept), path)


# ---------------------------------------------------------------------------------------------- checkpoints


def latest_sharded(out: Path) -> Path | None:
    """``OUT/ckpt.dcp``, or the one it replaces when a save stopped between the two renames."""
    for path in (out / SHARDED, out / f"{SHARDED}.old"):
        if (path / PROGRESS).exists():
            return path
    return None


def read_progress(path: Path) -> dict:
    """What a sharded checkpoint's ``progress.json`` says: step, wall, workers, parallel, bytes, run."""
    return read_json(path / PROGRESS)


def check_kind(cfg: TrainConfig) -> None:
    """A run continues only from a checkpoint of its own kind: one process (``ckpt.pt``) or the same workers."""
    out = Path(cfg.out)
    sharded, single = latest_sharded(out), (out / CHECKPOINT).exists()
    if cfg.workers == 1 and sharded and not single:
        saved = read_progress(sharded)
        raise ValueError(
            f"{sharded} was written by a run on {saved['workers']} workers: resume it with --workers {saved['workers']}"
        )
    if cfg.workers > 1 and not sharded and single:
        raise ValueError(f"{out / CHECKPOINT} was written by a run without workers: resume it without --workers")
    if cfg.workers > 1 and sharded:
        saved = read_progress(sharded)
        if (saved.get("workers"), saved.get("parallel")) != (cfg.workers, cfg.parallel):
            raise ValueError(
                f"{sharded} was written by a run with workers={saved.get('workers')}, "
                f"parallel={saved.get('parallel')}: resume it with the same, or start afresh with a new --out"
            )


def check_same_run(where: Path, saved: Any, run: dict[str, Any]) -> None:
    """Refuse to continue a checkpoint written by another run (a different identity, see ``config.identity``)."""
    if not isinstance(saved, dict):
        raise ValueError(f"{where} does not say which run wrote it (an older snoo?): start afresh with a new --out")
    changed = differences(saved, run)
    if changed:
        raise ValueError(
            f"{where} is of another run ({'; '.join(changed[:3])}{'; ...' if len(changed) > 3 else ''}): resume "
            f"with the settings it was trained with, or start afresh with a new --out"
        )


def digest(obj: Any) -> str:
    """sha256 of a checkpoint's contents (tensors by their bytes, dtypes and shapes): ``torch.load`` checks none."""
    h = hashlib.sha256()

    def walk(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous().reshape(-1)
            h.update(f"T{t.dtype}{tuple(x.shape)}:".encode())
            h.update(t.view(torch.uint8).numpy())
        elif isinstance(x, dict):
            h.update(f"D{len(x)}:".encode())
            for k, v in x.items():
                walk(k)
                walk(v)
        elif isinstance(x, (list, tuple)):
            h.update(f"L{len(x)}:".encode())
            for v in x:
                walk(v)
        else:
            h.update(f"{type(x).__name__}{x!r};".encode())

    walk(obj)
    return h.hexdigest()


def save(
    out: Path,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    world: World,
    cfg: TrainConfig,
    progress: Progress,
    run: dict[str, Any],
) -> None:
    """The run's checkpoint: ``ckpt.pt`` from one process, ``ckpt.dcp`` from several ranks (every rank calls this)."""
    record = {**dataclasses.asdict(progress), "run": run}
    if world.size == 1:
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), **record}
        atomic_save({**state, "sha256": digest(state)}, out / CHECKPOINT)
    else:
        record.update(workers=world.size, parallel=cfg.parallel)
        save_sharded(out, model, opt, world, cfg.parallel == "diloco", record)


def load(
    out: Path,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    world: World,
    cfg: TrainConfig,
    run: dict[str, Any],
    device: torch.device,
) -> Progress | None:
    """Load the run's checkpoint into ``model`` and ``opt`` once it checks out; None: there is none yet."""
    sharded = world.size > 1
    path = latest_sharded(out) if sharded else out / CHECKPOINT
    if path is None or not path.exists():
        return None
    record = read_progress(path) if sharded else _read_checkpoint(path, device)
    check_same_run(path, record.get("run"), run)
    try:
        if sharded:
            load_sharded(out, model, opt, world, cfg.parallel == "diloco")
        else:
            model.load_state_dict(record["model"])
            opt.load_state_dict(record["optimizer"])
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} does not fit this model and optimizer ({first}): start afresh") from None
    names = {f.name for f in dataclasses.fields(Progress)}
    progress = Progress(**{k: v for k, v in record.items() if k in names})
    if progress.step > cfg.steps:
        raise ValueError(f"{path} is at step {progress.step}, past this run's {cfg.steps} steps")
    return progress


def snapshot_name(step: int) -> str:
    """The file in which a run keeps its checkpoint of ``step`` besides ``ckpt.pt`` (``train(snapshots=...)``)."""
    return f"ckpt-{step}.pt"


def keep_snapshot(out: Path, step: int) -> None:
    """Keep the checkpoint just written, of ``step``, as :func:`snapshot_name` (a WSD ladder branches from it)."""

    def copy(f: BinaryIO) -> None:
        with (out / CHECKPOINT).open("rb") as source:
            shutil.copyfileobj(source, f)

    replace_atomically(out / snapshot_name(step), copy)


def unbranchable(path: Path) -> str | None:
    """Why the snapshot at ``path`` cannot start a branch (it cannot be read, was written by an older snoo, or says
    no run wrote it), or None. Memory-mapped, so no tensor is read: its sha256 and which run it must be of are
    checked by :func:`load_branch`, which reads it."""
    try:
        record = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # an untrusted file: whatever torch's reader raises on it
        return f"{path} cannot be read ({type(e).__name__})"
    if not isinstance(record, dict) or not record.keys() >= CHECKPOINT_KEYS:
        return f"{path} is not a checkpoint of this lab (an older snoo, or damaged)"
    return None if isinstance(record.get("run"), dict) else f"{path} does not say which run wrote it"


def load_branch(
    path: Path,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    cfg: TrainConfig,
    run: dict[str, Any],
    device: torch.device,
    metrics: Path,
) -> Progress:
    """Start ``cfg``'s run from ``path``, a snapshot of another run (the trunk), and copy the trunk's metrics up to
    it into ``metrics``. Refused unless the trunk is this run but for its length, and its lr schedule is this run's
    at every step before the snapshot: then the branch trains exactly what it would have from scratch. A snapshot
    that cannot be trusted is :class:`Damaged`, and nothing is changed."""
    from snoo.lab.config import lr_schedule

    record = _read_checkpoint(path, device)
    saved = record.get("run")
    if not isinstance(saved, dict):
        raise ValueError(f"{path} does not say which run wrote it: it cannot be branched from")
    changed = [c for c in differences(saved, run) if not c.startswith("steps ")]
    if any(c.startswith("corpus ") for c in changed):
        raise ValueError(
            f"{path} was trained on other data ({next(c for c in changed if c.startswith('corpus '))}): the data "
            f"changed during the experiment; start afresh with a new --out on data that does not change"
        )
    if changed:
        raise ValueError(f"{path} is of another run ({'; '.join(changed[:3])}): it cannot be branched from")
    step = record["step"]
    trunk, here = lr_schedule(dataclasses.replace(cfg, steps=saved["steps"])), lr_schedule(cfg)
    if step > cfg.steps or any(trunk(s) != here(s) for s in range(step)):
        raise ValueError(f"{path} (step {step}) has another lr schedule than this run before it: not a branch point")
    model.load_state_dict(record["model"])
    opt.load_state_dict(record["optimizer"])
    kept = [m for m in read_metrics(path.parent / "metrics.jsonl") if m["step"] <= step]
    write_text("".join(json.dumps(m) + "\n" for m in kept), metrics)
    keep_metrics_until(metrics, step)
    names = {f.name for f in dataclasses.fields(Progress)}
    return Progress(**{k: v for k, v in record.items() if k in names})


class Damaged(ValueError):
    """A checkpoint file that cannot be trusted: unreadable, not of this lab, or changed since it was saved."""

    def __init__(self, path: Path, why: str) -> None:
        super().__init__(f"{path} {why}; start afresh")
        self.why = why


def _read_checkpoint(path: Path, device: torch.device) -> dict:
    """``ckpt.pt`` as saved, or :class:`Damaged`: a file that torch cannot read, or whose contents changed."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # an untrusted file: whatever torch's reader raises on it
        raise Damaged(path, f"cannot be read ({type(e).__name__}): it is damaged") from None
    if not isinstance(ckpt, dict) or not ckpt.keys() >= CHECKPOINT_KEYS:
        raise Damaged(path, "is not a checkpoint of this lab (an older snoo, or damaged)")
    saved = ckpt.pop("sha256")
    if saved != digest(ckpt):
        raise Damaged(path, "is damaged: its contents do not match the sha256 it was saved with")
    return ckpt


def _sharded_state(model: nn.Module, opt: torch.optim.Optimizer, world: World, diloco: bool) -> dict[str, Any]:
    """What this rank saves. DDP ranks hold the same tensors: DCP writes one copy of each. DiLoCo ranks hold their
    own fast weights and inner-optimizer state, which DCP would also keep only one copy of under a shared key, so
    each rank other than 0 saves under ``rank<r>``; rank 0's are the usual ``model`` and ``optim``, so that
    :func:`snoo.distributed.load_evaluation_weights` reads any of the lab's checkpoints with its defaults."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    return {f"rank{world.rank}": state} if diloco and world.rank else state


def save_sharded(
    out: Path, model: nn.Module, opt: torch.optim.Optimizer, world: World, diloco: bool, record: dict
) -> None:
    """Every rank writes its part into ``ckpt.dcp.tmp``; then rank 0 adds ``progress.json`` and swaps it in, so a
    crash at any point leaves a whole checkpoint (``ckpt.dcp``, or ``ckpt.dcp.old`` between the two renames)."""
    import torch.distributed.checkpoint as dcp

    path, tmp, old = out / SHARDED, out / f"{SHARDED}.tmp", out / f"{SHARDED}.old"
    if world.rank == 0 and tmp.exists():  # what a crashed save left
        shutil.rmtree(tmp)
    dist.barrier()
    dcp.save(_sharded_state(model, opt, world, diloco), checkpoint_id=tmp)  # returns once every rank's part is in
    if world.rank == 0:
        (tmp / PROGRESS).write_text(json.dumps(record) + "\n")
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)


def load_sharded(out: Path, model: nn.Module, opt: torch.optim.Optimizer, world: World, diloco: bool) -> dict | None:
    """Load this rank's part of the latest sharded checkpoint into ``model`` and ``opt``; return its progress record
    (None: there is no checkpoint)."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    from snoo.checkpoint import load_dcp

    path = latest_sharded(out)
    if path is None:
        return None
    state = _sharded_state(model, opt, world, diloco)
    # untrusted input: the one place where the lab reads a DCP checkpoint. torch's reader unpickles path/.metadata
    # and non-tensor entries; snoo.checkpoint.load_dcp checks the metadata first and loads the rest weights-only
    load_dcp(state, path)
    mine = state.get(f"rank{world.rank}", state)
    set_state_dict(model, opt, model_state_dict=mine["model"], optim_state_dict=mine["optim"])
    return read_progress(path)
