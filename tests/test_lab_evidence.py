"""The lab's ruler and its evidence: compute factors that honour the measured points, intervals over seeds, the
warm-up-stable-decay ladder, and tuning with the same budget for every contender."""

from __future__ import annotations

import json
import math
import re
import shutil
import statistics
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from snoo import spec
from snoo.lab import checkpoint, config, experiments, scaling, stats, train, tuning
from snoo.lab.tuning import TUNE_SEED_OFFSET


def tiny(out, corpus_file, **kw) -> config.TrainConfig:
    return config.make_config("tiny", data=corpus_file, out=str(out), progress=False, threads=1, **kw)


# ---------------------------------------------------------------------------------------------- the ruler

ladders = st.lists(st.floats(1.0, 5.0), min_size=2, max_size=6)


@settings(max_examples=300, deadline=None)
@given(ladders, st.floats(0.5, 6.0))
def test_factor_never_contradicts_the_equal_step_result(losses, loss):
    """A run that ends at or below the baseline's 1x loss gets a factor >= 1; above it, < 1 (or a '<' bound),
    whatever the shape of the ladder (curved, noisy, non-monotone)."""
    steps = [100 + 25 * i for i in range(len(losses))]  # 1x is the first budget
    _assert_agrees_with_equal_steps(steps, losses, 100, losses[0], loss)


def _assert_agrees_with_equal_steps(steps, losses, anchor, anchor_loss, loss):
    factor = stats.compute_factor(steps, losses, anchor, loss)
    if factor is None:  # the ruler (isotonic, pinned at 1x) never improves on its first budget
        ruler = stats.envelope(steps, losses, anchor)
        assert ruler[-1] >= ruler[0]
        return
    if isinstance(factor, str):
        assert (factor.startswith(">") and loss <= anchor_loss) or (factor.startswith("<") and loss > anchor_loss)
        return
    assert factor >= 1 if loss <= anchor_loss else factor < 1


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(1.0, 5.0), min_size=3, max_size=7), st.data())
def test_factor_never_contradicts_the_equal_step_result_with_1x_inside_the_ladder(losses, data):
    """The same guarantee with the 1x run anywhere in the ladder (budgets below 1x too), and the loss drawn near the
    ladder's own values, where flat pieces of the ruler sit."""
    a = data.draw(st.integers(0, len(losses) - 1))
    loss = data.draw(st.sampled_from(losses) | st.floats(0.5, 6.0))
    steps = [50 + 25 * i for i in range(len(losses))]
    _assert_agrees_with_equal_steps(steps, losses, steps[a], losses[a], loss)


def test_a_flat_piece_through_1x_resolves_to_1x():
    """The audit's case: the ladder rises from 0.75x to 1x, so the ruler is flat at the 1x loss over [0.75x, 1x]; a
    loss equal to the 1x loss got 0.75x (the first flat segment) while 1.4999 got 1.0004."""
    budgets, losses = [500, 750, 1000, 1250, 1500], [1.60, 1.49, 1.50, 1.45, 1.42]
    assert stats.compute_factor(budgets, losses, 1000, 1.5000) == 1.0
    assert 1.0 < stats.compute_factor(budgets, losses, 1000, 1.4999) < 1.001
    assert 0.74 < stats.compute_factor(budgets, losses, 1000, 1.5001) < 0.75  # just above: on the 0.5x-0.75x piece


def test_ruler_passes_through_the_measured_1x_point_of_a_curved_ladder():
    """The case of the issue: losses curved in log-steps, so a log-linear fit passes below the 1x point; a run
    below the baseline's 1x loss at equal steps got a factor '<1' from the fit. The ruler says > 1."""
    steps = [500, 625, 750, 1000, 1250]
    losses = [1.8858, 1.8200, 1.8000, 1.7900, 1.7850]  # flattening: convex in log-steps
    a, b = stats.fit_log_steps(steps, losses)
    assert a + b * math.log(500) < 1.8648 < 1.8858  # the fit's 1x value is below SNOO's loss ...
    factor = stats.compute_factor(steps, losses, 500, 1.8648)
    assert isinstance(factor, float) and factor > 1  # ... the ruler's is the measured one
    # linear in log-steps between the two budgets around the loss
    t = (1.8858 - 1.8648) / (1.8858 - 1.8200)
    assert factor == pytest.approx(math.exp(math.log(500) + t * (math.log(625) - math.log(500))) / 500)


