"""A compare's summary: the table, the compute factor read off the baseline's ladder, the intervals over seeds, the
plain-words verdict, and the plots. ``summary.json``, ``summary.md`` and the plots are derived from the runs alone,
so ``snoo report DIR`` can draw them again (``report.py``).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from snoo.lab import checkpoint, plots, stats
from snoo.lab.checkpoint import read_json, read_metrics, write_json, write_text
from snoo.lab.jobs import load_result, same_corpus
from snoo.lab.ladder import budget_steps
from snoo.lab.stats import compute_factor, fit_log_steps
from snoo.lab.tuning import AT_EDGE, TUNE_SEED_OFFSET


def read_experiment(out: Path) -> dict:
    """``experiment.json`` of an experiment directory, which the summary and the plots may be written into (a
    directory holding a symbolic link is refused)."""
    path = out / "experiment.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: not a directory written by `snoo compare`, `snoo sweep` or `snoo scale-out`"
        )
    experiment = read_json(path)
    checkpoint.refuse_links(out)  # the summary and the plots are written there
    return experiment


def summarize_compare(out: Path | str, experiment: dict | None = None) -> dict:
    """Read a compare's (or a sweep's) runs; write summary.json, summary.md and the plots; return the summary."""
    out = Path(out)
    experiment = experiment or read_experiment(out)
    runs, curves = _read_runs(out, experiment)
    summary = {
        "kind": experiment["kind"],
        "baseline": experiment["baseline"],
        "steps": experiment["steps"],
        "seeds": experiment["seeds"],
        "runs": runs,
        **_measure(experiment, runs),
        "corpus": corpus_info(out, runs),
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


def _read_runs(out: Path, experiment: dict) -> tuple[list[dict], dict[str, list[dict]]]:
    """Each job's result as a row of the summary, and its metrics by directory; runs on different data refused."""
    runs, curves, corpora = [], {}, {}
    for job in experiment["jobs"]:
        r = load_result(out / "runs" / job["dir"])
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
    return runs, curves


def _measure(experiment: dict, runs: list[dict]) -> dict[str, Any]:
    """The table, the baseline's ladder with its fit, and each contender's compute factor and loss difference."""
    steps, baseline, seeds = experiment["steps"], experiment["baseline"], experiment["seeds"]
    budgets = experiment["budgets"]

    def final(optimizer: str, seed: int, budget: float = 1.0) -> float:
        r = next(r for r in runs if r["optimizer"] == optimizer and r["seed"] == seed and r["budget"] == budget)
        return r["final_val_loss"] if r["status"] == "ok" else math.inf

    base_steps = [budget_steps(steps, b) for b in budgets]
    ladder = {s: [final(baseline, s, b) for b in budgets] for s in seeds}
    at_1x = [ladder[s][budgets.index(1.0)] for s in seeds]
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
            if finite and all(math.isfinite(x) for x in at_1x):
                differences[o] = stats.difference_interval(losses, at_1x)
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
    return {
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
    }


def _one_factor(per_seed: list[float | str | None], interval: dict) -> float | str | None:
    """The compute factor of an optimizer: the geometric mean of its seeds' factors (``interval["mean"]``); where a
    seed's factor is a bound (beyond the ladder), the bound that every seed shares, else None."""
    if interval["mean"] is not None:
        return interval["mean"]
    return per_seed[0] if isinstance(per_seed[0], str) and len(set(per_seed)) == 1 else None


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def corpus_info(out: Path, runs: list[dict]) -> dict:
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
            f"tuned {t['from']} -> {tuned}: best of {len(t['trials'])} trials"
            + (f" ({len(t['widened'])} beyond the edge of the lrs tried first)" if t.get("widened") else "")
            + " on "
            + _seeds_text(t.get("seeds", [experiment["seeds"][0] + TUNE_SEED_OFFSET]))
            + f" ({t['steps']:,} steps, {t['wall_time']:.0f} s)"
            + (f"; {AT_EDGE}" if t.get("at_edge") else "")
        )
    return lines
