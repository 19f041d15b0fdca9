"""benchmarks/step_overhead.py measures its contenders in turn, so the order of measuring cannot favour one."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("step_overhead", ROOT / "benchmarks" / "step_overhead.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def test_contenders_take_turns_and_the_first_one_rotates(bench):
    log: list[str] = []
    contenders = [
        bench.Contender(name, lambda name=name: log.append(name), calls) for name, calls in zip("abc", (2, 1, 3))
    ]
    bench.time_round_robin(contenders, rounds=4, device="cpu")
    warm_up, timed = log[:6], log[6:]
    assert warm_up == ["a", "a", "b", "c", "c", "c"]
    runs = [name for i, name in enumerate(timed) if i == 0 or timed[i - 1] != name]  # one entry per sample
    assert runs == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert [len(c.seconds) for c in contenders] == [4, 4, 4]
    assert all(t > 0 for c in contenders for t in c.seconds)


def test_ratios_are_paired_within_a_round(bench):
    ref = bench.Contender("AdamW (foreach) step", lambda: None, 1, seconds=[1.0, 2.0, 4.0])
    other = bench.Contender("x", lambda: None, 1, reference=ref.name, seconds=[1.1, 2.2, 4.4])
    by_name = {c.name: c for c in (ref, other)}
    assert bench.paired_ratios(other, by_name) == pytest.approx([1.1, 1.1, 1.1])
    assert bench.paired_ratios(ref, by_name) == [1.0, 1.0, 1.0]
    assert bench.quartiles([3.0, 1.0, 2.0]) == (1.5, 2.0, 2.5)


def test_the_benchmark_runs_and_prints_every_row(bench, monkeypatch, capsys, one_thread):
    monkeypatch.setattr(sys, "argv", ["step_overhead.py", "--width", "16", "--layers", "2", "--rounds", "3"])
    bench.main()
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
    names = [line.split(" | ")[0][2:] for line in table]
    assert names[:9] == [
        "AdamW (foreach) step",
        "SNOO(AdamW) step, K=1",
        "SNOO(AdamW) step, K=20",
        "SNOO(AdamW) step, K=20, track_norms",
        "snoo.Lookahead(AdamW) step, K=5",
        "copy of p, w, b once (memory floor)",
        "SNOO outer step alone (Nesterov)",
        "copy of p, w once (Lookahead's floor, floor2)",
        "Lookahead outer step alone (lerp + copy)",
    ]
    assert "| 1.00x AdamW | 1.00-1.00 | - |" in table[0]
    assert table[2].endswith("| 2.0x params |") and table[4].endswith("| 1.0x params |")


def test_the_benchmark_compares_the_outer_step_with_the_floor_the_authors_and_the_peer_and_amortises_it(
    bench, monkeypatch, capsys, one_thread
):
    monkeypatch.setattr(sys, "argv", ["step_overhead.py", "--width", "16", "--layers", "2", "--rounds", "2"])
    bench.main()
    out = capsys.readouterr().out
    rows = {line.split(" | ")[0][2:]: line for line in out.splitlines() if line.startswith("| ")}
    for name in (
        "SNOO(AdamW) step, K=5",
        "SNOO(AdamW) step, K=100",
        "SNOO(AdamW) step, K=20, fused",
        "SNOO outer step in step() (foreach)",
        "SNOO outer step in step() (foreach, skip_nonfinite=False)",
        "SNOO outer step in step() (fused)",
        "snoo.Lookahead outer step in step() (fused)",
        "authors' outer step (slow weights stepped by SGD(nesterov=True))",
        "SNOO outer step / floor, fused",
        "SNOO outer step / authors' approach, foreach",
    ):
        assert name in rows, name
    amortised = [rows[what] for what in rows if what.startswith(("SNOO(AdamW) step at K", "outer step ("))]
    assert len(amortised) == 3 and all(line.count("%") == 4 for line in amortised)
    assert "SNOO outer step in step() (fused): compiled in" in out
    peer = "snoo.Lookahead outer step / pytorch_optimizer's, foreach"
    try:
        import pytorch_optimizer  # noqa: F401
    except ImportError:
        assert "pytorch_optimizer is not installed" in out and peer not in rows
    else:
        assert peer in rows
