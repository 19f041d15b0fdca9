"""One declaration per optimizer: a wrapper defined in one class (here, in this file) is a name of the SPEC grammar,
of the lab's tuning and of its plots, with nothing else to edit (docs/wrappers.md, "Adding a wrapper")."""

from __future__ import annotations

import json
import re
from typing import Any, ClassVar

import pytest
import torch
from torch.optim import Optimizer

from snoo import checks, spec
from snoo.lab import plots
from snoo.lab.cli import main
from snoo.optim import declaration
from snoo.optim.declaration import Trial
from snoo.optim.tensors import state_dtype
from snoo.optim.wrapper import StateSpec, Wrapper


@pytest.fixture
def toy_average(monkeypatch):
    """A toy wrapper, declared the way docs/wrappers.md shows: it evaluates an EMA of the iterates,
    a_{t+1} = decay a_t + (1 - decay) p_{t+1}. The registry is restored afterwards, so no other test sees it."""
    monkeypatch.setattr(declaration, "DECLARED", dict(declaration.DECLARED))

    class ToyAverage(Wrapper):
        r"""Evaluates :math:`a`, an EMA of the iterates: :math:`a_1 = p,\ a_{t+1} = d\,a_t + (1 - d)\,p_{t+1}`."""

        spec_name = "toy_average"
        hyperparameter_ranges: ClassVar[dict[str, checks.Range]] = {"decay": checks.UNIT}
        tuning_trials: ClassVar[tuple[Trial, ...]] = (
            (1.0, {"decay": 0.9}),
            (2.0, {"decay": 0.5}),
            (1.0, {"decay": 0.5}),
        )
        knob_labels: ClassVar[dict[str, str]] = {"decay": "toy average decay"}
        state_spec = StateSpec(prefix="toy_average", names=("a",), evaluation="a")

        def __init__(self, inner: Optimizer, decay: float = 0.9, *, state_device: Any = None) -> None:
            super().__init__(inner, {"toy_decay": decay}, state_device=state_device)

        def _check_group(self, group: dict[str, Any]) -> None:
            checks.number(group["toy_decay"], "decay", checks.UNIT)

        def _init_param_state(self, param: torch.Tensor, group: dict[str, Any]) -> dict[str, torch.Tensor]:
            return {"a": self._new_state(param, param, state_dtype(param))}  # a_1 = p

        def _after_inner_step(self) -> None:
            for group in self.param_groups:
                params = [p for p in group["params"] if p.grad is not None and p in self.state]
                if params:  # a_{t+1} = decay a_t + (1 - decay) p_{t+1}
                    torch._foreach_lerp_([self.state[p]["a"] for p in params], params, 1 - group["toy_decay"])

    return ToyAverage


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
