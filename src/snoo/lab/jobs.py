"""Many training runs of one experiment, in this process or several at once, each in a directory of its own.

A job is a dict: ``optimizer``, ``budget`` (a multiple of the config's steps), ``seed`` and ``dir``, and optionally
``workers``, ``parallel``, ``compression``, ``snapshots`` and ``branch_of`` / ``from_step`` (a WSD decay branch).
``check_jobs`` checks every job and every earlier run before anything trains; ``run_jobs`` trains what is not
finished, and with ``--resume`` keeps (and adopts, under another name) what is. Every run is a function of its config
alone, so runs trained in parallel processes give the numbers of one process, bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from snoo import spec
from snoo.lab import checkpoint
from snoo.lab.checkpoint import read_json, snapshot_name
from snoo.lab.config import TrainConfig, differences, identity, model_config, validate
from snoo.lab.data import fingerprint
from snoo.lab.ladder import budget_steps
from snoo.lab.launch import LaunchFailed, run

#: what an experiment leaves in its directory; a fresh experiment refuses a directory that holds one
EXPERIMENT_FILES = ("experiment.json", "runs", "tune", "summary.json")


def safe_name(optimizer: str) -> str:
    """A canonical SPEC as (part of) a directory name: what is not ``a-z0-9.=+_-`` becomes ``_``."""
    return re.sub(r"[^a-z0-9.=+_-]+", "_", optimizer)


def run_dir_name(index: int, optimizer: str, budget: float, seed: int) -> str:
    return f"{index:02d}-{safe_name(spec.canonical(optimizer))}-x{budget:g}-s{seed}"


def check_jobs(
    cfg: TrainConfig, jobs: list[dict], out: Path, resume: bool, adopt: Callable[[str], None] | None = None
) -> list[tuple[dict, TrainConfig, bool]]:
    """Each job ({optimizer, budget, seed, dir}, and optionally workers, parallel, compression, snapshots and
    branch_of / from_step) with its config and whether an earlier run of it is there to keep or continue (with
    ``resume``). Every job's settings, and with ``resume`` every earlier run's, are checked here: a run directory of
    other settings (another optimizer, steps, data contents, ...) is refused, never overwritten nor reported as done.
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
            compression=job.get("compression", cfg.compression),
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
    predicted, total = _announce(cfg, planned, todo, processes, say)
    began = time.monotonic()
    started_at: dict[int, float] = {}
    took: dict[int, float] = {}
    seen: dict[str, str] = {}  # the data's sha256 -> the first run that saw it

    def start(i: int) -> tuple[TrainConfig, dict] | None:
        """What job ``i`` trains, and how (``run``'s keywords); None: it is done already."""
        job, run_cfg, earlier = planned[i]
        if i not in todo:
            say(f"    {job['dir']}: done before, kept")
            return None
        how = _how(job, run_cfg, earlier, out, say)
        started_at[i] = time.monotonic()
        return run_cfg, how

    def finish(i: int, r: dict) -> None:
        seen.setdefault(r["corpus_sha256"], jobs[i]["dir"])
        if len(seen) > 1:  # the data changed during the experiment: stop before more runs train on either
            same_corpus(out, seen)
        took[i] = time.monotonic() - started_at[i]  # from its start to its result, the process's start-up included
        loss = f"val loss {r['final_val_loss']:.4f}" if r["status"] == "ok" else r["status"]
        left = ""
        if predicted and len(took) < len(todo):
            # the first estimate, scaled by how long the runs so far took against what it predicted for them
            pace = sum(took.values()) / sum(predicted[j] for j in took)
            left = f"; about {_minutes(max(0.0, pace * total - (time.monotonic() - began)))} left"
        say(f"[{len(took)}/{len(todo)} done] {_job_name(jobs[i])}: {loss}, {r['wall_time']:.0f} s{left}")

    if processes == 1:
        for i in range(len(jobs)):
            started = start(i)
            if started is not None:
                finish(i, run(started[0], **started[1]))
        return
    _run_parallel(jobs, start, finish, processes)


def _announce(
    cfg: TrainConfig, planned: list[tuple[dict, TrainConfig, bool]], todo: list[int], processes: int, say: Callable
) -> tuple[dict[int, float], float]:
    """Say how many runs and steps there are to train, and about how long they take here; return the seconds
    predicted for each job to train (none on an accelerator, or with several workers) and for all of them."""
    jobs = [job for job, _, _ in planned]
    steps = [run_cfg.steps - job.get("from_step", 0) for job, run_cfg, _ in planned]  # what each job trains
    timing = _timing(cfg) if todo and all(job.get("workers", 1) == 1 for job in jobs) else None
    predicted = {i: timing[0] + steps[i] * timing[1] for i in todo} if timing else {}
    total = _makespan(jobs, predicted, processes) if timing else 0.0
    kept = f" ({len(jobs) - len(todo)} done before)" if len(todo) < len(jobs) else ""
    at_once = f", {processes} at a time" if processes > 1 else ""
    when = f": about {_minutes(total)} on this machine, as busy as it is now" if timing else ""
    say(f"{len(todo)} runs to train{kept}, {sum(steps[i] for i in todo):,} steps in all{at_once}{when}")
    return predicted, total


def _how(job: dict, run_cfg: TrainConfig, earlier: bool, out: Path, say: Callable[[str], None]) -> dict[str, Any]:
    """``run``'s keywords for a job that trains now (continuing an ``earlier`` run, branching from a snapshot),
    said as it starts."""
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
    return how


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
        opt = spec.build(cfg.stages, model)
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


def _start_worker(parent: int) -> None:
    """A pool worker's initializer: the worker ignores Ctrl-C, which was held back (blocked) since it was started,
    so that no worker prints a traceback from wherever Ctrl-C found it (importing torch, say): the parent answers
    Ctrl-C by sending each worker SIGTERM, which a run answers with a checkpoint of its step. And the worker ends
    with its parent (:func:`_end_with_parent`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # one pressed while it started: ignored now
    _end_with_parent(parent)


@contextlib.contextmanager
def _ctrl_c_held_back() -> Iterator[None]:
    """Block SIGINT in this thread while the block runs: a worker process started inside inherits the block (across
    exec too) until :func:`_start_worker` ignores it; here a Ctrl-C pressed meanwhile arrives when the block ends."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _end_with_parent(parent: int) -> None:
    """The worker ends when ``parent``, the process that started it, ends (killed too), so that no orphan keeps
    training, holding the runs' locks and the terminal's output."""
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
    :class:`~snoo.lab.launch.LaunchFailed` line, saying that ``--resume`` continues. Stopped here (SIGTERM, Ctrl-C),
    it sends the workers SIGTERM, which each answers by checkpointing the step it is on, and waits for them."""
    import concurrent.futures as cf
    import multiprocessing
    from concurrent.futures.process import BrokenProcessPool

    waiting = list(range(len(jobs)))
    done: set[str] = set()
    running: dict[cf.Future, int] = {}
    context = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(
        processes, mp_context=context, initializer=_start_worker, initargs=(os.getpid(),)
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
                    with _ctrl_c_held_back():  # submit starts the workers
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
        except BaseException as e:
            for future in running:
                future.cancel()
            if not isinstance(e, Exception):  # SIGTERM or Ctrl-C here: the workers checkpoint their step and stop
                for worker in multiprocessing.active_children():
                    worker.terminate()
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


def load_result(run: Path) -> dict:
    path = run / "result.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the run did not finish (continue it with --resume)")
    problem = _result_problem(path)
    if problem is not None:
        raise ValueError(f"{problem}: continue the experiment with --resume, which finishes the run again")
    return read_json(path)
