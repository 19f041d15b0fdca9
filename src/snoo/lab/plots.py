"""PNG plots of an experiment, drawn with matplotlib's Agg backend (no display needed)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _mean_curve(curves: list[list[dict]], key: str) -> tuple[list[int], list[float], list[float], list[float]]:
    """Mean, min and max of ``key`` over seeds, at the steps every seed evaluated."""
    by_step: dict[int, list[float]] = {}
    for curve in curves:
        for m in curve:
            if key in m:
                by_step.setdefault(m["step"], []).append(m[key])
    steps = sorted(s for s, v in by_step.items() if len(v) == len(curves))
    return (
        steps,
        [statistics.fmean(by_step[s]) for s in steps],
        [min(by_step[s]) for s in steps],
        [max(by_step[s]) for s in steps],
    )


def _curve_plot(out: Path, summary: dict, curves: dict[str, list[dict]], key: str, ylabel: str, name: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups: dict[tuple[str, float], list[list[dict]]] = {}
    for r in summary["runs"]:
        groups.setdefault((r["optimizer"], r["budget"]), []).append(curves[r["dir"]])
    top = -math.inf
    for (optimizer, budget), cs in groups.items():
        steps, mean, lo, hi = _mean_curve(cs, key)
        if not steps:
            continue
        label = optimizer if budget == 1.0 else f"{optimizer} x{budget:g}"
        style = dict(lw=1.8) if budget == 1.0 else dict(lw=0.9, ls="--", alpha=0.6)
        (line,) = ax.plot(steps, mean, label=label, **style)
        if len(cs) > 1:
            ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.15)
        late = [v for s, v in zip(steps, mean) if s >= 0.1 * summary["steps"]]
        top = max(top, *late) if late else top
    if key == "val_loss" and math.isfinite(top):
        ax.set_ylim(top=top)  # the first steps' loss would flatten everything else
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    n = len(summary["seeds"])
    ax.set_title(f"{ylabel} ({n} seed{'s' * (n > 1)}{', band: min-max' * (n > 1)})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)


def heatmap(out: Path, summary: dict) -> None:
    """Final val loss over the first two grid knobs with more than one value (best over any other knobs)."""
    grid = summary["grid"]
    keys = [k for k in next(iter(grid.values())) if len({str(v[k]) for v in grid.values()}) > 1][:2]
    if len(keys) < 2:
        return
    loss = {row["optimizer"]: row["final_val_loss"] for row in summary["table"]}
    xs = sorted({v[keys[0]] for v in grid.values()})
    ys = sorted({v[keys[1]] for v in grid.values()})
    cells = [[math.inf] * len(xs) for _ in ys]
    for optimizer, settings in grid.items():
        i, j = ys.index(settings[keys[1]]), xs.index(settings[keys[0]])
        cells[i][j] = min(cells[i][j], loss[optimizer])
    finite = [v for row in cells for v in row if math.isfinite(v)]
    if not finite:
        return
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.2 * len(xs) + 3, 1.0 * len(ys) + 2))
    shown = [[v if math.isfinite(v) else float("nan") for v in row] for row in cells]
    im = ax.imshow(shown, cmap="viridis_r", origin="lower", aspect="auto")
    for i, row in enumerate(cells):
        for j, v in enumerate(row):
            light = not math.isfinite(v) or im.norm(v) < 0.5  # viridis_r is light at low values
            ax.text(
                j,
                i,
                f"{v:.3f}" if math.isfinite(v) else "div",
                ha="center",
                va="center",
                color="k" if light else "w",
                fontsize=9,
            )
    ax.set_xticks(range(len(xs)), [f"{x:g}" for x in xs])
    ax.set_yticks(range(len(ys)), [f"{y:g}" for y in ys])
    ax.set_xlabel(keys[0])
    ax.set_ylabel(keys[1])
    base = next(b["final_val_loss"] for b in summary["baseline_budgets"] if b["budget"] == 1.0)
    others = " (best over the other knobs)" if len(next(iter(grid.values()))) > 2 else ""
    ax.set_title(f"final val loss{others}; baseline {base:.3f}", fontsize=10)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(out / "heatmap.png", dpi=110)
    plt.close(fig)


def draw(out: Path, summary: dict, curves: dict[str, list[dict]]) -> None:
    _curve_plot(out, summary, curves, "val_loss", "validation loss", "val_loss.png")
    _curve_plot(out, summary, curves, "weight_norm", "weight l2 norm (evaluation weights)", "weight_norm.png")
    if summary.get("grid"):
        heatmap(out, summary)


def tokens_plot(out: Path, summary: dict, curves: dict[str, list[dict]]) -> None:
    """Scale-out: validation loss against the tokens all workers have read, one line per run."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    top = -math.inf
    for r in summary["runs"]:
        points = [(m["tokens"], m["val_loss"]) for m in curves[r["dir"]] if "val_loss" in m]
        if not points:
            continue
        kind = {"diloco": "DiLoCo", "ddp": "DDP"}.get(r["parallel"], "1 worker")
        workers = f", {r['workers']} workers" if r["workers"] > 1 else ""
        ax.plot(*zip(*points), label=f"{kind}: {r['optimizer']}{workers}", lw=1.5, marker=".", ms=4)
        late = [v for t, v in points if t >= 0.1 * r["tokens"]]
        top = max(top, *late) if late else top
    if math.isfinite(top):
        ax.set_ylim(top=top)
    ax.set_xlabel("tokens (all workers)")
    ax.set_ylabel("validation loss")
    ax.set_title("the same tokens on 1 worker, and on N workers")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "val_loss_tokens.png", dpi=110)
    plt.close(fig)