def test_envelope_is_isotonic_and_anchored():
    """Isotonic regression on each side of 1x, pinned to the measured 1x loss: the noisy 3.2 is clipped to the 1x
    loss, and 2.9, 3.0 pool to their mean (a running minimum would take the luckiest rung, 2.9, for both)."""
    assert stats.envelope([1, 2, 3, 4], [3.0, 3.2, 2.9, 3.0], anchor=1) == pytest.approx([3.0, 3.0, 2.95, 2.95])
    assert stats.envelope([1, 2, 3], [2.5, 3.0, 2.8], anchor=2) == [3.0, 3.0, 2.8]  # below 1x: at least the 1x loss
    assert stats.envelope([1, 2, 3, 4, 5], [1.6, 1.49, 1.5, 1.45, 1.42], anchor=3) == pytest.approx(
        [1.6, 1.5, 1.5, 1.45, 1.42]
    )
    with pytest.raises(ValueError, match="increasing"):
        stats.envelope([2, 1], [1.0, 2.0])


def test_intervals_and_verdicts():
    assert stats.t95(1) == pytest.approx(12.706, abs=1e-3) and stats.t95(4) == pytest.approx(2.776, abs=1e-3)
    assert stats.t95(100) == pytest.approx(1.984, abs=1e-3)
    iv = stats.interval([1.0, 2.0, 3.0])
    assert iv["mean"] == 2.0 and iv["high"] - iv["mean"] == pytest.approx(4.3027 * 1.0 / math.sqrt(3), rel=1e-4)
    assert stats.factor_interval([1.2, 1.25, 1.22])["verdict"] == "faster"
    assert stats.factor_interval([0.8, 0.82, 0.79])["verdict"] == "slower"
    wide = stats.factor_interval([0.9, 1.2, 1.05])
    assert wide["verdict"] == "no measurable difference" and wide["low"] < 1 < wide["high"]
    geo = stats.factor_interval([2.0, 0.5])
    assert geo["mean"] == pytest.approx(1.0)  # geometric mean: 2x and 0.5x cancel
    assert stats.factor_interval([1.3])["verdict"] == "one seed: no interval"
    censored = stats.factor_interval([1.3, ">2.5", 1.4])  # censored at the bound, not dropped
    assert censored["censored"] == [">2.5"] and censored["n"] == 3
    assert censored["mean"] == pytest.approx(math.exp((math.log(1.3) + math.log(2.5) + math.log(1.4)) / 3))
    assert stats.factor_interval([1.3, None])["verdict"] == "n/a"
    d = stats.difference_interval([1.0, 1.01, 0.99], [1.1, 1.12, 1.08])
    assert d["verdict"] == "lower" and d["mean"] == pytest.approx(-0.1)


# ---------------------------------------------------------------------------------------------- ladders


def test_wsd_ladder_costs_less_and_its_branches_equal_runs_from_scratch(tmp_path, corpus_file):
    """One trunk to the largest budget and a short decay branch per budget; each branch ends bit for bit where a
    warm-up-stable-decay run of that length from scratch ends."""
    cfg = tiny(tmp_path / "cmp", corpus_file, steps=20, eval_every=5, ckpt_every=100)
    summary = experiments.run_experiment(
        "compare", cfg, ["adamw", "snoo(k=5)+adamw"], budgets=(1.0, 1.5, 2.0), ladder="wsd", say=lambda s: None
    )
    experiment = json.loads((tmp_path / "cmp" / "experiment.json").read_text())
    trunk, *branches = [j for j in experiment["jobs"] if j["optimizer"] == "adamw"]
    assert trunk["budget"] == 2.0 and trunk["snapshots"] == [16, 24]  # 20 - 4 and 30 - 6
    assert {b["budget"]: b["from_step"] for b in branches} == {1.0: 16, 1.5: 24}
    trained = sum(r["steps"] for r in summary["runs"] if r["optimizer"] == "adamw")
    # the branches trained only their decay: 40 + 4 + 6 steps, not 20 + 30 + 40
    steps_run = 40 + sum(r["steps"] - b["from_step"] for r, b in zip(summary["runs"][1:3], branches))
    assert steps_run == 50 and trained == 90
    assert summary["ladder"] == "wsd" and all(r["status"] == "ok" for r in summary["runs"])
    scratch = train.train(
        config.make_config(
            "tiny",
            data=corpus_file,
            out=str(tmp_path / "scratch"),
            progress=False,
            threads=1,
            steps=30,
            eval_every=5,
            ckpt_every=100,
            schedule="wsd",
            warmup_steps=1,
        )
    )
    branch = next(r for r in summary["runs"] if r["optimizer"] == "adamw" and r["budget"] == 1.5)
    assert scratch["final_val_loss"] == branch["final_val_loss"]

    def evals(path):
        return [(m["step"], m["val_loss"]) for m in checkpoint.read_metrics(path / "metrics.jsonl") if "val_loss" in m]

    runs = tmp_path / "cmp" / "runs"
    assert evals(runs / branch["dir"]) == evals(tmp_path / "scratch")  # every logged eval, bit for bit
    assert evals(runs / branch["dir"])[:5] == evals(runs / trunk["dir"])[:5]  # the shared part: the trunk's
    assert evals(runs / branch["dir"])[-1] != evals(runs / trunk["dir"])[6]  # then the branch decayed


