"""Claim 4: on repeated data, SNOO's validation loss degrades more slowly than its base optimizer's."""

from __future__ import annotations

import statistics
from typing import Any

from snoo import spec
from snoo.lab import experiments, stats
from snoo.lab.claims import Claim, Context, Outcome, difference_verdict, final_losses, line_plot, table

PAIR = ("adamw", "snoo-adamw")  # the paper's base optimizer was Muon (gpu scale: see SETUP)

SETUP = {
    "quick": dict(epochs=(1, 4), pair=PAIR),
    "cpu": dict(epochs=(1, 4, 16), pair=PAIR),
    "gpu": dict(epochs=(1, 4, 16, 32), pair=("muon", "snoo-muon")),
}


def run(ctx: Context, setup: dict[str, Any]) -> Outcome:
    base, snoo = (spec.canonical(o) for o in setup["pair"])
    probe = ctx.config("probe")
    tokens = probe.steps * probe.batch_size * probe.block_size * probe.grad_accum
    losses: dict[int, dict[str, list[float]]] = {}
    for e in setup["epochs"]:
        # the same steps on the first tokens/e tokens of the corpus: e epochs of it
        summary = experiments.run_experiment(
            "compare",
            ctx.config(f"epochs{e}", unique_tokens=tokens // e),
            [base, snoo],
            seeds=ctx.seeds,
            budgets=(1.0,),
            resume=ctx.resume,
            say=ctx.say,
        )
        losses[e] = {o: final_losses(summary, o) for o in (base, snoo)}
    first, most = min(setup["epochs"]), max(setup["epochs"])
    degradation = {
        o: {e: [a - b for a, b in zip(losses[e][o], losses[first][o])] for e in setup["epochs"]} for o in (base, snoo)
    }
    diff = stats.difference_interval(degradation[snoo][most], degradation[base][most])
    mean = {o: {e: statistics.fmean(v) for e, v in d.items()} for o, d in degradation.items()}
    plot = line_plot(
        ctx.out / "repeated_data.png",
        {o: (list(setup["epochs"]), list(m.values())) for o, m in mean.items()},
        title="val loss minus its 1-epoch value, same steps (mean over seeds)",
        xlabel="epochs over the unique tokens",
        ylabel="degradation (nats)",
        logx=True,
    )
    rows = [
        [e, *(statistics.fmean(losses[e][o]) for o in (base, snoo)), mean[base][e], mean[snoo][e]]
        for e in setup["epochs"]
    ]
    return Outcome(
        measured=f"at {most} epochs AdamW degrades {mean[base][most]:+.4f}, SNOO {mean[snoo][most]:+.4f} nats; "
        f"SNOO minus AdamW {diff['mean']:+.4f}"
        + (f" [{diff['low']:+.4f}, {diff['high']:+.4f}]" if diff["low"] is not None else " (1 seed)"),
        values={"difference": diff, "degradation": {o: {str(e): v for e, v in m.items()} for o, m in mean.items()}},
        table=table(["epochs", f"{base} loss", f"{snoo} loss", f"{base} degradation", f"{snoo} degradation"], rows),
        plots=[plot],
    )


def decide(values: dict[str, Any]) -> str:
    return difference_verdict(values["difference"], sign=-1)


CLAIM = Claim(
    id="repeated-data",
    number=4,
    claim="On repeated data SNOO's validation loss degrades more slowly with the number of epochs than its base "
    "optimizer's.",
    source="Kallusky et al. 2025, arXiv 2510.15830 (multi-epoch experiment, against Muon)",
    paper="SNOO's val loss degrades more slowly than Muon's as the same data is repeated (1 to 16+ epochs)",
    criterion="per seed, degradation = final val loss at the most epochs minus at 1 epoch (same steps); holds if "
    "the 95% interval over >= 3 seeds of SNOO's degradation minus AdamW's lies below 0; does not hold if above 0; "
    "inconclusive if it contains 0",
    setup=SETUP,
    run=run,
    decide=decide,
)
