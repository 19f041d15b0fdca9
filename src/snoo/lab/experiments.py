"""Fair comparisons: same init, data order and eval batches for every optimizer; a baseline at several budgets.

An experiment directory holds ``experiment.json`` (what was asked), ``runs/<name>/`` (one training run each, see
``train.py``), and what ``summarize`` derives from them: ``summary.json``, ``summary.md`` and the plots. ``snoo
report DIR`` calls ``summarize`` again, so tables and plots can be redrawn from a finished experiment.

Compute factor (``stats.py``): the baseline runs at several budgets (1x, 1.25x, ... its steps), each with its own
full schedule (``ladder="cosine"``) or as decay branches of one warm-up-stable-decay trunk (``ladder="wsd"``); an
optimizer that reaches loss L in S steps saves ``steps_baseline(L) / S``, read off the ladder made monotone through
its measured 1x point. Each seed is measured against its own seed's ladder; the seeds give an interval. ``tune``
gives every contender the same number of trial runs of its own knobs first; ``run_scaling`` repeats a compare over
model sizes and run lengths. ``processes > 1`` trains several runs at once.

Scale-out (``run_scale_out``): at the same total tokens, SNOO and the baseline on one worker against DiLoCo and DDP on
N workers, with the bytes each worker sent; same directory layout.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from snoo import spec
from snoo.lab import checkpoint, plots, stats
from snoo.lab.checkpoint import read_json, read_metrics, snapshot_name, write_json
from snoo.lab.config import TrainConfig, differences, identity, model_config, validate
from snoo.lab.data import fingerprint
from snoo.lab.launch import run
from snoo.lab.stats import compute_factor, fit_log_steps
from snoo.lab.train import Diverged

# the baseline's budgets: below 1x too, so that a contender a little behind the baseline gets a factor, not "<1x"
BUDGETS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5)
TUNE_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)  # --tune-baseline tries the base lr times these


# ---------------------------------------------------------------------------------------------- the math


def steps_to_target(metrics: list[dict], target: float) -> int | None:
    """First evaluated step whose val loss is at or below ``target`` (None: never)."""
    return next((m["step"] for m in metrics if "val_loss" in m and m["val_loss"] <= target), None)


# ---------------------------------------------------------------------------------------------- running


def budget_steps(steps: int, budget: float) -> int:
    return max(1, round(steps * budget))


def _dirname(index: int, optimizer: str, budget: float, seed: int) -> str:
    safe = re.sub(r"[^a-z0-9.=+_-]+", "_", spec.canonical(optimizer))
    return f"{index:02d}-{safe}-x{budget:g}-s{seed}"


def check_jobs(
    cfg: TrainConfig, jobs: list[dict], out: Path, resume: bool, adopt: Callable[[str], None] | None = None
) -> list[tuple[dict, TrainConfig, bool]]:
    """Each job ({optimizer, budget, seed, dir}, and optionally workers, parallel, snapshots and branch_of /
    from_step) with its config and whether an earlier run of it is there to keep or continue (with ``resume``).
    Every job's settings, and with ``resume`` every earlier run's, are checked here: a run directory of other
    settings (another optimizer, steps, data contents, ...) is refused, never overwritten nor reported as done.
    With ``resume`` and ``adopt`` (where to say so), finished runs under other names are first moved to their jobs'
    directories (:func:`_adopt_finished`)."""
    configs = [
        dataclasses.replace(
            cfg,
            optimizer=job["optimizer"],
            seed=job["seed"],
            steps=budget_steps(cfg.steps, job["budget"]),
            out=str(out / job["dir"]),
            workers=job.get("workers", cfg.workers),
            parallel=job.get("parallel") or cfg.parallel,
        )
        for job in jobs
    ]
    for run_cfg in configs:
        validate(run_cfg)
    corpus = fingerprint(cfg.data) if resume else ""
    if resume and adopt is not None:
        _adopt_finished(cfg, jobs, configs, corpus, out, adopt)
    return [
        (job, run_cfg, resume and _same_config(run_cfg, out / job["dir"] / "config.json", corpus))
        for job, run_cfg in zip(jobs, configs)
    ]


def run_jobs(
    cfg: TrainConfig, jobs: list[dict], out: Path, resume: bool, say: Callable[[str], None], processes: int = 1
) -> None:
    """Train every job that has no finished result yet (with ``resume``), once all of them passed ``check_jobs``.

    ``snapshots``: steps at which a job also keeps a copy of its checkpoint; ``branch_of`` and ``from_step``: the job
    starts from that snapshot of an earlier job in the list (the WSD ladder's decay branches). A shortcut only: the
    earlier job trained the same steps with the same lr up to there, so the branch ends bit for bit where a run from
    scratch would (``train(start_from=...)`` checks that).

    ``processes > 1`` trains that many jobs at once, each in a process of its own with ``threads`` CPU threads (when
    ``threads`` is 0: the machine's cores shared out), a branch once its trunk is done. Every run is a function of
    its config alone, so the results are those of one process, bit for bit.
    """
    if processes < 1:
        raise ValueError(f"--jobs must be at least 1, got {processes}")
    if processes > 1 and cfg.threads == 0:
        cfg = dataclasses.replace(cfg, threads=max(1, (os.cpu_count() or 1) // processes))
    planned = check_jobs(cfg, jobs, out, resume, adopt=say)
    todo = [i for i, (job, _, kept) in enumerate(planned) if not (kept and (out / job["dir"] / "result.json").exists())]
    steps = [run_cfg.steps - job.get("from_step", 0) for job, run_cfg, _ in planned]  # what each job trains
    timing = _timing(cfg) if todo and all(job.get("workers", 1) == 1 for job in jobs) else None
    predicted = {i: timing[0] + steps[i] * timing[1] for i in todo} if timing else {}
    total = _makespan(jobs, predicted, processes) if timing else 0.0
    kept = f" ({len(jobs) - len(todo)} done before)" if len(todo) < len(jobs) else ""
    at_once = f", {processes} at a time" if processes > 1 else ""
    when = f": about {_minutes(total)} on this machine, as busy as it is now" if timing else ""
    say(f"{len(todo)} runs to train{kept}, {sum(steps[i] for i in todo):,} steps in all{at_once}{when}")
    began = time.monotonic()

    def start(i: int) -> tuple[TrainConfig, dict] | None:
        """What job ``i`` trains, and how (``run``'s keywords); None: it is done already."""
        job, run_cfg, earlier = planned[i]
        if i not in todo:
            say(f"    {job['dir']}: done before, kept")
            return None
        how: dict[str, Any] = {"resume": earlier}
        if job.get("snapshots"):
            how["snapshots"] = tuple(job["snapshots"])
        branch = ""
        if "branch_of" in job:
            # a branch is a shortcut: without a usable snapshot (the trunk diverged before it, or an older snoo wrote
            # it) the branch trains from scratch, to the same end
            snapshot = out / job["branch_of"] / snapshot_name(job["from_step"])
            problem = checkpoint.unbranchable(snapshot) if snapshot.exists() else "no snapshot"
            if problem is None:
                how["start_from"] = snapshot
                branch = f", from step {job['from_step']} of {job['branch_of']}"
            elif snapshot.exists():
                branch = f", from scratch ({problem})"
        on = f" on {run_cfg.workers} workers ({run_cfg.parallel})" if run_cfg.workers > 1 else ""
        say(f"    started {_job_name(job)}{on}: {run_cfg.steps} steps{branch}")
        started_at[i] = time.monotonic()
        return run_cfg, how

    def finish(i: int, r: dict) -> None:
        took[i] = time.monotonic() - started_at[i]  # from its start to its result, the process's start-up included
        loss = f"val loss {r['final_val_loss']:.4f}" if r["status"] == "ok" else r["status"]
        left = ""
        if timing and len(took) < len(todo):
            # the first estimate, scaled by how long the runs so far took against what it predicted for them
            pace = sum(took.values()) / sum(predicted[j] for j in took)
            left = f"; about {_minutes(max(0.0, pace * total - (time.monotonic() - began)))} left"
        say(f"[{len(took)}/{len(todo)} done] {_job_name(jobs[i])}: {loss}, {r['wall_time']:.0f} s{left}")

    started_at: dict[int, float] = {}
    took: dict[int, float] = {}

    if processes == 1:
        for i in range(len(jobs)):
            started = start(i)
            if started is not None:
                finish(i, run(started[0], **started[1]))
        return
    _run_parallel(jobs, start, finish, processes)


def _job_name(job: dict) -> str:
    return f"{spec.canonical(job['optimizer'])} x{job['budget']:g} seed {job['seed']}"


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def _timing(cfg: TrainConfig) -> tuple[float, float] | None:
    """About how long a run of ``cfg`` takes here, as (seconds per run, seconds per step): loading its corpus, and
    a few steps of its model and optimizer on random tokens, on the run's threads, evaluations included. None on
    an accelerator, where compilation makes the first steps no guide."""
    import torch

    from snoo.lab.data import load_corpus
    from snoo.lab.model import GPT

    if cfg.device not in ("cpu", "auto") or (cfg.device == "auto" and torch.cuda.is_available()):
        return None
    began = time.perf_counter()
    vocab = load_corpus(cfg.data, cfg.tokenizer, cfg.bpe_vocab).vocab_size
    per_run = time.perf_counter() - began
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads or threads)
    try:
        model = GPT(model_config(cfg, vocab))
        opt = spec.build(cfg.optimizer, model)
        x = torch.randint(vocab, (cfg.batch_size, cfg.block_size))
        timed = []
        for _ in range(8):  # the first steps warm up the allocator and the optimizer's state
            began = time.perf_counter()
            for _ in range(cfg.grad_accum):
                model(x, x).backward()
            opt.step()
            opt.zero_grad()
            timed.append(time.perf_counter() - began)
        step = statistics.median(timed[3:])
        with torch.no_grad():
            began = time.perf_counter()
            model(x, x)
            forward = time.perf_counter() - began
    finally:
        torch.set_num_threads(threads)
    return per_run, step + forward * cfg.eval_batches / cfg.eval_every


def _makespan(jobs: list[dict], seconds: dict[int, float], processes: int) -> float:
    """How long training the jobs of ``seconds`` (index: duration) takes on ``processes`` processes, started in
    the order of the list, each branch once its trunk is done, as :func:`_run_parallel` starts them."""
    waiting, free, done_at = sorted(seconds), [0.0] * processes, {}
    while waiting:
        free.sort()
        ready = [i for i in waiting if done_at.get(jobs[i].get("branch_of"), 0.0) <= free[0]]
        i = ready[0] if ready else min(waiting, key=lambda j: done_at.get(jobs[j]["branch_of"], 0.0))
        begin = max(free[0], done_at.get(jobs[i].get("branch_of"), 0.0))
        waiting.remove(i)
        done_at[jobs[i]["dir"]] = free[0] = begin + seconds[i]
    return max(free)


def _adopt_finished(
    cfg: TrainConfig, jobs: list[dict], configs: list[TrainConfig], corpus: str, out: Path, say: Callable[[str], None]
) -> None:
    """Move each finished run in ``out`` that is no job's directory but is a job's run (same identity: ``configs``,
    the jobs' configs, on data of sha256 ``corpus``) to that job's directory, so that ``--resume`` keeps it.
    Directory names carry the job's index: adding a contender to a finished experiment renames most of its runs."""
    wanted = {job["dir"] for job in jobs}
    spare = [
        (d, _recorded_identity(read_json(d / "config.json"), cfg))
        for d in sorted(p.parent for p in out.glob("*/result.json"))
        if d.name not in wanted and (d / "config.json").exists()
    ]
    for job, run_cfg in zip(jobs, configs):
        if not spare:
            return
        target = out / job["dir"]
        if target.exists():
            continue
        wanted_identity = identity(run_cfg, corpus)
        match = next((i for i, (_, recorded) in enumerate(spare) if not differences(recorded, wanted_identity)), None)
        if match is not None:
            source, _ = spare.pop(match)
            source.rename(target)
            say(f"    {source.name} is the run of {job['dir']}: moved there, kept")


def _run_job(run_cfg: TrainConfig, how: dict[str, Any]) -> dict:
    return run(run_cfg, **how)


def _run_parallel(jobs: list[dict], start: Callable, finish: Callable, processes: int) -> None:
    """Run ``jobs`` on ``processes`` worker processes, each branch after its trunk, in the order of the list."""
    import concurrent.futures as cf
    import multiprocessing

    waiting = list(range(len(jobs)))
    done: set[str] = set()
    running: dict[cf.Future, int] = {}
    with cf.ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            while waiting or running:
                for i in [i for i in waiting if jobs[i].get("branch_of") in (None, *done)]:
                    if len(running) >= processes:
                        break
                    waiting.remove(i)
                    started = start(i)
                    if started is None:
                        done.add(jobs[i]["dir"])
                        continue
                    running[pool.submit(_run_job, *started)] = i
                if not running:
                    continue
                finished, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                for future in finished:
                    i = running.pop(future)
                    finish(i, future.result())
                    done.add(jobs[i]["dir"])
        except BaseException:
            for future in running:
                future.cancel()
            raise


def _recorded_identity(saved: dict, cfg: TrainConfig) -> dict:
    """The identity a run's ``config.json`` (``saved``) records; for a run written before runs recorded it, the
    one its settings give (its optimizer's defaults filled in as ``cfg``'s version of snoo fills them)."""
    recorded = saved.get("run")
    if isinstance(recorded, dict):
        return recorded
    config = saved.get("config", {})
    optimizer = identity(dataclasses.replace(cfg, optimizer=config.get("optimizer", "")), "")["optimizer"]
    return {**config, "corpus": saved.get("corpus", {}).get("sha256"), "optimizer": optimizer}


def _same_config(cfg: TrainConfig, path: Path, corpus_sha256: str) -> bool:
    """Whether the run in ``path``'s directory was started with ``cfg`` on data of these contents (wherever its
    directory and its data were then, with or without a bar; a field that did not exist then had its default).
    False: nothing is there yet. A run of other settings is a ``ValueError``: it is neither kept nor overwritten."""
    if not path.exists():
        if any((path.parent / name).exists() for name in checkpoint.RUN_FILES):
            raise ValueError(f"{path} is missing beside the files of an earlier run: start afresh with a new --out")
        return False
    changed = differences(_recorded_identity(read_json(path), cfg), identity(cfg, corpus_sha256))
    if changed:
        raise ValueError(
            f"{path.parent} was trained with other settings ({'; '.join(changed[:3])}): it is kept as it is; "
            f"give the experiment a new --out"
        )
    return True


def _tune(cfg: TrainConfig, baseline: str, out: Path, resume: bool, say: Callable[[str], None]) -> float:
    base = spec.parse(baseline)[-1]
    peak = base.params["lr"]
    lrs = [peak * f for f in TUNE_FACTORS]
    jobs = [dict(optimizer=spec.override(spec.base(baseline), {"lr": lr}), budget=1.0, seed=cfg.seed) for lr in lrs]
    for i, job in enumerate(jobs):
        job["dir"] = _dirname(i, job["optimizer"], 1.0, cfg.seed)
    say(f"tuning the baseline's lr over {', '.join(f'{lr:.3g}' for lr in lrs)}")
    run_jobs(cfg, jobs, out / "tune", resume, say)
    losses = [_load_result(out / "tune" / j["dir"])["final_val_loss"] for j in jobs]
    ok = [(loss, lr) for loss, lr in zip(losses, lrs) if loss is not None]
    if not ok:
        raise Diverged(f"every lr of the baseline's sweep diverged ({', '.join(f'{lr:.3g}' for lr in lrs)})")
    best = min(ok)[1]
    say(f"best baseline lr: {best:.3g}")
    return best


#: the order in which a tuning budget of n trials takes multiples of a base optimizer's default lr
LR_TRIALS = (1.0, 2.0, 0.5, 4.0, 0.25, 8.0)
#: SNOO's trials: (inner lr as a multiple of its default, outer lr, outer momentum); the package default first, then
#: the inner lr re-tuned both ways as LR_TRIALS tunes a base optimizer's, then the paper's ablation point (0.8, 0.75)
#: and the published range's corners
SNOO_TRIALS = ((1.0, 0.7, 0.5), (2.0, 0.7, 0.5), (0.5, 0.7, 0.5), (1.0, 0.8, 0.75), (2.0, 0.8, 0.75), (2.0, 0.5, 0.9))
TUNE_SEED_OFFSET = 1000  # tuning runs use seeds no reported run uses


def trials(optimizer: str, n: int) -> list[str]:
    """The first ``n`` settings of ``optimizer``'s own main knobs that ``--tune n`` tries: the base optimizer's lr;
    for SNOO also its outer lr and momentum (``SNOO_TRIALS``). Fewer when the knobs have fewer settings."""
    stages = spec.parse(optimizer)
    base = stages[-1]
    if "lr" not in base.params:
        return [spec.canonical(optimizer)]
    lr = base.params["lr"]
    if stages[0].name == "snoo":
        points = [
            {f"{base.name}.lr": lr * f, "snoo.lr": outer_lr, "snoo.momentum": m} for f, outer_lr, m in SNOO_TRIALS
        ]
    else:
        points = [{f"{base.name}.lr": lr * f} for f in LR_TRIALS]
    return list(dict.fromkeys(spec.override(optimizer, p) for p in points[:n]))


def tune(
    cfg: TrainConfig,
    optimizers: list[str],
    n: int,
    out: Path,
    resume: bool,
    say: Callable[[str], None],
    processes: int = 1,
) -> dict[str, dict]:
    """Give every optimizer the same budget of ``n`` trial runs at 1x on a seed no reported run uses; return, by
    optimizer, the best trial (``tuned``), every trial's final loss, and what the tuning cost (steps, wall time)."""
    seed = cfg.seed + TUNE_SEED_OFFSET
    jobs, owner = [], []
    for o in optimizers:
        for t in trials(o, n):
            jobs.append(dict(optimizer=t, budget=1.0, seed=seed))
            owner.append(o)
    for i, job in enumerate(jobs):
        job["dir"] = _dirname(i, job["optimizer"], 1.0, seed)
    say(f"tuning: {n} trial{'s' * (n > 1)} each on seed {seed}, {len(jobs)} runs")
    run_jobs(cfg, jobs, out / "tune", resume, say, processes)
    tuned: dict[str, dict] = {}
    for o, job in zip(owner, jobs):
        r = _load_result(out / "tune" / job["dir"])
        entry = tuned.setdefault(o, {"trials": {}, "steps": 0, "wall_time": 0.0})
        entry["trials"][job["optimizer"]] = r["final_val_loss"]
        entry["steps"] += r["steps"]
        entry["wall_time"] = round(entry["wall_time"] + r["wall_time"], 3)
    for o, entry in tuned.items():
        ok = [(loss, t) for t, loss in entry["trials"].items() if loss is not None]
        if not ok:
            raise Diverged(f"every trial of {o} diverged while tuning: {', '.join(entry['trials'])}")
        entry["tuned"] = min(ok)[1]
        entry["at_edge"] = _at_edge(entry["tuned"], list(entry["trials"]))
        edge = ": the best lr is at the edge of the trials, a wider sweep may find better" if entry["at_edge"] else ""
        say(f"tuned {o}: {entry['tuned']} ({min(ok)[0]:.4f}){edge}")
    return tuned


def _at_edge(best: str, trials: list[str]) -> bool:
    """Whether ``best``'s base lr is the lowest or the highest of the trials' lrs (when they tried three or more)."""
    lrs = sorted({spec.parse(t)[-1].params.get("lr") for t in trials} - {None})
    lr = spec.parse(best)[-1].params.get("lr")
    return len(lrs) >= 3 and lr in (lrs[0], lrs[-1])


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


LADDERS = ("cosine", "wsd")


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
    ladder: str = "cosine",
    resume: bool = False,
    processes: int = 1,
    say: Callable[[str], None] = print,
) -> dict:
    """Train the baseline (``optimizers[0]``) at every budget and the others at 1x, for every seed; summarize.

    ``tune_trials``: first give every optimizer that many trial runs of its own knobs (:func:`tune`) and compare the
    best of each. ``ladder``: how the baseline's budgets are trained (:func:`ladder_jobs`); with ``wsd`` every run
    uses the warm-up-stable-decay schedule with the same warm-up steps, so that the branches share the trunk.
    """
    if seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {seeds}")
    if not budgets or min(budgets) <= 0:
        raise ValueError("budgets must be positive multiples of the steps")
    if ladder not in LADDERS:
        raise ValueError(f"ladder must be one of {', '.join(LADDERS)}, got {ladder!r}")
    if tune_trials < 0:
        raise ValueError(f"--tune must be 0 (off) or a number of trials, got {tune_trials}")
    if ladder == "wsd":
        cfg = dataclasses.replace(cfg, schedule="wsd", warmup_steps=round(cfg.warmup * cfg.steps))
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
            ladder=ladder,
            resume=resume,
            processes=processes,
            say=say,
        )


