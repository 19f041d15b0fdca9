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
import signal
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from snoo import spec
from snoo.lab import checkpoint, plots, stats
from snoo.lab.checkpoint import read_json, read_metrics, snapshot_name, write_json, write_text
from snoo.lab.config import TrainConfig, differences, identity, model_config, validate
from snoo.lab.data import fingerprint
from snoo.lab.launch import LaunchFailed, run
from snoo.lab.stats import compute_factor, fit_log_steps
from snoo.lab.train import Diverged

# the baseline's budgets: below 1x too, so that a contender a little behind the baseline gets a factor, not "<1x"
BUDGETS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5)
TUNE_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)  # --tune-baseline tries the base lr times these


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


def check_processes(processes: int) -> None:
    if processes < 1:
        raise ValueError(f"--jobs must be at least 1, got {processes}")


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
    check_processes(processes)
    if processes > 1 and cfg.threads == 0:
        cfg = dataclasses.replace(cfg, threads=max(1, (os.cpu_count() or 1) // processes))
    planned = check_jobs(cfg, jobs, out, resume, adopt=say)
    todo = [i for i, (job, _, kept) in enumerate(planned) if not (kept and _finished(out / job["dir"] / "result.json"))]
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
        result = out / job["dir"] / "result.json"
        if earlier and result.exists():  # to do although finished: its result is damaged
            say(f"    {job['dir']}: {_result_problem(result)}: the run is finished again from its checkpoint")
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

    seen: dict[str, str] = {}  # the data's sha256 -> the first run that saw it

    def finish(i: int, r: dict) -> None:
        seen.setdefault(r["corpus_sha256"], jobs[i]["dir"])
        if len(seen) > 1:  # the data changed during the experiment: stop before more runs train on either
            same_corpus(out, seen)
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


def same_corpus(out: Path, runs: dict[str, str]) -> None:
    """Refuse runs (``runs``: sha256 of the data they saw -> a run that saw it) that did not all see the same data."""
    if len(runs) > 1:
        seen = "; ".join(f"{run} on data of sha256 {sha}" for sha, run in runs.items())
        raise ValueError(
            f"the runs in {out} did not all see the same data ({seen}): the data changed during the experiment; "
            f"start afresh with a new --out on data that does not change"
        )


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


def _end_with_parent(parent: int) -> None:
    """A pool worker's initializer: the worker ends when ``parent``, the process that started it, ends (killed too),
    so that no orphan keeps training, holding the runs' locks and the terminal's output."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # sent when the parent ends
    else:  # no such signal: look every second
        import threading

        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1)
            os._exit(1)

        threading.Thread(target=watch, daemon=True).start()
    if os.getppid() != parent:  # it ended before the worker asked
        os._exit(1)


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _run_parallel(jobs: list[dict], start: Callable, finish: Callable, processes: int) -> None:
    """Run ``jobs`` on ``processes`` worker processes, each branch after its trunk, in the order of the list. A worker
    ends with this process; a worker killed from outside (the out-of-memory killer) stops the others and is one
    :class:`~snoo.lab.launch.LaunchFailed` line, saying that ``--resume`` continues."""
    import concurrent.futures as cf
    import multiprocessing
    from concurrent.futures.process import BrokenProcessPool

    waiting = list(range(len(jobs)))
    done: set[str] = set()
    running: dict[cf.Future, int] = {}
    context = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(
        processes, mp_context=context, initializer=_end_with_parent, initargs=(os.getpid(),)
    ) as pool:
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
                    try:
                        result = future.result()
                    except BrokenProcessPool:
                        raise LaunchFailed(
                            f"a worker process of --jobs {processes} ended abruptly (killed from outside, e.g. by "
                            f"the out-of-memory killer) while training {jobs[i]['dir']}: the finished runs and the "
                            f"checkpoints are kept; continue with --resume (and fewer --jobs if memory is short)",
                            1,
                        ) from None
                    finish(i, result)
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


TUNE_SEED_OFFSET = 1000  # tuning runs use seeds no reported run uses


def tuning_seeds(cfg: TrainConfig, n: int = 1) -> list[int]:
    """The seeds tuning trains on: ``n`` seeds that no reported run uses."""
    return [cfg.seed + TUNE_SEED_OFFSET + i for i in range(n)]


def _trial_losses(out: Path, jobs: list[dict], owner: list[str]) -> dict[str, float | None]:
    """Each trial's final loss, the mean over its tuning seeds (None when any of them diverged)."""
    losses: dict[str, list[float | None]] = {}
    for o, job in zip(owner, jobs):
        losses.setdefault(o, []).append(_load_result(out / job["dir"])["final_val_loss"])
    return {o: None if None in v else statistics.fmean(v) for o, v in losses.items()}  # type: ignore[arg-type]


def _tune(
    cfg: TrainConfig, baseline: str, out: Path, resume: bool, say: Callable[[str], None], seeds: int = 1
) -> float:
    base = spec.parse(baseline)[-1]
    peak = base.params["lr"]
    lrs = [peak * f for f in TUNE_FACTORS]
    names = [spec.override(spec.base(baseline), {"lr": lr}) for lr in lrs]
    jobs = [dict(optimizer=o, budget=1.0, seed=s) for s in tuning_seeds(cfg, seeds) for o in names]
    for i, job in enumerate(jobs):
        job["dir"] = _dirname(i, job["optimizer"], 1.0, job["seed"])
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
) -> dict[str, dict]:
    """Give every optimizer the same budget of ``n`` trial runs at 1x, each on ``seeds`` seeds that no reported run
    uses (a trial's loss is their mean); return, by optimizer, the best trial (``tuned``), every trial's final loss,
    and what the tuning cost (steps, wall time)."""
    owners: dict[str, list[str]] = {}  # each distinct trial, trained once -> the optimizers that try it
    for o in optimizers:
        for t in trials(o, n):
            owners.setdefault(t, []).append(o)
    jobs = [dict(optimizer=t, budget=1.0, seed=seed) for seed in tuning_seeds(cfg, seeds) for t in owners]
    for i, job in enumerate(jobs):
        job["dir"] = _dirname(i, job["optimizer"], 1.0, job["seed"])
    on = f"seed {tuning_seeds(cfg)[0]}" if seeds == 1 else f"seeds {tuning_seeds(cfg, seeds)}"
    say(f"tuning: {n} trial{'s' * (n > 1)} each on {on}, {len(jobs)} runs")
    run_jobs(cfg, jobs, out / "tune", resume, say, processes)
    # a trial that two optimizers share counts in the cost of each: it is part of each one's budget
    losses = _trial_losses(out / "tune", jobs, [j["optimizer"] for j in jobs])
    seeds_used = tuning_seeds(cfg, seeds)
    tuned: dict[str, dict] = {o: {"trials": {}, "steps": 0, "wall_time": 0.0, "seeds": seeds_used} for o in optimizers}
    for job in jobs:
        r = _load_result(out / "tune" / job["dir"])
        for o in owners[job["optimizer"]]:
            entry = tuned[o]
            entry["trials"][job["optimizer"]] = losses[job["optimizer"]]
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
    tune_seeds: int = 1,
    ladder: str = "cosine",
    resume: bool = False,
    processes: int = 1,
    say: Callable[[str], None] = print,
) -> dict:
    """Train the baseline (``optimizers[0]``) at every budget and the others at 1x, for every seed; summarize.

    ``tune_trials``: first give every optimizer that many trial runs of its own knobs (:func:`tune`), each on
    ``tune_seeds`` seeds that no reported run uses, and compare the best of each; ``tune_baseline`` sweeps the
    baseline's lr on the same seeds. ``ladder``: how the baseline's budgets are trained (:func:`ladder_jobs`); with
    ``wsd`` every run uses the warm-up-stable-decay schedule with the same warm-up steps, so that the branches share
    the trunk.
    """
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
    if ladder == "wsd":  # the warm-up in steps (the one asked for, if any), so that every budget shares it
        warmup_steps = round(cfg.warmup * cfg.steps) if cfg.warmup_steps is None else cfg.warmup_steps
        cfg = dataclasses.replace(cfg, schedule="wsd", warmup_steps=warmup_steps)
    for b in budgets:
        steps = budget_steps(cfg.steps, b)
        try:
            validate(dataclasses.replace(cfg, steps=steps))
        except ValueError as e:
            raise ValueError(f"--budgets {b:g} gives runs of {steps} steps (of --steps {cfg.steps}): {e}") from None
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
            ladder=ladder,
            resume=resume,
            processes=processes,
            say=say,
        )


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
    tune_seeds: int,
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
        lr = _tune(cfg, optimizers[0], out, resume, say, tune_seeds)
        base_name = spec.parse(optimizers[0])[-1].name
        renamed = {o: spec.override(o, {f"{base_name}.lr": lr}) for o in optimizers}
        experiment["tuned_lr"] = lr
    tuned: dict[str, dict] = {}
    if tune_trials:
        tuned = tune(cfg, list(renamed.values()), tune_trials, out, resume, say, processes, tune_seeds)
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
    jobs: list[dict] = []
    for seed in experiment["seeds"]:
        jobs += ladder_jobs(experiment["baseline"], experiment["budgets"], seed, cfg.steps, ladder, cfg.decay)
        for o in optimizers[1:]:  # the baseline already ran at 1x
            jobs.append(dict(optimizer=renamed[o], budget=1.0, seed=seed))
            if labels[o] != renamed[o]:
                jobs[-1]["label"] = labels[o]
    first: dict[tuple, str] = {}  # a run that two rows share is trained once, in the first one's directory
    for i, job in enumerate(jobs):
        key = (job["optimizer"], job["budget"], job["seed"])
        job["dir"] = first.setdefault(key, _dirname(i, job["optimizer"], job["budget"], job["seed"]))
    for job in jobs:
        if "branch_of" in job:
            job["branch_of"] = job["branch_of"]["dir"]
    experiment["jobs"] = jobs
    unique: dict[str, dict] = {}
    for job in jobs:
        unique.setdefault(job["dir"], job)
    jobs = list(unique.values())
    check_jobs(cfg, jobs, out / "runs", resume)  # before experiment.json is replaced
    write_json(experiment, out / "experiment.json")
    run_jobs(cfg, jobs, out / "runs", resume, say, processes)
    return summarize(out)


