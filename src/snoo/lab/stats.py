"""The ruler of the lab's comparisons: how many baseline steps a loss is worth, and how sure we are of it.

The baseline trains at several budgets (1x, 1.25x, ... its steps). Its final losses, in order of steps, are made
monotone by an *envelope* anchored at the 1x run (below 1x: the running maximum, above: the running minimum), so
the ruler passes exactly through the baseline's own measured 1x loss and never rises with more steps. Between
budgets it is linear in log-steps. The steps the baseline needs for a loss ``L`` are where the envelope crosses
``L``; the compute factor of a run that reached ``L`` in ``S`` steps is ``steps_baseline(L) / S``. Consequences,
each tested:

- a run that ends at or below the baseline's 1x loss at equal steps gets a factor of at least 1, and one that ends
  above it a factor below 1: the factor never contradicts the equal-step result;
- for losses exactly log-linear in the steps the ruler is exact (interpolation of a straight line);
- outside the budgets the factor is a bound: ``">2.5"`` (better than the largest budget), ``"<1"``.

Spread over seeds: each seed's run is measured against the same seed's ladder (paired), and the seeds' factors are
summarised by their geometric mean with a 95% t-interval of the mean log-factor. When the interval contains 1,
the verdict is "no measurable difference".
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Sequence
from typing import Any

#: two-sided 95% quantiles of Student's t, by degrees of freedom (1 to 30); above 30 the normal's 1.96 is close
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131)
_T95 += (2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t95(df: int) -> float:
    """The two-sided 95% quantile of Student's t with ``df`` degrees of freedom."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be at least 1, got {df}")
    return _T95[df - 1] if df <= len(_T95) else 1.96


def fit_log_steps(steps: Sequence[float], losses: Sequence[float]) -> tuple[float, float]:
    """Least squares ``loss = a + b * log(steps)``; returns (a, b). A diagnostic only: its residuals show how curved
    the ladder is, which is why the ruler is the envelope, not this line."""
    xs = [math.log(s) for s in steps]
    mx, my = statistics.fmean(xs), statistics.fmean(losses)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, losses)) / sxx
    return my - b * mx, b


def envelope(steps: Sequence[float], losses: Sequence[float], anchor: float | None = None) -> list[float]:
    """The baseline's losses made non-increasing in the steps, equal to the measured loss at ``anchor`` (the 1x
    steps; default: the fewest steps). ``steps`` must be increasing."""
    if any(b <= a for a, b in itertools.pairwise(steps)):
        raise ValueError(f"budget steps must be increasing, got {list(steps)}")
    a = steps.index(anchor) if anchor is not None else 0
    out = list(losses)
    for i in range(a + 1, len(out)):
        out[i] = min(out[i - 1], out[i])
    for i in range(a - 1, -1, -1):
        out[i] = max(out[i + 1], out[i])
    return out


def compute_factor(
    base_steps: Sequence[int], base_losses: Sequence[float], steps: int, loss: float, anchor: int | None = None
) -> float | str | None:
    """How many baseline steps match ``loss``, divided by ``steps``: a float, or a bound such as ``">2.5"``.

    ``base_steps``/``base_losses``: the baseline's ladder (any order); ``anchor``: the baseline's steps at 1x (default:
    ``steps``, when it is a budget, else the fewest). ``None`` when there are fewer than two budgets or the ladder
    does not improve with more steps (nothing to measure against), or a loss is not finite.
    """
    if len(set(base_steps)) < 2 or not all(math.isfinite(x) for x in (*base_losses, loss)):
        return None
    best: dict[int, float] = {}  # two budgets that round to the same steps are one point
    for x, y in zip(base_steps, base_losses):
        best[x] = min(y, best.get(x, math.inf))
    xs = sorted(best)
    if anchor is None:
        anchor = steps if steps in xs else xs[0]
    ys = envelope(xs, [best[x] for x in xs], anchor)
    if ys[-1] >= ys[0]:
        return None
    lo, hi = xs[0], xs[-1]
    if loss < ys[-1]:
        return f">{hi / steps:.3g}"
    if loss > ys[0]:
        return f"<{lo / steps:.3g}"
    for (x0, y0), (x1, y1) in itertools.pairwise(zip(xs, ys)):
        if y1 <= loss <= y0 and y1 < y0:  # the first segment that reaches the loss: the fewest steps
            t = (y0 - loss) / (y0 - y1)
            return math.exp(math.log(x0) + t * (math.log(x1) - math.log(x0))) / steps
        if loss == y0:
            return x0 / steps
    return xs[-1] / steps  # the loss equals a final plateau


def interval(values: Sequence[float]) -> dict[str, Any]:
    """Mean and 95% t-interval of ``values`` (seeds); no interval for one value."""
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return {"mean": mean, "low": None, "high": None, "n": n}
    half = t95(n - 1) * statistics.stdev(values) / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n}


def factor_interval(factors: Sequence[float | str | None]) -> dict[str, Any]:
    """The seeds' compute factors: geometric mean and 95% interval (from the mean log-factor), and a verdict.

    ``verdict``: "faster" or "slower" when the interval excludes 1, "no measurable difference" when it contains it,
    "one seed: no interval" with a single seed, and "beyond the ladder" or "n/a" when some seed's factor is a bound or
    missing (then ``mean`` etc. are None and ``bounds`` lists what was measured).
    """
    if any(f is None for f in factors) or not factors:
        return {"mean": None, "low": None, "high": None, "n": len(factors), "verdict": "n/a"}
    if any(isinstance(f, str) for f in factors):
        return {
            "mean": None,
            "low": None,
            "high": None,
            "n": len(factors),
            "bounds": [f if isinstance(f, str) else round(f, 4) for f in factors],
            "verdict": "beyond the ladder",
        }
    logs = interval([math.log(f) for f in factors])  # type: ignore[arg-type]
    out = {"mean": math.exp(logs["mean"]), "low": None, "high": None, "n": logs["n"]}
    if logs["low"] is None:
        return {**out, "verdict": "one seed: no interval"}
    out.update(low=math.exp(logs["low"]), high=math.exp(logs["high"]))
    if out["low"] > 1:
        verdict = "faster"
    elif out["high"] < 1:
        verdict = "slower"
    else:
        verdict = "no measurable difference"
    return {**out, "verdict": verdict}


def difference_interval(losses: Sequence[float], baseline: Sequence[float]) -> dict[str, Any]:
    """Paired by seed: ``losses[i] - baseline[i]`` (final val loss against the baseline's at equal steps), its mean
    and 95% t-interval, with the same verdicts as :func:`factor_interval` ("lower", "higher")."""
    diffs = [a - b for a, b in zip(losses, baseline, strict=True)]
    out = interval(diffs)
    if out["low"] is None:
        return {**out, "verdict": "one seed: no interval"}
    if out["high"] < 0:
        verdict = "lower"
    elif out["low"] > 0:
        verdict = "higher"
    else:
        verdict = "no measurable difference"
    return {**out, "verdict": verdict}
