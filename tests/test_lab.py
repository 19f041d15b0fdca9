"""The lab end to end on the `tiny` preset: data, model, train, resume, compare, sweep, report, the CLI."""

import itertools
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import LAB_TEXT as TEXT
from snoo import __version__ as snoo_version
from snoo import spec
from snoo.lab import checkpoint, config, data, experiments, stats, train, tuning
from snoo.lab.cli import main
from snoo.lab.jobs import _makespan
from snoo.lab.model import GPT, ModelConfig
from snoo.lab.summary import plain_words

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(out, corpus_file, **kw) -> config.TrainConfig:
    return config.make_config("tiny", data=corpus_file, out=str(out), progress=False, **kw)


# ---------------------------------------------------------------------------------------------- data


def test_default_corpus_is_the_stdlib_sorted_and_recorded():
    files = data.default_corpus_files()
    assert files == sorted(files) and any(f.name == "os.py" for f in files)
    c = data.load_corpus()
    assert c.vocab_size == 256 and len(c.train) > 1_000_000 and len(c.val) > 100_000
    assert c.info["python"] == sys.version.split()[0] and len(c.info["sha256"]) == 16
    assert data.load_corpus().info["sha256"] == c.info["sha256"]  # deterministic


def test_text_file_dir_glob_and_split(tmp_path, corpus_file):
    one = data.load_corpus(corpus_file)
    assert one.vocab_size == 256
    assert bytes(torch.cat([one.train, one.val]).to(torch.uint8).tolist()).decode() == TEXT  # byte tokens, all kept
    (tmp_path / "a.txt").write_text(TEXT[:40_000])
    (tmp_path / "b.txt").write_text(TEXT[40_000:])
    for path in (str(tmp_path), str(tmp_path / "*.txt")):
        c = data.load_corpus(path)
        assert c.info["files"] == 2 and c.info["sha256"] == one.info["sha256"]  # same bytes, same hash


def test_blockwise_split_holds_out_every_tenth_block():
    tokens = torch.arange(30 * data.BLOCK_BYTES) % 256
    train_t, val_t = data._split(tokens, 0.1)
    assert len(val_t) == 3 * data.BLOCK_BYTES and len(train_t) == 27 * data.BLOCK_BYTES
    assert torch.equal(val_t[: data.BLOCK_BYTES], tokens[9 * data.BLOCK_BYTES : 10 * data.BLOCK_BYTES])


def test_bin_files_nanogpt_layout_and_single(tmp_path):
    rng = np.random.default_rng(0)
    train_ids = rng.integers(0, 50257, 5000, dtype=np.uint16)
    val_ids = rng.integers(0, 50257, 800, dtype=np.uint16)
    train_ids.tofile(tmp_path / "train.bin")
    val_ids.tofile(tmp_path / "val.bin")
    (tmp_path / "meta.pkl").write_bytes(b"not tokens")  # nanoGPT keeps other files beside the .bin files
    c = data.load_corpus(str(tmp_path))
    assert torch.equal(c.train.long(), torch.from_numpy(train_ids.astype(np.int64)))
    assert torch.equal(c.val.long(), torch.from_numpy(val_ids.astype(np.int64)))
    x, _ = data.get_batch(c.train, 2, 16, seed=0, step=0)
    assert x.dtype == torch.int64 and int(x.max()) < c.vocab_size
    assert c.vocab_size % 64 == 0 and c.vocab_size > int(max(train_ids.max(), val_ids.max()))
    single = data.load_corpus(str(tmp_path / "train.bin"))
    assert len(single.train) + len(single.val) == 5000


def test_batches_are_a_function_of_seed_and_step():
    tokens = torch.arange(10_000)
    x, y = data.get_batch(tokens, 4, 16, seed=3, step=7)
    x2, y2 = data.get_batch(tokens, 4, 16, seed=3, step=7)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert torch.equal(y[:, :-1], x[:, 1:])  # targets are the next tokens
    assert not torch.equal(x, data.get_batch(tokens, 4, 16, seed=3, step=8)[0])
    assert not torch.equal(x, data.get_batch(tokens, 4, 16, seed=4, step=7)[0])


