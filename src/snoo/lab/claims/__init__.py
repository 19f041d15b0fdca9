"""`snoo reproduce`: the papers' claims, one module each, tested on this machine with a verdict fixed in advance.

A claim module reads top to bottom: the claim in one sentence, the paper's figure, the setup at each scale
(``quick``: a smoke test of the machinery on the tiny preset; ``cpu``: the real run on a laptop; ``gpu``: larger
presets), the runs (through :mod:`snoo.lab.experiments` and :func:`snoo.lab.train.train`), the criterion as a pure
function ``decide(values) -> verdict`` written before any run, and a plot. This module holds what they share: the
verdict vocabulary, the scales, the registry, and :func:`reproduce`, which runs claims and writes ``report.md`` and
``claims.json``.

Verdicts: ``holds``, ``does not hold``, or ``inconclusive: <reason>``. A scale too small to decide a claim (every
claim at ``quick``) gives ``inconclusive: too small`` whatever the runs measured; what the criterion would have read
is kept beside it (``reading``) so that the machinery is visible, never as evidence.
"""

from __future__ import annotations

import importlib
import math
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from snoo.lab import checkpoint
from snoo.lab.checkpoint import read_json, write_json
from snoo.lab.config import TrainConfig, make_config, model_config
from snoo.lab.train import Diverged

HOLDS = "holds"
DOES_NOT_HOLD = "does not hold"
TOO_SMALL = "inconclusive: too small"
MIN_SEEDS = 3  # a claim about a difference is decided on three seeds or more


def inconclusive(reason: str) -> str:
    return f"inconclusive: {reason}"


# ---------------------------------------------------------------------------------------------- scales


