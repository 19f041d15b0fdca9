"""The scaling study: where the saving appears, measured two ways across model sizes.

``run_scaling`` repeats a ``compare`` at each (model size, tokens per parameter) point, each with its own ladder
and, with ``tune_trials``, its own tuning of every contender on seeds it does not report. ``summarize_scaling`` reads
the points and measures each contender against the baseline

1. **with the ladder**, at every point: the compute factor of ``stats.factor_interval``, its 95% interval over seeds,
   the verdict, and the smallest factor the seeds' spread could have detected (80% power);
2. **the paper's way**, across sizes at each tokens-per-parameter ratio: per optimizer, the final loss at 1x
   against the training FLOPs, ``L(C) = E + A * C^(-alpha)`` (``stats.fit_frontier``), and the compute ratio
   ``C_baseline(L) / C_contender(L)`` at the loss the contender's frontier reaches at the largest measured compute,
   with a bootstrap interval over seeds (the seeds resampled together at every size, the frontiers refitted) and,
   from five sizes on, the factor with each smaller size left out in turn (the form of the curve, which the
   bootstrap does not vary).

Training FLOPs are counted from the model by ``torch.utils.flop_counter`` (:func:`flops_per_token`): per token,
``6 N + 14 L T C`` for ``N`` Linear weights (the output head included, the embedding lookup not) and attention over
``T`` positions of width ``C`` in ``L`` layers, as the kernels compute it.

No trend is extrapolated beyond the measured sizes: the fitted slope of log-factor against log-parameters is given
with its interval, as a description of the measured range.
"""

from __future__ import annotations

import dataclasses
import math
import shlex
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from snoo import spec
from snoo.lab import checkpoint, plots, stats
from snoo.lab.checkpoint import read_json, write_json
from snoo.lab.config import TrainConfig, model_config, validate
from snoo.lab.data import Corpus, load_corpus
from snoo.lab.experiments import check_experiment, run_experiment
from snoo.lab.jobs import same_corpus
from snoo.lab.ladder import BUDGETS

#: the fields that scaling sets for each point (from its size and tokens per parameter), whatever the config says
SCALING_DERIVED = ("steps", "eval_every", "ckpt_every", "log_every")


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


def flops_per_token(cfg: TrainConfig, vocab_size: int) -> float:
    """Training FLOPs per token of ``cfg``'s model, counted by ``torch.utils.flop_counter`` over one step
    (:func:`snoo.lab.model.training_flops_per_token`: ``6 N + 14 L T C``)."""
    import torch

    from snoo.lab.model import GPT, training_flops_per_token

    with torch.random.fork_rng():  # only the shapes count: the caller's random state is left as it was
        return training_flops_per_token(GPT(model_config(cfg, vocab_size)))


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
    tune_seeds: int = 2,
    tune_widen: int = 0,
    resume: bool = False,
    processes: int = 1,
    say: Callable[[str], None] = print,
) -> dict:
    """One ``compare`` per (size, tokens per parameter) into ``OUT/LxW-rR``, each with its own ladder and (with
    ``tune_trials``) every contender tuned for that size and length on ``tune_seeds`` unreported seeds (and up to
    ``tune_widen`` trials beyond the edge of the lrs tried where a best sits on it); then the table, the frontier fit
    and the plots (:func:`summarize_scaling`)."""
    if not sizes or not tokens_per_param or min(tokens_per_param) <= 0:
        raise ValueError("scaling needs at least one size and positive tokens per parameter")
    corpus = load_corpus(cfg.data, cfg.tokenizer, cfg.bpe_vocab)
    vocab = corpus.vocab_size
    out = Path(cfg.out)
    points = _points(cfg, corpus, sizes, tokens_per_param, budgets, say)
    # what every point's compare is given (checked for each point before anything is written)
    settings: dict[str, Any] = dict(
        seeds=seeds,
        budgets=budgets,
        ladder=ladder,
        tune_trials=tune_trials,
        tune_seeds=tune_seeds,
        tune_widen=tune_widen,
        processes=processes,
    )
    for *_, point in points:
        check_experiment(point, **settings)
    experiment = {
        "kind": "scaling",
        "optimizers": [spec.canonical(o) for o in optimizers],
        "points": [
            {
                "name": n,
                "n_layer": lay,
                "n_embd": w,
                "tokens_per_param": r,
                "params": p,
                "steps": c.steps,
                "flops_per_token": flops_per_token(c, vocab),
            }
            for n, lay, w, r, p, c in points
        ],
        "seeds": [cfg.seed + s for s in range(seeds)],
        "ladder": ladder,
        "budgets": sorted(set(budgets) | {1.0}),
        "tune_trials": tune_trials,
        "tune_seeds": tune_seeds if tune_trials else 0,
        "tune_widen": tune_widen if tune_trials else 0,
        "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in SCALING_DERIVED},  # each point's own
    }
    with checkpoint.claimed(out, fresh=not resume, earlier=("experiment.json",)):
        write_json(experiment, out / "experiment.json")
        for i, (name, *_, params, point) in enumerate(points, 1):
            say(f"=== scaling point {i}/{len(points)}: {name}, {params:,} params, {point.steps} steps")
            run_experiment("compare", point, optimizers, resume=resume, say=say, **settings)
        return summarize_scaling(out, experiment)