def test_unique_tokens_limits_the_train_split(tmp_path, corpus_file):
    cfg = tiny(tmp_path, corpus_file, unique_tokens=500, steps=4)
    assert train.train(cfg)["status"] == "ok"
    assert len(data.limit_unique(torch.arange(10_000), 500)) == 500


# ---------------------------------------------------------------------------------------------- model


@pytest.mark.parametrize(("flavour", "tie"), [("gpt", True), ("llama", False)])
def test_model_flavours_forward_and_tying(flavour, tie):
    cfg = ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16, flavour=flavour, tie_head=tie)
    model = GPT(cfg)
    x = torch.randint(64, (3, 16))
    assert model(x).shape == (3, 16, 64)
    loss = model(x, x)
    assert abs(loss.item() - math.log(64)) < 0.2  # small init: close to uniform
    assert (model.head.weight is model.embed.weight) == tie
    assert (model.pos is None) == (flavour == "llama")
    # causal: the logits at position t do not depend on tokens after t
    y = x.clone()
    y[:, 10:] = (y[:, 10:] + 1) % 64
    assert torch.allclose(model(x)[:, :10], model(y)[:, :10], atol=1e-5)


def test_lr_schedules():
    cfg = config.TrainConfig(steps=100, warmup=0.1, min_lr=0.1)
    f = [config.lr_schedule(cfg)(s) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0) and f[99] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in itertools.pairwise(f[10:]))
    wsd = config.TrainConfig(steps=100, warmup=0.1, schedule="wsd", decay=0.2)
    g = [config.lr_schedule(wsd)(s) for s in range(100)]
    assert g[50] == g[79] == 1.0 and g[80] == 1.0 and g[90] == pytest.approx(0.5) and g[99] == pytest.approx(0.05)


# ---------------------------------------------------------------------------------------------- training


def test_train_writes_metrics_and_result(tmp_path, corpus_file):
    r = train.train(tiny(tmp_path, corpus_file, optimizer="snoo(k=5)+adamw"))
    assert r["status"] == "ok" and r["steps"] == 40 and r["tokens"] == 40 * 8 * 32
    metrics = checkpoint.read_metrics(tmp_path / "metrics.jsonl")
    evals = [m for m in metrics if "val_loss" in m]
    assert [m["step"] for m in evals] == [0, 10, 20, 30, 40]
    assert evals[-1]["val_loss"] == r["final_val_loss"] < evals[0]["val_loss"] - 0.5
    logged = [m for m in metrics if "train_loss" in m]
    assert all("lr" in m and "outer/pseudo_grad" in m for m in logged)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["corpus"]["sha256"] and config["optimizer"][0]["k"] == 5
    assert json.loads((tmp_path / "result.json").read_text()) == r


def test_eval_uses_the_optimizers_evaluation_weights(tmp_path, corpus_file):
    # k=7 does not divide 40: at the end the fast weights are 5 steps past the slow ones
    r = train.train(tiny(tmp_path, corpus_file, optimizer="snoo(k=7)+adamw"))
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    fast_norm = math.sqrt(sum(v.float().pow(2).sum().item() for k, v in ckpt["model"].items() if k != "head.weight"))
    assert r["weight_norm"] != pytest.approx(fast_norm, rel=1e-6)


def _state(path: Path):
    ckpt = torch.load(path / "ckpt.pt", weights_only=True)
    metrics = [{k: v for k, v in m.items() if k != "time"} for m in checkpoint.read_metrics(path / "metrics.jsonl")]
    return ckpt, metrics