def test_a_branch_whose_snapshot_an_older_snoo_wrote_trains_from_scratch_to_the_same_end(tmp_path, corpus_file):
    cfg = tiny(tmp_path / "cmp", corpus_file, steps=20, eval_every=5, ckpt_every=100)
    args = dict(budgets=(1.0, 2.0), ladder="wsd", say=lambda s: None)
    first = experiments.run_experiment("compare", cfg, ["adamw"], **args)
    trunk, branch = json.loads((tmp_path / "cmp" / "experiment.json").read_text())["jobs"]
    snapshot = tmp_path / "cmp" / "runs" / trunk["dir"] / checkpoint.snapshot_name(branch["from_step"])
    torch.save({"model": {}, "step": branch["from_step"]}, snapshot)  # no sha256, no run: an older format
    assert "not a checkpoint of this lab" in checkpoint.unbranchable(snapshot)
    shutil.rmtree(tmp_path / "cmp" / "runs" / branch["dir"])
    said: list[str] = []
    again = experiments.run_experiment("compare", cfg, ["adamw"], **{**args, "say": said.append}, resume=True)
    assert any("from scratch" in line and "not a checkpoint of this lab" in line for line in said)
    assert [r["final_val_loss"] for r in again["runs"]] == [r["final_val_loss"] for r in first["runs"]]


def test_ladder_choice_is_checked(tmp_path, corpus_file):
    with pytest.raises(ValueError, match="ladder"):
        experiments.run_experiment("compare", tiny(tmp_path, corpus_file), ["adamw", "sgd"], ladder="linear")


# ---------------------------------------------------------------------------------------------- tuning


def test_every_contender_gets_the_same_number_of_trials_on_its_own_knobs():
    adamw, snoo = tuning.trials("adamw", 4), tuning.trials("snoo+adamw", 4)
    assert len(adamw) == len(snoo) == 4
    lr = spec.NAMES["adamw"].defaults["lr"]
    assert [spec.parse(t)[-1].params["lr"] for t in adamw] == pytest.approx([lr, 2 * lr, lr / 2, 4 * lr])
    outer = [(spec.parse(t)[0].params["lr"], spec.parse(t)[0].params["momentum"]) for t in snoo]
    assert len(set(outer)) > 1 and len({spec.parse(t)[-1].params["lr"] for t in snoo}) > 1  # outer and inner knobs
    (first,) = tuning.trials("snoo+adamw", 1)
    assert spec.resolved(first) == spec.resolved("snoo+adamw")  # the package defaults are the first trial


def test_tune_reports_the_best_trial_on_an_unreported_seed(tmp_path, corpus_file):
    cfg = tiny(tmp_path / "t", corpus_file, steps=6, eval_every=3)
    summary = experiments.run_experiment(
        "compare", cfg, ["adamw", "snoo(k=3)+adamw"], budgets=(1.0,), tune_trials=2, say=lambda s: None
    )
    tuning = summary["tuning"]
    assert {t["from"] for t in tuning.values()} == {"adamw", "snoo(k=3)+adamw"}
    for tuned, t in tuning.items():
        assert len(t["trials"]) == 2 and t["trials"][tuned] == min(t["trials"].values())
        assert t["steps"] == 12
    assert set(summary["compute_factor"]) == set(tuning)  # the reported runs are the tuned settings
    tune_seeds = {json.loads(p.read_text())["config"]["seed"] for p in (tmp_path / "t" / "tune").glob("*/config.json")}
    assert tune_seeds == {cfg.seed + TUNE_SEED_OFFSET} and cfg.seed not in tune_seeds
    assert "tuned adamw" in (tmp_path / "t" / "summary.md").read_text()