def _points(
    cfg: TrainConfig,
    corpus: Corpus,
    sizes: Sequence[tuple[int, int]],
    tokens_per_param: Sequence[float],
    budgets: Sequence[float],
    say: Callable[[str], None],
) -> list[tuple[str, int, int, float, int, TrainConfig]]:
    """Each point's (name, layers, width, tokens per parameter, parameters, config): its steps from its parameters,
    its evaluations, checkpoints and logs from its steps, its directory under ``cfg.out``."""
    vocab, out = corpus.vocab_size, Path(cfg.out)
    points = []
    for layers, width in sizes:
        for ratio in tokens_per_param:
            name = f"{layers}x{width}-r{ratio:g}"
            if any(name == earlier[0] for earlier in points):
                raise ValueError(
                    f"the point {name} is listed twice (--sizes or --tokens-per-param repeats a value): list each once"
                )
            point = dataclasses.replace(cfg, n_layer=layers, n_embd=width, n_head=width // 32)
            params = model_params(point, vocab)
            tokens_per_step = point.batch_size * point.block_size * point.grad_accum
            steps = max(1, round(ratio * params / tokens_per_step))
            epochs = max(budgets) * steps * tokens_per_step / corpus.info["train_tokens"]
            if epochs > 1:
                say(
                    f"note: {layers}x{width} at {ratio:g} tokens per parameter: its {max(budgets):g}x rung reads "
                    f"{epochs:.2f} epochs of the corpus; the table flags it"
                )
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
    return points


# ---------------------------------------------------------------------------------------------- summarizing


def run_command(config: dict) -> str:
    """The ``snoo train`` command that trains the run a ``config.json`` describes from scratch, to the same final
    loss (a WSD branch equals the run of its length from scratch, bit for bit: tests/test_lab_evidence.py)."""
    c = config["config"]
    defaults = dataclasses.asdict(TrainConfig())
    skip = {"optimizer", "data", "out", "progress", "tensorboard", "wandb"}
    sets = [f"{k}={v}" for k, v in c.items() if k not in skip and v != defaults.get(k) and v is not None]
    parts = ["snoo", "train", "--optimizer", c["optimizer"]]
    if c.get("data"):
        parts += ["--data", c["data"]]
    for s in sets:
        parts += ["--set", s]
    return shlex.join(parts)


def _point_rows(out: Path, point: dict) -> list[dict]:
    """One row per contender at one point: the ladder's factor, the losses per seed, the tuned settings."""
    path = out / point["name"] / "summary.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the point did not finish (continue it with --resume)")
    s = read_json(path)
    base = s["baseline"]
    runs = {(r["optimizer"], r["seed"], r["budget"]): r for r in s["runs"]}
    regime = s["regime"]
    tokens = regime["tokens"]
    flops = point["flops_per_token"] * tokens
    rows = []
    for row in s["table"]:
        o = row["optimizer"]
        if o == base:
            continue
        iv = s["compute_factor_interval"][o]
        losses = [runs[(o, seed, 1.0)]["final_val_loss"] for seed in s["seeds"]]
        base_losses = [runs[(base, seed, 1.0)]["final_val_loss"] for seed in s["seeds"]]
        rows.append(
            {
                "point": point["name"],
                "optimizer": o,
                "baseline": base,
                "contender": s["tuning"][o]["from"] if "tuning" in s else o,
                "params": regime["params"],
                "tokens": tokens,
                "tokens_per_param": regime["tokens_per_param"],
                "ratio": point["tokens_per_param"],  # as asked; the measured one differs by the steps' rounding
                "flops": flops,
                "epochs_1x": regime.get("epochs"),
                "epochs_largest_rung": (regime["epochs"] or 0) * max(b["budget"] for b in s["baseline_budgets"]),
                "seeds": s["seeds"],
                "final_val_loss": losses,
                "baseline_val_loss": base_losses,
                # the geometric mean of the seeds' factors: the one number that has an interval
                "compute_factor": iv.get("mean"),
                "interval": {k: iv.get(k) for k in ("mean", "low", "high", "detectable", "verdict", "censored")},
            }
        )
    return rows


