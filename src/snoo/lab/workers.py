"""One rank's world: its place among the ranks, the process group, DiLoCo's optimizer or DDP, and the fault points.

``workers = N`` (``snoo train --workers N``) starts N ranks with torchrun (``launch.py``); every rank builds the same
model from the same seed and reads batches no other rank reads; ``parallel`` says how they combine:

- ``diloco``: each rank takes its own inner steps; :class:`snoo.SNOO` averages the pseudo-gradients over the ranks at
  each outer step (one all-reduce every K steps). The SPEC must be SNOO-based (``snoo+...`` or ``lookahead+...``).
- ``ddp``: ``DistributedDataParallel`` averages the gradients at every step; any optimizer.

With ``fault_tolerant = "on"`` (DiLoCo only) the ranks share no process group: each is a torchft replica whose
:class:`snoo.integrations.torchft.FaultTolerantSNOO` averages over the replicas alive at each outer step; the launching
process runs the lighthouse and restarts a rank that dies, which heals from the others (``launch.py``).

Rank 0 writes the run's files; the sharded checkpoints are in ``checkpoint.py``. See docs/distributed.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from snoo import spec
from snoo.lab.config import TrainConfig

if TYPE_CHECKING:
    import torchft

#: what the ranks average in (DiLoCo's pseudo-gradients, DDP's gradients); None: the tensors' own dtype
REDUCE_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}
#: tests only: "RANK:STEP" makes rank RANK exit with status 3 as it starts step STEP; "RANK:STEP:hang" makes it hang
FAULT_ENV = "SNOO_LAB_FAULT"
#: torchrun's count of the times it restarted the ranks (``max_restarts``)
RESTART_ENV = "TORCHELASTIC_RESTART_COUNT"


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


def adopt(cfg: TrainConfig, world: World) -> TrainConfig:
    """``cfg`` with ``workers`` set to torchrun's world size (a value other than 1 must match it)."""
    if not world.launched or cfg.workers == world.size:
        return cfg
    if cfg.workers != 1:
        raise ValueError(
            f"workers={cfg.workers}, but torchrun started {world.size} ranks: give the same number to both"
        )
    return dataclasses.replace(cfg, workers=world.size)


def fault_point(world: World, step: int) -> None:
    """Tests only: die or hang here when ``SNOO_LAB_FAULT`` names this rank and step (not in ranks that torchrun
    restarted, ``max_restarts``)."""
    fault = os.environ.get(FAULT_ENV)
    if not fault or int(os.environ.get(RESTART_ENV, "0")) > 0:
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


def device(cfg: TrainConfig, world: World) -> torch.device:
    """The run's device; with several ranks on GPUs, rank r takes ``cuda:LOCAL_RANK``."""
    found = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    if world.size > 1 and found.type == "cuda":
        return torch.device("cuda", world.local_rank)
    return found


@contextlib.contextmanager
def process_group(cfg: TrainConfig, world: World, device: torch.device) -> Iterator[None]:
    """The process group of the ranks for the duration of the run (nothing with one rank, nor for torchft replicas,
    which form their groups through the lighthouse)."""
    if world.size == 1 or cfg.fault_tolerant == "on":
        yield
        return
    init_process_group(cfg, world, device)
    try:
        yield
    finally:
        dist.destroy_process_group()