# ---------------------------------------------------------------------------------------------- summarizing


def _finished(path: Path) -> bool:
    """Whether ``path`` is the ``result.json`` of a finished run (there, and not damaged)."""
    return path.exists() and _result_problem(path) is None


def _result_problem(path: Path) -> str | None:
    """What is wrong with a run's ``result.json`` (torn, or not what ``train`` writes), or None."""
    try:
        r = read_json(path)
    except ValueError as e:
        return str(e).split(": delete it")[0]

    def number(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    if (
        r.get("status") not in ("ok", "diverged")
        or not isinstance(r.get("steps"), int)
        or not number(r.get("wall_time"))
        or (r["status"] == "ok" and not number(r.get("final_val_loss")))
        or not (r.get("weight_norm") is None or number(r["weight_norm"]))
    ):
        return f"{path} is damaged (not the result of a run)"
    return None


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
    problem = _result_problem(path)
    if problem is not None:
        raise ValueError(f"{problem}: continue the experiment with --resume, which finishes the run again")
    return read_json(path)


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
    experiment = read_json(path)
    checkpoint.refuse_links(out)  # the summary and the plots are written there
    if experiment["kind"] == "scale-out":
        return _summarize_scale_out(out, experiment)
    if experiment["kind"] == "scaling":
        from snoo.lab.scaling import summarize_scaling  # the study is built on this module

        return summarize_scaling(out, experiment)
    steps, baseline, seeds = experiment["steps"], experiment["baseline"], experiment["seeds"]
    runs, curves, corpora = [], {}, {}
    for job in experiment["jobs"]:
        r = _load_result(out / "runs" / job["dir"])
        if r.get("corpus_sha256"):  # (a run of an older snoo did not record it)
            corpora.setdefault(r["corpus_sha256"], job["dir"])
        runs.append(
            {
                "optimizer": job.get("label", job["optimizer"]),
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
    same_corpus(out / "runs", corpora)

    def final(optimizer: str, seed: int, budget: float = 1.0) -> float:
        r = next(r for r in runs if r["optimizer"] == optimizer and r["seed"] == seed and r["budget"] == budget)
        return r["final_val_loss"] if r["status"] == "ok" else math.inf

    budgets = experiment["budgets"]
    base_steps = [budget_steps(steps, b) for b in budgets]
    ladder = {s: [final(baseline, s, b) for b in budgets] for s in seeds}
    budget_losses = [statistics.fmean(ladder[s][i] for s in seeds) for i in range(len(budgets))]
    fit_ok = all(math.isfinite(x) for x in budget_losses) and len(base_steps) > 1
    table, compute, intervals, differences = [], {}, {}, {}
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
    write_text(markdown(summary, experiment) + "\n", out / "summary.md")
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
        "epochs_largest_rung": max(r["steps"] for r in runs) / run["steps"] * tokens / train_tokens
        if train_tokens
        else None,
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
    cell = f"{iv['mean']:.2f}x [{iv['low']:.2f}, {iv['high']:.2f}] {iv['verdict']}"
    if iv.get("detectable"):
        cell += f" (could detect {iv['detectable']:.2f}x)"
    if iv.get("censored"):
        k = len(iv["censored"])
        cell += f"; {k} seed{'s' * (k > 1)} beyond the ladder ({', '.join(iv['censored'])}), counted at the bound"
    return cell


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
    if g.get("epochs_largest_rung"):
        epochs += f" ({g['epochs_largest_rung']:.2g} at the largest rung)"
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
            f"{b['budget']:g}x ({b['steps']} steps) {b['final_val_loss']:.4f}"
            + (" (over one epoch)" if g.get("epochs") and b["budget"] * g["epochs"] > 1 else "")
            for b in summary["baseline_budgets"]
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
            k = len(iv.get("censored", []))
            beyond = f" ({k} seed{'s' * (k > 1)} beyond the lengths measured, counted at the bound)" if k else ""
            ci += beyond
            if iv["verdict"] == "faster":
                said.append(f"{o} is faster than {base} {size}: the same loss for {factor:.2f}x less compute ({ci}).")
            elif iv["verdict"] == "slower":
                said.append(f"{o} is slower than {base} {size}: its compute factor is {factor:.2f}x ({ci}).")
            else:
                said.append(
                    f"{o} is not measurably faster than {base} {size}: its compute factor is {factor:.2f}x, but the "
                    f"95% interval over {n} seeds, {iv['low']:.2f}x to {iv['high']:.2f}x{beyond}, includes 1x "
                    f"(no saving)."
                    + (
                        f" With their spread, these seeds find a true saving of {iv['detectable']:.2f}x or more 4 "
                        f"times in 5; a smaller one can hide here."
                        if iv.get("detectable")
                        else ""
                    )
                )
    return said


def _seeds_text(seeds: list[int]) -> str:
    return f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {', '.join(map(str, seeds))} (trial loss: their mean)"


def _tuning_lines(summary: dict, experiment: dict) -> list[str]:
    """What the tuning chose, and what it cost."""
    lines = []
    if "tuned_lr" in summary:
        lines.append(f"baseline lr tuned by --tune-baseline: {summary['tuned_lr']:.3g}")
    for tuned, t in summary.get("tuning", {}).items():
        lines.append(
            f"tuned {t['from']} -> {tuned}: best of {len(t['trials'])} trials on "
            + _seeds_text(t.get("seeds", [experiment["seeds"][0] + TUNE_SEED_OFFSET]))
            + f" ({t['steps']:,} steps, {t['wall_time']:.0f} s)"
            + ("; its lr is at the edge of the trials, a wider sweep may find better" if t.get("at_edge") else "")
        )
    return lines


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
    rows, curves, corpora = [], {}, {}
    for job in experiment["jobs"]:
        r = _load_result(out / "runs" / job["dir"])
        if r.get("corpus_sha256"):  # (a run of an older snoo did not record it)
            corpora.setdefault(r["corpus_sha256"], job["dir"])
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
    same_corpus(out / "runs", corpora)
    summary = {
        "kind": "scale-out",
        "steps": experiment["steps"],
        "seeds": experiment["seeds"],
        "runs": rows,
        "corpus": _corpus_info(out, rows),
    }
    write_json(summary, out / "summary.json")
    write_text(markdown_scale_out(summary, experiment) + "\n", out / "summary.md")
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
