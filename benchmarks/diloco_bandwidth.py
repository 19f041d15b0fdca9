"""What each way of sending DiLoCo's pseudo-gradients buys: loss at equal tokens, bytes, and modelled wall-clock.

Two gloo processes on this machine train a student MLP to match a fixed random teacher, each rank on its own
batches, for the same number of steps (so the same tokens) in every setup: DDP (AdamW, gradients averaged every
step), DiLoCo (SNOO around AdamW) with float32, bf16 all-reduce, bf16/int8/int4 compression with and without error
feedback, and streaming DiLoCo with F fragments and tau overlapped steps. Measured per setup: the final loss on
held-out batches (of the slow weights for DiLoCo), the bytes rank 0 handed to the collectives per step
(``opt.communicated_bytes``; for DDP counted in a communication hook), and the seconds of compute per step with no
exchange (one SNOO run without a process group).

Modelled wall-clock at a link of B bit/s, the lab's model (``snoo.lab.scale_out.modelled_seconds``): ``steps *
compute + sum over exchanges of max(0, 8 * bytes / B - tau * compute)``: an exchange of ``bytes`` takes ``8 * bytes /
B`` seconds, of which ``tau`` inner steps hide up to ``tau * compute``. With 2 workers an all-reduce and an
all-gather move about the bytes handed to them; latency is left out, and DDP is modelled without overlapping its
all-reduce with the backward pass.

    OMP_NUM_THREADS=1 python benchmarks/diloco_bandwidth.py --out docs/img/diloco-bandwidth.png
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
from snoo.lab.scale_out import GBITS, modelled_seconds
from snoo.lab.workers import GradientBytes

#: name -> SNOO's DiLoCo arguments (None: DDP)
SETUPS: dict[str, dict | None] = {
    "DDP": None,
    "DiLoCo fp32": {},
    "bf16 all-reduce": {"reduce_dtype": torch.bfloat16},
    "bf16": {"compression": "bf16", "error_feedback": False},
    "bf16 + EF": {"compression": "bf16"},
    "int8": {"compression": "int8", "error_feedback": False},
    "int8 + EF": {"compression": "int8"},
    "int4": {"compression": "int4", "error_feedback": False},
    "int4 + EF": {"compression": "int4"},
    "F=4, tau=0": {"fragments": 4},
    "F=1, tau=1": {"overlap_steps": 1},
    "F=4, tau=1": {"fragments": 4, "overlap_steps": 1},
}


def mlp(width: int, depth: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    layers = [m for _ in range(depth) for m in (torch.nn.Linear(width, width), torch.nn.GELU())]
    return torch.nn.Sequential(*layers, torch.nn.Linear(width, 1))


def batch(args: argparse.Namespace, teacher: torch.nn.Module, rank: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(args.batch, args.width, generator=torch.Generator().manual_seed(100_000 * rank + t))
    with torch.no_grad():
        return x, teacher(x)


def train(args: argparse.Namespace, rank: int, setup: dict | None, group: bool = True) -> dict:
    teacher, model = mlp(args.width, args.depth, 1), mlp(args.width, args.depth, 0)
    counter = None
    if setup is None:  # the lab's DDP hook counts the bytes put into the gradient all-reduces
        model = torch.nn.parallel.DistributedDataParallel(model)
        counter = GradientBytes(bf16=False)
        model.register_comm_hook(counter, GradientBytes.hook)
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    else:
        pg = {"process_group": dist.group.WORLD} if group else {}
        opt = snoo.SNOO(torch.optim.AdamW(model.parameters(), lr=args.lr), k=args.k, momentum=0.9, **pg, **setup)
    began = time.perf_counter()
    for t in range(args.steps):
        x, y = batch(args, teacher, rank, t)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    seconds = time.perf_counter() - began
    if isinstance(opt, snoo.SNOO):
        for sync in opt.streaming.in_flight if opt.streaming is not None else []:
            sync.wait()
        opt.eval()  # the slow weights
    with torch.no_grad():
        held_out = [batch(args, teacher, 99, t) for t in range(8)]
        loss = sum(torch.nn.functional.mse_loss(model(x), y).item() for x, y in held_out) / len(held_out)
    sent = counter.sent if counter is not None else opt.communicated_bytes
    return {"loss": loss, "bytes_per_step": sent / args.steps, "seconds_per_step": seconds / args.steps}


def modelled(result: dict, setup: dict | None, args: argparse.Namespace, compute: float, gbit: float) -> float:
    """Seconds for the run at ``gbit`` Gbit/s from its measured bytes and the measured compute per step."""
    if setup is None:
        exchanges, tau = args.steps, 0
    else:
        exchanges, tau = args.steps // (args.k // setup.get("fragments", 1)), setup.get("overlap_steps", 0)
    return modelled_seconds(args.steps, compute, exchanges, result["bytes_per_step"] * args.steps, tau, gbit)


def worker(rank: int, args: argparse.Namespace, store: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2, timeout=timedelta(60))
    compute = train(args, rank, {}, group=False)["seconds_per_step"]  # no exchange: compute alone
    results = {name: train(args, rank, setup) for name, setup in SETUPS.items()}
    if rank == 0:
        params = sum(p.numel() for p in mlp(args.width, args.depth, 0).parameters())
        rows = []
        for name, setup in SETUPS.items():
            r = results[name]
            wall = {g: modelled(r, setup, args, compute, g) for g in GBITS}
            rows.append({"setup": name, **r, **{f"modelled_s_{g}gbit": round(w, 4) for g, w in wall.items()}})
        print(json.dumps({"params": params, "steps": args.steps, "k": args.k, "compute_s_per_step": compute}))
        print(
            "| setup | loss | bytes/worker/step | " + " | ".join(f"wall-clock at {g} Gbit/s (s)" for g in GBITS) + " |"
        )
        print("|---|---|---|" + "---|" * len(GBITS))
        for row in rows:
            walls = " | ".join(f"{row[f'modelled_s_{g}gbit']:.3f}" for g in GBITS)
            print(f"| {row['setup']} | {row['loss']:.4e} | {row['bytes_per_step']:,.0f} | {walls} |")
        if args.out:
            plot(rows, args.out)
    dist.destroy_process_group()


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(GBITS), figsize=(4.2 * len(GBITS), 3.6), sharey=True)
    for ax, g in zip(axes, GBITS):
        for row in rows:
            ax.scatter(row[f"modelled_s_{g}gbit"], row["loss"], s=18)
            ax.annotate(row["setup"], (row[f"modelled_s_{g}gbit"], row["loss"]), fontsize=6)
        ax.set_title(f"{g} Gbit/s")
        ax.set_xlabel("modelled wall-clock (s)")
    axes[0].set_ylabel("held-out loss at equal tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--steps", type=int, default=320)
    parser.add_argument("--out", default="", help="where to write the plot of loss against modelled wall-clock")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        mp.spawn(worker, args=(args, f"{directory}/store"), nprocs=2)


if __name__ == "__main__":
    main()
