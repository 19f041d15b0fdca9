"""Claim 10: GPA (generalised primal averaging) around AdamW takes about 9% fewer steps than AdamW to the same
loss."""

from __future__ import annotations

from typing import Any

from snoo import spec
from snoo.lab.claims import Claim, Context, Outcome, compare_pair, factor_verdict, fmt_interval

PAPER_LOW = 1.087  # 8.7% fewer steps (v3 of the paper)
SPEC = "gpa+adamw"

SETUP = {
    "quick": dict(budgets=(1.0, 1.5), ladder="cosine"),
    "cpu": dict(budgets=(0.5, 0.75, 1.0, 1.25, 1.5, 2.0), ladder="wsd"),
    "gpu": dict(budgets=(0.5, 0.75, 1.0, 1.25, 1.5, 2.0), ladder="wsd"),
}


def run(ctx: Context, setup: dict[str, Any]) -> Outcome:
    if "gpa" not in spec.NAMES:
        return Outcome(measured="not run: this version of snoo has no GPA", values={}, unavailable="GPA not available")
    summary, gpa = compare_pair(ctx, "compare", "adamw", SPEC, setup)
    iv = summary["compute_factor_interval"][gpa]
    return Outcome(
        measured=f"compute factor {fmt_interval(iv)} (steps saved: 1 - 1/factor)",
        values={"interval": iv},
        plots=["compare/ladder.png"] if (ctx.out / "compare" / "ladder.png").exists() else [],
    )


def decide(values: dict[str, Any]) -> str:
    return factor_verdict(values["interval"], PAPER_LOW)


CLAIM = Claim(
    id="gpa",
    number=10,
    claim="GPA around AdamW reaches AdamW's loss in about 9% fewer steps.",
    source="Defazio et al. 2025, arXiv 2512.17131 (v3)",
    paper="8.7% to 10% fewer steps than AdamW (Llama 160M, 1B, 8B): a compute factor of 1.09 to 1.11",
    criterion=f"the compute-factor criterion of claim 1 with the paper's {PAPER_LOW}x: holds if the 95% interval "
    f"over >= 3 seeds lies above 1; does not hold if below 1 or containing 1 with its upper end below {PAPER_LOW}; "
    "inconclusive otherwise",
    setup=SETUP,
    run=run,
    decide=decide,
)
