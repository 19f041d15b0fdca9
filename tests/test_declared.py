"""One declaration per optimizer: a wrapper defined in one class (the toy one docs/wrappers.md shows) is a name of
the SPEC grammar, of the lab's tuning and of its plots, with nothing else to edit (docs/wrappers.md, "Adding a
wrapper")."""

from __future__ import annotations

import json
import re

import pytest
import torch

from snoo import spec
from snoo.lab import plots
from snoo.lab.cli import main
from snoo.optim import declaration
from test_docs_snippets import ROOT, blocks_of


@pytest.fixture
def toy_average(monkeypatch):
    """The toy wrapper of docs/wrappers.md, defined by running that page's block as written (so the page and these
    tests cannot drift apart): it evaluates an EMA of the iterates, a_{t+1} = decay a_t + (1 - decay) p_{t+1}. The
    registry is restored afterwards, so no other test sees it."""
    monkeypatch.setattr(declaration, "DECLARED", dict(declaration.DECLARED))
    (block,) = [b for b in blocks_of(ROOT / "docs" / "wrappers.md") if "class ToyAverage(Wrapper)" in b.source]
    namespace: dict = {}
    exec(compile(block.source, f"docs/wrappers.md:{block.line}", "exec"), namespace)
    return namespace["ToyAverage"]


def test_a_declared_wrapper_is_a_name_of_the_grammar_with_its_declarations(toy_average):
    entry = spec.NAMES["toy_average"]
    assert entry.kind == "wrapper" and entry.defaults == {"decay": 0.9} and entry.trials == toy_average.tuning_trials
    with pytest.raises(ValueError, match=r"toy_average: decay=1 is out of range: decay must be in \[0, 1\)"):
        spec.parse("toy_average(decay=1)+adamw")
    opt = spec.build("toy-average(decay=0.5)+adamw", torch.nn.Linear(3, 2))
    assert isinstance(opt, toy_average) and opt.param_groups[0]["toy_decay"] == 0.5
    assert plots._knob_label("toy_average+adamw", "decay") == "toy average decay"


def test_plots_label_the_package_knobs_as_their_classes_declare():
    """The labels the heatmap had in a table of its own (plots.KNOB_NAMES), now declared by SNOO and Lookahead."""
    labels = {
        ("snoo", "lr"): "SNOO outer lr",
        ("snoo", "momentum"): "SNOO outer momentum",
        ("snoo", "k"): "K (inner steps per outer step)",
        ("lookahead", "alpha"): "Lookahead alpha",
        ("lookahead", "k"): "lookahead k",  # not declared: "<stage> <key>"
        ("adamw", "lr"): "adamw lr",
    }
    for (stage, key), label in labels.items():
        optimizer = "adamw" if stage == "adamw" else f"{stage}+adamw"
        assert plots._knob_label(optimizer, f"{stage}.{key}") == label
    assert plots._knob_label("snoo+adamw", "momentum") == "SNOO outer momentum"  # the outermost stage with the key


def test_a_second_class_cannot_take_a_declared_name(toy_average):
    with pytest.raises(ValueError, match=re.escape("'snoo' is declared by snoo.optim.snoo.SNOO already")):

        class Impostor(toy_average):
            spec_name = "snoo"


def test_the_declarations_leave_with_the_fixture():
    assert "toy_average" not in spec.NAMES


def test_a_declared_wrapper_runs_through_compare_with_tune(toy_average, tmp_path, corpus_file):
    """``snoo compare --tune 2`` on the toy wrapper: its two declared trials train, the best is reported."""
    out = tmp_path / "cmp"
    code = main(
        [
            "compare",
            "--preset",
            "tiny",
            "--data",
            corpus_file,
            "--steps",
            "4",
            "--budgets",
            "1",
            "--tune",
            "2",
            "--jobs",
            "1",
            "--set",
            "threads=1",
            "--set",
            "eval_every=2",
            "--out",
            str(out),
            "--optimizers",
            "adamw,toy_average+adamw",
            "--no-progress",
        ]
    )
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    lr = spec.NAMES["adamw"].defaults["lr"]
    trials = {  # the first two that the class declares
        spec.override("toy_average+adamw", {"adamw.lr": lr * f, "toy_average.decay": knobs["decay"]})
        for f, knobs in toy_average.tuning_trials[:2]
    }
    toy = next(t for t in summary["tuning"].values() if t["from"] == "toy_average+adamw")
    assert set(toy["trials"]) == trials and all(loss > 0 for loss in toy["trials"].values())
    tuned = next(name for name, t in summary["tuning"].items() if t is toy)
    rows = [r for r in summary["runs"] if r["optimizer"] == tuned]
    assert rows and all(r["final_val_loss"] > 0 for r in rows)
    assert tuned in summary["compute_factor"]
