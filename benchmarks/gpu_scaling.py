"""The scaling study's next step, prepared for one GPU: AdamW against SNOO(AdamW) at as many sizes from about 2M
parameters upward as fit a time budget, written as the CPU study writes it (``summary.md``, ``summary.json`` with
the frontier fit, ``scaling.png``, ``frontier.png``). Run it through ``benchmarks/gpu_scaling.sh``.

1. **Pilot.** One short ``snoo train`` at the smallest candidate size: seconds per step after step 20 (compiling
   done), and the run's start-up (wall time less its steps).
2. **Plan.** Each candidate size costs ``seeds x (ladder runs + 1 contender run)`` runs of ``tokens_per_param x
   params`` tokens; a run's time is its start-up plus its steps at the pilot's seconds per step scaled by the
   FLOPs per step (``snoo.lab.scaling.flops_per_token``; never less than the pilot's: small models are bound by
   kernel launches, not FLOPs). Sizes are taken from the smallest while the total fits; two seeds when that still
   leaves four sizes (the fewest a frontier fit takes), else one.
3. **Run** ``snoo scaling`` with that plan under a hard limit (what is left of the budget), then ``snoo report``
   writes the table, fit and plots from the points that finished (the others are listed as pending).

Every setting is printed with the plan in ``plan.md``. Contenders are untuned (AdamW at the ``compare`` preset's lr,
SNOO with the package defaults around it): eight minutes do not hold a tuning budget, and the table says so.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from snoo.lab import config
from snoo.lab.data import load_corpus
from snoo.lab.ladder import budget_steps
from snoo.lab.scaling import flops_per_token, model_params, summarize_scaling

#: candidate sizes (layers x width; one head per 32 of width), about 2M to 20M parameters with bytes
GPU_SIZES = ("6x160", "6x192", "8x192", "8x224", "8x256", "10x256", "10x320", "12x384")
SMOKE_SIZES = ("1x32", "2x32", "3x32", "4x32")


#: every run's settings: bf16 autocast, torch.compile and batches of 16K tokens on the GPU; the tiny preset on a CPU
GPU_SETTINGS = dict(device="cuda", autocast="bf16", compile="on", batch_size=64, block_size=256, eval_batches=10)
SMOKE_SETTINGS = dict(device="cpu", autocast="off", compile="off", threads=1, eval_batches=1)


def snoo(*args: str, limit: float | None = None) -> int:
    """``python -m snoo ARGS`` in a session of its own; the exit status (124, and the whole session stopped, when it
    ran past ``limit``: compile workers and job processes included)."""
    proc = subprocess.Popen([sys.executable, "-m", "snoo", *args], start_new_session=True)
    try:
        return proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # the lab checkpoints and exits on SIGTERM
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        return 124


def pilot(out: Path, preset: str, size: tuple[int, int], sets: list[str], steps: int, data: list[str]) -> dict:
    """Seconds per step after step 20 at ``size``, and the rest of the pilot's wall time (start-up, building,
    compiling, evaluating) as the overhead of one run."""
    layers, width = size
    args = ["train", "--preset", preset, "--steps", str(steps), "--no-progress", "--out", str(out), *data]
    for s in [*sets, f"n_layer={layers}", f"n_embd={width}", f"n_head={width // 32}", "log_every=5"]:
        args += ["--set", s]
    t0 = time.perf_counter()
    if snoo(*args) != 0:
        raise SystemExit(f"the pilot run failed (see {out})")
    wall = time.perf_counter() - t0
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [m for m in logged if "time" in m and m["step"] >= min(20, steps // 2)]
    first, last = timed[0], timed[-1]
    per_step = (last["time"] - first["time"]) / max(last["step"] - first["step"], 1)
    # a run of the study costs what the pilot's process cost beyond its steps (imports and the corpus included:
    # an overestimate where the study trains its runs in one process, never an underestimate)
    return {"seconds_per_step": per_step, "per_run": max(0.0, wall - steps * per_step)}


def plan(
    cfg: config.TrainConfig,
    sizes: list[tuple[int, int]],
    measured: dict,
    tokens_per_param: float,
    budgets: list[float],
    decay: float,
    budget_s: float,
    vocab: int,
    train_tokens: int,
) -> tuple[list[tuple[int, int]], int, list[dict]]:
    """The sizes and seeds that fit ``budget_s``, and each candidate's estimated cost."""
    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum
    pilot_cfg = config.make_config(
        "tiny", n_layer=sizes[0][0], n_embd=sizes[0][1], n_head=sizes[0][1] // 32, block_size=cfg.block_size
    )
    pilot_flops = flops_per_token(pilot_cfg, vocab)
    top = max(budgets)
    rows = []
    for layers, width in sizes:
        point = config.make_config("tiny", n_layer=layers, n_embd=width, n_head=width // 32, block_size=cfg.block_size)
        params = model_params(point, vocab)
        steps = max(1, round(tokens_per_param * params / tokens_per_step))
        per_step = measured["seconds_per_step"] * max(1.0, flops_per_token(point, vocab) / pilot_flops)
        ladder_steps = budget_steps(steps, top) + sum(
            round(decay * budget_steps(steps, b)) for b in budgets if b != top
        )
        runs = len(budgets)  # a trunk and its branches: one start-up each
        seed_cost = (ladder_steps + steps) * per_step + (runs + 1) * measured["per_run"]
        epochs = budget_steps(steps, top) * tokens_per_step / train_tokens
        rows.append(
            {
                "size": f"{layers}x{width}",
                "params": params,
                "steps": steps,
                "seconds_per_seed": seed_cost,
                "epochs": epochs,
            }
        )
    for seeds in (2, 1):
        chosen, total = [], 0.0
        for (layers, width), row in zip(sizes, rows):
            if total + seeds * row["seconds_per_seed"] > budget_s:
                break
            chosen.append((layers, width))
            total += seeds * row["seconds_per_seed"]
        if len(chosen) >= 4:
            return chosen, seeds, rows
    # fewer than four sizes fit: one seed each, and at least the smallest size (the time limit stops what overruns)
    return chosen or sizes[:1], 1, rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU, in seconds (what the tests run)")
    p.add_argument("--budget", type=float, default=None, help="seconds for everything (default 450; smoke: 150)")
    p.add_argument("--tokens-per-param", type=float, default=None, help="default 20 (smoke: 0.05)")
    p.add_argument("--budgets", default="0.5,1,1.5,2", help="the baseline's ladder (default 0.5,1,1.5,2)")
    p.add_argument("--data", help="a text file or built-in corpus (default: the standard library's source)")
    args = p.parse_args(argv)
    start = time.perf_counter()
    smoke = args.cpu_smoke
    budget_s = args.budget or (150.0 if smoke else 450.0)
    ratio = args.tokens_per_param or (0.05 if smoke else 20.0)
    preset = "tiny" if smoke else "compare"
    budgets = [float(b) for b in args.budgets.split(",")]
    chosen_settings = SMOKE_SETTINGS if smoke else GPU_SETTINGS
    sets = [f"{k}={v}" for k, v in chosen_settings.items()]
    data = ["--data", args.data] if args.data else []
    args.out.mkdir(parents=True, exist_ok=True)
    sizes = [tuple(map(int, s.split("x"))) for s in (SMOKE_SIZES if smoke else GPU_SIZES)]
    cfg = config.make_config(preset, **{k: v for k, v in chosen_settings.items() if k in ("batch_size", "block_size")})
    corpus = load_corpus(args.data)
    measured = pilot(args.out / "pilot", preset, sizes[0], sets, 8 if smoke else 60, data)
    left = budget_s - (time.perf_counter() - start) - (10 if smoke else 30)  # the report's share
    chosen, seeds, rows = plan(
        cfg, sizes, measured, ratio, budgets, cfg.decay, left, corpus.vocab_size, corpus.info["train_tokens"]
    )
    lines = [
        f"# GPU scaling plan ({'CPU smoke' if smoke else 'GPU'})",
        "",
        f"pilot at {sizes[0][0]}x{sizes[0][1]}: {measured['seconds_per_step'] * 1e3:.1f} ms per step, "
        f"{measured['per_run']:.1f} s more per run (start-up, compiling, evaluating); {left:.0f} s left for the "
        f"study; {ratio:g} tokens per parameter; ladder "
        f"{args.budgets}; settings {' '.join(sets)}; corpus {corpus.info['source']} "
        f"({corpus.info['train_tokens']:,} train tokens); AdamW and SNOO(AdamW) untuned",
        "",
        "| size | params | steps | estimated seconds per seed | epochs at the largest rung | planned |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for row, size in zip(rows, sizes):
        lines.append(
            f"| {row['size']} | {row['params']:,} | {row['steps']:,} | {row['seconds_per_seed']:.0f} "
            f"| {row['epochs']:.2f}{' (over one)' * (row['epochs'] > 1)} "
            f"| {'yes' if size in chosen else 'no'} |"
        )
    lines.append(f"\n{len(chosen)} sizes, {seeds} seed{'s' * (seeds > 1)} each")
    (args.out / "plan.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    study = args.out / "study"
    cmd = [
        "scaling",
        "--preset",
        preset,
        "--sizes",
        ",".join(f"{a}x{b}" for a, b in chosen),
        "--tokens-per-param",
        f"{ratio:g}",
        "--optimizers",
        "adamw(lr=0.004),snoo+adamw(lr=0.004)",
        "--seeds",
        str(seeds),
        "--budgets",
        args.budgets,
        "--ladder",
        "wsd",
        "--jobs",
        "1",
        "--no-progress",
        "--out",
        str(study),
        *data,
    ]
    for s in sets:
        cmd += ["--set", s]
    left = budget_s - (time.perf_counter() - start) - (10 if smoke else 30)
    status = snoo(*cmd, limit=max(left, 1.0))
    if status == 124:
        print(f"the study ran out of its {left:.0f} s: the points that finished are reported, the rest pending")
    if status == 124 and (study / "experiment.json").exists():
        summarize_scaling(study)  # from the points that finished, in this process
        print((study / "summary.md").read_text())
    return 0 if status in (0, 124) else status


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
