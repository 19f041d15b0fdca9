"""Tuning: every contender gets the same number of trial runs of its own knobs, on seeds no reported run uses.

``trials`` reads what each optimizer's outermost stage declares (its class's ``tuning_trials``; a base optimizer's lr
alone); ``tune`` trains them at 1x and picks the best of each, with ``widen`` one trial more beyond the edge of the
lrs tried where the best sits on it (``--tune-widen``); ``tune_lr`` sweeps the baseline's lr alone
(``--tune-baseline``).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path

from snoo import spec
from snoo.lab.config import TrainConfig
from snoo.lab.jobs import load_result, run_dir_name, run_jobs
from snoo.lab.train import Diverged

TUNE_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)  # --tune-baseline tries the base lr times these
TUNE_SEED_OFFSET = 1000  # tuning runs use seeds no reported run uses
AT_EDGE = "the best lr is at the edge of the trials, a wider sweep may find better (--tune-widen)"


def tuning_seeds(cfg: TrainConfig, n: int = 1) -> list[int]:
    """The seeds tuning trains on: ``n`` seeds that no reported run uses."""
    return [cfg.seed + TUNE_SEED_OFFSET + i for i in range(n)]


def _trial_losses(out: Path, jobs: list[dict], owner: list[str]) -> dict[str, float | None]:
    """Each trial's final loss, the mean over its tuning seeds (None when any of them diverged)."""
    losses: dict[str, list[float | None]] = {}
    for o, job in zip(owner, jobs):
        losses.setdefault(o, []).append(load_result(out / job["dir"])["final_val_loss"])
    return {o: None if None in v else statistics.fmean(v) for o, v in losses.items()}  # type: ignore[arg-type]


def tune_lr(
    cfg: TrainConfig, baseline: str, out: Path, resume: bool, say: Callable[[str], None], seeds: int = 1
) -> float:
    """The best lr of the baseline's base optimizer (``--tune-baseline``): its lr times each of ``TUNE_FACTORS``,
    trained at 1x on ``seeds`` tuning seeds."""
    base = spec.parse(baseline)[-1]
    peak = base.params["lr"]
    lrs = [peak * f for f in TUNE_FACTORS]
    names = [spec.override(spec.base(baseline), {"lr": lr}) for lr in lrs]
    jobs = [dict(optimizer=o, budget=1.0, seed=s) for s in tuning_seeds(cfg, seeds) for o in names]
    for i, job in enumerate(jobs):
        job["dir"] = run_dir_name(i, job["optimizer"], 1.0, job["seed"])
    say(f"tuning the baseline's lr over {', '.join(f'{lr:.3g}' for lr in lrs)} on seeds {tuning_seeds(cfg, seeds)}")
    run_jobs(cfg, jobs, out / "tune", resume, say)
    losses = _trial_losses(out / "tune", jobs, [j["optimizer"] for j in jobs])
    ok = [(losses[o], lr) for o, lr in zip(names, lrs) if losses[o] is not None]
    if not ok:
        raise Diverged(f"every lr of the baseline's sweep diverged ({', '.join(f'{lr:.3g}' for lr in lrs)})")
    best = min(ok)[1]
    say(f"best baseline lr: {best:.3g}")
    return best


def trials(optimizer: str, n: int) -> list[str]:
    """The first ``n`` settings that ``--tune n`` tries for ``optimizer``: what its outermost stage declares
    (``tuning_trials`` of a wrapper class; a base optimizer's lr alone), each a multiple of the base optimizer's lr
    and settings of the outermost stage's own knobs. Fewer when the settings repeat."""
    stages = spec.parse(optimizer)
    base, outer = stages[-1], stages[0]
    if "lr" not in base.params:
        return [spec.canonical(optimizer)]
    lr = base.params["lr"]
    points = [
        {f"{base.name}.lr": lr * f, **{f"{outer.name}.{k}": v for k, v in knobs.items()}}
        for f, knobs in spec.NAMES[outer.name].trials[:n]
    ]
    return list(dict.fromkeys(spec.override(optimizer, p) for p in points))


