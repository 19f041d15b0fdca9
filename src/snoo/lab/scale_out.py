"""Scale-out: at the same total tokens, SNOO and the baseline on one worker against DiLoCo and DDP on N workers, with
the bytes each worker sent. Same directory layout as a compare (``experiment.json``, ``runs/<name>/``, the summary).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

from snoo import spec
from snoo.lab import checkpoint, plots
from snoo.lab.checkpoint import read_metrics, write_json, write_text
from snoo.lab.config import TrainConfig
from snoo.lab.jobs import EXPERIMENT_FILES, check_jobs, load_result, run_jobs, safe_name, same_corpus
from snoo.lab.summary import corpus_info, read_experiment


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
        job["dir"] = (
            f"{i:02d}-{safe_name(job['optimizer'])}-{job['workers']}w{'-' + job['parallel'] if job['parallel'] else ''}"
        )
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
    return summarize_scale_out(out)


def summarize_scale_out(out: Path, experiment: dict | None = None) -> dict:
    """Read a scale-out's runs; write summary.json, summary.md and the loss-against-tokens plot; return the summary."""
    experiment = experiment or read_experiment(out)
    rows, curves, corpora = [], {}, {}
    for job in experiment["jobs"]:
        r = load_result(out / "runs" / job["dir"])
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
        "corpus": corpus_info(out, rows),
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