def test_every_wrapper_is_tuned_on_the_trials_its_class_declares():
    """--tune N takes the first N of the outermost stage's declared trials: the base lr times a factor, and that
    wrapper's own knobs (SNOO: outer lr and momentum; GPA: mu_y and mu_x; ...); a base optimizer its lr alone."""
    import snoo

    for name, cls in (("snoo", snoo.SNOO), ("lookahead", snoo.Lookahead), ("gpa", snoo.GPA)):
        for n in (1, 4, 6):
            got = tuning.trials(f"{name}+adamw(lr=0.004)", n)
            want = [
                spec.canonical(
                    spec.override(
                        f"{name}+adamw(lr=0.004)",
                        {"adamw.lr": 0.004 * f, **{f"{name}.{k}": v for k, v in knobs.items()}},
                    )
                )
                for f, knobs in cls.tuning_trials[:n]
            ]
            assert got == list(dict.fromkeys(want)) and len(got) == n
    assert tuning.trials("adamw(lr=0.004)", 3) == ["adamw(lr=0.004)", "adamw(lr=0.008)", "adamw(lr=0.002)"]
    # the package's defaults come first for every wrapper, so a budget of one trial compares the defaults
    assert all(c.tuning_trials[0][0] == 1.0 for c in (snoo.SNOO, snoo.Lookahead, snoo.EMANesterov, snoo.GPA))


def test_tuning_on_two_seeds_takes_the_mean_and_reports_neither(tmp_path, corpus_file):
    cfg = tiny(tmp_path / "t2", corpus_file, steps=6, eval_every=3)
    summary = experiments.run_experiment(
        "compare", cfg, ["adamw", "snoo(k=3)+adamw"], budgets=(1.0,), tune_trials=2, tune_seeds=2, say=lambda s: None
    )
    runs = {p.parent.name: json.loads(p.read_text()) for p in (tmp_path / "t2" / "tune").glob("*/result.json")}
    configs = {p.parent.name: json.loads(p.read_text()) for p in (tmp_path / "t2" / "tune").glob("*/config.json")}
    assert {c["config"]["seed"] for c in configs.values()} == {cfg.seed + 1000, cfg.seed + 1001}
    for t in summary["tuning"].values():
        assert t["seeds"] == [cfg.seed + 1000, cfg.seed + 1001] and t["steps"] == 4 * 6
        for trial, loss in t["trials"].items():
            per_seed = [runs[d]["final_val_loss"] for d, c in configs.items() if c["spec"] == trial]
            assert len(per_seed) == 2 and loss == pytest.approx(statistics.fmean(per_seed))
    assert "seeds 1000, 1001 (trial loss: their mean)" in (tmp_path / "t2" / "summary.md").read_text()


def test_a_tuned_lr_at_the_edge_of_its_trials_is_flagged():
    lrs = ["adamw(lr=0.001)", "adamw(lr=0.002)", "adamw(lr=0.004)"]
    assert tuning._at_edge("adamw(lr=0.004)", lrs) and tuning._at_edge("adamw(lr=0.001)", lrs)
    assert not tuning._at_edge("adamw(lr=0.002)", lrs)
    assert not tuning._at_edge("adamw(lr=0.004)", lrs[1:])  # two trials have no inside
    snoo = tuning.trials("snoo+adamw(lr=0.002)", 2)  # inner lr 1x and 2x only: no edge to speak of
    assert not any(tuning._at_edge(t, snoo) for t in snoo)
    snoo = tuning.trials("snoo+adamw(lr=0.002)", 4)  # inner lr 0.5x, 1x and 2x: SNOO's lr has edges too
    assert [tuning._at_edge(t, snoo) for t in snoo] == [False, True, True, False]