#: what an experiment leaves in its directory; a fresh experiment refuses a directory that holds one
EXPERIMENT_FILES = ("experiment.json", "runs", "tune", "summary.json")


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
        lr = _tune(cfg, optimizers[0], out, resume, say)
        base_name = spec.parse(optimizers[0])[-1].name
        renamed = {o: spec.override(o, {f"{base_name}.lr": lr}) for o in optimizers}
        experiment["tuned_lr"] = lr
    if tune_trials:
        tuned = tune(cfg, list(renamed.values()), tune_trials, out, resume, say, processes)
        experiment["tuning"] = {tuned[r]["tuned"]: {"from": o, **tuned[r]} for o, r in renamed.items()}
        renamed = {o: tuned[r]["tuned"] for o, r in renamed.items()}
    if renamed != {o: o for o in optimizers}:
        experiment.update(
            baseline=renamed[optimizers[0]],
            optimizers=list(dict.fromkeys(renamed.values())),
            grid={renamed[o]: v for o, v in (grid or {}).items()},
        )
    jobs: list[dict] = []
    for seed in experiment["seeds"]:
        jobs += ladder_jobs(experiment["baseline"], experiment["budgets"], seed, cfg.steps, ladder, cfg.decay)
        for o in experiment["optimizers"][1:]:  # the baseline already ran at 1x
            jobs.append(dict(optimizer=o, budget=1.0, seed=seed))
    for i, job in enumerate(jobs):
        job["dir"] = _dirname(i, job["optimizer"], job["budget"], job["seed"])
    for job in jobs:
        if "branch_of" in job:
            job["branch_of"] = job["branch_of"]["dir"]
    experiment["jobs"] = jobs
    check_jobs(cfg, jobs, out / "runs", resume)  # before experiment.json is replaced
    write_json(experiment, out / "experiment.json")
    run_jobs(cfg, jobs, out / "runs", resume, say, processes)
    return summarize(out)


