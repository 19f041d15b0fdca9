"""Claim 1: SNOO around AdamW beats a tuned AdamW: it needs fewer steps for the same loss (compute factor > 1)."""

from __future__ import annotations

from typing import Any

from snoo.lab.claims import Claim, Context, Outcome, compare_pair, factor_verdict, fmt_interval, table

PAPER_LOW = 1.4  # the smallest factor the paper reports

SETUP = {
    "quick": dict(budgets=(1.0, 1.5), ladder="cosine"),
    "cpu": dict(budgets=(0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5), ladder="wsd"),
    "gpu": dict(budgets=(0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5), ladder="wsd"),
}


def run(ctx: Context, setup: dict[str, Any]) -> Outcome:
    # both contenders get the same tuning budget on a seed no reported run uses, then every seed is measured
    # against the same seed's ladder of the tuned AdamW
    summary, snoo = compare_pair(ctx, "compare", "adamw", "snoo-adamw", setup)
    iv = summary["compute_factor_interval"][snoo]
    rows = [
        [r["optimizer"], r["final_val_loss"], fmt_interval(summary["compute_factor_interval"].get(r["optimizer"]))]
        for r in summary["table"]
    ]
    regime = summary["regime"]
    return Outcome(
        measured=f"compute factor {fmt_interval(iv)} at {regime['params']:,} parameters, "
        f"{regime['tokens_per_param']:.2g} tokens per parameter",
        values={"interval": iv, "tokens_per_param": regime["tokens_per_param"]},
        table=table(["optimizer (tuned)", "final val loss (mean)", "compute factor (95% interval)"], rows),
        plots=["compare/ladder.png"] if (ctx.out / "compare" / "ladder.png").exists() else [],
    )


def decide(values: dict[str, Any]) -> str:
    return factor_verdict(values["interval"], PAPER_LOW)


CLAIM = Claim(
    id="snoo-vs-adamw",
    number=1,
    claim="SNOO(AdamW) reaches a tuned AdamW's loss in fewer steps (compute factor above 1).",
    source="Kallusky et al. 2025, arXiv 2510.15830 (abstract, main results)",
    paper="1.4x to 2.5x compute factor, 125M to 1B parameters, growing with size",
    criterion="holds if the 95% interval of the compute factor over >= 3 seeds lies above 1; does not hold if it "
    "lies below 1, or contains 1 with its upper end below the paper's 1.4x; inconclusive otherwise",
    setup=SETUP,
    run=run,
    decide=decide,
)