def test_beyond_the_edge_is_the_next_lr_out_with_the_best_trials_other_knobs():
    adamw = ["adamw(lr=0.004)", "adamw(lr=0.008)", "adamw(lr=0.002)", "adamw(lr=0.016)"]
    assert tuning._beyond("adamw(lr=0.002)", adamw) == "adamw(lr=0.001)"
    assert tuning._beyond("adamw(lr=0.016)", adamw) == "adamw(lr=0.032)"
    snoo = tuning.trials("snoo+adamw(lr=0.002)", 4)  # inner lr 0.5x, 1x and 2x; the outer knobs of the best stay
    best = next(t for t in snoo if tuning._at_edge(t, snoo) and "0.004" in t)
    assert tuning._beyond(best, snoo) == spec.override(best, {"adamw.lr": 0.008})


def test_tune_widen_tries_beyond_the_edge_until_the_best_is_inside(tmp_path, corpus_file):
    """An lr far too small for 6 steps: each larger lr is better, so the best stays at the top edge and every widening
    step is taken; the trials beyond it are numbered after the first ones, counted in the cost, and kept on --resume."""
    cfg = tiny(tmp_path / "w", corpus_file, steps=6, eval_every=3)
    run = dict(budgets=(1.0,), tune_trials=3, tune_seeds=1, tune_widen=2, say=lambda s: None)
    summary = experiments.run_experiment("compare", cfg, ["adamw(lr=1e-05)", "snoo(k=3)+adamw(lr=1e-05)"], **run)
    for t in summary["tuning"].values():
        lrs = [spec.parse(x)[-1].params["lr"] for x in t["trials"]]
        assert lrs == pytest.approx([1e-5, 2e-5, 5e-6, 4e-5, 8e-5])
        assert t["widened"] == list(t["trials"])[3:] and t["tuned"] == list(t["trials"])[-1]
        assert t["at_edge"] and t["steps"] == 5 * 6
        losses = list(t["trials"].values())
        assert losses[-1] < losses[3] < losses[1]  # each step out was better: why there were two
    dirs = sorted(p.name for p in (tmp_path / "w" / "tune").iterdir())
    assert [d[:2] for d in dirs] == [f"{i:02d}" for i in range(10)]
    assert all("lr=8e-05" in d for d in dirs[8:])
    text = (tmp_path / "w" / "summary.md").read_text()
    assert "best of 5 trials (2 beyond the edge of the lrs tried first)" in text
    said: list[str] = []
    again = experiments.run_experiment(
        "compare", cfg, ["adamw(lr=1e-05)", "snoo(k=3)+adamw(lr=1e-05)"], resume=True, **{**run, "say": said.append}
    )
    assert again["tuning"] == summary["tuning"] and not any(s.startswith("    started") for s in said)
    with pytest.raises(ValueError, match="give --tune too"):
        experiments.run_experiment("compare", cfg, ["adamw", "snoo+adamw"], tune_widen=1, say=lambda s: None)


# ---------------------------------------------------------------------------------------------- scaling


def test_scaling_runs_one_compare_per_point_and_fits_a_trend(tmp_path, corpus_file, capsys):
    from snoo.lab.cli import main

    out = tmp_path / "sc"
    args = ["scaling", "--preset", "tiny", "--data", corpus_file, "--sizes", "1x32,2x32,3x32"]
    args += ["--tokens-per-param", "0.05", "--optimizers", "adamw,snoo(k=3)+adamw", "--budgets", "1,2"]
    args += ["--ladder", "wsd", "--set", "threads=1", "--no-progress", "--out", str(out)]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    rows = summary["rows"]
    assert [r["point"] for r in rows] == ["1x32-r0.05", "2x32-r0.05", "3x32-r0.05"]
    assert rows[0]["params"] < rows[1]["params"] < rows[2]["params"]
    for r in rows:
        assert r["tokens_per_param"] == pytest.approx(0.05, rel=0.2)  # steps are rounded
        point = json.loads((out / r["point"] / "summary.json").read_text())
        assert point["compute_factor_interval"][r["optimizer"]]["mean"] == r["compute_factor"]
    trend = summary["trend"].get("snoo(k=3)+adamw")
    finite = [r for r in rows if r["compute_factor"] is not None]
    assert (trend is not None) == (len(finite) == 3)
    assert "| 3x32-r0.05 |" in capsys.readouterr().out and (out / "summary.md").exists()
    with pytest.raises(ValueError, match="LAYERSxWIDTH"):
        scaling.parse_sizes("4x50")