# ---------------------------------------------------------------------------------------------- summarizing


def _one_factor(per_seed: list[float | str | None], interval: dict) -> float | str | None:
    """The compute factor of an optimizer: the geometric mean of its seeds' factors (``interval["mean"]``); where a
    seed's factor is a bound (beyond the ladder), the bound that every seed shares, else None."""
    if interval["mean"] is not None:
        return interval["mean"]
    return per_seed[0] if isinstance(per_seed[0], str) and len(set(per_seed)) == 1 else None


def _load_result(run: Path) -> dict:
    path = run / "result.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the run did not finish (continue it with --resume)")
    return json.loads(path.read_text())


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(out: Path | str) -> dict:
    """Read an experiment directory's runs; write summary.json, summary.md and the plots; return the summary."""
    out = Path(out)
    path = out / "experiment.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: not a directory written by `snoo compare`, `snoo sweep` or `snoo scale-out`"
        )
    experiment = json.loads(path.read_text())
    if experiment["kind"] == "scale-out":
        return _summarize_scale_out(out, experiment)
    if experiment["kind"] == "scaling":
        return _summarize_scaling(out, experiment)
    steps, baseline, seeds = experiment["steps"], experiment["baseline"], experiment["seeds"]
    runs, curves = [], {}
    for job in experiment["jobs"]:
        r = _load_result(out / "runs" / job["dir"])
        runs.append(
            {
                "optimizer": job["optimizer"],
                "seed": job["seed"],
                "budget": job["budget"],
                "steps": r["steps"],
                "final_val_loss": r["final_val_loss"],
                "weight_norm": r["weight_norm"],
                "status": r["status"],
                "wall_time": r["wall_time"],
                "dir": job["dir"],
            }
        )
        curves[job["dir"]] = read_metrics(out / "runs" / job["dir"] / "metrics.jsonl")

    def final(optimizer: str, seed: int, budget: float = 1.0) -> float:
        r = next(r for r in runs if r["optimizer"] == optimizer and r["seed"] == seed and r["budget"] == budget)
        return r["final_val_loss"] if r["status"] == "ok" else math.inf

    budgets = experiment["budgets"]
    base_steps = [budget_steps(steps, b) for b in budgets]
    ladder = {s: [final(baseline, s, b) for b in budgets] for s in seeds}
    budget_losses = [statistics.fmean(ladder[s][i] for s in seeds) for i in range(len(budgets))]
    fit_ok = all(math.isfinite(x) for x in budget_losses) and len(base_steps) > 1
    target = budget_losses[budgets.index(1.0)]
    table, compute, to_target, intervals, differences = [], {}, {}, {}, {}
    for o in experiment["optimizers"]:
        losses = [final(o, s) for s in seeds]
        finite = all(math.isfinite(x) for x in losses)
        mean, std = _mean_std(losses) if finite else (math.inf, 0.0)
        norms = [r["weight_norm"] for r in runs if r["optimizer"] == o and r["budget"] == 1.0 and r["weight_norm"]]
        if o == baseline:
            compute[o] = 1.0  # by definition; the ladder is only the ruler for the others
        else:
            # each seed against its own seed's ladder (paired); the factor is their geometric mean, the centre of the
            # interval: one number in the table, the plots and here
            per_seed = [compute_factor(base_steps, ladder[s], steps, final(o, s)) for s in seeds]
            intervals[o] = {"per_seed": per_seed, **stats.factor_interval(per_seed)}
            compute[o] = _one_factor(per_seed, intervals[o])
            if finite and all(math.isfinite(ladder[s][budgets.index(1.0)]) for s in seeds):
                differences[o] = stats.difference_interval(losses, [ladder[s][budgets.index(1.0)] for s in seeds])
        reached = [
            steps_to_target(curves[r["dir"]], target) for r in runs if r["optimizer"] == o and r["budget"] == 1.0
        ]
        usable = math.isfinite(target) and reached and None not in reached and min(reached) > 0
        to_target[o] = steps / statistics.fmean(reached) if usable else None
        table.append(
            {
                "optimizer": o,
                "seeds": len(losses),
                "final_val_loss": mean,
                "std": std,
                "weight_norm": statistics.fmean(norms) if norms else None,
            }
        )
    fit = dict(zip(("a", "b"), fit_log_steps(base_steps, budget_losses))) if fit_ok else None
    distinct = len(set(base_steps)) == len(base_steps)
    ruler = stats.envelope(base_steps, budget_losses, steps) if fit_ok and distinct else None
    summary = {
        "kind": experiment["kind"],
        "baseline": baseline,
        "steps": steps,
        "seeds": seeds,
        "runs": runs,
        "table": table,
        "baseline_budgets": [
            {
                "budget": b,
                "steps": s,
                "final_val_loss": x,
                "ruler": ruler[i] if ruler else None,
                "log_fit_residual": x - (fit["a"] + fit["b"] * math.log(s)) if fit else None,
            }
            for i, (b, s, x) in enumerate(zip(budgets, base_steps, budget_losses))
        ],
        "ladder": experiment.get("ladder", "cosine"),
        "fit": fit,
        "compute_factor": compute,
        "compute_factor_interval": intervals,
        "loss_difference": differences,
        "steps_to_target": {"target": target, "speedup": to_target},
        "corpus": _corpus_info(out, runs),
        "regime": _regime(out, runs),
    }
    if experiment.get("tuned_lr") is not None:
        summary["tuned_lr"] = experiment["tuned_lr"]
    if experiment.get("tuning"):
        summary["tuning"] = experiment["tuning"]
    if experiment["grid"]:
        summary["grid"] = experiment["grid"]
    write_json(summary, out / "summary.json")
    (out / "summary.md").write_text(markdown(summary, experiment) + "\n")
    plots.draw(out, summary, curves)
    return summary