def init_process_group(cfg: TrainConfig, world: World, device: torch.device) -> None:
    """gloo on the CPU, NCCL on the GPU ``cuda:LOCAL_RANK``; a collective that waits longer than ``dist_timeout``
    seconds for the other ranks fails, so a rank that hangs stops the run instead of blocking it."""
    if device.type == "cuda":
        if world.local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"rank {world.rank} needs cuda:{world.local_rank}, and this machine has {torch.cuda.device_count()} "
                f"GPUs: use at most that many workers, or --device cpu"
            )
        torch.cuda.set_device(device)
    backend, timeout = "nccl" if device.type == "cuda" else "gloo", timedelta(seconds=cfg.dist_timeout)
    restart = int(os.environ.get(RESTART_ENV, "0"))
    if not restart:
        dist.init_process_group(backend, timeout=timeout)
        return
    # ranks that torchrun restarted meet in its store, which still holds the dead ranks' addresses: a fresh prefix
    store, rank, size = next(dist.rendezvous("env://", timeout=timeout))
    dist.init_process_group(
        backend, store=dist.PrefixStore(f"restart{restart}", store), rank=rank, world_size=size, timeout=timeout
    )


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """DDP: the SPEC as it is (the gradients are averaged already). DiLoCo: the SPEC with its outermost stage (SNOO,
    or Lookahead, SNOO without momentum) averaging the pseudo-gradients over every rank: the run's process group,
    which ``config`` checked that it takes, and ``compression`` when set; on torchft, ``FaultTolerantSNOO`` with that
    stage's settings."""
    if cfg.parallel == "ddp":
        return spec.build(cfg.stages, model, track_norms=True)
    if cfg.fault_tolerant == "on":
        outer, *rest = cfg.stages
        return fault_tolerant_snoo(cfg, spec.build(rest, model), outer.params)
    world = dict(process_group=dist.group.WORLD, reduce_dtype=REDUCE_DTYPES[cfg.reduce_dtype])
    if cfg.compression != "none":
        world["compression"] = cfg.compression
    return spec.build(cfg.stages, model, track_norms=True, outer=world)


#: set by the launching process of a fault-tolerant run: the port of its store where the ranks meet before the
#: first quorum, and "1" for a rank it restarted
START_ENV, RESTARTED_ENV = "SNOO_FT_START", "SNOO_FT_RESTARTED"


def fault_tolerant_snoo(cfg: TrainConfig, inner: torch.optim.Optimizer, params: dict) -> torch.optim.Optimizer:
    """DiLoCo on torchft: SNOO over this rank's Manager. The ranks the run starts with wait for each other, so that
    the first quorum holds them all; a restarted rank must heal from a live one in its first quorum (else the run
    is over, or every rank died, and it stops rather than train alone from the start)."""
    from snoo.integrations.torchft import FaultTolerantSNOO

    manager = replica_manager(cfg)  # heartbeats from here on
    restarted = os.environ.get(RESTARTED_ENV) == "1"
    if not restarted and START_ENV in os.environ:
        start = dist.TCPStore("localhost", int(os.environ[START_ENV]), is_master=False, wait_for_workers=False)
        start.add("ready", 1)
        while start.add("ready", 0) < cfg.workers:
            time.sleep(0.05)
    opt = FaultTolerantSNOO(inner, manager, **params, track_norms=True)
    if restarted and opt.heals == 0:
        raise RuntimeError("this restarted rank found no live rank to heal from: the run is over, or every rank died")
    return opt


def replica_manager(cfg: TrainConfig) -> torchft.Manager:
    """This rank's torchft ``Manager``: a replica group of one process, whose store (``MASTER_ADDR``,
    ``MASTER_PORT``) and lighthouse (``TORCHFT_LIGHTHOUSE``) the launching process runs; named by its rank, so a
    restarted rank is the same replica. Its collectives and votes wait ``dist_timeout`` seconds."""
    from torchft import Manager, ProcessGroupBabyNCCL, ProcessGroupGloo

    timeout = timedelta(seconds=cfg.dist_timeout)
    world = World.from_env()
    group = ProcessGroupBabyNCCL if device(cfg, world).type == "cuda" else ProcessGroupGloo
    return Manager(
        pg=group(timeout=timeout),
        load_state_dict=None,
        state_dict=None,
        min_replica_size=1,
        use_async_quorum=False,
        replica_id=f"rank_{world.rank}",
        rank=0,
        world_size=1,
        timeout=timeout,
        quorum_timeout=timeout,
        connect_timeout=timeout,
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


def wrap_ddp(cfg: TrainConfig, model: nn.Module, device: torch.device) -> tuple[nn.Module, GradientBytes]:
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    counter = GradientBytes(bf16=cfg.reduce_dtype == "bf16")
    ddp.register_comm_hook(counter, GradientBytes.hook)
    return ddp, counter