def test_jobs_in_parallel_processes_give_the_same_results(tmp_path, corpus_file):
    """--jobs 2: two runs at once in processes of their own, the WSD branches after their trunk; every run ends
    where it ends in one process, bit for bit."""
    results, said = {}, []
    for processes in (1, 2):
        cfg = tiny(tmp_path / f"p{processes}", corpus_file, steps=8, eval_every=4)
        summary = experiments.run_experiment(
            "compare",
            cfg,
            ["adamw", "snoo(k=3)+adamw"],
            budgets=(1.0, 2.0),
            ladder="wsd",
            processes=processes,
            say=said.append if processes == 2 else lambda s: None,
        )
        results[processes] = {r["dir"]: r["final_val_loss"] for r in summary["runs"]}
    assert results[1] == results[2] and len(results[1]) == 3
    # what a newcomer reads: the time it will take first, then each result counted in order, named by its run
    assert re.fullmatch(r"3 runs to train, \d+ steps in all, 2 at a time: about \d+ s on this machine.*", said[0])
    done = [line for line in said if "done]" in line]
    assert [line.split()[0] for line in done] == ["[1/3", "[2/3", "[3/3"]
    for line in done:
        name = line.split("] ", 1)[1].split(":")[0]  # e.g. "adamw x2 seed 0"
        started = next(i for i, s in enumerate(said) if s.startswith(f"    started {name}:"))
        assert started < said.index(line)
    assert "left" in done[0] and "left" not in done[-1]


def test_builtin_corpora_of_three_kinds_ship_with_python():
    from snoo.lab import data

    corpora = {name: data.load_corpus(name) for name in data.BUILTIN_CORPORA if name != "torch-source"}
    assert corpora["python-stdlib"].info == data.load_corpus().info  # the default
    assert len({c.info["sha256"] for c in corpora.values()}) == 3
    for name, c in corpora.items():
        assert c.info["source"] == name and len(c.train) > 500_000 and len(c.val) > 50_000
        assert data.fingerprint(name) == c.info["sha256"]  # what --resume keys a finished run on
    docs = bytes(corpora["python-docs"].train[:200_000].tolist())
    headers = bytes(corpora["python-headers"].train[:200_000].tolist())
    assert docs.count(b"def ") < docs.count(b" the ") and b"#define" in headers and b"#define" not in docs


def test_the_large_corpus_is_the_source_of_the_installed_torch():
    """The scaling study's corpus: torch's own Python files (tens of MB), in a fixed order, fingerprinted by their
    contents (loading it is left to the study: 46 MB)."""
    from snoo.lab import data

    name, files, texts = data._sources("torch-source")
    root = Path(torch.__file__).parent
    assert name == "torch-source" and texts is None and len(files) > 1000
    assert all(f.suffix == ".py" and root in f.parents for f in files) and (root / "optim" / "adamw.py") in files
    assert sum(f.stat().st_size for f in files) > 20e6  # 20M tokens: a 0.5M-parameter model at 20 tokens each
    assert data.fingerprint("torch-source") not in {data.fingerprint(n) for n in ("python-stdlib", "python-docs")}


# ------------------------------------------------------------------------------------ power and the paper's fit


def test_smallest_detectable_factor_has_the_power_it_claims():
    """Simulated experiments whose true log-factor is the detectable one are called "faster" about 80% of the
    time (the formula is the usual normal-shift approximation of the t-test's power)."""
    import numpy as np

    n, sd = 8, 0.05
    mde = stats.detectable(sd, n)
    assert mde == pytest.approx((stats.t_quantile(0.975, 7) + stats.t_quantile(0.8, 7)) * sd / math.sqrt(8))
    rng = np.random.default_rng(0)
    sims = rng.normal(mde, sd, size=(4000, n))
    called = sum(stats.factor_interval(list(np.exp(row)))["verdict"] == "faster" for row in sims)
    assert 0.75 < called / 4000 < 0.85
    assert stats.detectable(sd, 1) is None
    factors = [1.05, 1.1, 0.98, 1.02]
    sd = statistics.stdev(math.log(f) for f in factors)
    assert stats.factor_interval(factors)["detectable"] == pytest.approx(math.exp(stats.detectable(sd, 4)))


