"""The lab on several worker processes of this machine: torchrun, DiLoCo or DDP, per-rank data, sharded checkpoints.

``workers = N`` (``snoo train --workers N``) starts N ranks with torchrun, each running ``python -m snoo.lab.workers
OUT/launch.json``; ``torchrun --nproc-per-node N -m snoo.lab.cli train ...`` does the same by hand. Every rank
builds the same model from the same seed and reads batches no other rank reads; ``parallel`` says how they combine:

- ``diloco``: each rank takes its own inner steps; :class:`snoo.SNOO` averages the pseudo-gradients over the ranks at
  each outer step (one all-reduce every K steps). The SPEC must be SNOO-based (``snoo+...`` or ``lookahead+...``).
- ``ddp``: ``DistributedDataParallel`` averages the gradients at every step; any optimizer.

Rank 0 writes the run's files. Checkpoints are ``torch.distributed.checkpoint`` directories (``OUT/ckpt.dcp``) that
replace the previous one only once they are complete. See docs/distributed.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import snoo
from snoo import spec

PARALLEL = ("diloco", "ddp")
#: what the ranks average in (DiLoCo's pseudo-gradients, DDP's gradients); None: the tensors' own dtype
REDUCE_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}
CHECKPOINT = "ckpt.dcp"
PROGRESS = "progress.json"  # written into a checkpoint directory last: its presence says the checkpoint is whole
#: tests only: "RANK:STEP" makes rank RANK exit with status 3 as it starts step STEP; "RANK:STEP:hang" makes it hang
FAULT_ENV = "SNOO_LAB_FAULT"


@dataclass(frozen=True)
class World:
    """This process's place among the ranks, as torchrun's environment gives it (one rank when there is none)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    launched: bool = False  # started by torchrun (or by anything that sets WORLD_SIZE and RANK)

    @classmethod
    def from_env(cls) -> World:
        if "WORLD_SIZE" not in os.environ:
            return cls()
        rank = int(os.environ.get("RANK", "0"))
        return cls(rank, int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", rank)), launched=True)

    def batch_index(self, index: int) -> int:
        """The batch this rank reads where one process reads batch ``index``: rank r of N reads batch N index + r,
        so no two ranks read the same batch, the N ranks of a step read what one process reads in N consecutive
        steps, and one rank reads exactly what a run without workers reads."""
        return index * self.size + self.rank


def check(cfg: Any) -> None:
    """The distributed fields of a ``TrainConfig`` (``train.validate`` calls this)."""
    if cfg.workers < 1:
        raise ValueError(f"workers must be at least 1, got {cfg.workers}")
    if cfg.parallel not in PARALLEL:
        raise ValueError(f"parallel must be diloco or ddp, got {cfg.parallel!r}")
    if cfg.reduce_dtype not in REDUCE_DTYPES:
        raise ValueError(f"reduce_dtype must be fp32 or bf16, got {cfg.reduce_dtype!r}")
    if not cfg.dist_timeout > 0:
        raise ValueError(f"dist_timeout must be a positive number of seconds, got {cfg.dist_timeout}")
    if cfg.workers == 1:
        return
    if cfg.parallel == "diloco" and spec.parse(cfg.optimizer)[0].name not in ("snoo", "lookahead"):
        raise ValueError(
            f"parallel=diloco averages the pseudo-gradients of a SNOO outer stage, and "
            f"{spec.canonical(cfg.optimizer)!r} has none: use a SPEC that starts with snoo or lookahead "
            f"(e.g. snoo-adamw), or --set parallel=ddp"
        )
    if cfg.device.startswith("cuda:"):
        raise ValueError(
            f"with workers > 1 each rank takes the GPU cuda:LOCAL_RANK: set device to cuda, not {cfg.device}"
        )


def adopt(cfg: Any, world: World) -> Any:
    """``cfg`` with ``workers`` set to torchrun's world size (a value other than 1 must match it)."""
    if not world.launched or cfg.workers == world.size:
        return cfg
    if cfg.workers != 1:
        raise ValueError(
            f"workers={cfg.workers}, but torchrun started {world.size} ranks: give the same number to both"
        )
    return dataclasses.replace(cfg, workers=world.size)


# ---------------------------------------------------------------------------------------------- launching


class LaunchFailed(RuntimeError):
    """The ranks of a launched run stopped before the run's end; ``status`` is torchrun's exit status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def launch(cfg: Any, *, resume: bool) -> dict:
    """Train ``cfg`` on ``cfg.workers`` ranks of this machine under torchrun; return rank 0's ``result.json``.

    The config travels whole in ``OUT/launch.json``. torchrun stops every rank when one fails; then this raises
    :class:`LaunchFailed` with what to do next (unless rank 0 wrote a result, e.g. of a diverged run).
    """
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    request = out / "launch.json"
    request.write_text(json.dumps({"config": dataclasses.asdict(cfg), "resume": resume}, indent=2) + "\n")
    result = out / "result.json"
    result.unlink(missing_ok=True)  # what is there now is from an earlier run
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={cfg.workers}"),
        *("-m", "snoo.lab.workers", str(request)),
    ]
    # torchrun sets one thread per rank anyway, and says so unless asked
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.Popen(command, env=env)
    try:
        status = proc.wait()
    except BaseException:  # Ctrl-C: torchrun stops its ranks on SIGTERM
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
    if result.exists():
        return json.loads(result.read_text())
    found = latest_checkpoint(out)
    then = (
        f"the last checkpoint is {found} (step {progress(found)['step']}): continue with --resume"
        if found
        else "no checkpoint was written yet: start it again"
    )
    raise LaunchFailed(
        f"the run on {cfg.workers} ranks stopped before its end (torchrun exit status {status}; the ranks' "
        f"messages are above): {then}",
        status or 1,
    )


def main(argv: list[str] | None = None) -> int:
    """What torchrun runs on each rank of a launched run: ``python -m snoo.lab.workers OUT/launch.json``."""
    from snoo.lab.train import TrainConfig, train  # train.py imports this module

    (path,) = sys.argv[1:] if argv is None else argv
    request = json.loads(Path(path).read_text())
    rank = World.from_env().rank
    try:
        result = train(TrainConfig(**request["config"]), resume=request["resume"])
    except (ValueError, FileNotFoundError, ImportError, RuntimeError) as e:
        if os.environ.get("SNOO_DEBUG"):
            raise
        print(f"snoo: rank {rank}: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 1 if isinstance(e, RuntimeError) else 2
    if result["status"] != "ok":
        if rank != 0:  # rank 0's message is in result.json, which the launching process reports
            print(f"snoo: rank {rank}: {result['message']}", file=sys.stderr)
        return 1
    return 0


def fault_point(world: World, step: int) -> None:
    """Tests only: die or hang here when ``SNOO_LAB_FAULT`` names this rank and step."""
    fault = os.environ.get(FAULT_ENV)
    if not fault:
        return
    rank, at, *how = fault.split(":")
    if (int(rank), int(at)) != (world.rank, step):
        return
    if how == ["hang"]:
        while True:
            time.sleep(1)
    sys.stderr.flush()
    os._exit(3)


# ---------------------------------------------------------------------------------------------- on each rank


def init_process_group(cfg: Any, world: World, device: torch.device) -> None:
    """gloo on the CPU, NCCL on the GPU ``cuda:LOCAL_RANK``; a collective that waits longer than ``dist_timeout``
    seconds for the other ranks fails, so a rank that hangs stops the run instead of blocking it."""
    if device.type == "cuda":
        if world.local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"rank {world.rank} needs cuda:{world.local_rank}, and this machine has {torch.cuda.device_count()} "
                f"GPUs: use at most that many workers, or --device cpu"
            )
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=cfg.dist_timeout))


def build_optimizer(cfg: Any, model: nn.Module) -> torch.optim.Optimizer:
    """DiLoCo: the SPEC's outer SNOO (or Lookahead, SNOO without momentum) averaging over every rank, around the rest
    of the SPEC; DDP: the SPEC as it is (the gradients are averaged already)."""
    if cfg.parallel == "ddp":
        return spec.build(cfg.optimizer, model, track_norms=True)
    outer, *rest = spec.parse(cfg.optimizer)
    params = outer.params
    if outer.name == "lookahead":
        params = dict(k=params["k"], lr=params["alpha"], momentum=0.0, nesterov=False)
    return snoo.SNOO(
        spec.build(rest, model),
        **params,
        track_norms=True,
        process_group=dist.group.WORLD,
        reduce_dtype=REDUCE_DTYPES[cfg.reduce_dtype],
    )


class GradientBytes:
    """DDP comm hook state: counts the bytes this rank puts into the gradient all-reduces, then averages them."""

    def __init__(self, bf16: bool) -> None:
        self.bf16 = bf16
        self.sent = 0

    @staticmethod
    def hook(state, bucket):  # no annotations: DDP refuses the strings that `from __future__ import annotations` makes
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        buffer = bucket.buffer()
        if state.bf16:
            state.sent += buffer.numel() * torch.bfloat16.itemsize
            return default_hooks.bf16_compress_hook(None, bucket)  # type: ignore[arg-type]  # None: the world
        state.sent += buffer.numel() * buffer.element_size()
        return default_hooks.allreduce_hook(None, bucket)  # type: ignore[arg-type]


def wrap_ddp(cfg: Any, model: nn.Module, device: torch.device) -> tuple[nn.Module, GradientBytes]:
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    counter = GradientBytes(bf16=cfg.reduce_dtype == "bf16")
    ddp.register_comm_hook(counter, GradientBytes.hook)
    return ddp, counter


# ---------------------------------------------------------------------------------------------- checkpoints


def _state(model: nn.Module, opt: torch.optim.Optimizer, world: World, diloco: bool) -> dict[str, Any]:
    """What this rank saves. DDP ranks hold the same tensors: DCP writes one copy of each. DiLoCo ranks hold their
    own fast weights and inner-optimizer state, which DCP would also keep only one copy of under a shared key, so
    each rank other than 0 saves under ``rank<r>``; rank 0's are the usual ``model`` and ``optim``, so that
    :func:`snoo.distributed.load_evaluation_weights` reads any of the lab's checkpoints with its defaults."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    return {f"rank{world.rank}": state} if diloco and world.rank else state


def progress(path: Path) -> dict:
    """What a checkpoint directory's ``progress.json`` says: step, wall, workers, parallel, communicated_bytes."""
    return json.loads((path / PROGRESS).read_text())


def latest_checkpoint(out: Path) -> Path | None:
    """``OUT/ckpt.dcp``, or the one it replaces when a save stopped between the two renames."""
    for path in (out / CHECKPOINT, out / f"{CHECKPOINT}.old"):
        if (path / PROGRESS).exists():
            return path
    return None


def save_checkpoint(
    out: Path, model: nn.Module, opt: torch.optim.Optimizer, world: World, diloco: bool, record: dict
) -> None:
    """Every rank writes its part into ``ckpt.dcp.tmp``; then rank 0 adds ``progress.json`` and swaps it in, so a
    crash at any point leaves a whole checkpoint (``ckpt.dcp``, or ``ckpt.dcp.old`` between the two renames)."""
    import torch.distributed.checkpoint as dcp

    path, tmp, old = out / CHECKPOINT, out / f"{CHECKPOINT}.tmp", out / f"{CHECKPOINT}.old"
    if world.rank == 0 and tmp.exists():  # what a crashed save left
        shutil.rmtree(tmp)
    dist.barrier()
    dcp.save(_state(model, opt, world, diloco), checkpoint_id=tmp)  # returns on rank 0 once every rank's part is in
    if world.rank == 0:
        (tmp / PROGRESS).write_text(json.dumps(record) + "\n")
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(out: Path, model: nn.Module, opt: torch.optim.Optimizer, world: World, diloco: bool) -> dict | None:
    """Load this rank's part of the latest checkpoint into ``model`` and ``opt``; return its progress record (None:
    there is no checkpoint)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    path = latest_checkpoint(out)
    if path is None:
        return None
    state = _state(model, opt, world, diloco)
    dcp.load(state, checkpoint_id=path)
    mine = state.get(f"rank{world.rank}", state)
    set_state_dict(model, opt, model_state_dict=mine["model"], optim_state_dict=mine["optim"])
    return progress(path)


if __name__ == "__main__":
    sys.exit(main())
