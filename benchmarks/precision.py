"""bf16 autocast against fp32 on the CPU: does the lab's final val loss move, paired by seed?

Trains the `compare` preset's 1x runs (123K parameters, 1000 steps, the WSD schedule with the warm-up a default
`snoo compare` gives it) of its two default contenders, AdamW and SNOO around it, for every seed, once with
``autocast=off`` and once with ``autocast=bf16``; one thread per run, ``--jobs`` runs at a time, each seed's four
runs together so that the two precisions share the machine's busy and quiet stretches. Then, per optimizer, the
paired difference of final val loss bf16 - fp32: its mean and 95% t-interval over the seeds (``stats``).

The rule of the scaling study (issue 26): bf16 is used for the large sizes only if it is faster and the interval
lies within [-0.005, 0.005] nats. The speed half comes from ``benchmarks/throughput.py`` (its interleaved timings);
the runs' own wall times are printed here too, but they share the machine with whatever else runs.

    python benchmarks/precision.py [--seeds 5] [--jobs 2] [--out runs/precision]

Finished runs are kept (``--resume`` of the lab): run it again to continue, or with ``--report`` to print the table
of the seeds whose runs have all finished, training nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path

from snoo import spec
from snoo.lab import stats
from snoo.lab.config import make_config
from snoo.lab.jobs import run_jobs

PRECISIONS = ("off", "bf16")  # the values of TrainConfig.autocast compared; fp32 is "off"
TOLERANCE = 0.005  # nats: the largest difference bf16 may make (issue 26)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", default="runs/precision")
    ap.add_argument("--preset", default="compare")
    ap.add_argument("--steps", type=int, default=None, help="default: the preset's")
    ap.add_argument("--report", action="store_true", help="train nothing: the table of the seeds finished so far")
    args = ap.parse_args()
    base = make_config(args.preset, threads=1, steps=args.steps, progress=False)
    # what a default `snoo compare` (WSD ladder) trains at 1x: experiments.run_experiment
    base = dataclasses.replace(base, schedule="wsd", warmup_steps=round(base.warmup * base.steps))
    # the compare command's contenders: the preset's optimizer and SNOO around it (cli.py)
    optimizers = [spec.canonical(base.optimizer), spec.canonical(f"snoo+{base.optimizer}")]
    out = Path(args.out)
    for seed in range(0 if args.report else args.seeds):
        for precision in PRECISIONS:
            cfg = dataclasses.replace(base, autocast=precision)
            jobs = [
                dict(optimizer=o, budget=1.0, seed=seed, dir=f"{precision}-{i}-s{seed}")
                for i, o in enumerate(optimizers)
            ]
            run_jobs(cfg, jobs, out, resume=True, say=print, processes=args.jobs)
    runs = [f"{p}-{i}-s{{}}" for p in PRECISIONS for i in range(len(optimizers))]
    seeds = [s for s in range(args.seeds) if all((out / run.format(s) / "result.json").exists() for run in runs)]
    if not seeds:
        print(f"no seed has finished its {len(runs)} runs in {out} yet")
        return
    print(f"\n{args.preset} preset, {base.steps} steps, wsd schedule, one thread per run, seeds {seeds}\n")
    print("| optimizer | fp32 final val loss | bf16 final val loss | bf16 - fp32 (95% interval) | s/run fp32 | bf16 |")
    print("|---|---|---|---|---|---|")
    within = True
    for i, o in enumerate(optimizers):
        results = {
            p: [json.loads((out / f"{p}-{i}-s{s}" / "result.json").read_text()) for s in seeds] for p in PRECISIONS
        }
        losses = {p: [r["final_val_loss"] for r in rs] for p, rs in results.items()}
        diff = stats.difference_interval(losses["bf16"], losses["off"])
        within &= diff["low"] is not None and diff["low"] >= -TOLERANCE and diff["high"] <= TOLERANCE
        interval = f"[{diff['low']:+.4f}, {diff['high']:+.4f}]" if diff["low"] is not None else "n/a"
        walls = {p: statistics.median(r["wall_time"] for r in rs) for p, rs in results.items()}
        print(
            f"| {o} | {statistics.fmean(losses['off']):.4f} | {statistics.fmean(losses['bf16']):.4f} "
            f"| {diff['mean']:+.4f} {interval} | {walls['off']:.0f} | {walls['bf16']:.0f} |"
        )
    print(
        f"\nevery paired interval within [-{TOLERANCE}, {TOLERANCE}] nats: {'yes' if within else 'no'}; "
        "whether bf16 is faster: benchmarks/throughput.py"
    )


if __name__ == "__main__":
    main()