def test_the_trend_weights_each_point_by_its_own_interval_and_is_never_surer_than_the_points():
    from scipy import stats as sps

    x, y = [10.6, 11.2, 11.7, 12.1], [-0.134, -0.108, 0.005, 0.051]
    # equal errors: the least-squares line
    ols = sps.linregress(x, y)
    fit = stats.weighted_trend(x, y, [0.05] * 4)
    assert fit["weighted"] and fit["b"] == pytest.approx(ols.slope) and fit["a"] == pytest.approx(ols.intercept)
    # a point known to within 0.01 pulls the line through itself; one known to within 1 barely counts
    sure, unsure = stats.weighted_trend(x, y, [0.01, 1, 1, 1]), stats.weighted_trend(x, y, [1, 0.01, 1, 1])
    assert abs(sure["a"] + sure["b"] * x[0] - y[0]) < 0.01 and abs(unsure["a"] + unsure["b"] * x[1] - y[1]) < 0.01
    # points exactly on a line: least squares would give a zero-width interval; their own errors still count
    line = [0.1 * v - 1.2 for v in x]
    half = stats.t95(2) * math.sqrt(1 / sum((v - sum(x) / 4) ** 2 / 0.2**2 for v in x))
    lo, hi = stats.weighted_trend(x, line, [0.2] * 4)["slope_interval"]
    assert (hi - lo) / 2 == pytest.approx(half) and lo < 0.1 < hi
    # points that scatter more than their errors say get the interval of their scatter (least squares'); points
    # whose errors are larger than their scatter get the interval of their errors
    sxx = sum((v - sum(x) / 4) ** 2 for v in x)
    loose, tight = stats.weighted_trend(x, y, [0.001] * 4), stats.weighted_trend(x, y, [0.2] * 4)
    assert loose["scatter"] > 1 and tight["scatter"] < 1
    assert loose["slope_interval"][1] - loose["b"] == pytest.approx(stats.t95(2) * ols.stderr)
    assert tight["slope_interval"][1] - tight["b"] == pytest.approx(stats.t95(2) * 0.2 / math.sqrt(sxx))
    assert stats.t95(2) * 0.2 / math.sqrt(sxx) > stats.t95(2) * ols.stderr
    # a point without an interval (one seed): least squares from the scatter alone, said so
    plain = stats.weighted_trend(x, y, [0.05, math.inf, 0.05, 0.05])
    assert not plain["weighted"] and plain["b"] == pytest.approx(ols.slope)
    assert plain["slope_interval"][1] - plain["b"] == pytest.approx(stats.t95(2) * ols.stderr)
    with pytest.raises(ValueError, match="three points"):
        stats.weighted_trend(x[:2], y[:2], [0.1, 0.1])


def test_frontier_fit_recovers_a_power_law_and_the_compute_ratio():
    """Losses exactly on L = E + A C^-alpha are fitted back, and a contender that reaches every loss with 1.5x less
    compute has the factor 1.5 at any loss."""
    flops = [1e12 * 2**i for i in range(6)]
    base = [1.2 + 3.0 * (c / 1e12) ** -0.3 for c in flops]
    contender = [1.2 + 3.0 * (1.5 * c / 1e12) ** -0.3 for c in flops]
    b, c = stats.fit_frontier(flops, base), stats.fit_frontier(flops, contender)
    assert b["e"] == pytest.approx(1.2, abs=1e-4) and b["alpha"] == pytest.approx(0.3, abs=1e-4)
    assert stats.frontier_ratio(b, c, 2.0) == pytest.approx(1.5, rel=1e-3)
    assert stats.frontier_flops(b, 1.1) == math.inf  # below the irreducible loss: never reached
    with pytest.raises(ValueError, match="four points"):
        stats.fit_frontier(flops[:3], base[:3])


def test_bootstrap_interval_covers_the_mean_of_the_seeds():
    values = [1.0, 1.2, 0.9, 1.1, 1.05, 0.95, 1.15, 1.0]
    iv = stats.bootstrap_interval(list(range(8)), lambda idx: sum(values[i] for i in idx) / len(idx))
    assert iv["low"] < sum(values) / 8 < iv["high"] and iv["failed"] == 0
    assert iv["high"] - iv["low"] < 0.2


