"""The statistics of the lab's comparisons: the ruler, intervals over seeds, power, and the paper's frontier fit.

**The ruler.** The baseline trains at several budgets (0.5x, ..., 1x, ..., 2.5x its steps). Its final losses, in
order of steps, are made non-increasing by isotonic regression (pool-adjacent-violators, ``scipy``) on each side of
the 1x run, with the 1x point pinned to its measured loss: below 1x the fit is clipped to at least, above 1x to at
most that loss. Between budgets the ruler is linear in log-steps. The steps the baseline needs for a loss ``L`` are
where the ruler crosses ``L``; where it is flat at exactly ``L`` (the ladder cannot tell those steps apart), the end
of the flat piece nearest the 1x run. The compute factor of a run that reached ``L`` in ``S`` steps is
``steps_baseline(L) / S``. Consequences, each tested:

- a run that ends at or below the baseline's 1x loss at equal steps gets a factor of at least 1, and one that ends
  above it a factor below 1, wherever the 1x run sits in the ladder and whatever the ladder's shape;
- for losses exactly log-linear in the steps the ruler is exact (interpolation of a straight line);
- outside the budgets the factor is a bound: ``">2.5"`` (better than the largest budget), ``"<0.5"``.

**Spread over seeds.** Each seed's run is measured against the same seed's ladder (paired), and the seeds' factors
are summarised by their geometric mean with a 95% t-interval of the mean log-factor. A seed whose factor is a bound
is *censored*: it enters the interval at the bound (``>2.5`` as 2.5, ``<0.5`` as 0.5), which can only pull the
estimate towards 1 against the direction the bound points, and the table says how many were. When the interval
contains 1, the verdict is "no measurable difference", next to the smallest factor the seeds' spread could have
detected (80% power, 5% two-sided; :func:`detectable`).

**The paper's way** (:func:`fit_frontier`, :func:`frontier_ratio`): per optimizer, loss against training FLOPs
across model sizes, ``L(C) = E + A * C^(-alpha)``, and the compute ratio at equal loss; intervals by resampling seeds.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy import optimize
from scipy import stats as sps


def t_quantile(q: float, df: int) -> float:
    """The ``q`` quantile of Student's t with ``df`` degrees of freedom (``scipy.stats.t``)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be at least 1, got {df}")
    return float(sps.t.ppf(q, df))


def t95(df: int) -> float:
    """The two-sided 95% quantile of Student's t with ``df`` degrees of freedom."""
    return t_quantile(0.975, df)


def detectable(sd: float, n: int, power: float = 0.8) -> float | None:
    """The smallest true effect (in the units of ``sd``) that a paired t-test over ``n`` seeds with per-seed spread
    ``sd`` detects with probability ``power`` at 5% two-sided: ``(t_{0.975, n-1} + t_{power, n-1}) * sd / sqrt(n)``.
    For log-factors, ``exp`` of it is the smallest detectable factor. None with fewer than two seeds."""
    if n < 2:
        return None
    return (t_quantile(0.975, n - 1) + t_quantile(power, n - 1)) * sd / math.sqrt(n)


def fit_log_steps(steps: Sequence[float], losses: Sequence[float]) -> tuple[float, float]:
    """Least squares ``loss = a + b * log(steps)``; returns (a, b). A diagnostic only: the ladder is curved, which is
    why the ruler is the ladder itself, not this line."""
    res = sps.linregress([math.log(s) for s in steps], list(losses))
    return float(res.intercept), float(res.slope)


