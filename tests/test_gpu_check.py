"""The GPU benchmarks and benchmarks/gpu_check.sh in their small CPU forms, so that the one prepared device check
does not rot while no GPU runs it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


@pytest.fixture
def benchmarks(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # as when run as a script: they import each other
    import offload_step
    import outer_step_gpu

    return outer_step_gpu, offload_step


def table_rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| ")]


def test_outer_step_benchmark_prints_its_tables_in_quick_mode(benchmarks, capsys, one_thread):
    outer_step_gpu, _ = benchmarks
    outer_step_gpu.main(["--quick"])
    out = capsys.readouterr().out
    assert "### float32 parameters" in out and "### bfloat16 parameters" in out and "amortised at K=20" in out
    rows = table_rows(out)
    floors = [r for r in rows if r[0].startswith("copy of p, w, b")]
    steps = [r for r in rows if r[0] == "SNOO outer step (foreach, Nesterov)"]
    assert len(floors) == len(steps) == 2
    assert all(float(r[1]) > 0 and re.fullmatch(r"\d+\.\d\dx floor", r[2]) for r in steps)
    shares = [r for r in rows if r[0] in ("float32", "bfloat16")]
    assert len(shares) == 2 and all(r[3].endswith("%") and float(r[3][:-1]) > 0 for r in shares)


def test_offload_benchmark_prints_floor_streamed_and_host_rows_in_quick_mode(benchmarks, capsys, one_thread):
    _, offload_step = benchmarks
    offload_step.main(["--quick"])
    rows = table_rows(capsys.readouterr().out)
    for dtype in ("float32", "bfloat16"):
        what = [r[1] for r in rows if r[0] == dtype]
        assert what[0].startswith("floor:") and what[-1] == "host-arithmetic outer step (before)"
        assert [w for w in what if w.startswith("streamed")] == [
            "streamed outer step, chunk 2^6",
            "streamed outer step, chunk 2^10",
        ]
    assert all(float(r[2]) > 0 for r in rows[1:])


def run_script(out: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "OUT"}
    environment.update(PYTHON=sys.executable, SNOO_GPU_CHECK_SMOKE="1", **env)
    return subprocess.run(
        ["bash", str(SCRIPT), str(out)], capture_output=True, text=True, timeout=300, env=environment, cwd="/"
    )


def test_gpu_check_script_parses_runs_the_lab_part_and_keeps_to_its_budget(tmp_path, corpus_file):
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    assert os.access(SCRIPT, os.X_OK)

    done = run_script(tmp_path / "lab", SNOO_GPU_CHECK_PARTS="lab", SNOO_GPU_CHECK_DATA=corpus_file)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = (tmp_path / "lab" / "summary.md").read_text()
    assert "| lab | 0 |" in summary and "| cuda-tests | not selected |" in summary
    rows = table_rows((tmp_path / "lab" / "lab.md").read_text())
    runs = {r[0]: r for r in rows if r[0] in ("adamw", "snoo(k=20)+adamw")}
    assert runs.keys() == {"adamw", "snoo(k=20)+adamw"}
    for r in runs.values():
        assert r[2] == "6" and 0 < float(r[3]) < 10 and float(r[4].replace(",", "")) > 0  # steps, loss, tokens/s

    # a budget that is spent skips every part, and says so
    done = run_script(tmp_path / "late", SNOO_GPU_CHECK_BUDGET="5")
    assert done.returncode == 0, done.stderr
    summary = (tmp_path / "late" / "summary.md").read_text()
    for name in ("environment", "cuda-tests", "outer-step", "offload", "lab"):
        assert f"| {name} | skipped: out of time |" in summary


def test_the_cuda_tests_that_need_no_streams_run_on_the_cpu():
    """tests/test_cuda.py imports the references of the other test files and calls them: run its float32 wrapper
    tests on the CPU (SNOO_TEST_DEVICE=cpu), so that a change to a reference breaks here and not on a GPU."""
    env = {**os.environ, "SNOO_TEST_DEVICE": "cpu"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", "-k", "wrapper and float32",
         str(ROOT / "tests" / "test_cuda.py")],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"\b8 passed\b", done.stdout), done.stdout
