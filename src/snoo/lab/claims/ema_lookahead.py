"""Claim 6: can you look ahead? Along the classical one-step direction (gamma = 0) the loss rises at any nontrivial
beta, along EMA-Nesterov's EMA direction there is a wide safe interval of beta; and EMA-Nesterov accelerates AdamW."""

from __future__ import annotations

from typing import Any

import torch

from snoo import spec
from snoo.lab.checkpoint import read_json, snapshot_name, write_json
from snoo.lab.claims import (
    DOES_NOT_HOLD,
    HOLDS,
    Claim,
    Context,
    Outcome,
    combine,
    compare_pair,
    factor_verdict,
    fmt_interval,
    inconclusive,
    lab_batch,
    lab_device,
    lab_model,
    line_plot,
    table,
)
from snoo.lab.train import train

BETAS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
RISE = 0.01  # a lookahead is safe while the loss there is at most 1% above the loss at the iterate
WIDER = 4.0  # "a wide safe interval": the EMA direction's safe beta at least 4x the classical one's
PAPER_LOW = 1.06  # the speedrun: 3325 -> 3125 steps
RUN = "ema_nesterov(beta=0)+adamw"  # beta 0: AdamW's own trajectory, with the EMA m of its updates kept

SETUP = {
    "quick": dict(points=(0.3, 0.6, 0.9), bases=("adamw",), budgets=(1.0, 1.5), ladder="cosine"),
    "cpu": dict(points=(0.1, 0.3, 0.6, 0.9), bases=("adamw",), budgets=(0.5, 0.75, 1.0, 1.25, 1.5, 2.0), ladder="wsd"),
    "gpu": dict(
        points=(0.1, 0.3, 0.6, 0.9), bases=("adamw", "muon"), budgets=(0.5, 0.75, 1.0, 1.25, 1.5, 2.0), ladder="wsd"
    ),
}


def safe_beta(rises: dict[float, float]) -> float:
    """The largest beta of the grid up to which every lookahead raised the loss by at most RISE (0: none)."""
    safe = 0.0
    for beta in sorted(rises):
        if rises[beta] > RISE:
            break
        safe = beta
    return safe


def _lookahead(ctx: Context, steps: list[int]) -> dict[str, Any]:
    """Train the run with snapshots at ``steps`` and one step before each; at each, the relative loss rise at
    x + beta d for d the last update (gamma = 0) and d the EMA of updates (gamma = 0.99)."""
    cfg = ctx.config("lookahead", optimizer=RUN)
    run_dir, cache = ctx.out / "lookahead", ctx.out / "lookahead.json"
    if ctx.resume and cache.exists():
        return read_json(cache)
    if not (ctx.resume and (run_dir / "result.json").exists()):
        train(cfg, resume=ctx.resume, snapshots=sorted({s for t in steps for s in (t - 1, t)}))
    with torch.no_grad():
        result = _rises(cfg, run_dir, steps)
    write_json(result, cache)
    return result


def _rises(cfg, run_dir, steps: list[int]) -> dict[str, Any]:
    model, corpus = lab_model(cfg)
    batches = [lab_batch(corpus.val, cfg, 0, -1 - i) for i in range(cfg.eval_batches)]
    params = list(model.parameters())

    def loss_at(point: list[torch.Tensor]) -> float:
        for p, v in zip(params, point):
            p.copy_(v)
        model.eval()
        return sum(model(x, y).item() for x, y in batches) / len(batches)

    points = {}
    for t in steps:
        before = torch.load(run_dir / snapshot_name(t - 1), map_location=lab_device(cfg), weights_only=True)
        now = torch.load(run_dir / snapshot_name(t), map_location=lab_device(cfg), weights_only=True)
        model.load_state_dict(before["model"])
        x_before = [p.clone() for p in params]
        model.load_state_dict(now["model"])
        opt = spec.build(RUN, model)
        opt.load_state_dict(now["optimizer"])
        x = [p.clone() for p in params]
        directions = {
            "classical (gamma 0)": [a - b for a, b in zip(x, x_before)],
            "EMA (gamma 0.99)": [opt.state[p]["m"].clone() for p in params],
        }
        base = loss_at(x)
        rises = {
            name: {b: loss_at([xi + b * di for xi, di in zip(x, d)]) / base - 1 for b in BETAS}
            for name, d in directions.items()
        }
        points[str(t)] = {"loss": base, "rises": rises, "safe": {n: safe_beta(r) for n, r in rises.items()}}
    return {"points": points}


