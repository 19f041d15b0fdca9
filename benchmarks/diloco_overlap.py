"""How much of DiLoCo's exchange ``overlap_steps`` hides behind the inner steps: 2 gloo processes on this machine.

Each rank trains the same MLP (``--layers`` square layers of ``--width``, float32) on its own batch and times
``opt.step()`` in three runs of ``--cycles`` cycles of K steps: SNOO alone (no exchange), DiLoCo with
``overlap_steps=0`` (the all-reduce blocks the step at which it starts) and with ``overlap_steps=1`` (started there,
waited for one inner step later). The time the exchange adds to a cycle beyond SNOO alone is its exposed part;
``hidden = 1 - exposed(tau=1) / exposed(tau=0)``.

    OMP_NUM_THREADS=1 python benchmarks/diloco_overlap.py --width 1024 --layers 4 --batch 32 --k 4 --cycles 8

Measured, not asserted: on a loaded machine the gloo thread and the compute share cores, so repeat it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import snoo


def timed_run(args: argparse.Namespace, rank: int, overlap: int | None) -> float:
    """Seconds per cycle of K steps that ``opt.step()`` takes beyond K quiet steps: per phase of the cycle (inner step
    modulo K) the median over the cycles of its ``opt.step()`` time, summed over the phases, less K times the median
    of the phases where nothing is started or waited for. Medians, so that a slow step of another process on the
    machine does not count. ``overlap`` None: no exchange (what is left is the outer step's own cost)."""
    torch.manual_seed(0)
    layers = [torch.nn.Linear(args.width, args.width) for _ in range(args.layers)]
    model = torch.nn.Sequential(*[m for layer in layers for m in (layer, torch.nn.Tanh())])
    inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
    diloco = {} if overlap is None else {"process_group": dist.group.WORLD, "overlap_steps": overlap}
    opt = snoo.SNOO(inner, k=args.k, **diloco)
    x = torch.randn(args.batch, args.width, generator=torch.Generator().manual_seed(rank))
    phases: list[list[float]] = [[] for _ in range(args.k)]
    for t in range(1, args.k * (args.cycles + 1) + 1):
        model(x).square().mean().backward()
        began = time.perf_counter()
        opt.step()
        if t > args.k:  # the first cycle warms up
            phases[t % args.k].append(time.perf_counter() - began)
        opt.zero_grad()
    for sync in opt.streaming.in_flight if opt.streaming is not None else []:
        sync.wait()
    medians = [statistics.median(p) for p in phases]
    quiet = statistics.median(medians[2:])  # phases 0 and 1 start, wait for or apply the exchange
    return sum(medians) - args.k * quiet


def worker(rank: int, args: argparse.Namespace, store: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2, timeout=timedelta(60))
    extra = {name: timed_run(args, rank, overlap) for name, overlap in (("alone", None), ("tau0", 0), ("tau1", 1))}
    if rank == 0:
        exposed = {name: extra[name] - extra["alone"] for name in ("tau0", "tau1")}
        params = args.layers * (args.width**2 + args.width)
        print(
            json.dumps(
                {
                    "params": params,
                    "bytes_per_exchange": 4 * (params + 2 * args.layers),
                    "k": args.k,
                    "outer_step_s": round(extra["alone"], 5),
                    "exposed_exchange_s": {k: round(v, 5) for k, v in exposed.items()},
                    "hidden": round(1 - exposed["tau1"] / exposed["tau0"], 3) if exposed["tau0"] > 0 else None,
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
    parser.add_argument("--cycles", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        mp.spawn(worker, args=(args, f"{directory}/store"), nprocs=2)


if __name__ == "__main__":
    main()
