"""Claim 5: at equal tokens, one worker (SNOO) beats N DiLoCo workers, and the loss worsens as N grows."""

from __future__ import annotations

import itertools
import statistics
from typing import Any

from snoo.lab import scale_out, stats
from snoo.lab.claims import DOES_NOT_HOLD, HOLDS, Claim, Context, Outcome, combine, difference_verdict, line_plot, table

SETUP = {
    # torchrun start-ups cost more than the whole quick scale: not run there (tests run it once with 2 workers)
    "quick": dict(worker_counts=()),
    "cpu": dict(worker_counts=(2, 4)),
    "gpu": dict(worker_counts=(2, 4, 8)),
}


def run(ctx: Context, setup: dict[str, Any]) -> Outcome:
    counts = tuple(setup["worker_counts"])
    if not counts:
        return Outcome(measured="not run at this scale", values={}, unavailable="too small")
    losses: dict[int, list[float]] = {1: [], **{n: [] for n in counts}}
    for s in range(ctx.seeds):
        seed = ctx.config("probe").seed + s
        summary = scale_out.run_scale_out(
            ctx.config(f"seed{seed}", seed=seed),
            snoo_spec="snoo-adamw",
            baseline="adamw",
            worker_counts=counts,
            resume=ctx.resume,
            say=ctx.say,
        )
        for r in summary["runs"]:
            if r["parallel"] in (None, "diloco") and r["optimizer"].startswith("snoo"):
                losses[r["workers"]].append(r["final_val_loss"] if r["status"] == "ok" else float("inf"))
    diffs = {n: stats.difference_interval(losses[n], losses[1]) for n in counts}
    means = {n: statistics.fmean(v) for n, v in losses.items()}
    plot = line_plot(
        ctx.out / "diloco_workers.png",
        {"SNOO / DiLoCo": (list(means), list(means.values()))},
        title="final val loss at equal tokens against the number of workers",
        xlabel="workers",
        ylabel="val loss",
    )
    rows = [[n, means[n], "-" if n == 1 else f"{diffs[n]['mean']:+.4f}"] for n in means]
    return Outcome(
        measured="final val loss by workers: " + ", ".join(f"{n}: {m:.4f}" for n, m in means.items()),
        values={"means": {str(n): m for n, m in means.items()}, "differences": {str(n): d for n, d in diffs.items()}},
        table=table(["workers", "final val loss (mean)", "minus 1 worker"], rows),
        plots=[plot],
    )


def decide(values: dict[str, Any]) -> str:
    parts = {f"1 worker beats {n}": difference_verdict(d, sign=1) for n, d in values["differences"].items()}
    means = [values["means"][n] for n in sorted(values["means"], key=int)]
    parts["worse with more workers"] = HOLDS if all(a < b for a, b in itertools.pairwise(means)) else DOES_NOT_HOLD
    return combine(parts)


CLAIM = Claim(
    id="diloco-workers",
    number=5,
    claim="At equal total tokens one SNOO worker beats N DiLoCo workers, and the loss worsens as N grows.",
    source="Kallusky et al. 2025, arXiv 2510.15830 (SNOO as DiLoCo with N = 1); Douillard et al. 2023",
    paper="N = 1 (SNOO) best at equal tokens; loss worsens with more workers",
    criterion="for every N: holds if the 95% interval over >= 3 seeds of DiLoCo-N's final loss minus SNOO's lies "
    "above 0, does not hold if below; and the mean loss must rise strictly with N (1, then each N) or that part "
    "does not hold; the claim holds if every part holds, does not hold if any does not",
    setup=SETUP,
    run=run,
    decide=decide,
)
