"""benchmarks/gpu_scaling.sh in its CPU smoke form: the pilot, the plan from FLOP counts and the pilot's speed, the
study under a hard time limit, and the CPU study's table from whatever finished."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_plan_fits_the_budget_from_flop_counts(monkeypatch):
    """Costs scale with each size's FLOPs per step above the pilot's (never below: small models are launch-bound);
    sizes are taken from the smallest while they fit, two seeds when four sizes still fit, else one."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_scaling
    from snoo.lab import config, scaling

    cfg = config.make_config("compare")
    sizes = [(1, 64), (2, 64), (3, 64), (4, 64), (6, 64)]
    measured = {"seconds_per_step": 0.01, "per_run": 2.0}
    budgets = [0.5, 1.0, 2.0]
    chosen, seeds, rows = gpu_scaling.plan(cfg, sizes, measured, 20, budgets, 0.2, 1e9, 256, 10**8)
    assert chosen == sizes and seeds == 2
    pilot = scaling.flops_per_token(config.make_config("tiny", n_layer=1, n_embd=64, n_head=2, block_size=128), 256)
    for (layers, width), row in zip(sizes, rows):
        point = config.make_config("tiny", n_layer=layers, n_embd=width, n_head=2, block_size=128)
        per_step = 0.01 * max(1.0, scaling.flops_per_token(point, 256) / pilot)
        s = row["steps"]
        ladder = round(2 * s) + round(0.2 * round(0.5 * s)) + round(0.2 * s)  # trunk to 2x, decays of 0.5x and 1x
        assert row["seconds_per_seed"] == pytest.approx((ladder + s) * per_step + 4 * 2.0)
    four = sum(r["seconds_per_seed"] for r in rows[:4])
    assert gpu_scaling.plan(cfg, sizes, measured, 20, budgets, 0.2, 2 * four + 1, 256, 10**8)[:2] == (sizes[:4], 2)
    assert gpu_scaling.plan(cfg, sizes, measured, 20, budgets, 0.2, four, 256, 10**8)[:2] == (sizes[:4], 1)
    assert gpu_scaling.plan(cfg, sizes, measured, 20, budgets, 0.2, 1.0, 256, 10**8)[:2] == (sizes[:1], 1)


def test_gpu_scaling_plans_runs_and_reports_within_its_budget(tmp_path, corpus_file):
    out = tmp_path / "gs"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        # a budget of its own: the smoke's default (150 s) fills itself with as many sizes as the machine's speed
        # allows, 18 s on a busy machine and 140 s on a quiet one
        [str(ROOT / "benchmarks" / "gpu_scaling.sh"), str(out), "--cpu-smoke", "--data", corpus_file, "--budget", "40"],
        env=env,
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    plan = (out / "plan.md").read_text()
    planned = [line.split("|")[1].strip() for line in plan.splitlines() if line.endswith("| yes |")]
    assert planned and "ms per step" in plan and "untuned" in plan
    assert planned == [f"{n}x32" for n in range(1, len(planned) + 1)]  # from the smallest, while they fit
    summary = json.loads((out / "study" / "summary.json").read_text())
    done = [r["point"].split("-")[0] for r in summary["rows"]]
    assert done + [p.split("-")[0] for p in summary["pending"]] == planned  # finished or said to be pending
    assert summary["precision"] == "fp32" and all(r["command"].startswith("snoo train") for r in summary["runs"])