def _runs(out: Path, point: dict) -> list[dict]:
    """Every run of a point with its final loss and the command that trains it again."""
    s = read_json(out / point["name"] / "summary.json")
    records = []
    for r in s["runs"]:
        config = read_json(out / point["name"] / "runs" / r["dir"] / "config.json")
        records.append(
            {
                "point": point["name"],
                "optimizer": r["optimizer"],
                "seed": r["seed"],
                "budget": r["budget"],
                "final_val_loss": r["final_val_loss"],
                "precision": "bf16 autocast" if config.get("bf16") else "fp32",  # as the run recorded it
                "command": run_command(config),
            }
        )
    return records


def _frontiers(rows: list[dict]) -> dict[str, Any]:
    """The paper's factor at each tokens-per-parameter ratio with four sizes or more: both frontiers fitted to the
    mean final loss over seeds at each size, the ratio at the contender's loss at the largest compute, and its
    bootstrap interval over seeds. From five sizes on, also the factor with each smaller size left out in turn
    (the largest stays, so the question is the same): a check on the curve's form, which resampling the seeds does
    not vary."""
    out: dict[str, Any] = {}
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["contender"], r["ratio"]), []).append(r)
    for (contender, ratio), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["flops"])
        if len({r["params"] for r in rs}) < 4:
            continue
        n = min(len(r["seeds"]) for r in rs)

        def fit(idx: Sequence[int], sizes: list[dict] = rs) -> tuple[dict, dict, float, float]:
            """Both frontiers over ``sizes`` from the seeds ``idx``, the contender's loss at the largest compute,
            and the factor there."""
            flops = [r["flops"] for r in sizes]
            base = [statistics.fmean(r["baseline_val_loss"][i] for i in idx) for r in sizes]
            cont = [statistics.fmean(r["final_val_loss"][i] for i in idx) for r in sizes]
            b, c = stats.fit_frontier(flops, base), stats.fit_frontier(flops, cont)
            loss = c["e"] + c["a"] * (max(flops) / c["c0"]) ** -c["alpha"]
            return b, c, loss, stats.frontier_ratio(b, c, loss)

        b, c, loss, factor = fit(range(n))
        out[f"{contender} @ {ratio:g} tokens/param"] = {
            "contender": contender,
            "tokens_per_param": ratio,
            "sizes": len(rs),
            "seeds": n,
            "baseline_fit": b,
            "contender_fit": c,
            "at_loss": loss,
            "at_flops": rs[-1]["flops"],
            "factor": factor,
            "interval": stats.bootstrap_interval(list(range(n)), lambda idx: fit(idx)[3]) if n > 1 else None,
            "leave_one_out": [
                {"left_out_params": r["params"], "factor": fit(range(n), rs[:i] + rs[i + 1 :])[3]}
                for i, r in enumerate(rs[:-1])
            ]
            if len(rs) >= 5
            else [],
            "points": [
                {
                    "params": r["params"],
                    "flops": r["flops"],
                    "baseline": r["baseline_val_loss"][:n],
                    "contender": r["final_val_loss"][:n],
                }
                for r in rs
            ],
        }
    return out


