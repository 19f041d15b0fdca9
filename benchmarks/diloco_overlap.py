"""How much of DiLoCo's exchange ``overlap_steps`` hides behind the inner steps: 2 gloo processes on this machine.

Each rank trains the same MLP (``--width`` square layers, float32) on its own random batches and times its training
steps (forward, backward, ``opt.step()``) in three runs of ``--steps`` steps: SNOO alone (no exchange), DiLoCo with
``overlap_steps=0`` (the all-reduce blocks the step at which it starts) and DiLoCo with ``overlap_steps=1`` (it is
waited for one inner step later). The exchange costs the ``tau=0`` run ``exposed_0 = T(tau=0) - T(alone)``; the
overlapped run still pays ``exposed_1 = T(tau=1) - T(alone)``; ``hidden = 1 - exposed_1 / exposed_0``.

    OMP_NUM_THREADS=1 python benchmarks/diloco_overlap.py --width 1024 --steps 48 --k 4

Measured, not asserted: on a loaded machine the gloo thread and the compute share cores, so repeat it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import snoo


def timed_run(args: argparse.Namespace, rank: int, overlap: int | None) -> float:
    """Seconds per training step (the mean over the run after a warm-up of one cycle); ``overlap`` None: no
    exchange."""
    torch.manual_seed(0)
    layers = [torch.nn.Linear(args.width, args.width) for _ in range(args.layers)]
    model = torch.nn.Sequential(*[m for layer in layers for m in (layer, torch.nn.Tanh())])
    inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
    diloco = {} if overlap is None else {"process_group": dist.group.WORLD, "overlap_steps": overlap}
    opt = snoo.SNOO(inner, k=args.k, **diloco)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(args.batch, args.width, generator=g)
    dist.barrier()
    started = 0.0
    for t in range(args.steps + args.k):
        if t == args.k:
            dist.barrier()
            started = time.perf_counter()
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    for sync in opt.streaming.in_flight if opt.streaming is not None else []:
        sync.wait()
    return (time.perf_counter() - started) / args.steps


def worker(rank: int, args: argparse.Namespace, store: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2, timeout=timedelta(60))
    seconds = {name: timed_run(args, rank, overlap) for name, overlap in (("alone", None), ("tau0", 0), ("tau1", 1))}
    if rank == 0:
        exposed0, exposed1 = seconds["tau0"] - seconds["alone"], seconds["tau1"] - seconds["alone"]
        params = args.layers * (args.width**2 + args.width)
        print(
            json.dumps(
                {
                    "params": params,
                    "bytes_per_exchange": 4 * params,
                    "k": args.k,
                    "seconds_per_step": {k: round(v, 5) for k, v in seconds.items()},
                    "exposed_per_exchange_s": {
                        "tau0": round(exposed0 * args.k, 5),
                        "tau1": round(exposed1 * args.k, 5),
                    },
                    "hidden": round(1 - exposed1 / exposed0, 3) if exposed0 > 0 else None,
                }
            )
        )
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--steps", type=int, default=48)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        mp.spawn(worker, args=(args, f"{directory}/store"), nprocs=2)


if __name__ == "__main__":
    main()
