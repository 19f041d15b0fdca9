"""Fair comparisons: same init, data order and eval batches for every optimizer; a baseline at several budgets.

An experiment directory holds ``experiment.json`` (what was asked), ``runs/<name>/`` (one training run each, see
``train.py``), and what the summary (``summary.py``) derives from them: ``summary.json``, ``summary.md`` and the
plots. ``snoo report DIR`` writes the summary again, so tables and plots can be redrawn from a finished experiment.

Compute factor (``stats.py``): the baseline runs at several budgets (1x, 1.25x, ... its steps), each with its own
full schedule (``ladder="cosine"``) or as decay branches of one warm-up-stable-decay trunk (``ladder="wsd"``,
``ladder.py``); an optimizer that reaches loss L in S steps saves ``steps_baseline(L) / S``, read off the ladder made
monotone through its measured 1x point. Each seed is measured against its own seed's ladder; the seeds give an
interval. ``tune`` (``tuning.py``) gives every contender the same number of trial runs of its own knobs first;
``run_scaling`` (``scaling.py``) repeats a compare over model sizes and run lengths; ``jobs.py`` trains the runs,
``processes > 1`` several at once.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from snoo import spec
from snoo.lab import checkpoint
from snoo.lab.checkpoint import write_json
from snoo.lab.config import TrainConfig, validate
from snoo.lab.jobs import EXPERIMENT_FILES, check_jobs, check_processes, run_dir_name, run_jobs
from snoo.lab.ladder import BUDGETS, LADDERS, budget_steps, ladder_jobs
from snoo.lab.summary import summarize_compare
from snoo.lab.tuning import tune, tune_lr


def run_experiment(
    kind: str,
    cfg: TrainConfig,
    optimizers: list[str],
    *,
    seeds: int = 1,
    budgets: Sequence[float] = BUDGETS,
    grid: dict[str, dict] | None = None,
    tune_baseline: bool = False,
    tune_trials: int = 0,
    tune_seeds: int = 1,
    tune_widen: int = 0,
    ladder: str = "cosine",
    resume: bool = False,
    processes: int = 1,
    say: Callable[[str], None] = print,
) -> dict:
    """Train the baseline (``optimizers[0]``) at every budget and the others at 1x, for every seed; summarize.

    ``tune_trials``: first give every optimizer that many trial runs of its own knobs (:func:`tune`), each on
    ``tune_seeds`` seeds that no reported run uses, and compare the best of each (a best at the edge of its lrs
    tried gets up to ``tune_widen`` trials more beyond it); ``tune_baseline`` sweeps the baseline's lr on the same
    seeds. ``ladder``: how the baseline's budgets are trained (:func:`ladder_jobs`); with
    ``wsd`` every run uses the warm-up-stable-decay schedule with the same warm-up steps, so that the branches share
    the trunk.
    """
    cfg = check_experiment(
        cfg,
        seeds=seeds,
        budgets=budgets,
        ladder=ladder,
        tune_trials=tune_trials,
        tune_seeds=tune_seeds,
        tune_widen=tune_widen,
        processes=processes,
    )
    optimizers = list(dict.fromkeys(spec.canonical(o) for o in optimizers))  # each once, the baseline first
    out = Path(cfg.out)
    with checkpoint.claimed(out, fresh=not resume, earlier=EXPERIMENT_FILES):
        return _run_experiment(
            kind,
            cfg,
            optimizers,
            out,
            seeds=seeds,
            budgets=budgets,
            grid=grid,
            tune_baseline=tune_baseline,
            tune_trials=tune_trials,
            tune_seeds=tune_seeds,
            tune_widen=tune_widen,
            ladder=ladder,
            resume=resume,
            processes=processes,
            say=say,
        )


def check_experiment(
    cfg: TrainConfig,
    *,
    seeds: int,
    budgets: Sequence[float],
    ladder: str,
    tune_trials: int,
    tune_seeds: int,
    tune_widen: int,
    processes: int,
) -> TrainConfig:
    """Refuse an experiment's bad settings before anything is written (``snoo scaling`` checks every point's this
    way before it starts); return ``cfg`` as the experiment's runs use it (the wsd ladder: the wsd schedule, with the
    warm-up in steps, so that every budget shares it)."""
    if seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {seeds}")
    if not budgets or not all(0 < b < math.inf for b in budgets):  # (nan too)
        raise ValueError(f"--budgets must be positive, finite multiples of the steps, got {list(budgets)}")
    check_processes(processes)
    if ladder not in LADDERS:
        raise ValueError(f"ladder must be one of {', '.join(LADDERS)}, got {ladder!r}")
    if tune_trials < 0:
        raise ValueError(f"--tune must be 0 (off) or a number of trials, got {tune_trials}")
    if tune_seeds < 1:
        raise ValueError(f"--tune-seeds must be at least 1, got {tune_seeds}")
    if tune_widen < 0:
        raise ValueError(f"--tune-widen must be 0 (off) or a number of trials, got {tune_widen}")
    if tune_widen and not tune_trials:
        raise ValueError("--tune-widen widens the trials of --tune N: give --tune too")
    if ladder == "wsd":  # the warm-up in steps (the one asked for, if any), so that every budget shares it
        warmup_steps = round(cfg.warmup * cfg.steps) if cfg.warmup_steps is None else cfg.warmup_steps
        cfg = dataclasses.replace(cfg, schedule="wsd", warmup_steps=warmup_steps)
    for b in budgets:
        steps = budget_steps(cfg.steps, b)
        try:
            validate(dataclasses.replace(cfg, steps=steps))
        except ValueError as e:
            raise ValueError(f"--budgets {b:g} gives runs of {steps} steps (of --steps {cfg.steps}): {e}") from None
    return cfg


def _row_labels(renamed: dict[str, str], say: Callable[[str], None]) -> dict[str, str]:
    """Each contender's row in the table: the SPEC it was tuned to (``renamed``), and where two contenders were tuned
    to the same SPEC, which contender it was tuned from (the baseline keeps its SPEC): two rows of the same runs."""
    baseline = next(iter(renamed))
    labels = {}
    for o, tuned in renamed.items():
        twins = [c for c, t in renamed.items() if t == tuned]
        labels[o] = tuned if o == baseline or len(twins) == 1 else f"{tuned} (tuned from {o})"
        if len(twins) > 1 and o == twins[0]:
            say(f"{' and '.join(twins)} were tuned to the same setting, {tuned}: its runs are trained once")
    return labels


def _run_experiment(
    kind: str,
    cfg: TrainConfig,
    optimizers: list[str],
    out: Path,
    *,
    seeds: int,
    budgets: Sequence[float],
    grid: dict[str, dict] | None,
    tune_baseline: bool,
    tune_trials: int,
    tune_seeds: int,
    tune_widen: int,
    ladder: str,
    resume: bool,
    processes: int,
    say: Callable[[str], None],
) -> dict:
    experiment: dict[str, Any] = {
        "kind": kind,
        "baseline": optimizers[0],
        "optimizers": optimizers,
        "steps": cfg.steps,
        "seeds": [cfg.seed + s for s in range(seeds)],
        "budgets": sorted(set(budgets) | {1.0}),
        "ladder": ladder,
        "grid": grid or {},
        "config": dataclasses.asdict(cfg),
    }
    renamed = {o: o for o in optimizers}
    if tune_baseline:
        lr = tune_lr(cfg, optimizers[0], out, resume, say, tune_seeds)
        base_name = spec.parse(optimizers[0])[-1].name
        renamed = {o: spec.override(o, {f"{base_name}.lr": lr}) for o in optimizers}
        experiment["tuned_lr"] = lr
    tuned: dict[str, dict] = {}
    if tune_trials:
        tuned = tune(cfg, list(renamed.values()), tune_trials, out, resume, say, processes, tune_seeds, tune_widen)
        tuned = {o: tuned[r] for o, r in renamed.items()}
        renamed = {o: tuned[o]["tuned"] for o in optimizers}
    labels = _row_labels(renamed, say)
    if tuned:
        experiment["tuning"] = {labels[o]: {"from": o, **tuned[o]} for o in optimizers}
    if renamed != {o: o for o in optimizers}:
        experiment.update(
            baseline=renamed[optimizers[0]],
            optimizers=list(dict.fromkeys(labels.values())),
            grid={labels[o]: v for o, v in (grid or {}).items()},
        )
    jobs = _jobs(experiment, optimizers, renamed, labels, cfg)
    experiment["jobs"] = jobs
    unique: dict[str, dict] = {}
    for job in jobs:
        unique.setdefault(job["dir"], job)
    jobs = list(unique.values())
    check_jobs(cfg, jobs, out / "runs", resume)  # before experiment.json is replaced
    write_json(experiment, out / "experiment.json")
    run_jobs(cfg, jobs, out / "runs", resume, say, processes)
    return summarize_compare(out)


def _jobs(
    experiment: dict, optimizers: list[str], renamed: dict[str, str], labels: dict[str, str], cfg: TrainConfig
) -> list[dict]:
    """Every seed's ladder of the baseline, and each other contender (``renamed``: as tuned) at 1x, each job with its
    directory (a run that two rows share: the first one's) and its trunk's directory for a branch."""
    jobs: list[dict] = []
    for seed in experiment["seeds"]:
        jobs += ladder_jobs(
            experiment["baseline"], experiment["budgets"], seed, cfg.steps, experiment["ladder"], cfg.decay
        )
        for o in optimizers[1:]:  # the baseline already ran at 1x
            jobs.append(dict(optimizer=renamed[o], budget=1.0, seed=seed))
            if labels[o] != renamed[o]:
                jobs[-1]["label"] = labels[o]
    first: dict[tuple, str] = {}  # a run that two rows share is trained once, in the first one's directory
    for i, job in enumerate(jobs):
        key = (job["optimizer"], job["budget"], job["seed"])
        job["dir"] = first.setdefault(key, run_dir_name(i, job["optimizer"], job["budget"], job["seed"]))
    for job in jobs:
        if "branch_of" in job:
            job["branch_of"] = job["branch_of"]["dir"]
    return jobs
