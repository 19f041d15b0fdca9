"""PNG plots of an experiment, drawn with matplotlib's Agg backend (no display needed)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
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


def _colours(summary: dict) -> dict[str, str]:
    """One colour per optimizer, the same in every plot of an experiment."""
    palette = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive")
    names = [row["optimizer"] for row in summary["table"]]
    return {o: palette[i % len(palette)] for i, o in enumerate(names)}


def _curve_plot(
    out: Path, summary: dict, curves: dict[str, list[dict]], key: str, ylabel: str, name: str, title: str = ""
) -> None:
    """``key`` against the step for every optimizer's 1x runs (mean over seeds, band: min-max). The baseline's longer
    budgets are left out: they would stretch the x-axis; the ladder plot shows them."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = _colours(summary)
    groups: dict[str, list[list[dict]]] = {}
    for r in summary["runs"]:
        if r["budget"] == 1.0:
            groups.setdefault(r["optimizer"], []).append(curves[r["dir"]])
    low, top = math.inf, -math.inf
    for optimizer, cs in groups.items():
        steps, mean, lo, hi = _mean_curve(cs, key)
        if not steps:
            continue
        ax.plot(steps, mean, label=optimizer, lw=1.6, color=colours[optimizer])
        if len(cs) > 1:
            ax.fill_between(steps, lo, hi, color=colours[optimizer], alpha=0.15)
        late = [v for s, v in zip(steps, mean) if s >= 0.2 * summary["steps"]]
        if late:
            low, top = min(low, *late), max(top, *late)
    if key == "val_loss" and math.isfinite(top) and top > low:
        pad = 0.05 * (top - low)
        ax.set_ylim(low - pad, top + pad)  # the last 80% of training: the first steps' loss would flatten the rest
        ax.set_xlim(0.2 * summary["steps"], summary["steps"])
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    n = len(summary["seeds"])
    ax.set_title(f"{title or ylabel} ({n} seed{'s' * (n > 1)}{', band: min-max' * (n > 1)})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)


def difference_plot(out: Path, summary: dict, curves: dict[str, list[dict]]) -> None:
    """Validation loss minus the baseline's at the same step and seed: below zero, the optimizer is ahead."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = _colours(summary)
    base = {
        r["seed"]: curves[r["dir"]]
        for r in summary["runs"]
        if r["optimizer"] == summary["baseline"] and r["budget"] == 1.0
    }
    drawn = False
    for row in summary["table"]:
        o = row["optimizer"]
        if o == summary["baseline"]:
            continue
        diffs = []
        for r in summary["runs"]:
            if r["optimizer"] != o or r["budget"] != 1.0 or r["seed"] not in base:
                continue
            ref = {m["step"]: m["val_loss"] for m in base[r["seed"]] if "val_loss" in m}
            diffs.append(
                [
                    {"step": m["step"], "d": m["val_loss"] - ref[m["step"]]}
                    for m in curves[r["dir"]]
                    if "val_loss" in m and m["step"] in ref and m["step"] > 0
                ]
            )
        steps, mean, lo, hi = _mean_curve(diffs, "d")
        if not steps:
            continue
        ax.plot(steps, mean, label=o, lw=1.6, color=colours[o], marker=".", ms=4)
        if len(diffs) > 1:
            ax.fill_between(steps, lo, hi, color=colours[o], alpha=0.15)
        drawn = True
    if not drawn:
        plt.close(fig)
        return
    ax.axhline(0.0, color=colours[summary["baseline"]], lw=1.2, label=f"{summary['baseline']} (baseline)")
    ax.set_xlabel("step")
    ax.set_ylabel("val loss - baseline's val loss (lower is better)")
    n = len(summary["seeds"])
    ax.set_title(f"difference to the baseline at equal steps ({n} seed{'s' * (n > 1)}{', band: min-max' * (n > 1)})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "difference.png", dpi=110)
    plt.close(fig)


def ladder_plot(out: Path, summary: dict) -> None:
    """The compute factor, read off: the baseline's final loss at each budget (the ruler through them), and each
    optimizer's final loss at its steps with the baseline steps that match it."""
    budgets = [b for b in summary["baseline_budgets"] if math.isfinite(b["final_val_loss"])]
    if len(budgets) < 2 or not summary.get("fit"):
        return
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = _colours(summary)
    xs = [b["steps"] for b in budgets]
    base = summary["baseline"]
    ax.plot(
        xs,
        [b["final_val_loss"] for b in budgets],
        "o",
        color=colours[base],
        label=f"{base}: final loss after each length",
    )
    if all(b.get("ruler") is not None for b in budgets):
        ax.plot(
            xs,
            [b["ruler"] for b in budgets],
            "-",
            color=colours[base],
            lw=1.2,
            label=f"{base}: the steps it needs for each loss",
        )
    n = len(summary["seeds"])
    for row in summary["table"]:
        o = row["optimizer"]
        factor = summary["compute_factor"].get(o)
        if o == base or not math.isfinite(row["final_val_loss"]):
            continue
        iv = summary["compute_factor_interval"].get(o) or {}
        if isinstance(factor, float):
            label = f"{o}, {summary['steps']} steps: compute factor {factor:.2f}x"
        else:
            label = f"{o}, {summary['steps']} steps: compute factor {factor or 'n/a'}"
        ax.plot([summary["steps"]], [row["final_val_loss"]], "*", ms=11, color=colours[o], label=label)
        ax.axhline(row["final_val_loss"], color=colours[o], lw=0.8, ls="--")
        if isinstance(factor, float):
            ax.axvline(factor * summary["steps"], color=colours[o], lw=0.8, ls="--")
        if iv.get("low") is not None:
            ax.axvspan(
                iv["low"] * summary["steps"],
                iv["high"] * summary["steps"],
                color=colours[o],
                alpha=0.12,
                label=f"its 95% interval over {n} seeds: {iv['low']:.2f}x to {iv['high']:.2f}x",
            )
    ax.set_xscale("log")
    steps_label = plt.FuncFormatter(lambda x, _: f"{x:g}")  # 800, not 8 x 10^2
    ax.xaxis.set_major_formatter(steps_label)
    ax.xaxis.set_minor_formatter(steps_label)
    ax.set_xlabel(f"{base}'s training steps (log scale)")
    ax.set_ylabel("final validation loss (mean over seeds)")
    ax.set_title(
        f"compute factor = {base}'s steps to the same loss / the steps taken\n"
        "(above 1x: the same loss for less compute)",
        fontsize=10,
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "ladder.png", dpi=110)
    plt.close(fig)


def _knob_label(optimizer: str, key: str) -> str:
    """How the heatmap names a swept key of a stage: as the stage's optimizer declares (``knob_labels``: the grammar's
    short names are ambiguous, SNOO's lr is its outer lr), else "<stage> <key>"."""
    from snoo import spec

    stages = spec.parse(optimizer)
    name, _, bare = key.rpartition(".")
    stage = next((st.name for st in stages if (st.name == name if name else bare in st.params)), "")
    labels = spec.NAMES[stage].knob_labels if stage else {}
    return labels.get(bare, f"{stage} {bare}".strip())


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
    ax.set_xlabel(_knob_label(next(iter(grid)), keys[0]))
    ax.set_ylabel(_knob_label(next(iter(grid)), keys[1]))
    base = next(b["final_val_loss"] for b in summary["baseline_budgets"] if b["budget"] == 1.0)
    others = " (best over the other knobs)" if len(next(iter(grid.values()))) > 2 else ""
    ax.set_title(f"final val loss, lower is better{others}; baseline {base:.3f}", fontsize=10)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(out / "heatmap.png", dpi=110)
    plt.close(fig)


def draw(out: Path, summary: dict, curves: dict[str, list[dict]]) -> None:
    _curve_plot(out, summary, curves, "val_loss", "validation loss", "val_loss.png")
    difference_plot(out, summary, curves)
    ladder_plot(out, summary)
    _curve_plot(
        out,
        summary,
        curves,
        "weight_norm",
        "weight l2 norm (evaluation weights)",
        "weight_norm.png",
        title="size of the weights: the SNOO paper reports it lower than AdamW's throughout training;\n"
        "this checks that claim",
    )
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


def wall_clock_plot(
    out: Path, summary: dict, curves: dict[str, list[dict]], modelled: Callable[[dict, int, float], float]
) -> None:
    """Scale-out: validation loss against the modelled wall-clock, ``modelled(row, step, gbit)``, one panel per link
    speed of ``summary``'s runs, one line per run."""
    plt = _pyplot()
    gbits = [int(g) for g in summary["runs"][0]["modelled_seconds"]] if summary["runs"] else []
    fig, axes = plt.subplots(1, len(gbits), figsize=(4.5 * len(gbits), 4.5), sharey=True, squeeze=False)
    top = -math.inf
    for ax, gbit in zip(axes[0], gbits):
        for i, r in enumerate(summary["runs"]):
            points = [(modelled(r, m["step"], gbit), m["val_loss"]) for m in curves[r["dir"]] if "val_loss" in m]
            if points:
                who = f", {r['workers']} workers" if r["workers"] > 1 else f": {r['optimizer']}"
                color = plt.get_cmap("tab20").colors[i % 20]
                ax.plot(*zip(*points), label=f"{r['setup']}{who}", color=color, lw=1.2, marker=".", ms=3)
                top = max(top, *(v for _, v in points[len(points) // 4 :]))
        ax.set_xlabel("modelled wall-clock (s)")
        ax.set_title(f"{gbit} Gbit/s between workers")
        ax.grid(alpha=0.3)
    if math.isfinite(top):
        axes[0][0].set_ylim(top=top)
    axes[0][0].set_ylabel("validation loss")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "val_loss_wall_clock.png", dpi=110)
    plt.close(fig)


def scaling_plot(out: Path, summary: dict) -> None:
    """Compute factor against parameters (log-log), one line per contender and tokens-per-parameter ratio, with the
    fitted trend; 1x (no saving) drawn."""
    rows = [r for r in summary["rows"] if isinstance(r["compute_factor"], float)]
    if not rows:
        return
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    palette = ("tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink")
    series: dict[tuple[str, float], list[dict]] = {}
    for r in rows:
        series.setdefault((r["contender"], round(r["tokens_per_param"], 1)), []).append(r)
    for i, ((contender, ratio), rs) in enumerate(series.items()):
        rs.sort(key=lambda r: r["params"])
        xs, ys = [r["params"] for r in rs], [r["compute_factor"] for r in rs]
        lows = [y - (r["interval"]["low"] or y) for r, y in zip(rs, ys)]
        highs = [(r["interval"]["high"] or y) - y for r, y in zip(rs, ys)]
        ax.errorbar(
            xs,
            ys,
            yerr=[lows, highs],
            marker="o",
            capsize=3,
            color=palette[i % len(palette)],
            label=f"{contender}, {ratio:g} tokens/param",
        )
    for contender, t in summary["trend"].items():
        xs = sorted({r["params"] for r in rows if r["contender"] == contender})
        a, b = t["log_factor"]["a"], t["log_factor"]["b"]
        ax.plot(xs, [math.exp(a + b * math.log(x)) for x in xs], ":", color="grey", label=f"fitted trend: {contender}")
    ax.axhline(1.0, color="tab:blue", lw=1.2, label="baseline (1x)")
    _save_log_x(
        fig,
        ax,
        out / "scaling.png",
        "parameters (log scale)",
        "compute factor against the baseline (higher is better)",
        "does the saving grow with model size?",
    )


def _save_log_x(fig, ax, path: Path, xlabel: str, ylabel: str, title: str) -> None:
    """Label a plot whose x-axis is logarithmic (the studies across sizes), save it and close it."""
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)


def frontier_plot(out: Path, summary: dict) -> None:
    """The paper's way: final loss against training FLOPs (log scale), each size's seeds as a mean with min-max
    bars, and each optimizer's fitted frontier ``E + A (C/C0)^-alpha`` over the measured range only."""
    if not summary.get("frontier"):
        return
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    palette = ("tab:orange", "tab:green", "tab:red", "tab:purple")
    for i, f in enumerate(summary["frontier"].values()):
        lo, hi = min(p["flops"] for p in f["points"]), max(p["flops"] for p in f["points"])
        grid = [lo * (hi / lo) ** (j / 60) for j in range(61)]
        for key, fit, colour, label in (
            ("baseline", f["baseline_fit"], "tab:blue", "baseline"),
            ("contender", f["contender_fit"], palette[i % len(palette)], f["contender"]),
        ):
            xs = [p["flops"] for p in f["points"]]
            ys = [statistics.fmean(p[key]) for p in f["points"]]
            err = [
                [y - min(p[key]) for y, p in zip(ys, f["points"])],
                [max(p[key]) - y for y, p in zip(ys, f["points"])],
            ]
            ax.errorbar(xs, ys, yerr=err, fmt="o", color=colour, capsize=3, ms=4)
            curve = [fit["e"] + fit["a"] * (c / fit["c0"]) ** -fit["alpha"] for c in grid]
            ax.plot(grid, curve, "-", color=colour, lw=1.2, label=f"{label} ({f['tokens_per_param']:g} tokens/param)")
        ax.plot(
            [],
            [],
            " ",
            label=f"factor at the largest size: {f['factor']:.2f}x"
            + (f" [{f['interval']['low']:.2f}, {f['interval']['high']:.2f}]" if f["interval"] else " (one seed)"),
        )
    _save_log_x(
        fig,
        ax,
        out / "frontier.png",
        "training FLOPs (log scale)",
        "final val loss (lower is better)",
        "loss against compute, one point per model size (bars: min-max over seeds)",
    )