@dataclass(frozen=True)
class Scale:
    name: str
    preset: str
    settings: dict[str, Any]  # TrainConfig fields on top of the preset
    seeds: int  # default --seeds
    tune_trials: int  # tuning trials per contender, where a claim tunes
    decidable: bool  # False: every verdict is "inconclusive: too small"

    def with_steps(self, steps: int) -> dict[str, Any]:
        """The settings for a run of ``steps`` steps: ten evaluations, four checkpoints, fifty log lines."""
        return {
            **self.settings,
            "steps": steps,
            "eval_every": max(1, steps // 10),
            "ckpt_every": max(1, steps // 4),
            "log_every": max(1, steps // 50),
        }


SCALES: dict[str, Scale] = {
    # seconds in all: the tiny preset, a dozen steps, one seed; checks the machinery, decides nothing
    "quick": Scale("quick", "tiny", dict(steps=10, eval_batches=1), seeds=1, tune_trials=1, decidable=False),
    # a 2-layer, 64-wide model (about 115k parameters with the byte tokenizer), 64-token blocks, 1,000 steps of
    # 512 tokens (~4.5 tokens per parameter): about 12 ms a step on one core of an idle laptop
    "cpu": Scale(
        "cpu",
        "tiny",
        dict(n_layer=2, n_head=2, n_embd=64, block_size=64, batch_size=8, steps=1000, eval_batches=8),
        seeds=3,
        tune_trials=2,
        decidable=True,
    ),
    # the `small` preset (0.9M parameters), 4,000 steps: for a GPU (or a very patient CPU)
    "gpu": Scale("gpu", "small", dict(steps=4000, eval_batches=20), seeds=3, tune_trials=4, decidable=True),
}


# ---------------------------------------------------------------------------------------------- a claim and its run


@dataclass
class Context:
    """What a claim's ``run`` gets: the scale, its own directory, the seeds and the user's settings."""

    scale: Scale
    out: Path
    seeds: int
    resume: bool = False
    settings: dict[str, Any] = field(default_factory=dict)  # --data, --set: applied last
    say: Callable[[str], None] = print

    def config(self, name: str, steps: int | None = None, **fields: Any) -> TrainConfig:
        """The scale's config for a run (or experiment) in ``out/name``, with ``fields`` and the user's settings."""
        base = self.scale.with_steps(steps or self.scale.settings["steps"])
        return make_config(
            self.scale.preset,
            **{**base, "progress": False, **fields, **self.settings, "out": str(self.out / name)},
        )


@dataclass
class Outcome:
    """What a claim measured: ``measured``, one sentence beside the paper's; ``values``, what ``decide`` reads;
    ``table``, markdown; ``plots``, PNG names in the report's directory; ``unavailable``: why it could not run;
    ``seeds``: how many seeds the measurement used, where that is not ``--seeds``."""

    measured: str
    values: dict[str, Any]
    table: str = ""
    plots: list[str] = field(default_factory=list)
    unavailable: str | None = None
    seeds: int | None = None


@dataclass(frozen=True)
class Claim:
    """One claim: what it says and where, the paper's figure, and how it is tested (``run``) and judged
    (``decide``, a pure function of ``Outcome.values``, fixed before any run)."""

    id: str
    number: int
    claim: str  # one sentence
    source: str
    paper: str  # the paper's figure, in words
    criterion: str  # decide(), in words
    setup: dict[str, dict[str, Any]]  # scale name -> the claim's knobs at that scale
    run: Callable[[Context, dict[str, Any]], Outcome]
    decide: Callable[[dict[str, Any]], str]

    def verdict(self, outcome: Outcome, scale: Scale) -> tuple[str, str]:
        """(verdict, what the criterion reads on the measured values)."""
        if outcome.unavailable:
            return inconclusive(outcome.unavailable), inconclusive(outcome.unavailable)
        reading = self.decide(outcome.values)
        return (reading if scale.decidable else TOO_SMALL), reading


MODULES = (
    "snoo_vs_adamw",
    "k_curve",
    "weight_norms",
    "repeated_data",
    "diloco_workers",
    "ema_lookahead",
    "scale_memory",
    "sgd_ll",
    "nesterov_nadam",
    "gpa",
)


def registry() -> dict[str, Claim]:
    """Every claim by id, in the issue's order."""
    claims = [importlib.import_module(f"{__name__}.{m}").CLAIM for m in MODULES]
    return {c.id: c for c in claims}


def select(names: Sequence[str]) -> list[Claim]:
    """Claims by id or number (``2`` or ``k-curve``); all of them when ``names`` is empty."""
    claims = registry()
    if not names:
        return list(claims.values())
    by_number = {str(c.number): c for c in claims.values()}
    picked: list[Claim] = []
    for name in names:
        claim = claims.get(name) or by_number.get(name)
        if claim is None:
            raise ValueError(f"unknown claim {name!r}; claims: {', '.join(claims)} (or their numbers 1-{len(claims)})")
        if claim not in picked:
            picked.append(claim)
    return picked


# ---------------------------------------------------------------------------------------------- shared criteria


def factor_verdict(interval: dict[str, Any], paper_low: float) -> str:
    """The compute-factor criterion: holds if the 95% interval over >= 3 seeds lies above 1 (or every seed is
    faster than the whole ladder); does not hold if it lies below 1, or contains 1 but excludes the paper's smallest
    figure ``paper_low``; inconclusive otherwise."""
    n = interval.get("n", 0)
    if n < MIN_SEEDS:
        return inconclusive(f"{n} seed{'s' * (n != 1)}, the criterion needs {MIN_SEEDS}")
    if interval.get("bounds"):

        def side(f: Any) -> int:
            if isinstance(f, str):
                return 1 if f.startswith(">") and float(f[1:]) >= 1 else -1 if f.startswith("<") else 0
            return (f > 1) - (f < 1)

        sides = {side(f) for f in interval["bounds"]}
        return HOLDS if sides == {1} else DOES_NOT_HOLD if sides == {-1} else inconclusive("beyond the ladder")
    if interval.get("low") is None:
        return inconclusive("no compute factor (the baseline's ladder did not improve with steps)")
    if interval["low"] > 1:
        return HOLDS
    if interval["high"] < 1 or interval["high"] < paper_low:
        return DOES_NOT_HOLD
    return inconclusive("no measurable difference")


def difference_verdict(diff: dict[str, Any] | None, sign: int) -> str:
    """Paired differences over seeds: holds if the 95% interval lies on the side ``sign`` of 0 (-1: below),
    does not hold if it lies on the other side; inconclusive if it contains 0 or there are fewer than 3 seeds."""
    if diff is None:
        return inconclusive("a run diverged")
    if diff["n"] < MIN_SEEDS or diff["low"] is None:
        return inconclusive(f"{diff['n']} seed{'s' * (diff['n'] != 1)}, the criterion needs {MIN_SEEDS}")
    if (diff["high"] < 0) if sign < 0 else (diff["low"] > 0):
        return HOLDS
    if (diff["low"] > 0) if sign < 0 else (diff["high"] < 0):
        return DOES_NOT_HOLD
    return inconclusive("no measurable difference")


def combine(parts: dict[str, str]) -> str:
    """A claim of several parts: holds if every part holds, does not hold if any does not, else inconclusive."""
    if all(v == HOLDS for v in parts.values()):
        return HOLDS
    failed = [k for k, v in parts.items() if v == DOES_NOT_HOLD]
    if failed:
        return DOES_NOT_HOLD
    return inconclusive("; ".join(f"{k}: {v.removeprefix('inconclusive: ')}" for k, v in parts.items() if v != HOLDS))


# ---------------------------------------------------------------------------------------------- helpers for claims


def compare_pair(ctx: Context, name: str, baseline: str, other: str, setup: dict[str, Any]) -> tuple[dict, str]:
    """``baseline`` against ``other`` in ``out/name`` at the scale's seeds, ladder and tuning trials (the setup's
    ``budgets`` and ``ladder``); returns the summary and the name ``other`` has in it (its tuned SPEC when tuned)."""
    from snoo.lab import experiments

    summary = experiments.run_experiment(
        "compare",
        ctx.config(name),
        [baseline, other],
        seeds=ctx.seeds,
        budgets=setup["budgets"],
        ladder=setup["ladder"],
        tune_trials=ctx.scale.tune_trials,
        resume=ctx.resume,
        say=ctx.say,
    )
    return summary, next(r["optimizer"] for r in summary["table"] if r["optimizer"] != summary["baseline"])


def contender(summary: dict, optimizer: str) -> str:
    """The name an optimizer has in a summary (its tuned SPEC, when the experiment tuned it)."""
    for tuned, t in summary.get("tuning", {}).items():
        if t["from"] == optimizer:
            return tuned
    return optimizer


def final_losses(summary: dict, optimizer: str) -> list[float]:
    """The 1x final val losses of ``optimizer`` in a summary, by seed (inf: diverged)."""
    return [
        r["final_val_loss"] if r["status"] == "ok" else math.inf
        for r in summary["runs"]
        if r["optimizer"] == optimizer and r["budget"] == 1.0
    ]


def fmt_interval(iv: dict[str, Any] | None, unit: str = "x") -> str:
    if iv is None:
        return "n/a"
    if iv.get("bounds"):
        return "per seed " + ", ".join(f"{b}{unit}" if isinstance(b, str) else f"{b:.2f}{unit}" for b in iv["bounds"])
    if iv.get("mean") is None:
        return "n/a"
    if iv.get("low") is None:
        return f"{iv['mean']:.3g}{unit} (1 seed)"
    return f"{iv['mean']:.3g}{unit} [{iv['low']:.3g}, {iv['high']:.3g}]"


def md_cell(text: str) -> str:
    """Text that stays one cell of a markdown table."""
    return text.replace("|", "\\|").replace("\n", " ")


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float) and math.isfinite(v):
            return f"{v:.4f}"
        return "diverged" if v == math.inf else md_cell(str(v))

    lines = ["| " + " | ".join(md_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def line_plot(
    path: Path,
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    logx: bool = False,
    logy: bool = False,
    hline: float | None = None,
) -> str:
    """One line per series, markers at the points; returns the file's name."""
    from snoo.lab.plots import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, (xs, ys) in series.items():
        pts = [(x, y) for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
        if pts:
            ax.plot([x for x, _ in pts], [y for _, y in pts], "o-", label=name, lw=1.5, ms=4)
    if hline is not None:
        ax.axhline(hline, color="grey", ls="--", lw=1)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def lab_device(cfg: TrainConfig) -> str:
    """Where a claim's own model lives: ``cfg.device``, with "auto" a GPU when there is one (as ``train`` does)."""
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device


def lab_model(cfg: TrainConfig):
    """The lab's model for ``cfg`` (seeded as a run's, on :func:`lab_device`) and its corpus: for claims that look
    inside a model."""
    import torch

    from snoo.lab.data import load_corpus
    from snoo.lab.model import GPT

    corpus = load_corpus(cfg.data, cfg.tokenizer, cfg.bpe_vocab)
    torch.manual_seed(cfg.seed)
    model = GPT(model_config(cfg, corpus.vocab_size))
    return model.to(lab_device(cfg)), corpus


def lab_batch(tokens, cfg: TrainConfig, seed: int, index: int):
    """Batch ``index`` of ``tokens`` as a run seeded ``seed`` reads it (held-out batches: seed 0, index -1, -2, ...),
    on :func:`lab_device`."""
    from snoo.lab.data import get_batch

    x, y = get_batch(tokens, cfg.batch_size, cfg.block_size, seed, index)
    return x.to(lab_device(cfg)), y.to(lab_device(cfg))


# ---------------------------------------------------------------------------------------------- the report


def reproduce(
    names: Sequence[str],
    *,
    scale: str = "quick",
    seeds: int | None = None,
    out: Path | str = "runs/reproduce",
    resume: bool = False,
    settings: dict[str, Any] | None = None,
    say: Callable[[str], None] = print,
) -> dict[str, dict]:
    """Run the claims (all when ``names`` is empty) at ``scale``; write ``out/report.md``, ``out/claims.json`` and
    the plots; return what claims.json holds. With ``resume``, a finished run is never trained again."""
    if scale not in SCALES:
        raise ValueError(f"--scale must be one of {', '.join(SCALES)}, got {scale!r}")
    the_scale, given_seeds = SCALES[scale], seeds
    seeds = the_scale.seeds if seeds is None else seeds
    if seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {seeds}")
    claims = select(names)
    out = Path(out)
    with checkpoint.claimed(out, fresh=False, earlier=()):  # one `snoo reproduce` at a time writes claims.json
        return _reproduce(claims, the_scale, seeds, given_seeds, out, resume, dict(settings or {}), say)


def _reproduce(
    claims: list[Claim],
    the_scale: Scale,
    seeds: int,
    given_seeds: int | None,
    out: Path,
    resume: bool,
    settings: dict[str, Any],
    say: Callable[[str], None],
) -> dict[str, dict]:
    scale = the_scale.name
    path = out / "claims.json"
    # the claims run before into this directory at this scale stay in the report
    results = {k: v for k, v in (read_json(path) if path.exists() else {}).items() if v.get("scale") == scale}
    start = time.perf_counter()
    for claim in claims:
        say(f"=== claim {claim.number} ({claim.id}): {claim.claim}")
        t0 = time.perf_counter()
        ctx = Context(the_scale, out / claim.id, seeds, resume, dict(settings), say)
        ctx.out.mkdir(parents=True, exist_ok=True)
        try:
            outcome = claim.run(ctx, claim.setup[scale])
        except Diverged as e:  # every trial of a contender diverged: nothing to measure, and the report says so
            outcome = Outcome(measured=f"not measured: {e}", values={}, unavailable="a contender diverged in every run")
        verdict, reading = claim.verdict(outcome, the_scale)
        results[claim.id] = {
            "verdict": verdict,
            "paper": claim.paper,
            "measured": outcome.measured,
            "criterion": claim.criterion,
            "reading": reading,
            "values": outcome.values,
            "table": outcome.table,
            "plots": outcome.plots,
            "scale": scale,
            "seeds": outcome.seeds or seeds,
            "wall_time": round(time.perf_counter() - t0, 1),
            "flags": flags(given_seeds, settings),
        }
        say(f"    claim {claim.number}: {verdict}")
    order = {c.id: c.number for c in registry().values()}
    results = dict(sorted(results.items(), key=lambda kv: order.get(kv[0], 99)))
    write_json(results, path)
    checkpoint.write_text(report(results, scale, time.perf_counter() - start) + "\n", out / "report.md")
    return results


def flags(seeds: int | None, settings: dict[str, Any]) -> str:
    """The flags of `snoo reproduce` that give these seeds (None: the scale's) and settings (--data, --set)."""
    words = [f"--seeds {seeds}"] if seeds is not None else []
    words += [f"--data {shlex.quote(str(v))}" for k, v in settings.items() if k == "data"]
    words += [f"--set {shlex.quote(f'{k}={v}')}" for k, v in settings.items() if k != "data"]
    return " ".join(words)


def report(results: dict[str, dict], scale: str, wall: float) -> str:
    claims = registry()
    by_flags: dict[str, list[str]] = {}  # claims run with the same flags regenerate with one command
    for cid, r in results.items():
        by_flags.setdefault(r.get("flags", ""), []).append(str(claims[cid].number))
    commands = "; ".join(
        f"`snoo reproduce {' '.join(numbers)} --scale {scale} {f + ' ' if f else ''}--resume`"
        for f, numbers in by_flags.items()
    )
    lines = [
        f"# snoo reproduce --scale {scale}",
        "",
        f"{len(results)} claim{'s' * (len(results) != 1)}, {wall:.0f} s of wall time for this invocation (finished "
        f"runs kept from earlier ones cost nothing). Regenerate with {commands}.",
    ]
    if not SCALES[scale].decidable:
        lines.append(
            f"\nAt `--scale {scale}` the runs are a smoke test of the machinery: every verdict is "
            f"'{TOO_SMALL}', whatever the numbers say."
        )
    lines += ["", "| claim | paper | measured | verdict |", "|---|---|---|---|"]
    for cid, r in results.items():
        paper, measured = md_cell(r["paper"]), md_cell(r["measured"])
        lines.append(f"| {claims[cid].number}. {cid} | {paper} | {measured} | **{r['verdict']}** |")
    for cid, r in results.items():
        c = claims[cid]
        used = f"with {r['flags']}" if r.get("flags") else "with the scale's data and settings"
        lines += [
            "",
            f"## {c.number}. {c.claim}",
            "",
            f"*Source:* {c.source}",
            "",
            f"**Paper.** {r['paper']}",
            "",
            f"**Measured** ({r['seeds']} seed{'s' * (r['seeds'] != 1)}, {r['wall_time']:.0f} s, {used}). "
            f"{r['measured']}",
        ]
        if r["table"]:
            lines += ["", r["table"]]
        lines += [f"\n![{cid}]({cid}/{p})" for p in r["plots"]]
        lines += ["", f"**Criterion** (fixed before the run). {r['criterion']}", "", f"**Verdict: {r['verdict']}**"]
        if r["reading"] != r["verdict"]:
            lines.append(f"(the criterion reads '{r['reading']}' on these numbers; at this scale that is no evidence)")
    return "\n".join(lines)


def describe() -> str:
    """``snoo reproduce --list``: every claim with its number, id and source."""
    return "\n".join(f"{c.number:>2}. {c.id}: {c.claim}\n    source: {c.source}" for c in registry().values())


__all__ = [
    "DOES_NOT_HOLD",
    "HOLDS",
    "SCALES",
    "TOO_SMALL",
    "Claim",
    "Context",
    "Outcome",
    "Scale",
    "combine",
    "describe",
    "difference_verdict",
    "factor_verdict",
    "inconclusive",
    "registry",
    "reproduce",
    "select",
]