def _corpus_info(out: Path, runs: list[dict]) -> dict:
    config = json.loads((out / "runs" / runs[0]["dir"] / "config.json").read_text())
    return {**config["corpus"], "params": config["params"], "device": config["device"]}


def _regime(out: Path, runs: list[dict]) -> dict:
    """Parameters, tokens and tokens per parameter of the 1x runs (what the paper calls the training regime), as
    each run's config.json records them (a run written before it recorded them: from its settings)."""
    run = next(r for r in runs if r["budget"] == 1.0)
    config = read_json(out / "runs" / run["dir"] / "config.json")
    c = config["config"]
    planned = c["steps"] * c["batch_size"] * c["block_size"] * c["grad_accum"] * c.get("workers", 1)
    tokens = config.get("tokens_planned", planned)
    train_tokens = config["corpus"].get("train_tokens")
    return {
        "params": config["params"],
        "params_non_embedding": config.get("params_non_embedding"),
        "tokens": tokens,
        "tokens_per_param": tokens / config["params"],
        "epochs": tokens / train_tokens if train_tokens else None,
    }


def _factor(value: Any) -> str:
    if value is None:
        return "n/a"
    return f"{value}x" if isinstance(value, str) else f"{value:.2f}x"


def _factor_cell(summary: dict, optimizer: str) -> str:
    """The compute factor with its interval over seeds and the verdict, e.g. ``1.12x [1.03, 1.22] faster``."""
    iv = summary["compute_factor_interval"].get(optimizer)
    if iv is None:
        return "1.00x"
    if iv["mean"] is None:
        bounds = ", ".join(_factor(b) for b in iv.get("bounds", [])) or "n/a"
        return f"{bounds} (per seed; {iv['verdict']})" if iv.get("bounds") else _factor(None)
    if iv["low"] is None:
        return f"{iv['mean']:.2f}x (1 seed)"
    return f"{iv['mean']:.2f}x [{iv['low']:.2f}, {iv['high']:.2f}] {iv['verdict']}"