def envelope(steps: Sequence[float], losses: Sequence[float], anchor: float | None = None) -> list[float]:
    """The ruler's values at the budgets: ``losses`` made non-increasing in the steps by isotonic regression on
    each side of ``anchor`` (the 1x steps; default the fewest), pinned to the measured loss there. ``steps`` must be
    increasing."""
    if any(b <= a for a, b in itertools.pairwise(steps)):
        raise ValueError(f"budget steps must be increasing, got {list(steps)}")
    a = list(steps).index(anchor) if anchor is not None else 0
    pinned = losses[a]
    below, above = list(losses[:a]), list(losses[a + 1 :])
    # clipping the unconstrained isotonic fit at the pinned value is the isotonic fit under that bound
    below = [max(pinned, y) for y in optimize.isotonic_regression(below, increasing=False).x] if below else []
    above = [min(pinned, y) for y in optimize.isotonic_regression(above, increasing=False).x] if above else []
    return [float(y) for y in (*below, pinned, *above)]


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
    if loss < ys[-1]:
        return f">{xs[-1] / steps:.3g}"
    if loss > ys[0]:
        return f"<{xs[0] / steps:.3g}"
    a = xs.index(anchor)
    # walk away from the 1x point towards the loss: more steps for a lower loss, fewer for a higher one; a flat
    # piece at exactly the loss then resolves to its end nearest 1x
    order = range(a, len(xs) - 1) if loss <= ys[a] else range(a - 1, -1, -1)
    for i in order:
        (x0, y0), (x1, y1) = (xs[i], ys[i]), (xs[i + 1], ys[i + 1])
        if loss <= ys[a] and loss == y0:
            return x0 / steps
        if loss > ys[a] and loss == y1:
            return x1 / steps
        if y1 <= loss <= y0 and y1 < y0:
            t = (y0 - loss) / (y0 - y1)
            return math.exp(math.log(x0) + t * (math.log(x1) - math.log(x0))) / steps
    return xs[-1] / steps  # the loss equals a final plateau


def interval(values: Sequence[float]) -> dict[str, Any]:
    """Mean and 95% t-interval of ``values`` (seeds), their standard deviation, and the smallest effect they could
    have detected (:func:`detectable`); no interval for one value."""
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return {"mean": mean, "low": None, "high": None, "n": n, "sd": None, "detectable": None}
    sd = statistics.stdev(values)
    half = t95(n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n, "sd": sd, "detectable": detectable(sd, n)}


def _bound_value(factor: str) -> float:
    return float(factor[1:])


def factor_interval(factors: Sequence[float | str | None]) -> dict[str, Any]:
    """The seeds' compute factors: geometric mean and 95% interval (from the mean log-factor), a verdict, and the
    smallest factor the seeds could have detected (``detectable``, 80% power).

    ``verdict``: "faster" or "slower" when the interval excludes 1, "no measurable difference" when it contains it,
    "one seed: no interval" with a single seed, and "n/a" when some seed's factor is missing (then ``mean`` etc. are
    None). Bounds (a seed beyond the ladder) are censored at the bound and counted in ``censored``.
    """
    if any(f is None for f in factors) or not factors:
        return {"mean": None, "low": None, "high": None, "n": len(factors), "verdict": "n/a"}
    censored = [f for f in factors if isinstance(f, str)]
    values = [_bound_value(f) if isinstance(f, str) else f for f in factors]
    logs = interval([math.log(f) for f in values])
    out: dict[str, Any] = {"mean": math.exp(logs["mean"]), "low": None, "high": None, "n": logs["n"]}
    if censored:
        out["censored"] = censored
    if logs["low"] is None:
        return {**out, "detectable": None, "verdict": "one seed: no interval"}
    out.update(low=math.exp(logs["low"]), high=math.exp(logs["high"]), detectable=math.exp(logs["detectable"]))
    if out["low"] > 1:
        verdict = "faster"
    elif out["high"] < 1:
        verdict = "slower"
    else:
        verdict = "no measurable difference"
    return {**out, "verdict": verdict}


def difference_interval(losses: Sequence[float], baseline: Sequence[float]) -> dict[str, Any]:
    """Paired by seed: ``losses[i] - baseline[i]`` (final val loss against the baseline's at equal steps), its mean
    and 95% t-interval, the smallest difference it could have detected, and the same verdicts as
    :func:`factor_interval` ("lower", "higher")."""
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


# ---------------------------------------------------------------------------------------------- the paper's way


def _power_law(c: np.ndarray, e: float, log_a: float, alpha: float) -> np.ndarray:
    # L(C) = E + A * C^-alpha, with C in units of the smallest run's compute (well-conditioned) and A = exp(log_a)
    return e + np.exp(log_a - alpha * np.log(c))