def run(ctx: Context, setup: dict[str, Any]) -> Outcome:
    steps = ctx.config("probe").steps
    lookahead = _lookahead(ctx, [max(2, round(f * steps)) for f in setup["points"]])
    accelerate = {}
    for base in setup["bases"]:
        summary, ema = compare_pair(ctx, f"accelerate-{base}", base, f"ema_nesterov(scale_by_lr=true)+{base}", setup)
        accelerate[base] = summary["compute_factor_interval"][ema]
    points = lookahead["points"]
    series = {
        f"{name}, step {t}": (list(BETAS), [r[str(b)] if str(b) in r else r[b] for b in BETAS])
        for t, p in points.items()
        for name, r in p["rises"].items()
    }
    plot = line_plot(
        ctx.out / "lookahead.png",
        series,
        title="loss at x + beta d over the loss at x, minus 1",
        xlabel="beta",
        ylabel="relative loss rise",
        logx=True,
        hline=RISE,
    )
    rows = [[t, *(f"{v:g}" for v in p["safe"].values())] for t, p in points.items()]
    rows += [[f"compute factor around {b}", fmt_interval(iv), ""] for b, iv in accelerate.items()]
    safe = [p["safe"] for p in points.values()]
    return Outcome(
        measured="safe beta classical/EMA at steps "
        + ", ".join(
            f"{t}: {p['safe']['classical (gamma 0)']:g}/{p['safe']['EMA (gamma 0.99)']:g}" for t, p in points.items()
        )
        + "; EMA-Nesterov compute factor "
        + ", ".join(f"{b} {fmt_interval(iv)}" for b, iv in accelerate.items()),
        values={"safe": safe, "accelerate": accelerate},
        table=table(["step", "safe beta, classical", "safe beta, EMA"], rows),
        plots=[plot],
    )


def _lookahead_part(safe: list[dict[str, float]]) -> str:
    pairs = [(s["classical (gamma 0)"], s["EMA (gamma 0.99)"]) for s in safe]
    if not pairs:
        return inconclusive("no checkpoints")
    if all(ema >= max(WIDER * classical, 1.0) for classical, ema in pairs):
        return HOLDS
    if any(ema <= classical for classical, ema in pairs):
        return DOES_NOT_HOLD
    return inconclusive("the EMA direction is safer, but not 4x")


def decide(values: dict[str, Any]) -> str:
    parts = {"lookahead": _lookahead_part(values["safe"])}
    parts.update({f"accelerates {b}": factor_verdict(iv, PAPER_LOW) for b, iv in values["accelerate"].items()})
    return combine(parts)


CLAIM = Claim(
    id="ema-lookahead",
    number=6,
    claim="Looking ahead along the last update (gamma = 0) raises the loss at any nontrivial beta while the EMA "
    "direction is safe over a wide range of beta, and EMA-Nesterov accelerates AdamW (and Muon).",
    source="Yau et al. 2026, arXiv 2605.25395 (the talk's 'can you look ahead?' figure; NanoGPT speedrun)",
    paper="classical lookahead explodes at any nontrivial beta, the EMA direction has a wide safe interval; "
    "speedrun Muon 3325 -> 3125 steps (1.06x)",
    criterion=f"lookahead: the safe beta of a direction is the largest beta of {BETAS[0]:g}..{BETAS[-1]:g} (doubling) "
    f"up to which the loss at x + beta d is at most {RISE:.0%} above the loss at x; holds if at every checkpoint "
    f"the EMA direction's safe beta is >= {WIDER:g}x the classical one's and >= 1, does not hold if it is <= the "
    "classical one's at some checkpoint. Acceleration: the compute-factor criterion of claim 1 with the paper's "
    f"{PAPER_LOW}x. The claim holds if every part holds, does not hold if any does not",
    setup=SETUP,
    run=run,
    decide=decide,
)