def _difference_cell(summary: dict, optimizer: str) -> str:
    d = summary["loss_difference"].get(optimizer)
    if optimizer == summary["baseline"]:
        return "-"
    if d is None:
        return "n/a"
    if d["low"] is None:
        return f"{d['mean']:+.4f} (1 seed)"
    return f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}] {d['verdict']}"


def markdown(summary: dict, experiment: dict) -> str:
    """The summary as a markdown table, with the facts needed to reproduce it."""
    c, g = summary["corpus"], summary["regime"]
    cfg = experiment["config"]
    n = len(summary["seeds"])
    epochs = f", {g['epochs']:.2g} epochs" if g.get("epochs") else ""
    ladder = len(summary["baseline_budgets"]) > 1  # else there is no ruler, and no compute factor
    lines = [
        f"{experiment['kind']}: {cfg['n_layer']} layers x {cfg['n_embd']} ({c['params']:,} params, {cfg['flavour']}), "
        f"{summary['steps']} steps of {cfg['batch_size'] * cfg['block_size'] * cfg['grad_accum']:,} tokens "
        f"= {g['tokens']:,} tokens, **{g['tokens_per_param']:.3g} tokens per parameter**{epochs}; "
        f"{cfg['schedule']} schedule; corpus {c['source']} ({c['tokenizer']}, {c['train_tokens']:,} train tokens, "
        f"sha256 {c['sha256']}), python {c['python']}, {c['device']}; {n} seed{'s' * (n > 1)}",
        "",
        f"| optimizer | final val loss ({'mean ± std, ' * (n > 1)}{n} seed{'s' * (n > 1)}) "
        f"| difference to the baseline at equal steps{' (95% CI)' * (n > 1)} "
        + f"| compute factor{' (95% CI)' * (n > 1)} " * ladder
        + "| weight norm |",
        "|---|---|---|---|" + "---|" * ladder,
    ]
    for row in summary["table"]:
        if not math.isfinite(row["final_val_loss"]):
            loss = "diverged"
        else:
            loss = f"{row['final_val_loss']:.4f}" + (f" ± {row['std']:.4f}" if n > 1 else "")
        norm = f"{row['weight_norm']:.2f}" if row["weight_norm"] else "-"
        is_base = row["optimizer"] == summary["baseline"]
        lines.append(
            f"| {row['optimizer']}{' (baseline)' * is_base} | {loss} | {_difference_cell(summary, row['optimizer'])} "
            + f"| {_factor_cell(summary, row['optimizer'])} " * ladder
            + f"| {norm} |"
        )
    if not ladder:
        lines += ["", "one baseline budget: no compute factor (give --budgets 1,1.25,1.5,2 for one)"]
        return "\n".join(lines + _tuning_lines(summary, experiment))
    base = summary["baseline"]
    how = "decay branches of one long run" if summary["ladder"] == "wsd" else "one run each"
    lines += [
        "",
        f"{base} trained longer and shorter too ({how}), final val loss: "
        + ", ".join(
            f"{b['budget']:g}x ({b['steps']} steps) {b['final_val_loss']:.4f}" for b in summary["baseline_budgets"]
        ),
        f"compute factor: the steps {base} needs to reach an optimizer's final loss (read between the lengths above), "
        f"divided by the steps that optimizer took; 1.25x means the same loss for 1/1.25 of the compute. Each seed is "
        f"measured against {base} on the same seed; the factor is their geometric mean, with a 95% interval, and "
        f"'no measurable difference' when the interval contains 1x. '>2.5x' or '<0.5x': beyond the lengths measured.",
    ]
    return "\n".join(lines + _tuning_lines(summary, experiment) + ["", *plain_words(summary)])