def test_resume_is_bit_exact(tmp_path, corpus_file):
    spec_ = "snoo(k=6)+adamw"  # 6 does not divide the checkpoint interval: resume lands mid outer step
    whole = tiny(tmp_path / "whole", corpus_file, optimizer=spec_)
    train.train(whole)

    def interrupt(step, loss):
        if step == 25:
            raise KeyboardInterrupt

    cut = tiny(tmp_path / "cut", corpus_file, optimizer=spec_)
    with pytest.raises(KeyboardInterrupt):
        train.train(cut, callback=interrupt)
    assert torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=True)["step"] == 20
    train.train(cut, resume=True)

    (a, ma), (b, mb) = _state(tmp_path / "whole"), _state(tmp_path / "cut")
    assert a["step"] == b["step"] == 40
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert ma == mb  # every logged number, in order, with no duplicate from the resumed step
    assert (
        json.loads((tmp_path / "whole/result.json").read_text())["final_val_loss"]
        == json.loads((tmp_path / "cut/result.json").read_text())["final_val_loss"]
    )


def test_checkpoint_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    checkpoint.atomic_save({"step": 1}, path)

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.os, "replace", crash)
    with pytest.raises(OSError):
        checkpoint.atomic_save({"step": 2}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}  # the old checkpoint is whole


