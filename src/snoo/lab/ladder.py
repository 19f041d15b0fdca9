"""The baseline's ladder: the budgets it trains at (multiples of the compared runs' steps) and how they are trained.

The compute factor is read off this ladder (``stats.compute_factor``). Nothing here imports torch, so the command
line takes its defaults from here.
"""

from __future__ import annotations

from collections.abc import Sequence

# the baseline's budgets: below 1x too, so that a contender a little behind the baseline gets a factor, not "<1x"
BUDGETS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5)
#: how the budgets are trained: one full run each, or decay branches of one warm-up-stable-decay trunk
LADDERS = ("cosine", "wsd")


def budget_steps(steps: int, budget: float) -> int:
    return max(1, round(steps * budget))


def ladder_jobs(baseline: str, budgets: Sequence[float], seed: int, steps: int, ladder: str, decay: float) -> list:
    """The baseline's runs at every budget. ``cosine``: one full run per budget. ``wsd`` (warm-up, stable, decay;
    Hägele et al. 2024): one run to the largest budget whose constant-lr part the others share; the run of budget
    ``b`` branches from it ``decay * b * steps`` steps before its own end and decays there, which costs
    ``max(b) + decay * sum(other b)`` runs instead of ``sum(b)``."""
    if ladder == "cosine":
        return [dict(optimizer=baseline, budget=b, seed=seed) for b in budgets]
    top = max(budgets)
    branches = [b for b in budgets if b != top]
    starts = {b: budget_steps(steps, b) - round(decay * budget_steps(steps, b)) for b in branches}
    trunk = dict(optimizer=baseline, budget=top, seed=seed, snapshots=sorted(set(starts.values())))
    return [trunk] + [
        dict(optimizer=baseline, budget=b, seed=seed, branch_of=trunk, from_step=starts[b]) for b in branches
    ]