def plain_words(summary: dict) -> list[str]:
    """One sentence per optimizer against the baseline: what the compute factor and its interval say."""
    base, g, n = summary["baseline"], summary["regime"], len(summary["seeds"])
    size = f"at this size ({g['params']:,} parameters, {g['tokens_per_param']:.3g} tokens per parameter)"
    said = []
    for row in summary["table"]:
        o = row["optimizer"]
        if o == base:
            continue
        iv, factor = summary["compute_factor_interval"].get(o), summary["compute_factor"].get(o)
        if not math.isfinite(row["final_val_loss"]):
            said.append(f"{o} diverged: no compute factor.")
        elif iv is None or iv["mean"] is None:
            shown = ", ".join(_factor(b) for b in iv.get("bounds", [])) if iv else ""
            said.append(f"{o}: no single compute factor ({shown or 'n/a'} by seed); give --budgets a wider range.")
        elif iv["low"] is None:
            said.append(f"{o}: {factor:.2f}x the compute of {base} on one seed, with no interval (use --seeds 3).")
        else:
            ci = f"95% interval over {n} seeds: {iv['low']:.2f}x to {iv['high']:.2f}x"
            if iv["verdict"] == "faster":
                said.append(f"{o} is faster than {base} {size}: the same loss for {factor:.2f}x less compute ({ci}).")
            elif iv["verdict"] == "slower":
                said.append(f"{o} is slower than {base} {size}: its compute factor is {factor:.2f}x ({ci}).")
            else:
                said.append(
                    f"{o} is not measurably faster than {base} {size}: its compute factor is {factor:.2f}x, but the "
                    f"95% interval over {n} seeds, {iv['low']:.2f}x to {iv['high']:.2f}x, includes 1x (no saving)."
                )
    return said


def _tuning_lines(summary: dict, experiment: dict) -> list[str]:
    """What the tuning chose, and what it cost."""
    lines = []
    if "tuned_lr" in summary:
        lines.append(f"baseline lr tuned by --tune-baseline: {summary['tuned_lr']:.3g}")
    for tuned, t in summary.get("tuning", {}).items():
        lines.append(
            f"tuned {t['from']} -> {tuned}: best of {len(t['trials'])} trials on seed "
            f"{experiment['seeds'][0] + TUNE_SEED_OFFSET} ({t['steps']:,} steps, {t['wall_time']:.0f} s)"
            + ("; its lr is at the edge of the trials, a wider sweep may find better" if t.get("at_edge") else "")
        )
    return lines


# ---------------------------------------------------------------------------------------------- scaling


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """``"2x64,4x64,4x128"`` -> [(layers, width), ...] (heads: one per 32 of width)."""
    sizes = []
    for item in text.split(","):
        layers, x, width = item.strip().partition("x")
        if not x or not layers.isdigit() or not width.isdigit() or int(width) % 32 or int(layers) < 1:
            raise ValueError(f"--sizes item {item!r}: expected LAYERSxWIDTH with a width that is a multiple of 32")
        sizes.append((int(layers), int(width)))
    return sizes


def model_params(cfg: TrainConfig, vocab_size: int) -> int:
    """The parameter count of ``cfg``'s model (built on the meta device: no memory, no time)."""
    import torch

    from snoo.lab.model import GPT

    with torch.device("meta"):
        return GPT(model_config(cfg, vocab_size)).num_params()