def test_the_scaling_frontier_from_rows_with_one_seed_has_no_interval_and_with_several_a_bootstrap():
    """Four sizes on a power law, the contender at 1.5x less compute: the paper's factor is 1.5; with one seed the
    interval is said to be missing (a bootstrap of one seed resamples nothing), with three it brackets the factor."""

    def rows(seeds: int, sizes: int = 4) -> list[dict]:
        out = []
        for i, params in enumerate((40_000, 80_000, 160_000, 320_000, 640_000)[:sizes]):
            flops = 1e12 * 2**i
            base = 1.2 + 3.0 * (flops / 1e12) ** -0.3
            cont = 1.2 + 3.0 * (1.5 * flops / 1e12) ** -0.3
            noise = [0.002 * (s - 1) for s in range(seeds)]  # seeds that disagree a little, alike for both
            out.append(
                {
                    "contender": "snoo",
                    "ratio": 20,
                    "params": params,
                    "flops": flops,
                    "seeds": list(range(seeds)),
                    "baseline_val_loss": [base + e for e in noise],
                    "final_val_loss": [cont + e for e in noise],
                }
            )
        return out

    (one,) = scaling._frontiers(rows(1)).values()
    assert one["factor"] == pytest.approx(1.5, rel=1e-3) and one["interval"] is None and one["sizes"] == 4
    (three,) = scaling._frontiers(rows(3)).values()
    assert three["interval"]["low"] <= three["factor"] <= three["interval"]["high"]
    assert scaling._frontiers(rows(3)[:3]) == {}  # three sizes: no fit of three parameters
    assert three["leave_one_out"] == []  # four sizes: a refit without one would have three points


def test_the_scaling_frontier_from_five_sizes_refits_with_each_smaller_size_left_out():
    """Five sizes whose smallest contender point is off the curve: leaving that size out refits on the four exact
    points (1.5x again), and each refit is the plain fit of the four sizes it keeps, at the largest compute."""
    flops = [1e12 * 2**i for i in range(5)]
    base = [1.2 + 3.0 * (f / 1e12) ** -0.3 for f in flops]
    cont = [1.2 + 3.0 * (1.5 * f / 1e12) ** -0.3 for f in flops]
    cont[0] += 0.05  # the smallest size: the contender worse than its curve
    rows = [
        {
            "contender": "snoo",
            "ratio": 20,
            "params": 40_000 * 2**i,
            "flops": flops[i],
            "seeds": [0],
            "baseline_val_loss": [base[i]],
            "final_val_loss": [cont[i]],
        }
        for i in range(5)
    ]
    (f,) = scaling._frontiers(rows).values()
    assert [x["left_out_params"] for x in f["leave_one_out"]] == [40_000, 80_000, 160_000, 320_000]
    for i, x in enumerate(f["leave_one_out"]):
        keep = [j for j in range(5) if j != i]
        b = stats.fit_frontier([flops[j] for j in keep], [base[j] for j in keep])
        c = stats.fit_frontier([flops[j] for j in keep], [cont[j] for j in keep])
        loss = c["e"] + c["a"] * (flops[-1] / c["c0"]) ** -c["alpha"]
        assert x["factor"] == stats.frontier_ratio(b, c, loss)
    assert f["leave_one_out"][0]["factor"] == pytest.approx(1.5, rel=1e-3)
    assert f["factor"] != pytest.approx(1.5, rel=1e-3)  # the off-curve point moves the fit over all five
    values = [x["factor"] for x in f["leave_one_out"]]
    assert scaling._left_out(f["leave_one_out"]).startswith(
        f"; with one smaller size left out at a time (4 refits): {min(values):.2f}x to {max(values):.2f}x"
    )


def test_a_run_recorded_before_an_optimizer_gained_a_keyword_is_still_the_same_run():
    """SNOO gained ``fused`` and ``skip_nonfinite``: a run whose config.json predates them recorded SNOO without them;
    --resume must keep it (the new keywords at their defaults), and tell a real change of a setting from that."""
    cfg = config.make_config("tiny", optimizer="snoo(k=5)+adamw")
    now = config.identity(cfg, "abc")
    assert ",fused=False,skip_nonfinite=True" in now["optimizer"]
    before = {**now, "optimizer": now["optimizer"].replace(",fused=False,skip_nonfinite=True", "")}
    assert config.differences(before, now) == []
    fused = config.identity(config.make_config("tiny", optimizer="snoo(k=5,fused=true)+adamw"), "abc")
    assert config.differences(before, fused) == [f"optimizer {before['optimizer']!r} -> {fused['optimizer']!r}"]
    other = config.identity(config.make_config("tiny", optimizer="snoo(k=6)+adamw"), "abc")
    assert len(config.differences(before, other)) == 1
    lookahead = config.identity(config.make_config("tiny", optimizer="lookahead(k=5)+adamw"), "abc")
    assert len(config.differences(before, lookahead)) == 1  # another stage is another run, not a default