def _trends(rows: list[dict]) -> dict[str, Any]:
    """Log-factor against log-parameters over the measured sizes, with the slope's 95% interval
    (:func:`stats.weighted_trend`: each point weighted by its own interval over seeds, so a trend is not surer than
    the points it joins); no extrapolation."""
    trends = {}
    for contender in dict.fromkeys(r["contender"] for r in rows):
        points = [r for r in rows if r["contender"] == contender and r["compute_factor"]]
        if len({r["params"] for r in points}) < 3:  # two points always fit a line: no trend to speak of
            continue
        # the standard error of each point's mean log-factor, from its t-interval over its seeds (inf: one seed)
        ses = [
            (math.log(r["interval"]["high"]) - math.log(r["interval"]["low"])) / (2 * stats.t95(len(r["seeds"]) - 1))
            if len(r["seeds"]) > 1 and r["interval"]["low"] and math.isfinite(r["interval"]["high"])
            else math.inf
            for r in points
        ]
        fit = stats.weighted_trend(
            [math.log(r["params"]) for r in points], [math.log(r["compute_factor"]) for r in points], ses
        )
        trends[contender] = {
            "log_factor": {"a": fit["a"], "b": fit["b"]},
            "slope_interval": fit["slope_interval"],
            "weighted": fit["weighted"],
            "scatter": fit["scatter"],
            "points": len(points),
            "params_range": [min(r["params"] for r in points), max(r["params"] for r in points)],
        }
    return trends


def summarize_scaling(out: Path, experiment: dict | None = None) -> dict:
    """The study's ``summary.json`` (every point, run, command, tuned setting, factor and fit), ``summary.md`` and
    the plots (``scaling.png``: the factor against size; ``frontier.png``: loss against compute); points that have
    not finished are listed as pending."""
    experiment = experiment or read_json(out / "experiment.json")
    rows, runs, pending, corpora = [], [], [], {}
    for point in experiment["points"]:
        if not (out / point["name"] / "summary.json").exists():
            pending.append(point["name"])
            continue
        corpora.setdefault(read_json(out / point["name"] / "summary.json")["corpus"]["sha256"], point["name"])
        same_corpus(out, corpora)
        rows += _point_rows(out, point)
        runs += _runs(out, point)
    cfg = experiment["config"]
    summary = {
        "kind": "scaling",
        "seeds": experiment["seeds"],
        "precision": " and ".join(sorted({r["precision"] for r in runs})) or "no run yet",
        "corpus": cfg["data"] or "python-stdlib",
        "tuning": {
            "trials": experiment["tune_trials"],
            "seeds": experiment.get("tune_seeds", 1),
            "widen": experiment.get("tune_widen", 0),
        },
        "rows": rows,
        "pending": pending,
        "trend": _trends(rows),
        "frontier": _frontiers(rows),
        "runs": runs,
    }
    write_json(summary, out / "summary.json")
    (out / "summary.md").write_text(markdown_scaling(summary, experiment) + "\n")
    plots.scaling_plot(out, summary)
    plots.frontier_plot(out, summary)
    return summary


def _mean_sd(values: list[float]) -> str:
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}" if len(values) > 1 else f"{values[0]:.4f}"


def _left_out(factors: list[dict] | None) -> str:
    """The summary's clause on the leave-one-size-out refits ('' when there are none)."""
    if not factors:
        return ""
    values = [f["factor"] for f in factors]
    return (
        f"; with one smaller size left out at a time ({len(values)} refits): {min(values):.2f}x to "
        f"{max(values):.2f}x (the curve's form, which the bootstrap does not vary)"
    )