def run_scaling(
    cfg: TrainConfig,
    optimizers: list[str],
    *,
    sizes: Sequence[tuple[int, int]],
    tokens_per_param: Sequence[float],
    seeds: int = 1,
    budgets: Sequence[float] = BUDGETS,
    ladder: str = "cosine",
    tune_trials: int = 0,
    resume: bool = False,
    processes: int = 1,
    say: Callable[[str], None] = print,
) -> dict:
    """The compute factor against model size and run length: one ``compare`` per (size, tokens per parameter), each
    with its own ladder (and, with ``tune_trials``, every contender tuned for that size and length), into
    ``OUT/LxW-rR``; then one table, one plot and a fitted trend of log-factor against log-parameters."""
    from snoo.lab.data import load_corpus

    if not sizes or not tokens_per_param or min(tokens_per_param) <= 0:
        raise ValueError("scaling needs at least one size and positive tokens per parameter")
    vocab = load_corpus(cfg.data, cfg.tokenizer, cfg.bpe_vocab).vocab_size
    out = Path(cfg.out)
    points = []
    for layers, width in sizes:
        for ratio in tokens_per_param:
            point = dataclasses.replace(cfg, n_layer=layers, n_embd=width, n_head=width // 32)
            params = model_params(point, vocab)
            tokens_per_step = point.batch_size * point.block_size * point.grad_accum
            steps = max(1, round(ratio * params / tokens_per_step))
            name = f"{layers}x{width}-r{ratio:g}"
            point = dataclasses.replace(
                point,
                steps=steps,
                eval_every=max(1, steps // 10),
                ckpt_every=max(1, steps // 4),
                log_every=max(1, steps // 50),
                out=str(out / name),
            )
            validate(point)
            points.append((name, layers, width, ratio, params, point))
    experiment = {
        "kind": "scaling",
        "optimizers": [spec.canonical(o) for o in optimizers],
        "points": [
            {"name": n, "n_layer": lay, "n_embd": w, "tokens_per_param": r, "params": p, "steps": c.steps}
            for n, lay, w, r, p, c in points
        ],
        "seeds": [cfg.seed + s for s in range(seeds)],
        "ladder": ladder,
        "tune_trials": tune_trials,
        "config": dataclasses.asdict(cfg),
    }
    with checkpoint.claimed(out, fresh=not resume, earlier=("experiment.json",)):
        write_json(experiment, out / "experiment.json")
        for i, (name, *_, params, point) in enumerate(points, 1):
            say(f"=== scaling point {i}/{len(points)}: {name}, {params:,} params, {point.steps} steps")
            run_experiment(
                "compare",
                point,
                optimizers,
                seeds=seeds,
                budgets=budgets,
                ladder=ladder,
                tune_trials=tune_trials,
                resume=resume,
                processes=processes,
                say=say,
            )
        return summarize(out)


def _summarize_scaling(out: Path, experiment: dict) -> dict:
    rows = []
    for point in experiment["points"]:
        path = out / point["name"] / "summary.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: the point did not finish (continue it with --resume)")
        s = json.loads(path.read_text())
        for row in s["table"]:
            o = row["optimizer"]
            if o == s["baseline"]:
                continue
            iv = s["compute_factor_interval"][o]
            rows.append(
                {
                    "point": point["name"],
                    "optimizer": o,
                    "baseline": s["baseline"],
                    "contender": s["tuning"][o]["from"] if "tuning" in s else o,
                    "params": s["regime"]["params"],
                    "tokens_per_param": s["regime"]["tokens_per_param"],
                    "final_val_loss": row["final_val_loss"],
                    "baseline_val_loss": s["table"][0]["final_val_loss"],
                    "compute_factor": s["compute_factor"][o],
                    "interval": {k: iv.get(k) for k in ("mean", "low", "high", "verdict")},
                }
            )
    trends = {}
    for contender in dict.fromkeys(r["contender"] for r in rows):
        xs = [
            (math.log(r["params"]), math.log(r["compute_factor"]))
            for r in rows
            if r["contender"] == contender and isinstance(r["compute_factor"], float)
        ]
        if len({x for x, _ in xs}) >= 3:  # two points always fit a line: no trend to speak of
            a, b = fit_log_steps([math.exp(x) for x, _ in xs], [y for _, y in xs])
            trends[contender] = {
                "log_factor": {"a": a, "b": b},
                "predicted_at_124M": math.exp(a + b * math.log(124e6)),
                "points": len(xs),
            }
    summary = {"kind": "scaling", "rows": rows, "trend": trends, "seeds": experiment["seeds"]}
    write_json(summary, out / "summary.json")
    (out / "summary.md").write_text(markdown_scaling(summary, experiment) + "\n")
    plots.scaling_plot(out, summary)
    return summary


def markdown_scaling(summary: dict, experiment: dict) -> str:
    cfg = experiment["config"]
    n = len(summary["seeds"])
    lines = [
        f"scaling: {len(experiment['points'])} points (model size x tokens per parameter), batch "
        f"{cfg['batch_size'] * cfg['block_size'] * cfg['grad_accum']:,} tokens, "
        f"{'wsd' if experiment['ladder'] == 'wsd' else cfg['schedule']} schedule, {experiment['ladder']} ladder, "
        f"{experiment['tune_trials'] or 'no'} tuning trials per contender, corpus {cfg['data'] or 'python-stdlib'}; "
        f"{n} seed{'s' * (n > 1)} per point; every point's ladder and tuning are its own",
        "",
        "| point | params | tokens per param | contender | final val loss | baseline | compute factor | interval |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        iv = r["interval"]
        ci = f"[{iv['low']:.2f}, {iv['high']:.2f}] {iv['verdict']}" if iv["low"] is not None else iv["verdict"]
        lines.append(
            f"| {r['point']} | {r['params']:,} | {r['tokens_per_param']:.3g} | {r['optimizer']} "
            f"| {r['final_val_loss']:.4f} | {r['baseline_val_loss']:.4f} | {_factor(r['compute_factor'])} | {ci} |"
        )
    for contender, t in summary["trend"].items():
        lines.append(
            f"\ntrend of {contender}: ln(factor) = {t['log_factor']['a']:.3f} {t['log_factor']['b']:+.4f} * ln(params) "
            f"over {t['points']} points; extrapolated to GPT-2 124M: {t['predicted_at_124M']:.2f}x (an extrapolation, "
            f"for a GPU run to test, not a measurement)"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- scale-out


def run_scale_out(
    cfg: TrainConfig,
    *,
    snoo_spec: str = "snoo-adamw",
    baseline: str = "adamw",
    worker_counts: Sequence[int] = (2, 4),
    resume: bool = False,
    say: Callable[[str], None] = print,
) -> dict:
    """The same total tokens five ways and more: the baseline and SNOO on one worker for ``cfg.steps`` steps; for each
    N of ``worker_counts``, DiLoCo (``snoo_spec`` averaged over N workers, each on its own batches) and DDP (the
    baseline on an N-times larger batch) for steps / N steps. Every worker's batch is ``cfg``'s."""
    for n in worker_counts:
        if n < 2:
            raise ValueError(f"worker counts are 2 or more, got {n} (the 1-worker runs are always there)")
        if cfg.steps % n:
            raise ValueError(f"--steps {cfg.steps} is not a multiple of {n}: the runs would not see the same tokens")
    snoo_spec, baseline = spec.canonical(snoo_spec), spec.canonical(baseline)
    jobs = [
        dict(optimizer=baseline, workers=1, parallel=None),
        dict(optimizer=snoo_spec, workers=1, parallel=None),
    ]
    for n in worker_counts:
        jobs += [
            dict(optimizer=snoo_spec, workers=n, parallel="diloco"),
            dict(optimizer=baseline, workers=n, parallel="ddp"),
        ]
    for i, job in enumerate(jobs):
        job.update(budget=1 / job["workers"], seed=cfg.seed)
        safe = re.sub(r"[^a-z0-9.=+_-]+", "_", job["optimizer"])
        job["dir"] = f"{i:02d}-{safe}-{job['workers']}w{'-' + job['parallel'] if job['parallel'] else ''}"
    out = Path(cfg.out)
    with checkpoint.claimed(out, fresh=not resume, earlier=EXPERIMENT_FILES):
        return _run_scale_out(cfg, [snoo_spec, baseline], jobs, worker_counts, out, resume, say)


def _run_scale_out(
    cfg: TrainConfig,
    optimizers: list[str],
    jobs: list[dict],
    worker_counts: Sequence[int],
    out: Path,
    resume: bool,
    say: Callable[[str], None],
) -> dict:
    experiment = {
        "kind": "scale-out",
        "optimizers": optimizers,
        "steps": cfg.steps,
        "worker_counts": list(worker_counts),
        "seeds": [cfg.seed],
        "jobs": jobs,
        "config": dataclasses.asdict(cfg),
    }
    check_jobs(cfg, jobs, out / "runs", resume)  # before experiment.json is replaced
    write_json(experiment, out / "experiment.json")
    run_jobs(cfg, jobs, out / "runs", resume, say)
    return summarize(out)


def _summarize_scale_out(out: Path, experiment: dict) -> dict:
    rows, curves = [], {}
    for job in experiment["jobs"]:
        r = _load_result(out / "runs" / job["dir"])
        sent = r["communicated_bytes_per_step"]
        rows.append(
            {
                "optimizer": job["optimizer"],
                "workers": r["workers"],
                "parallel": r["parallel"],
                "steps_per_worker": r["steps"],
                "tokens": r["tokens"],
                "status": r["status"],
                "final_val_loss": r["final_val_loss"],
                "bytes_per_step": sent,  # what each worker sent, on average over the run's steps
                "bytes_per_token": sent * r["workers"] * r["steps"] / r["tokens"] if r["tokens"] else 0.0,
                "wall_time": r["wall_time"],
                "dir": job["dir"],
            }
        )
        curves[job["dir"]] = read_metrics(out / "runs" / job["dir"] / "metrics.jsonl")
    summary = {
        "kind": "scale-out",
        "steps": experiment["steps"],
        "seeds": experiment["seeds"],
        "runs": rows,
        "corpus": _corpus_info(out, rows),
    }
    write_json(summary, out / "summary.json")
    (out / "summary.md").write_text(markdown_scale_out(summary, experiment) + "\n")
    plots.tokens_plot(out, summary, curves)
    return summary


def markdown_scale_out(summary: dict, experiment: dict) -> str:
    """The scale-out table: loss, tokens, steps and the bytes each worker sent, DiLoCo next to DDP."""
    c, cfg = summary["corpus"], experiment["config"]
    batch = cfg["batch_size"] * cfg["block_size"] * cfg["grad_accum"]
    lines = [
        f"scale-out: {cfg['n_layer']} layers x {cfg['n_embd']} ({c['params']:,} params, {cfg['flavour']}), "
        f"{summary['steps']:,} steps of {batch:,} tokens on one worker (the same batch per worker and step on N), "
        f"{cfg['schedule']} schedule; corpus {c['source']} ({c['tokenizer']}, {c['train_tokens']:,} train tokens, "
        f"sha256 {c['sha256']}), python {c['python']}, {c['device']}; seed {summary['seeds'][0]}",
        "",
        "| run | SPEC | workers | steps per worker | tokens (all workers) | final val loss | bytes sent per step "
        "and worker | bytes per token | wall time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in summary["runs"]:
        kind = {"diloco": "DiLoCo", "ddp": "DDP"}.get(row["parallel"], "1 worker")
        loss = f"{row['final_val_loss']:.4f}" if row["status"] == "ok" else row["status"]
        lines.append(
            f"| {kind} | {row['optimizer']} | {row['workers']} | {row['steps_per_worker']:,} | {row['tokens']:,} "
            f"| {loss} | {row['bytes_per_step']:,.0f} | {row['bytes_per_token']:.2f} | {row['wall_time']:.1f} s |"
        )
    ratios = []
    for n in experiment["worker_counts"]:
        diloco, ddp = (
            next(r for r in summary["runs"] if r["workers"] == n and r["parallel"] == kind)
            for kind in ("diloco", "ddp")
        )
        if ddp["bytes_per_step"]:
            ratios.append(
                f"{n} workers: DiLoCo sends {diloco['bytes_per_step'] / ddp['bytes_per_step']:.3g}x DDP's bytes"
            )
    lines += [
        "",
        "Bytes: measured, what each worker put into all-reduces (DDP: the gradients, every step; DiLoCo: the "
        "pseudo-gradients and one flag per tensor, every K steps), averaged over the run's steps. Bytes per token: "
        "all workers' bytes over all tokens. Wall time: rank 0's training time (torchrun's start-up and the "
        "checkpoints not included); the workers share the machine's cores."
        + (" " + "; ".join(ratios) + "." if ratios else ""),
    ]
    return "\n".join(lines)