def tune(
    cfg: TrainConfig,
    optimizers: list[str],
    n: int,
    out: Path,
    resume: bool,
    say: Callable[[str], None],
    processes: int = 1,
    seeds: int = 1,
    widen: int = 0,
) -> dict[str, dict]:
    """Give every optimizer the same budget of ``n`` trial runs at 1x, each on ``seeds`` seeds that no reported run
    uses (a trial's loss is their mean); return, by optimizer, the best trial (``tuned``), every trial's final loss,
    and what the tuning cost (steps, wall time).

    ``widen``: an optimizer whose best trial has the lowest or highest lr of its trials (``at_edge``) gets one trial
    more, the best's settings at the next lr beyond that edge (the same ratio as the last step inside it), and again
    up to ``widen`` times while its best stays at the edge; these trials are listed in ``widened``. The rule is the
    same for every contender, so the budget differs only where a contender's range held it back."""
    seeds_used = tuning_seeds(cfg, seeds)
    tuned: dict[str, dict] = {o: {"trials": {}, "steps": 0, "wall_time": 0.0, "seeds": seeds_used} for o in optimizers}
    owners: dict[str, list[str]] = {}  # each distinct trial, trained once -> the optimizers that try it
    for o in optimizers:
        for t in trials(o, n):
            owners.setdefault(t, []).append(o)
    on = f"seed {seeds_used[0]}" if seeds == 1 else f"seeds {seeds_used}"
    say(f"tuning: {n} trial{'s' * (n > 1)} each on {on}, {len(owners) * seeds} runs")
    done: list[dict] = []  # every tuning job so far, in the order of their directories
    _train_trials(cfg, owners, done, tuned, out / "tune", resume, say, processes, seeds_used)
    for _ in range(widen):
        more: dict[str, list[str]] = {}
        for o, entry in tuned.items():
            if entry["at_edge"]:
                t = _beyond(entry["tuned"], list(entry["trials"]))
                if t not in entry["trials"]:
                    more.setdefault(t, []).append(o)
                    entry.setdefault("widened", []).append(t)
        if not more:
            break
        say(f"widening: {', '.join(f'{o} tries {t}' for t, them in more.items() for o in them)} (best at an edge)")
        _train_trials(cfg, more, done, tuned, out / "tune", resume, say, processes, seeds_used)
    for o, entry in tuned.items():
        edge = f": {AT_EDGE}" if entry["at_edge"] else ""
        say(f"tuned {o}: {entry['tuned']} ({entry['trials'][entry['tuned']]:.4f}){edge}")
    return tuned


def _train_trials(
    cfg: TrainConfig,
    owners: dict[str, list[str]],
    done: list[dict],
    tuned: dict[str, dict],
    out: Path,
    resume: bool,
    say: Callable[[str], None],
    processes: int,
    seeds: list[int],
) -> None:
    """Train each trial of ``owners`` on every seed (a trial trained before is not trained again), numbering the
    directories on from ``done``; add each trial's loss and cost to the entries of the optimizers that own it, and
    choose each one's best again."""
    trained = {j["optimizer"] for j in done}
    jobs = [dict(optimizer=t, budget=1.0, seed=seed) for seed in seeds for t in owners if t not in trained]
    for i, job in enumerate(jobs, len(done)):
        job["dir"] = run_dir_name(i, job["optimizer"], 1.0, job["seed"])
    run_jobs(cfg, jobs, out, resume, say, processes)
    done += jobs
    mine = [j for j in done if j["optimizer"] in owners]
    losses = _trial_losses(out, mine, [j["optimizer"] for j in mine])
    for job in mine:
        # a trial that two optimizers share counts in the cost of each: it is part of each one's budget
        r = load_result(out / job["dir"])
        for o in owners[job["optimizer"]]:
            entry = tuned[o]
            entry["trials"][job["optimizer"]] = losses[job["optimizer"]]
            entry["steps"] += r["steps"]
            entry["wall_time"] = round(entry["wall_time"] + r["wall_time"], 3)
    for o in {o for os in owners.values() for o in os}:
        entry = tuned[o]
        ok = [(loss, t) for t, loss in entry["trials"].items() if loss is not None]
        if not ok:
            raise Diverged(f"every trial of {o} diverged while tuning: {', '.join(entry['trials'])}")
        entry["tuned"] = min(ok)[1]
        entry["at_edge"] = _at_edge(entry["tuned"], list(entry["trials"]))


def _beyond(best: str, trials: list[str]) -> str:
    """``best`` at the next base lr beyond the edge of the trials' lrs that it sits on: the edge's lr times the ratio
    between it and the next lr inside."""
    lrs = sorted({spec.parse(t)[-1].params.get("lr") for t in trials} - {None})
    base = spec.parse(best)[-1]
    edge, inside = (lrs[0], lrs[1]) if base.params["lr"] == lrs[0] else (lrs[-1], lrs[-2])
    return spec.override(best, {f"{base.name}.lr": float(f"{edge * edge / inside:.6g}")})


def _at_edge(best: str, trials: list[str]) -> bool:
    """Whether ``best``'s base lr is the lowest or the highest of the trials' lrs (when they tried three or more)."""
    lrs = sorted({spec.parse(t)[-1].params.get("lr") for t in trials} - {None})
    lr = spec.parse(best)[-1].params.get("lr")
    return len(lrs) >= 3 and lr in (lrs[0], lrs[-1])
