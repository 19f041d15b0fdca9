"""Claim 9: Nesterov momentum around Adam (the corrected, black-box form) and NAdam agree while Adam's denominator
is steady, and part when it moves quickly (a low beta2)."""

from __future__ import annotations

import json
import math
import statistics
from typing import Any

import torch

from snoo import spec
from snoo.lab.checkpoint import write_json
from snoo.lab.claims import (
    DOES_NOT_HOLD,
    HOLDS,
    MIN_SEEDS,
    Claim,
    Context,
    Outcome,
    inconclusive,
    lab_batch,
    lab_model,
    line_plot,
    table,
)

MU = 0.9  # the momentum of both
LR = 2e-3  # the lr of both (the wrapper's real iterate moves by Adam's own update, so the same lr)
PARTS = 2.0  # "part": the loss gap at the low beta2 at least twice the gap at the steady one
AGREE = 0.02  # nats: "agree" at the steady beta2

SETUP = {
    "quick": dict(beta2s=(0.999, 0.5)),
    "cpu": dict(beta2s=(0.999, 0.9, 0.5)),
    "gpu": dict(beta2s=(0.999, 0.95, 0.9, 0.5)),
}


def nesterov_spec(beta2: float) -> str:
    """Adam with momentum MU, its gradients taken at the wrapper's lookahead point (momentum MU too)."""
    return f"nesterov(momentum={MU:g})+adamw(lr={LR:g},beta1={MU:g},beta2={beta2:g},weight_decay=0)"


@torch.no_grad()
def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _pair(ctx: Context, seed: int, beta2: float) -> list[dict[str, Any]]:
    """Both optimizers from the same weights on the same batches; the distance of their real iterates over the
    distance NAdam travelled, and both val losses, at every evaluation."""
    cache = ctx.out / f"seed{seed}-beta2_{beta2:g}.json"
    if ctx.resume and cache.exists():
        return json.loads(cache.read_text())  # a list: the curve (checkpoint.read_json reads objects)
    cfg = ctx.config(f"seed{seed}", seed=seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    (a, corpus), (b, _) = lab_model(cfg), lab_model(cfg)
    start = _flat(b)
    opt_a = spec.build(nesterov_spec(beta2), a)
    opt_b = torch.optim.NAdam(b.parameters(), lr=LR, betas=(MU, beta2), momentum_decay=1e9)  # mu_t = MU
    val = [lab_batch(corpus.val, cfg, 0, -1 - i) for i in range(cfg.eval_batches)]
    curve = []
    for step in range(cfg.steps + 1):
        if step % cfg.eval_every == 0 or step == cfg.steps:
            opt_a.eval()  # the real iterate theta, not the lookahead point phi
            with torch.no_grad():
                loss = [sum(m(x, y).item() for x, y in val) / len(val) for m in (a, b)]
                moved = (_flat(b) - start).norm().item()
                apart = (_flat(a) - _flat(b)).norm().item() / max(moved, 1e-12)
            opt_a.train()
            curve.append({"step": step, "nesterov": loss[0], "nadam": loss[1], "distance": apart})
        if step == cfg.steps:
            break
        x, y = lab_batch(corpus.train, cfg, seed, step)
        for model, opt in ((a, opt_a), (b, opt_b)):
            model(x, y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    write_json(curve, cache)
    return curve


def _gap(point: dict[str, float]) -> float:
    """The absolute difference of the two val losses; infinite when one of them diverged (they parted for good)."""
    gap = abs(point["nesterov"] - point["nadam"])
    return gap if math.isfinite(gap) else math.inf


def run(ctx: Context, setup: dict[str, Any]) -> Outcome:
    first = ctx.config("probe").seed
    curves = {b2: [_pair(ctx, first + s, b2) for s in range(ctx.seeds)] for b2 in setup["beta2s"]}
    final = {
        f"{b2:g}": {
            "loss_gap": statistics.fmean(_gap(c[-1]) for c in cs),
            "diverged": sum(not math.isfinite(c[-1]["nesterov"] + c[-1]["nadam"]) for c in cs),
            "distance": statistics.fmean(c[-1]["distance"] for c in cs),
        }
        for b2, cs in curves.items()
    }
    plot = line_plot(
        ctx.out / "nesterov_nadam.png",
        {f"beta2 {b2:g}": ([p["step"] for p in cs[0]], [_gap(p) for p in cs[0]]) for b2, cs in curves.items()},
        title="val loss gap, Nesterov(Adam) against NAdam (first seed)",
        xlabel="step",
        ylabel="loss gap (nats)",
        logy=True,
    )
    rows = [[b2, v["loss_gap"], v["diverged"], v["distance"]] for b2, v in final.items()]
    return Outcome(
        measured="val loss gap (Nesterov(Adam) against NAdam) at the end: "
        + ", ".join(
            f"beta2 {b2}: {v['loss_gap']:.4f}" + (f" ({v['diverged']} seed(s) diverged)" if v["diverged"] else "")
            for b2, v in final.items()
        ),
        values={
            "seeds": ctx.seeds,
            "final": final,
            "steady": f"{max(setup['beta2s']):g}",
            "low": f"{min(setup['beta2s']):g}",
        },
        table=table(["beta2", "val loss gap (mean)", "runs diverged", "weight distance / travel"], rows),
        plots=[plot],
    )


def decide(values: dict[str, Any]) -> str:
    if values["seeds"] < MIN_SEEDS:
        return inconclusive(f"{values['seeds']} seeds, the criterion needs {MIN_SEEDS}")
    steady, low = values["final"][values["steady"]]["loss_gap"], values["final"][values["low"]]["loss_gap"]
    if steady > AGREE or low <= steady:
        return DOES_NOT_HOLD
    if low >= max(PARTS * steady, AGREE):
        return HOLDS
    return inconclusive("they part a little at the low beta2, less than the criterion asks")


CLAIM = Claim(
    id="nesterov-nadam",
    number=9,
    claim="Nesterov around Adam and NAdam agree while Adam's denominator is steady, and part when it moves quickly "
    "(a low beta2).",
    source="'Fixes for Nesterov momentum in ML' (note); Dozat 2016 (NAdam)",
    paper="NAdam's in-numerator Nesterov ignores Adam's denominator: the same as Nesterov around Adam while the "
    "denominator is steady, wrong when it changes quickly (after loss spikes, low beta2)",
    criterion=f"same weights, same batches, the same lr, momentum {MU} in both (NAdam without its momentum "
    "warm-up), no clipping; gap = the absolute difference of their final val losses (infinite if one diverged), "
    f"mean over >= {MIN_SEEDS} seeds: holds if the gap at beta2 0.999 is <= {AGREE} nats and the gap at the "
    f"grid's lowest beta2 is >= max({PARTS:g}x that, {AGREE}); does not hold if the gap at 0.999 is above "
    f"{AGREE} or the lowest beta2's is no larger; inconclusive otherwise. Loss spikes are not provoked; the "
    "weights' distance is shown, not judged (two runs of a deep net drift apart in weight space even when their "
    "losses agree)",
    setup=SETUP,
    run=run,
    decide=decide,
)
