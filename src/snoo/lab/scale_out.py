"""Scale-out: at the same total tokens, SNOO and the baseline on one worker against DiLoCo and DDP on N workers, with
the bytes each worker sent and the wall-clock each run would take on a link of 1, 10 and 100 Gbit/s between the
workers (modelled from the measured step time and bytes). Same directory layout as a compare (``experiment.json``,
``runs/<name>/``, the summary).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from snoo import spec
from snoo.lab import checkpoint, plots
from snoo.lab.checkpoint import read_metrics, write_json, write_text
from snoo.lab.config import TrainConfig
from snoo.lab.jobs import EXPERIMENT_FILES, check_jobs, load_result, run_jobs, safe_name, same_corpus
from snoo.lab.summary import corpus_info, read_experiment

#: ``bandwidth=True``: the DiLoCo setups run beside plain DiLoCo (fp32, one fragment, no overlap), as (settings of
#: the SPEC's outer stage, ``TrainConfig.compression``): bf16, int8 and int4 pseudo-gradients without and with
#: error feedback, then streaming with F fragments and tau overlapped steps, (F, tau) in {(4, 0), (1, 1), (4, 1)}
BANDWIDTH_SETUPS: tuple[tuple[dict[str, Any], str], ...] = (
    *(
        (feedback, compression)
        for compression in ("bf16", "int8", "int4")
        for feedback in ({"error_feedback": False}, {"error_feedback": True})
    ),
    ({"fragments": 4}, "none"),
    ({"overlap_steps": 1}, "none"),
    ({"fragments": 4, "overlap_steps": 1}, "none"),
)
#: the links between workers the wall-clock is modelled for, in Gbit/s
GBITS = (1, 10, 100)


def run_scale_out(
    cfg: TrainConfig,
    *,
    snoo_spec: str = "snoo-adamw",
    baseline: str = "adamw",
    worker_counts: Sequence[int] = (2, 4),
    bandwidth: bool = False,
    resume: bool = False,
    say: Callable[[str], None] = print,
) -> dict:
    """The same total tokens five ways and more: the baseline and SNOO on one worker for ``cfg.steps`` steps; for each
    N of ``worker_counts``, DiLoCo (``snoo_spec`` averaged over N workers, each on its own batches) and DDP (the
    baseline on an N-times larger batch) for steps / N steps; with ``bandwidth``, then for each N the DiLoCo setups
    of ``BANDWIDTH_SETUPS`` too (after the others, so that adding them keeps the earlier runs' directories). Every
    worker's batch is ``cfg``'s."""
    for n in worker_counts:
        if n < 2:
            raise ValueError(f"worker counts are 2 or more, got {n} (the 1-worker runs are always there)")
        if cfg.steps % n:
            raise ValueError(f"--steps {cfg.steps} is not a multiple of {n}: the runs would not see the same tokens")
    snoo_spec, baseline = spec.canonical(snoo_spec), spec.canonical(baseline)
    fragments = max(settings.get("fragments", 1) for settings, _ in BANDWIDTH_SETUPS)
    if bandwidth and spec.parse(snoo_spec)[0].params.get("k", 0) % fragments:
        raise ValueError(
            f"the bandwidth setups stream {fragments} fragments, one every K/{fragments} steps: the outer k of "
            f"{snoo_spec!r} must be a multiple of {fragments}"
        )
    jobs = [
        dict(optimizer=baseline, workers=1, parallel=None),
        dict(optimizer=snoo_spec, workers=1, parallel=None),
    ]
    for n in worker_counts:
        jobs += [
            dict(optimizer=snoo_spec, workers=n, parallel="diloco"),
            dict(optimizer=baseline, workers=n, parallel="ddp"),
        ]
    if bandwidth:
        outer = spec.parse(snoo_spec)[0].name
        for n in worker_counts:
            jobs += [
                dict(
                    optimizer=spec.override(snoo_spec, {f"{outer}.{k}": v for k, v in settings.items()}),
                    workers=n,
                    parallel="diloco",
                    compression=compression,
                )
                for settings, compression in BANDWIDTH_SETUPS
            ]
    for i, job in enumerate(jobs):
        job.update(budget=1 / job["workers"], seed=cfg.seed)
        how = [name for name in (job["parallel"], job.get("compression")) if name not in (None, "none")]
        job["dir"] = "-".join([f"{i:02d}", safe_name(job["optimizer"]), f"{job['workers']}w", *how])
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
                "setup": setup_name(job),
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
    # the compute of a worker's step, one number for every row, so that the modelled times differ by what is sent: the
    # faster 1-worker run's (they send nothing; on a shared machine the slower one measured more of the others' load)
    step = min(row["wall_time"] / row["steps_per_worker"] for row in rows if row["workers"] == 1)
    for job, row in zip(experiment["jobs"], rows):
        row["step_seconds"] = step
        exchanges, overlap = _exchanges(job, row["steps_per_worker"])
        sent = row["bytes_per_step"] * row["steps_per_worker"]
        row["modelled_seconds"] = {
            str(gbit): modelled_seconds(row["steps_per_worker"], row["step_seconds"], exchanges, sent, overlap, gbit)
            for gbit in GBITS
        }
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
    plots.wall_clock_plot(out, summary, curves, lambda row, step, gbit: _modelled_at(experiment, row, step, gbit))
    return summary


def setup_name(job: dict) -> str:
    """A job's setup in words: ``1 worker``, ``DDP``, or ``DiLoCo`` with its compression (``+ EF``: error feedback)
    and its streaming (``F`` fragments, ``tau`` overlapped steps)."""
    if not job["parallel"]:
        return "1 worker"
    if job["parallel"] == "ddp":
        return "DDP"
    outer, compression = spec.parse(job["optimizer"])[0].params, job.get("compression", "none")
    name = "DiLoCo" if compression == "none" else f"DiLoCo {compression}"
    if compression != "none" and outer.get("error_feedback", True):
        name += " + EF"
    if outer.get("fragments", 1) > 1 or outer.get("overlap_steps", 0):
        name += f", F={outer.get('fragments', 1)} tau={outer.get('overlap_steps', 0)}"
    return name


def _exchanges(job: dict, steps: int) -> tuple[int, int]:
    """How many exchanges a run of ``job`` starts in its first ``steps`` steps, and how many inner steps after its
    start each is applied: DDP one every step, applied at once; DiLoCo one every K / F steps (fragment f after the
    steps t with (t - f K / F) mod K = 0), applied ``overlap_steps`` later; one worker none."""
    if not job["parallel"]:
        return 0, 0
    if job["parallel"] == "ddp":
        return steps, 0
    outer = spec.parse(job["optimizer"])[0].params
    return steps // (outer["k"] // outer.get("fragments", 1)), outer.get("overlap_steps", 0)


def modelled_seconds(steps: int, step_seconds: float, exchanges: int, sent: float, overlap: int, gbit: float) -> float:
    r"""The wall-clock of ``steps`` steps of ``step_seconds`` compute each, on a link of ``gbit`` Gbit/s between the
    workers, when each worker sends ``sent`` bytes in ``exchanges`` equal exchanges, each applied ``overlap`` inner
    steps after it starts:

    .. math:: T = S\,c + E \max\left(0, \frac{8\,b / E}{B} - \tau c\right)

    an exchange of :math:`b / E` bytes takes :math:`8 b / (E B)` seconds, of which the :math:`\tau` inner steps
    computed meanwhile hide up to :math:`\tau c`. Latency and the collectives' own algorithm are left out (with 2
    workers an all-reduce and an all-gather move about the bytes handed to them)."""
    if not exchanges:
        return steps * step_seconds
    transfer = 8 * sent / exchanges / (gbit * 1e9)
    return steps * step_seconds + exchanges * max(0.0, transfer - overlap * step_seconds)


def _modelled_at(experiment: dict, row: dict, step: int, gbit: float) -> float:
    """``modelled_seconds`` of a run's first ``step`` steps (its bytes sent at its average rate)."""
    job = next(job for job in experiment["jobs"] if job["dir"] == row["dir"])
    exchanges, overlap = _exchanges(job, step)
    return modelled_seconds(step, row["step_seconds"], exchanges, row["bytes_per_step"] * step, overlap, gbit)


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
        "and worker | bytes per token | wall time | "
        + " | ".join(f"modelled at {gbit} Gbit/s" for gbit in GBITS)
        + " |",
        "|---|---|---|---|---|---|---|---|---|" + "---|" * len(GBITS),
    ]
    for row in summary["runs"]:
        loss = f"{row['final_val_loss']:.4f}" if row["status"] == "ok" else row["status"]
        modelled = " | ".join(f"{row['modelled_seconds'][str(gbit)]:.3f} s" for gbit in GBITS)
        lines.append(
            f"| {row['setup']} | {row['optimizer']} | {row['workers']} | {row['steps_per_worker']:,} "
            f"| {row['tokens']:,} | {loss} | {row['bytes_per_step']:,.0f} | {row['bytes_per_token']:.2f} "
            f"| {row['wall_time']:.1f} s | {modelled} |"
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
        "Bytes: measured, what each worker handed to the collectives (DDP: the gradients, every step; DiLoCo: the "
        "pseudo-gradients, or their bf16/int8/int4 codes and scales, and one flag per tensor, every K steps, a "
        "fragment every K/F steps), averaged over the run's steps. Bytes per token: "
        "all workers' bytes over all tokens. Wall time: rank 0's training time (torchrun's start-up and the "
        "checkpoints not included); the workers share the machine's cores. Modelled at B Gbit/s: the steps per "
        "worker times the compute of a step (the faster 1-worker run's wall time over its steps, evaluations "
        "included), plus for each exchange (DDP: every step; DiLoCo: every K/F steps) its bytes over B, "
        "less the compute of the tau inner steps it overlaps (the SPEC's overlap_steps), if positive; latency left "
        "out." + (" " + "; ".join(ratios) + "." if ratios else ""),
    ]
    return "\n".join(lines)
