"""The lab's shape (issue 20): rooms of one idea each, no import circle, no long function or file; and the numbers
a fixed compare gives, unchanged by the split."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

from snoo import spec
from snoo.lab import config, experiments, launch

SRC = Path(__file__).resolve().parents[1] / "src" / "snoo"
LAB = SRC / "lab"


def _functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.lineno, node.end_lineno - node.lineno + 1


def test_no_lab_function_is_over_80_lines():
    long = [
        f"{path.relative_to(SRC)}:{line} {name} ({n} lines)"
        for path in sorted(LAB.rglob("*.py"))
        for name, line, n in _functions(path)
        if n > 80
    ]
    assert not long, long


def test_no_source_file_is_over_700_lines():
    long = [
        f"{p.relative_to(SRC)} ({n} lines)"
        for p in sorted(SRC.rglob("*.py"))
        if (n := len(p.read_text().splitlines())) > 700
    ]
    assert not long, long


def _lab_imports(path: Path) -> set[str]:
    """The lab modules a lab module imports, at its top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "snoo.lab":
                found |= {f"snoo.lab.{a.name}" for a in node.names}
            elif node.module.startswith("snoo.lab."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("snoo.lab.")}
    return found


def test_the_lab_has_no_import_circle():
    def name(path: Path) -> str:
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    graph = {name(p): _lab_imports(p) for p in LAB.rglob("*.py")}
    graph = {m: {i for i in imported if i in graph and i != m} for m, imported in graph.items()}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError(" -> ".join([*path[path.index(module) :], module]))
        if module not in done:
            for imported in sorted(graph[module]):
                visit(imported, [*path, module])
            done.add(module)

    for module in sorted(graph):
        visit(module, [])


def test_a_fixed_compare_gives_the_numbers_it_gave_before(tmp_path, corpus_file, one_thread):
    # recorded with the code of main at f6ad21c (before the lab was split into rooms), this corpus and these settings
    cfg = config.make_config("tiny", data=corpus_file, out=str(tmp_path), progress=False, threads=1, steps=20)
    optimizers = ["adamw", "lookahead+adamw", "snoo(k=5)+adamw"]
    summary = experiments.run_experiment("compare", cfg, optimizers, budgets=[0.5, 1, 2], tune_trials=2, say=print)
    assert {r["dir"]: r["final_val_loss"] for r in summary["runs"]} == {
        "00-adamw_lr=0.004_-x0.5-s0": 4.345418214797974,
        "01-adamw_lr=0.004_-x1-s0": 3.4852874279022217,
        "02-adamw_lr=0.004_-x2-s0": 2.6179171800613403,
        "03-lookahead_alpha=0.5_+adamw_lr=0.004_-x1-s0": 4.277390956878662,
        "04-snoo_k=5_lr=0.7_momentum=0.5_+adamw_lr=0.004_-x1-s0": 3.1874353885650635,
    }
    assert summary["compute_factor"] == {
        "adamw(lr=0.004)": 1.0,
        "lookahead(alpha=0.5)+adamw(lr=0.004)": 0.52817555410027,
        "snoo(k=5,lr=0.7,momentum=0.5)+adamw(lr=0.004)": 1.268740176724351,
    }
    trials = {o: t["trials"] for o, t in summary["tuning"].items()}
    assert trials["snoo(k=5,lr=0.7,momentum=0.5)+adamw(lr=0.004)"] == {
        "snoo(k=5,lr=0.7,momentum=0.5)+adamw(lr=0.002)": 3.9972407817840576,
        "snoo(k=5,lr=0.7,momentum=0.5)+adamw(lr=0.004)": 3.1452122926712036,
    }
    assert trials["lookahead(alpha=0.5)+adamw(lr=0.004)"] == {
        "lookahead(alpha=0.5)+adamw(lr=0.002)": 4.795001268386841,
        "lookahead(alpha=0.5)+adamw(lr=0.004)": 4.258905649185181,
    }


def test_a_run_parses_its_spec_once(tmp_path, corpus_file, one_thread, monkeypatch):
    cfg = config.make_config("tiny", optimizer="snoo(k=2)+adamw", data=corpus_file, out=str(tmp_path), progress=False)
    cfg = dataclasses.replace(cfg, steps=4)  # a config that has not been parsed yet
    parsed = []
    parse = spec.parse
    monkeypatch.setattr(spec, "parse", lambda text: parsed.append(text) or parse(text))
    result = launch.run(cfg)
    assert result["status"] == "ok" and parsed == ["snoo(k=2)+adamw"]  # checks, build, schedule, records: once


def test_a_run_recorded_before_total_steps_was_a_key_is_the_same_run():
    # EMA-Nesterov's optimizer in a run's identity as main at f6ad21c recorded it, before lr_peak and total_steps
    # (None by default) were keys of the SPEC: --resume keeps such a run
    before = "ema_nesterov(beta=0.6,gamma=0.99,scale_by_lr=False,warmup_steps=0,rest_steps=0)+adamw(lr=0.002,"
    before += "beta1=0.9,beta2=0.95,eps=1e-08,weight_decay=0.1)"
    now = config.identity(config.make_config("tiny", optimizer="ema_nesterov(beta=0.6)+adamw"), "abc")
    assert "total_steps=None" in now["optimizer"]
    assert config.differences({**now, "optimizer": before}, now) == []
    longer = config.make_config("tiny", optimizer="ema_nesterov(beta=0.6,rest_steps=2,total_steps=40)+adamw")
    assert len(config.differences({**now, "optimizer": before}, config.identity(longer, "abc"))) == 1