def markdown_scaling(summary: dict, experiment: dict) -> str:
    cfg = experiment["config"]
    n = len(summary["seeds"])
    tuning = summary["tuning"]
    lines = [
        f"scaling: {len(experiment['points'])} points (model size x tokens per parameter), batch "
        f"{cfg['batch_size'] * cfg['block_size'] * cfg['grad_accum']:,} tokens, "
        f"{'wsd' if experiment['ladder'] == 'wsd' else cfg['schedule']} schedule, {experiment['ladder']} ladder to "
        f"{max(experiment.get('budgets', [2.5])):g}x, {summary['precision']}, corpus {summary['corpus']}; "
        f"{n} seed{'s' * (n > 1)} per point; "
        + (
            f"every contender tuned at every point with {tuning['trials']} trials on {tuning['seeds']} unreported "
            f"seed{'s' * (tuning['seeds'] > 1)}"
            + (f", and up to {tuning['widen']} more beyond the edge of the lrs tried" if tuning.get("widen") else "")
            if tuning["trials"]
            else "no tuning"
        ),
        "",
        "| point | params | tokens/param | epochs (largest rung) | contender | final val loss | baseline "
        "| compute factor (95% CI) | verdict | smallest detectable |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        iv = r["interval"]
        factor = f"{r['compute_factor']:.2f}x" if r["compute_factor"] else "n/a"
        if iv.get("low") is not None:
            factor += f" [{iv['low']:.2f}, {iv['high']:.2f}]"
        if iv.get("censored"):
            factor += f" ({len(iv['censored'])} seed{'s' * (len(iv['censored']) > 1)} beyond the ladder, at its bound)"
        epochs = f"{r['epochs_largest_rung']:.2f}" + (" (over 1 epoch)" if r["epochs_largest_rung"] > 1 else "")
        detect = f"{iv['detectable']:.2f}x" if iv.get("detectable") else "-"
        lines.append(
            f"| {r['point']} | {r['params']:,} | {r['tokens_per_param']:.3g} | {epochs} | {r['optimizer']} "
            f"| {_mean_sd(r['final_val_loss'])} | {_mean_sd(r['baseline_val_loss'])} | {factor} | {iv['verdict']} "
            f"| {detect} |"
        )
    if summary["pending"]:
        lines.append(f"\npending (not finished; continue with --resume): {', '.join(summary['pending'])}")
    lines.append(
        "\ncompute factor: baseline steps on the point's own ladder that reach the contender's final loss, over the "
        "contender's steps, per seed against the same seed's ladder; geometric mean over seeds with a 95% t-interval. "
        "smallest detectable: the factor these seeds' spread detects with 80% power (5% two-sided)."
    )
    for name, f in summary["frontier"].items():
        iv = f["interval"]
        if iv is None:
            spread = " (one seed: no interval)"
        else:
            failed = f", {iv['failed']} without a fit" if iv["failed"] else ""
            spread = (
                f" [{iv['low']:.2f}, {iv['high']:.2f}] (bootstrap over {f['seeds']} seeds, {iv['resamples']} "
                f"resamples{failed})"
            )
        lines.append(
            f"\nthe paper's way, {name}: L(C) = E + A (C/C0)^-alpha fitted per optimizer over {f['sizes']} sizes "
            f"(C0 = {f['baseline_fit']['c0']:.3g} FLOPs); baseline E {f['baseline_fit']['e']:.3f}, alpha "
            f"{f['baseline_fit']['alpha']:.3f}, rms residual {f['baseline_fit']['rms_residual']:.4f}; contender E "
            f"{f['contender_fit']['e']:.3f}, alpha {f['contender_fit']['alpha']:.3f}, rms residual "
            f"{f['contender_fit']['rms_residual']:.4f}. Compute factor at the contender's loss "
            f"{f['at_loss']:.4f} (the largest measured compute, {f['at_flops']:.3g} FLOPs): **{f['factor']:.2f}x**"
            + spread
            + _left_out(f.get("leave_one_out"))
        )
    for contender, t in summary["trend"].items():
        lo, hi = t["slope_interval"]
        lines.append(
            f"\ntrend of {contender} over {t['points']} points ({t['params_range'][0]:,.0f} to "
            f"{t['params_range'][1]:,.0f} params): ln(factor) = {t['log_factor']['a']:.3f} "
            f"{t['log_factor']['b']:+.4f} * ln(params), slope 95% CI [{lo:+.4f}, {hi:+.4f}] "
            + (
                "(each point weighted by its interval over seeds)"
                if t.get("weighted")
                else "(unweighted, from the points' scatter alone: some point has no interval over seeds)"
            )
            + "; a description of the measured range, not a prediction beyond it"
        )
    return "\n".join(lines)