def fit_frontier(flops: Sequence[float], losses: Sequence[float]) -> dict[str, float]:
    """Least squares ``L(C) = E + A * C^(-alpha)`` over (training FLOPs, final loss) points of one optimizer
    (``scipy.optimize.curve_fit``); C is measured in units of ``c0``, the smallest of ``flops``. Returns ``e``,
    ``a`` (at that unit), ``alpha``, ``c0`` and the residuals' root mean square."""
    if len(flops) < 4:
        raise ValueError(f"a frontier of three parameters needs at least four points, got {len(flops)}")
    c0 = min(flops)
    x, y = np.asarray(flops, dtype=float) / c0, np.asarray(losses, dtype=float)
    start = (0.5 * float(y.min()), math.log(max(float(y.max()) - 0.5 * float(y.min()), 1e-3)), 0.3)
    params, _ = optimize.curve_fit(
        _power_law, x, y, p0=start, bounds=([0.0, -20.0, 1e-3], [float(y.min()), 20.0, 3.0]), maxfev=20000
    )
    e, log_a, alpha = (float(v) for v in params)
    rms = float(np.sqrt(np.mean((_power_law(x, e, log_a, alpha) - y) ** 2)))
    return {"e": e, "a": math.exp(log_a), "alpha": alpha, "c0": c0, "rms_residual": rms}


def frontier_flops(fit: dict[str, float], loss: float) -> float:
    """The training FLOPs at which a fitted frontier reaches ``loss`` (inf when it never does: ``loss <= E``)."""
    if loss <= fit["e"]:
        return math.inf
    return fit["c0"] * (fit["a"] / (loss - fit["e"])) ** (1 / fit["alpha"])


def frontier_ratio(baseline: dict[str, float], contender: dict[str, float], loss: float) -> float:
    """The paper's compute factor at ``loss``: the baseline frontier's FLOPs over the contender's."""
    return frontier_flops(baseline, loss) / frontier_flops(contender, loss)


def bootstrap_interval(
    seeds: Sequence[Any], statistic: Callable[[Sequence[Any]], float], resamples: int = 400, seed: int = 0
) -> dict[str, Any]:
    """A 95% percentile interval of ``statistic`` over resamples of ``seeds`` with replacement
    (``scipy.stats.bootstrap``); resamples where the statistic is not finite (a fit that failed) are dropped and
    counted."""
    index = np.arange(len(seeds))
    failed = 0

    def stat(i: np.ndarray) -> float:
        nonlocal failed
        try:
            value = statistic([seeds[j] for j in i])
        except (RuntimeError, ValueError):  # curve_fit found no fit on this resample
            value = math.nan
        if not math.isfinite(value):
            failed += 1
        return value

    res = sps.bootstrap(
        (index,), stat, n_resamples=resamples, vectorized=False, method="percentile", rng=np.random.default_rng(seed)
    )
    # the percentile method itself, over the resamples that gave a value
    low, high = np.nanpercentile(res.bootstrap_distribution, [2.5, 97.5])
    return {"low": float(low), "high": float(high), "resamples": resamples, "failed": failed}


def weighted_trend(xs: Sequence[float], ys: Sequence[float], ses: Sequence[float] | None = None) -> dict[str, Any]:
    """A line ``y = a + b x`` through points each known to standard error ``se`` (weights ``1/se^2``), with the
    slope's 95% interval: ``b ± t_{0.975, k-2} sqrt(max(1, s^2) / sum w (x - x_w)^2)``, where ``s^2`` is the weighted
    residual variance. So the interval is never narrower than the points' own uncertainty allows, and widens when the
    points scatter more about the line than their errors say (the usual meta-regression rule). Without ``ses`` (or
    with one that is not finite and positive: a point measured on one seed), ordinary least squares, the interval
    from the scatter alone (``"weighted": False``). ``k >= 3`` points."""
    x, y = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    if len(x) < 3:
        raise ValueError(f"a trend needs three points or more, got {len(x)}")
    se = np.ones_like(x) if ses is None else np.asarray(ses, dtype=float)
    weighted = ses is not None and bool(np.all(np.isfinite(se)) and np.all(se > 0))
    w = 1 / se**2 if weighted else np.ones_like(x)
    x_w = np.sum(w * x) / np.sum(w)
    sxx = np.sum(w * (x - x_w) ** 2)
    b = float(np.sum(w * (x - x_w) * y) / sxx)
    a = float(np.sum(w * (y - b * x)) / np.sum(w))
    scatter = float(np.sum(w * (y - a - b * x) ** 2) / (len(x) - 2))
    half = t95(len(x) - 2) * math.sqrt((max(1.0, scatter) if weighted else scatter) / sxx)
    return {"a": a, "b": b, "slope_interval": [b - half, b + half], "scatter": scatter, "weighted": weighted}
