"""Fair comparisons: same init, data order and eval batches for every optimizer; a baseline at several budgets.

An experiment directory holds ``experiment.json`` (what was asked), ``runs/<name>/`` (one training run each, see
``train.py``), and what ``summarize`` derives from them: ``summary.json``, ``summary.md`` and the plots. ``snoo
report DIR`` calls ``summarize`` again, so tables and plots can be redrawn from a finished experiment.

Compute factor: the baseline runs at several budgets (1x, 1.25x, ... its steps, each with its own full schedule);
its final loss is fitted as ``a + b * log(steps)``; an optimizer that reaches loss L in S steps saves
``steps_baseline(L) / S``, where ``steps_baseline(L) = exp((L - a) / b)``. Outside the budgets it is a bound.

Scale-out (``run_scale_out``): at the same total tokens, SNOO and the baseline on one worker against DiLoCo and DDP on
N workers, with the bytes each worker sent; same directory layout.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from snoo import spec
from snoo.lab import checkpoint, plots
from snoo.lab.checkpoint import read_json, read_metrics, write_json
from snoo.lab.config import TrainConfig, differences, identity, validate
from snoo.lab.data import fingerprint
from snoo.lab.launch import run
from snoo.lab.train import Diverged

BUDGETS = (1.0, 1.25, 1.5, 2.0, 2.5)
TUNE_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)  # --tune-baseline tries the base lr times these


# ---------------------------------------------------------------------------------------------- the math


def fit_log_steps(steps: Sequence[float], losses: Sequence[float]) -> tuple[float, float]:
    """Least squares ``loss = a + b * log(steps)``; returns (a, b)."""
    xs = [math.log(s) for s in steps]
    mx, my = statistics.fmean(xs), statistics.fmean(losses)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, losses)) / sxx
    return my - b * mx, b


def compute_factor(base_steps: Sequence[int], base_losses: Sequence[float], steps: int, loss: float):
    """How many baseline steps match ``loss``, divided by ``steps``: a float, or a bound such as ``">2.5"``.

    Bounds: beyond the largest budget the fit is not trusted (">"), nor below the smallest ("<"). ``None`` when the
    baseline does not improve with more steps (nothing to measure against) or there are fewer than two budgets.
    """
    if len(set(base_steps)) < 2:
        return None
    a, b = fit_log_steps(base_steps, base_losses)
    if b >= 0:
        return None
    matched = math.exp((loss - a) / b)
    lo, hi = min(base_steps), max(base_steps)
    if matched > hi:
        return f">{hi / steps:.3g}"
    if matched < lo:
        return f"<{lo / steps:.3g}"
    return matched / steps


def steps_to_target(metrics: list[dict], target: float) -> int | None:
    """First evaluated step whose val loss is at or below ``target`` (None: never)."""
    return next((m["step"] for m in metrics if "val_loss" in m and m["val_loss"] <= target), None)


# ---------------------------------------------------------------------------------------------- running


def budget_steps(steps: int, budget: float) -> int:
    return max(1, round(steps * budget))


def _dirname(index: int, optimizer: str, budget: float, seed: int) -> str:
    safe = re.sub(r"[^a-z0-9.=+_-]+", "_", spec.canonical(optimizer))
    return f"{index:02d}-{safe}-x{budget:g}-s{seed}"


def check_jobs(cfg: TrainConfig, jobs: list[dict], out: Path, resume: bool) -> list[tuple[dict, TrainConfig, bool]]:
    """Each job ({optimizer, budget, seed, dir}, and optionally workers and parallel) with its config and whether an
    earlier run of it is there to keep or continue (with ``resume``). Every job's settings, and with ``resume``
    every earlier run's, are checked here: a run directory of other settings (another optimizer, steps, data
    contents, ...) is refused, never overwritten nor reported as done."""
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
    return [
        (job, run_cfg, resume and _same_config(run_cfg, out / job["dir"] / "config.json", corpus))
        for job, run_cfg in zip(jobs, configs)
    ]


def run_jobs(cfg: TrainConfig, jobs: list[dict], out: Path, resume: bool, say: Callable[[str], None]) -> None:
    """Train every job that has no finished result yet (with ``resume``), once all of them passed ``check_jobs``."""
    planned = check_jobs(cfg, jobs, out, resume)
    for i, (job, run_cfg, earlier) in enumerate(planned, 1):
        if earlier and (out / job["dir"] / "result.json").exists():
            say(f"[{i}/{len(jobs)}] {job['dir']}: done before, kept")
            continue
        on = f" on {run_cfg.workers} workers ({run_cfg.parallel})" if run_cfg.workers > 1 else ""
        say(
            f"[{i}/{len(jobs)}] {spec.canonical(job['optimizer'])} x{job['budget']:g} seed {job['seed']}{on}: "
            f"{run_cfg.steps} steps"
        )
        r = run(run_cfg, resume=earlier)
        loss = f"{r['final_val_loss']:.4f}" if r["status"] == "ok" else r["status"]
        say(f"    val loss {loss}, {r['wall_time']:.1f}s")


def _same_config(cfg: TrainConfig, path: Path, corpus_sha256: str) -> bool:
    """Whether the run in ``path``'s directory was started with ``cfg`` on data of these contents (wherever its
    directory and its data were then, with or without a bar; a field that did not exist then had its default).
    False: nothing is there yet. A run of other settings is a ``ValueError``: it is neither kept nor overwritten."""
    if not path.exists():
        if any((path.parent / name).exists() for name in checkpoint.RUN_FILES):
            raise ValueError(f"{path} is missing beside the files of an earlier run: start afresh with a new --out")
        return False
    saved = read_json(path)
    wanted = identity(cfg, corpus_sha256)
    recorded = saved.get("run")
    if not isinstance(recorded, dict):  # written before runs recorded their identity
        config = saved.get("config", {})
        recorded = {**config, "corpus": saved.get("corpus", {}).get("sha256")}
        recorded["optimizer"] = identity(dataclasses.replace(cfg, optimizer=config.get("optimizer", "")), "")[
            "optimizer"
        ]
    changed = differences(recorded, wanted)
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


def run_experiment(
    kind: str,
    cfg: TrainConfig,
    optimizers: list[str],
    *,
    seeds: int = 1,
    budgets: Sequence[float] = BUDGETS,
    grid: dict[str, dict] | None = None,
    tune_baseline: bool = False,
    resume: bool = False,
    say: Callable[[str], None] = print,
) -> dict:
    """Train the baseline (``optimizers[0]``) at every budget and the others at 1x, for every seed; summarize."""
    if seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {seeds}")
    if not budgets or min(budgets) <= 0:
        raise ValueError("budgets must be positive multiples of the steps")
    optimizers = list(dict.fromkeys(spec.canonical(o) for o in optimizers))  # each once, the baseline first
    out = Path(cfg.out)
    with checkpoint.claimed(out, fresh=not resume, earlier=EXPERIMENT_FILES):
        return _run_experiment(kind, cfg, optimizers, out, seeds, budgets, grid, tune_baseline, resume, say)


#: what an experiment leaves in its directory; a fresh experiment refuses a directory that holds one
EXPERIMENT_FILES = ("experiment.json", "runs", "tune", "summary.json")


def _run_experiment(
    kind: str,
    cfg: TrainConfig,
    optimizers: list[str],
    out: Path,
    seeds: int,
    budgets: Sequence[float],
    grid: dict[str, dict] | None,
    tune_baseline: bool,
    resume: bool,
    say: Callable[[str], None],
) -> dict:
    experiment: dict[str, Any] = {
        "kind": kind,
        "baseline": optimizers[0],
        "optimizers": optimizers,
        "steps": cfg.steps,
        "seeds": [cfg.seed + s for s in range(seeds)],
        "budgets": sorted(set(budgets) | {1.0}),
        "grid": grid or {},
        "config": dataclasses.asdict(cfg),
    }
    if tune_baseline:
        lr = _tune(cfg, optimizers[0], out, resume, say)
        base_name = spec.parse(optimizers[0])[-1].name
        renamed = {o: spec.override(o, {f"{base_name}.lr": lr}) for o in optimizers}
        experiment.update(
            tuned_lr=lr,
            baseline=renamed[optimizers[0]],
            optimizers=list(dict.fromkeys(renamed.values())),
            grid={renamed[o]: v for o, v in (grid or {}).items()},
        )
    jobs: list[dict] = []
    for seed in experiment["seeds"]:
        for budget in experiment["budgets"]:
            jobs.append(dict(optimizer=experiment["baseline"], budget=budget, seed=seed))
        for o in experiment["optimizers"][1:]:  # the baseline already ran at 1x
            jobs.append(dict(optimizer=o, budget=1.0, seed=seed))
    for i, job in enumerate(jobs):
        job["dir"] = _dirname(i, job["optimizer"], job["budget"], job["seed"])
    experiment["jobs"] = jobs
    check_jobs(cfg, jobs, out / "runs", resume)  # before experiment.json is replaced
    write_json(experiment, out / "experiment.json")
    run_jobs(cfg, jobs, out / "runs", resume, say)
    return summarize(out)


# ---------------------------------------------------------------------------------------------- summarizing


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
    steps, baseline = experiment["steps"], experiment["baseline"]
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

    def finals(optimizer: str, budget: float = 1.0) -> list[float]:
        return [
            r["final_val_loss"] if r["status"] == "ok" else math.inf
            for r in runs
            if r["optimizer"] == optimizer and r["budget"] == budget
        ]

    base_steps = [budget_steps(steps, b) for b in experiment["budgets"]]
    budget_losses = [statistics.fmean(finals(baseline, b)) for b in experiment["budgets"]]
    fit_ok = all(math.isfinite(x) for x in budget_losses) and len(base_steps) > 1
    target = budget_losses[experiment["budgets"].index(1.0)]
    table, compute, to_target = [], {}, {}
    for o in experiment["optimizers"]:
        losses = finals(o)
        finite = all(math.isfinite(x) for x in losses)
        mean, std = _mean_std(losses) if finite else (math.inf, 0.0)
        norms = [r["weight_norm"] for r in runs if r["optimizer"] == o and r["budget"] == 1.0 and r["weight_norm"]]
        if o == baseline:
            compute[o] = 1.0  # by definition; the fit is only the ruler for the others
        else:
            compute[o] = compute_factor(base_steps, budget_losses, steps, mean) if fit_ok and finite else None
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
    summary = {
        "kind": experiment["kind"],
        "baseline": baseline,
        "steps": steps,
        "seeds": experiment["seeds"],
        "runs": runs,
        "table": table,
        "baseline_budgets": [
            {"budget": b, "steps": s, "final_val_loss": x}
            for b, s, x in zip(experiment["budgets"], base_steps, budget_losses)
        ],
        "fit": dict(zip(("a", "b"), fit_log_steps(base_steps, budget_losses))) if fit_ok else None,
        "compute_factor": compute,
        "steps_to_target": {"target": target, "speedup": to_target},
        "corpus": _corpus_info(out, runs),
    }
    if experiment.get("tuned_lr") is not None:
        summary["tuned_lr"] = experiment["tuned_lr"]
    if experiment["grid"]:
        summary["grid"] = experiment["grid"]
    write_json(summary, out / "summary.json")
    (out / "summary.md").write_text(markdown(summary, experiment) + "\n")
    plots.draw(out, summary, curves)
    return summary


def _corpus_info(out: Path, runs: list[dict]) -> dict:
    config = json.loads((out / "runs" / runs[0]["dir"] / "config.json").read_text())
    return {**config["corpus"], "params": config["params"], "device": config["device"]}


def _factor(value: Any) -> str:
    if value is None:
        return "n/a"
    return f"{value}x" if isinstance(value, str) else f"{value:.2f}x"


def markdown(summary: dict, experiment: dict) -> str:
    """The summary as a markdown table, with the facts needed to reproduce it."""
    c = summary["corpus"]
    cfg = experiment["config"]
    n = len(summary["seeds"])
    lines = [
        f"{experiment['kind']}: {cfg['n_layer']} layers x {cfg['n_embd']} ({c['params']:,} params, {cfg['flavour']}), "
        f"{summary['steps']} steps of {cfg['batch_size'] * cfg['block_size'] * cfg['grad_accum']:,} tokens, "
        f"{cfg['schedule']} schedule; corpus {c['source']} ({c['tokenizer']}, {c['train_tokens']:,} train tokens, "
        f"sha256 {c['sha256']}), python {c['python']}, {c['device']}; {n} seed{'s' * (n > 1)}",
        "",
        f"| optimizer | final val loss (mean ± std, {n} seed{'s' * (n > 1)}) | weight norm | compute factor "
        f"| speed-up to baseline's loss (same run) |",
        "|---|---|---|---|---|",
    ]
    for row in summary["table"]:
        loss = f"{row['final_val_loss']:.4f} ± {row['std']:.4f}" if math.isfinite(row["final_val_loss"]) else "diverged"
        norm = f"{row['weight_norm']:.2f}" if row["weight_norm"] else "-"
        speed = summary["steps_to_target"]["speedup"][row["optimizer"]]
        is_base = row["optimizer"] == summary["baseline"]
        lines.append(
            f"| {row['optimizer']}{' (baseline)' * is_base} | {loss} | {norm} "
            f"| {'1.00x' if is_base else _factor(summary['compute_factor'][row['optimizer']])} "
            f"| {'1.00x' if is_base else _factor(speed)} |"
        )
    lines += [
        "",
        "baseline budgets: "
        + ", ".join(
            f"{b['budget']:g}x ({b['steps']} steps) {b['final_val_loss']:.4f}" for b in summary["baseline_budgets"]
        ),
    ]
    if summary["fit"]:
        lines.append(f"fit: loss = {summary['fit']['a']:.4f} {summary['fit']['b']:+.4f} * ln(steps)")
    lines.append(
        "compute factor: baseline steps that would reach the same final loss (from the fit), divided by "
        "the steps taken; '>' beyond the largest budget. Speed-up to baseline's loss: baseline steps / "
        "first evaluated step at the baseline's final loss, within one run of the same length."
    )
    if "tuned_lr" in summary:
        lines.append(f"baseline lr tuned by --tune-baseline: {summary['tuned_lr']:.3g}")
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