def test_divergence_stops_and_keeps_last_good_checkpoint(tmp_path, corpus_file, capsys):
    out = tmp_path / "div"
    code = main(
        [
            "train",
            "--preset",
            "tiny",
            "--data",
            corpus_file,
            "--out",
            str(out),
            "--no-progress",
            "--optimizer",
            "sgd(lr=1e12,momentum=0)",
            "--set",
            "grad_clip=0",
            "--set",
            "ckpt_every=1",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 1 and "diverged" in err and len(err.splitlines()) == 1
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "diverged" and result["final_val_loss"] is None
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


# ---------------------------------------------------------------------------------------------- experiments


def test_compute_factor_math():
    steps = [100, 125, 150, 200, 250]
    losses = [3.0 - 0.5 * math.log(s) for s in steps]
    a, b = stats.fit_log_steps(steps, losses)
    assert a == pytest.approx(3.0) and b == pytest.approx(-0.5)
    # an optimizer reaching in 100 steps what the baseline reaches in 180 saves 1.8x
    assert stats.compute_factor(steps, losses, 100, 3.0 - 0.5 * math.log(180)) == pytest.approx(1.8)
    assert stats.compute_factor(steps, losses, 100, losses[0]) == pytest.approx(1.0)
    assert stats.compute_factor(steps, losses, 100, 3.0 - 0.5 * math.log(400)) == ">2.5"
    assert stats.compute_factor(steps, losses, 100, losses[0] + 0.1) == "<1"
    assert stats.compute_factor(steps, [2.0] * 5, 100, 1.9) is None  # baseline does not improve
    assert stats.compute_factor([100], [2.0], 100, 1.9) is None
    assert not hasattr(stats, "steps_to_target")  # a step read mid-schedule is no measure of a saving


def test_compare_summary_and_report(tmp_path, corpus_file, capsys):
    out = tmp_path / "cmp"
    code = main(
        [
            "compare",
            "--preset",
            "tiny",
            "--data",
            corpus_file,
            "--steps",
            "10",
            "--seeds",
            "2",
            "--out",
            str(out),
            "--optimizers",
            "adamw,snoo(k=5)+adamw",
            "--no-progress",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0 and "| snoo(k=5)+adamw |" in printed and "2 seeds" in printed
    summary = json.loads((out / "summary.json").read_text())
    runs = summary["runs"]
    assert len(runs) == 2 * (7 + 1)  # per seed: the baseline at 7 budgets, SNOO at 1x
    assert {r["steps"] for r in runs if r["optimizer"] == "adamw"} == {5, 8, 10, 12, 15, 20, 25}
    for r in runs:
        assert {"optimizer", "seed", "steps", "final_val_loss", "weight_norm"} <= set(r)
        assert r["final_val_loss"] > 0 and r["weight_norm"] > 0
    assert set(summary["compute_factor"]) == {"adamw", "snoo(k=5)+adamw"}
    assert summary["compute_factor"]["adamw"] == 1.0
    factor = summary["compute_factor"]["snoo(k=5)+adamw"]
    assert factor is None or isinstance(factor, (float, str))
    # one number: the factor is the centre of its interval, and the table and the sentence print that number
    interval = summary["compute_factor_interval"]["snoo(k=5)+adamw"]
    if interval["mean"] is not None:
        assert factor == interval["mean"]
        assert f"| {factor:.2f}x [" in printed
        assert f"compute factor is {factor:.2f}x" in printed or f"for {factor:.2f}x less compute" in printed
    last = printed.strip().splitlines()[-1]
    assert last.startswith(f"wrote {out / 'summary.json'}") and f"{out / 'ladder.png'}" in last
    assert printed.strip().splitlines()[-3].startswith("snoo(k=5)+adamw")  # the closing sentence, in plain words
    assert summary["corpus"]["python"] == sys.version.split()[0]
    # fairness: same seed -> same init, and one eval set -> the same loss at step 0 for every optimizer of a seed
    first = {}
    for r in runs:
        m0 = checkpoint.read_metrics(out / "runs" / r["dir"] / "metrics.jsonl")[0]
        first.setdefault(r["seed"], set()).add(m0["val_loss"])
    assert all(len(v) == 1 for v in first.values()) and len(first) == 2
    assert first[0] != first[1]  # another seed, another init
    for name in ("val_loss.png", "weight_norm.png", "summary.md"):
        assert (out / name).stat().st_size > 0

    before = (out / "summary.json").read_text()
    for name in ("summary.json", "summary.md", "val_loss.png", "weight_norm.png"):
        (out / name).unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "summary.json").read_text() == before and (out / "val_loss.png").exists()


def test_sweep_heatmap_and_resume_keeps_finished_runs(tmp_path, corpus_file, capsys):
    out = tmp_path / "sw"
    args = [
        "sweep",
        "--preset",
        "tiny",
        "--data",
        corpus_file,
        "--steps",
        "8",
        "--out",
        str(out),
        "--optimizer",
        "snoo-adamw",
        "--grid",
        "k=2,4 lr=0.5,0.7",
        "--no-progress",
    ]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["runs"]) == 1 + 4 and len(summary["grid"]) == 4
    assert summary["grid"]["snoo(k=4,lr=0.5)+adamw"] == {"k": 4, "lr": 0.5}
    assert (out / "heatmap.png").stat().st_size > 0
    capsys.readouterr()
    assert main([*args, "--resume"]) == 0
    assert capsys.readouterr().out.count("done before, kept") == 5


def test_a_diverged_run_is_reported_not_fatal(tmp_path, corpus_file, capsys):
    out = tmp_path / "d"
    assert (
        main(
            [
                "compare",
                "--preset",
                "tiny",
                "--data",
                corpus_file,
                "--steps",
                "6",
                "--out",
                str(out),
                "--optimizers",
                "adamw,sgd(lr=1e12,momentum=0)",
                "--set",
                "grad_clip=0",
                "--budgets",
                "1",
                "--seeds",
                "1",
                "--ladder",
                "cosine",
                "--jobs",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    assert "| sgd(lr=1e+12,momentum=0) | diverged |" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert [r["status"] for r in summary["runs"]] == ["ok", "diverged"]
    assert summary["compute_factor"]["sgd(lr=1e+12,momentum=0)"] is None


def test_tune_baseline_uses_best_lr_for_everyone(tmp_path, corpus_file):
    cfg = tiny(tmp_path, corpus_file, steps=6, eval_every=3)
    summary = experiments.run_experiment(
        "compare", cfg, ["adamw", "snoo(k=5)+adamw"], budgets=(1.0,), tune_baseline=True, say=lambda s: None
    )
    lr = summary["tuned_lr"]
    assert lr in [spec.NAMES["adamw"].defaults["lr"] * f for f in tuning.TUNE_FACTORS]
    assert all(f"adamw(lr={lr:g})" in r["optimizer"] for r in summary["runs"])


# ---------------------------------------------------------------------------------------------- command line


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["train", "--optimizer", "adamx"], "unknown optimizer 'adamx'"),
        (["train", "--optimizer", "snoo(k=0)+adamw"], "k=0 is out of range"),
        (["train", "--data", "/no/such/file.txt"], "no such file"),
        (
            ["train", "--data", "python-doc"],
            "nor a built-in corpus (python-stdlib, python-docs, python-headers, torch-source)",
        ),
        (["compare", "--schedule", "cosine"], "wsd ladder trains every run on the wsd schedule"),
        (["train", "--data", "EMPTY"], "fewer than one block"),
        (["train", "--preset", "huge"], "unknown preset 'huge'"),
        (["train", "--set", "n_layers=3"], "unknown config key 'n_layers'"),
        (["train", "--steps", "many"], "invalid int value"),
        (["train", "--set", "steps=many"], "steps must be int"),
        (["train", "--set", "tie_head=1"], "tie_head must be bool"),
        (["compare", "--optimizers", "adamw"], "at least two"),
        (["sweep", "--grid", "k=1,2 foo=3"], "has a key 'foo'"),
        (["report", "/no/such/dir"], "experiment.json is missing"),
        (["fly"], "invalid choice"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, args, words):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    args = [str(empty) if a == "EMPTY" else a for a in args]
    if args[0] != "report":
        args += ["--preset", "tiny"] if "--preset" not in args else []
        args += ["--out", str(tmp_path / "o"), "--no-progress"] if args[0] != "fly" else []
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("snoo: error: ") and words in err and err.count("\n") == 1


def test_plain_words_follow_the_verdict_and_print_the_one_factor():
    def summary(mean, low, high, verdict):
        iv = {"mean": mean, "low": low, "high": high, "n": 3, "verdict": verdict}
        return {
            "baseline": "adamw",
            "seeds": [0, 1, 2],
            "regime": {"params": 123_456, "tokens_per_param": 16.6},
            "table": [{"optimizer": "adamw", "final_val_loss": 1.4}, {"optimizer": "snoo", "final_val_loss": 1.3}],
            "compute_factor": {"adamw": 1.0, "snoo": mean},
            "compute_factor_interval": {"snoo": iv},
        }

    (faster,) = plain_words(summary(1.5, 1.2, 1.9, "faster"))
    assert faster.startswith("snoo is faster than adamw at this size (123,456 parameters, 16.6 tokens per parameter)")
    assert "1.50x less compute (95% interval over 3 seeds: 1.20x to 1.90x)" in faster
    (same,) = plain_words(summary(1.04, 0.9, 1.2, "no measurable difference"))
    assert (
        same.startswith("snoo is not measurably faster than adamw")
        and "1.04x" in same
        and "0.90x to 1.20x, includes 1x" in same
    )
    assert "4 times in 5" not in same  # no power figure given, none said
    powered = summary(1.04, 0.9, 1.2, "no measurable difference")
    powered["compute_factor_interval"]["snoo"].update(detectable=1.31, censored=[">2.5"])
    (said,) = plain_words(powered)
    assert "a true saving of 1.31x or more 4 times in 5" in said and "1 seed beyond the lengths measured" in said
    (slower,) = plain_words(summary(0.88, 0.86, 0.9, "slower"))
    assert slower.startswith("snoo is slower than adamw") and "0.88x" in slower


def test_the_time_estimate_follows_the_order_the_runs_start_in():
    """Two processes; the trunk (10 s) with two branches (2 s each, after it), and a contender (3 s)."""
    jobs = [{"dir": "trunk"}, {"dir": "b1", "branch_of": "trunk"}, {"dir": "b2", "branch_of": "trunk"}, {"dir": "c"}]
    seconds = {0: 10.0, 1: 2.0, 2: 2.0, 3: 3.0}
    assert _makespan(jobs, seconds, 2) == 12.0  # c runs beside the trunk; the branches at 10 s, at once
    assert _makespan(jobs, seconds, 1) == 17.0
    assert _makespan(jobs, {1: 2.0, 2: 2.0, 3: 3.0}, 2) == 5.0  # trunk done before: b1, b2, then c


def test_version_and_help_name_the_corpora_and_the_schedule_that_runs(capsys):
    import platform
    import re

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    expected = f"snoo {snoo_version} (torch {torch.__version__}, Python {platform.python_version()})"
    assert capsys.readouterr().out.strip() == expected
    helps = {}
    for command in ("train", "compare", "reproduce"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        helps[command] = " ".join(re.sub(r"-\n\s+", "-", capsys.readouterr().out).split())  # as argparse wraps
        assert f"a built-in corpus ({', '.join(data.BUILTIN_CORPORA)}; default python-stdlib" in helps[command], command
    assert "inner lr schedule (default cosine)" in helps["train"]
    assert "inner lr schedule (default wsd, as the default --ladder wsd needs" in helps["compare"]


@pytest.mark.parametrize(
    ("flag", "module", "words"),
    [
        (["--tokenizer", "bpe"], "tokenizers", "pip install tokenizers"),
        (["--tensorboard"], "tensorboard", "pip install tensorboard"),
        (["--wandb"], "wandb", "pip install 'snoo-optim[wandb]'"),
    ],
)
def test_missing_optional_package_is_one_clear_line(tmp_path, corpus_file, capsys, monkeypatch, flag, module, words):
    monkeypatch.setitem(sys.modules, module, None)  # as if it were not installed: importing it raises ImportError
    args = ["train", "--preset", "tiny", "--data", corpus_file, "--out", str(tmp_path), "--steps", "2", *flag]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1


def test_wandb_logs_every_number_offline(tmp_path, corpus_file, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")  # no network, no account
    monkeypatch.setenv("WANDB_SILENT", "true")
    args = ["train", "--preset", "tiny", "--data", corpus_file, "--out", str(tmp_path), "--steps", "6", "--wandb"]
    assert main([*args, "--no-progress"]) == 0
    (run,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    final = repr(json.loads((tmp_path / "result.json").read_text())["final_val_loss"]).encode()
    began = time.monotonic()  # wandb's service process may still be writing the run file when finish() returns
    while final not in run.read_bytes() and time.monotonic() - began < 60:
        time.sleep(0.2)
    logged = run.read_bytes()
    assert b"val_loss" in logged and b"outer/" not in logged and final in logged


def test_bpe_tokenizer_is_trained_on_the_corpus_offline(tmp_path, corpus_file):
    pytest.importorskip("tokenizers")
    args = ["train", "--preset", "tiny", "--data", corpus_file, "--out", str(tmp_path), "--steps", "2"]
    assert main([*args, "--tokenizer", "bpe", "--set", "bpe_vocab=300"]) == 0
    corpus = json.loads((tmp_path / "config.json").read_text())["corpus"]
    assert corpus["tokenizer"] == "bpe-300" and corpus["train_tokens"] < 0.7 * len(TEXT.encode())  # merges happened
    assert json.loads((tmp_path / "result.json").read_text())["status"] == "ok"


def test_python_m_snoo_bad_input_no_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "snoo", "train", "--optimizer", "snoo(lr=zero)+adamw"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr == "snoo: error: snoo: lr='zero' is not a number\n"


def test_toml_config(tmp_path, corpus_file):
    config = tmp_path / "run.toml"
    config.write_text(
        f'preset = "tiny"\ndata = "{corpus_file}"\nsteps = 8\nprogress = false\nschedule = "wsd"\n'
        'optimizer = [{name = "snoo", k = 4}, {name = "adamw", lr = 2e-3}]\n'
    )
    out = tmp_path / "t"
    assert main(["train", "--config", str(config), "--out", str(out), "--steps", "6"]) == 0  # flags win
    saved = json.loads((out / "config.json").read_text())
    assert saved["config"]["optimizer"] == "snoo(k=4)+adamw(lr=0.002)"
    assert saved["config"]["steps"] == 6 and saved["config"]["schedule"] == "wsd"
