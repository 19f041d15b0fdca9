"""The lab's runs under careless or hostile use (issue 12): what is continued, what is refused, what is never changed.

Refusals are one line on stderr and exit status 2 (Ctrl-C: 130), and leave every file of an earlier run as it was.
Concurrency and interruption are tested with real processes.
"""

import hashlib
import json
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import LAB_TEXT, snoo_process
from snoo.lab import checkpoint, config, report, train
from snoo.lab.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")
SPEC = "snoo(k=4)+adamw"


def argv(out: Path, data: str, *extra: str) -> list[str]:
    return ["train", "--preset", "tiny", "--data", data, "--out", str(out), "--no-progress", "--steps", "8", *extra]


def files(out: Path) -> dict[str, str]:
    """sha256 of every file below ``out`` (the lock file aside: it only says who holds the directory)."""
    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name != checkpoint.LOCK
    }


def refused(args: list[str], capsys, words: str, unchanged: Path | None = None) -> str:
    """Run ``snoo ARGS``: status 2, one line with ``words``, and (``unchanged``) no file there changed."""
    before = files(unchanged) if unchanged else None
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("snoo: error: ") and err.count("\n") == 1 and words in err, err
    assert "Traceback" not in err
    if unchanged:
        assert files(unchanged) == before
    return err


@pytest.fixture(scope="module")
def finished(tmp_path_factory, corpus_file) -> Path:
    """A finished 8-step SNOO run: tests copy it and then try to spoil it."""
    out = tmp_path_factory.mktemp("runs") / "done"
    assert main(argv(out, corpus_file, "--optimizer", SPEC)) == 0
    return out


def copy_of(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


# ---------------------------------------------------------------------------------------------- resume


def test_resuming_a_finished_run_stops_at_its_end(tmp_path, finished, corpus_file, capsys):
    out = copy_of(finished, tmp_path)
    began = time.monotonic()
    assert main([*argv(out, corpus_file, "--optimizer", SPEC), "--resume"]) == 0
    assert time.monotonic() - began < 30
    steps = [m["step"] for m in checkpoint.read_metrics(out / "metrics.jsonl")]
    assert max(steps) == 8 and steps == sorted(steps)
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 8


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--steps", "4"], "steps 8 -> 4"),  # past the end: the loop once ran forever
        (["--steps", "12"], "steps 8 -> 12"),  # another schedule
        (["--optimizer", "adamw"], "optimizer"),
        (["--optimizer", "snoo(k=4)+adamw(lr=0.02)"], "lr=0.02"),
        (["--optimizer", "snoo(k=4)+sgd"], "sgd"),
        (["--optimizer", SPEC, "--seed", "1"], "seed 0 -> 1"),
        (["--optimizer", SPEC, "--set", "n_layer=3"], "n_layer 2 -> 3"),  # another model shape
        (["--optimizer", SPEC, "--set", "eval_batches=3"], "eval_batches"),
        (["--optimizer", SPEC, "--data", "OTHER"], "corpus"),
    ],
)
def test_resume_with_other_settings_is_refused(tmp_path, finished, corpus_file, capsys, extra, words):
    out = copy_of(finished, tmp_path)
    other = tmp_path / "other.txt"
    other.write_text(LAB_TEXT.replace("return", "yield"))
    args = [*argv(out, corpus_file), *[str(other) if a == "OTHER" else a for a in extra], "--resume"]
    err = refused(args, capsys, "is of another run", unchanged=out)
    assert words in err  # the setting that differs is named


def test_resume_ignores_what_changes_no_number(tmp_path, finished, corpus_file):
    out = copy_of(finished, tmp_path)
    moved = tmp_path / "moved.txt"
    shutil.copy(corpus_file, moved)  # the same contents elsewhere: the same data
    before = json.loads((out / "result.json").read_text())
    extra = ["--set", "threads=0", "--set", "ckpt_every=3", "--set", "dist_timeout=9"]
    assert main([*argv(out, str(moved), "--optimizer", SPEC, *extra), "--resume"]) == 0
    assert json.loads((out / "result.json").read_text())["final_val_loss"] == before["final_val_loss"]


def test_a_fresh_run_into_a_used_directory_is_refused(tmp_path, finished, corpus_file, capsys):
    out = copy_of(finished, tmp_path)
    err = refused(argv(out, corpus_file, "--optimizer", SPEC), capsys, "holds an earlier run", unchanged=out)
    assert "continue it with --resume, or choose a new --out" in err
    (tmp_path / "cmp").mkdir()
    (tmp_path / "cmp" / "experiment.json").write_text("{}")
    refused(
        ["compare", "--preset", "tiny", "--data", corpus_file, "--out", str(tmp_path / "cmp"), "--steps", "2"],
        capsys,
        "holds an earlier run (experiment.json)",
        unchanged=tmp_path / "cmp",
    )


def test_a_torn_last_metrics_line_is_dropped_and_the_first_line_after_resume_has_the_outer_norms(tmp_path, corpus_file):
    # k=4, checkpoints every 5 steps, a log line every step: the resumed run logs step 6 before its next outer step
    cfg = dict(data=corpus_file, progress=False, optimizer=SPEC, steps=12, ckpt_every=5, log_every=1, eval_every=4)
    whole = config.make_config("tiny", out=str(tmp_path / "whole"), **cfg)
    train.train(whole)
    cut = config.make_config("tiny", out=str(tmp_path / "cut"), **cfg)

    def interrupt(step, loss):
        if step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train.train(cut, callback=interrupt)
    with (tmp_path / "cut" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 8, "train_lo')  # a crash in the middle of a write
    train.train(cut, resume=True)

    def logged(out):
        return [{k: v for k, v in m.items() if k != "time"} for m in checkpoint.read_metrics(out / "metrics.jsonl")]

    first = next(m for m in logged(tmp_path / "cut") if m["step"] == 6)
    assert "outer/pseudo_grad" in first
    assert logged(tmp_path / "cut") == logged(tmp_path / "whole")


def test_a_damaged_metrics_line_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, oops}\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2, is damaged"):
        checkpoint.read_metrics(path)


# ---------------------------------------------------------------------------------------------- compare --resume


def test_compare_resume_keys_finished_runs_on_the_data_contents(tmp_path, corpus_file, capsys):
    data = tmp_path / "corpus.txt"
    shutil.copy(corpus_file, data)
    out = tmp_path / "cmp"
    args = ["compare", "--preset", "tiny", "--steps", "4", "--budgets", "1", "--out", str(out), "--no-progress"]
    args += ["--optimizers", "adamw,snoo(k=2)+adamw", "--seeds", "1", "--jobs", "1"]
    assert main([*args, "--data", str(data)]) == 0
    moved = tmp_path / "moved.txt"
    shutil.copy(data, moved)
    capsys.readouterr()
    assert main([*args, "--data", str(moved), "--resume"]) == 0  # same contents, another path: kept
    assert capsys.readouterr().out.count("done before, kept") == 2
    data.write_text(LAB_TEXT.replace("x", "y"))  # same path, other contents
    refused([*args, "--data", str(data), "--resume"], capsys, "was trained with other settings", unchanged=out)


def test_runs_written_before_the_regime_was_recorded_still_summarize(tmp_path, corpus_file):
    out = tmp_path / "cmp"
    args = ["compare", "--preset", "tiny", "--data", corpus_file, "--steps", "4", "--budgets", "1,2", "--seeds", "1"]
    assert main([*args, "--jobs", "1", "--out", str(out), "--no-progress"]) == 0
    regime = json.loads((out / "summary.json").read_text())["regime"]
    for path in (out / "runs").glob("*/config.json"):
        saved = json.loads(path.read_text())
        for key in ("tokens_planned", "tokens_per_param", "params_non_embedding", "tokens_per_non_embedding_param"):
            del saved[key]
        path.write_text(json.dumps(saved))
    again = report.summarize(out)["regime"]
    assert again["tokens"] == regime["tokens"] and again["tokens_per_param"] == pytest.approx(
        regime["tokens_per_param"]
    )


def test_compare_resume_with_a_contender_added_keeps_every_finished_run(tmp_path, corpus_file, capsys):
    """Directory names carry the job's index, so a contender added to the list renames the runs after it; --resume
    finds them by their identity and trains only the new contender (docs/lab.md)."""
    out = tmp_path / "cmp"
    args = ["compare", "--preset", "tiny", "--data", corpus_file, "--steps", "6", "--budgets", "1,1.5"]
    args += ["--ladder", "wsd", "--seeds", "2", "--jobs", "1", "--out", str(out), "--no-progress"]
    assert main([*args, "--optimizers", "adamw,snoo(k=2)+adamw"]) == 0
    before = {
        (r["optimizer"], r["seed"], r["budget"]): r for r in json.loads((out / "summary.json").read_text())["runs"]
    }
    legacy = sorted((out / "runs").glob("*-s1/config.json"))[0]  # a run written before runs recorded their identity
    legacy.write_text(json.dumps({k: v for k, v in json.loads(legacy.read_text()).items() if k != "run"}))
    capsys.readouterr()
    assert main([*args, "--optimizers", "adamw,sgd(lr=0.1),snoo(k=2)+adamw", "--resume"]) == 0
    said = capsys.readouterr().out
    trained = re.findall(r"^\[\d+/\d+ done\] .*: val loss", said, re.M)
    assert said.count("done before, kept") == len(before) and len(trained) == 2  # sgd, 2 seeds
    assert said.count("moved there, kept") == 4  # seed 1's three runs, and seed 0's SNOO run
    after = {
        (r["optimizer"], r["seed"], r["budget"]): r for r in json.loads((out / "summary.json").read_text())["runs"]
    }
    assert {k: after[k]["final_val_loss"] for k in before} == {k: r["final_val_loss"] for k, r in before.items()}
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(r["dir"] for r in after.values())


# ---------------------------------------------------------------------------------------------- processes


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    began = time.monotonic()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - began < timeout
        time.sleep(0.05)


def test_two_writers_the_second_is_refused_and_ctrl_c_is_one_line(tmp_path, corpus_file, capsys):
    out = tmp_path / "r"
    long_run = argv(out, corpus_file, "--steps", "100000", "--set", "eval_every=100000", "--set", "ckpt_every=20")
    first = snoo_process(long_run)
    try:
        wait_for(out / "ckpt.pt", first)
        # the second writer (here, in this process: flock locks conflict between any two opens of the lock file)
        err = refused([*long_run, "--resume"], capsys, "is in use by another run")
        assert f"{out} is in use by another run (process {first.pid}): wait for it to end, or choose another" in err
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=60)
    finally:
        first.kill()
    assert first.returncode == 130
    assert err == "snoo: interrupted: the last checkpoint is kept; continue with --resume\n"
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] % 20 == 0


def test_a_killed_runs_lock_does_not_block(tmp_path):
    out = tmp_path / "r"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from snoo.lab.checkpoint import claimed\n"
            "with claimed(Path(sys.argv[1]), fresh=True):\n    print('held', flush=True); time.sleep(600)",
            str(out),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(ValueError, match="in use by another run"), checkpoint.claimed(out, fresh=False):
            pass
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        with checkpoint.claimed(out, fresh=True):  # the kernel dropped the dead process's lock
            pass
    finally:
        holder.kill()


# ---------------------------------------------------------------------------------------------- one line, status 2


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--out", "FILE"], "is a file, not a directory"),
        (["--out", "/proc/no-such-dir/out"], "cannot write there"),
        (["--config", "DIR"], "cannot read it"),
        (["--set", "device=bogus"], "device must be auto, cpu, cuda, cuda:N or mps"),
        (["--device", "cdua"], "device must be"),
        (["--set", "n_head=0"], "n_head must be at least 1"),
        (["--set", "block_size=-4"], "block_size must be at least 1"),
        (["--set", "block_size=0"], "block_size must be at least 1"),
        (["--set", "data=5"], "data must be str or None"),
        (["--set", "unique_tokens=abc"], "unique_tokens must be int or None"),
        (["--set", "threads=100000"], "threads must be 0 (torch's default) to"),
        (["--set", "autocast=maybe"], "autocast must be auto, bf16 or off"),
        (["--set", "compile=yes"], "compile must be auto, on or off"),
        (["--set", "n_embd=30", "--set", "n_head=2"], "must be even"),
        (["--set", "lr=1e-3"], '--optimizer "adamw(lr=0.001)"'),
        (["--set", "out="], "out must be a directory"),
    ],
)
def test_bad_values_are_one_line_and_status_2(tmp_path, corpus_file, capsys, extra, words):
    (tmp_path / "file").write_text("")
    extra = [str(tmp_path / "file") if a == "FILE" else str(tmp_path) if a == "DIR" else a for a in extra]
    args = ["train", "--preset", "tiny", "--no-progress"]
    args += ["--data", corpus_file] if "data=5" not in extra else []  # the flag would win over --set
    args += ["--out", str(tmp_path / "o")] if "--out" not in extra and "out=" not in extra else []
    refused([*args, *extra], capsys, words)
    if not extra[1].startswith("out"):
        assert not (tmp_path / "o").exists()  # refused before anything was written


def test_set_out_is_honoured(tmp_path, corpus_file):
    out = tmp_path / "via-set"
    assert main(["train", "--preset", "tiny", "--data", corpus_file, "--steps", "2", "--set", f"out={out}"]) == 0
    assert json.loads((out / "result.json").read_text())["status"] == "ok"


def test_a_full_disk_is_one_line(tmp_path, corpus_file, capsys, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    refused(argv(tmp_path / "r", corpus_file), capsys, "No space left on device")


def test_the_regime_is_recorded(tmp_path, finished):
    result = json.loads((finished / "result.json").read_text())
    saved = json.loads((finished / "config.json").read_text())
    tokens = 8 * 8 * 32
    for record in (result, saved):
        assert record["params"] > record["params_non_embedding"] > 0
        assert record["params"] - record["params_non_embedding"] == 256 * 32  # the tied embedding, counted once
        assert record["tokens_per_param"] == pytest.approx(tokens / record["params"])
    assert result["tokens"] == saved["tokens_planned"] == tokens


def test_help_is_quick_to_import_and_shows_the_out_default(tmp_path):
    code = (
        "import sys\nfrom snoo.lab import cli\ntry:\n    cli.main(['train', '--help'])\nexcept SystemExit:\n    pass\n"
        "print([m for m in ('snoo.lab.train', 'snoo.lab.experiments', 'matplotlib') if m in sys.modules])"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.stdout.strip().endswith("[]"), run.stdout[-500:]
    text = " ".join(run.stdout.split())  # argparse wraps the epilog wherever the names fall
    assert "default runs/train" in text and "snoo (wrapper)" in text


# ---------------------------------------------------------------------------------------------- fuzz


def test_fuzz_specs_settings_and_damaged_checkpoints(tmp_path, finished, corpus_file, capsys):
    """Random SPECs, --set values and truncated or bit-flipped checkpoints: status 2 and one line, no traceback,
    and the earlier run's files as they were. Seeded, and bounded to a few seconds."""
    rng = random.Random(0)
    out = copy_of(finished, tmp_path)
    pieces = ["snoo", "adamw", "sgd", "lookahead", "muon", "(", ")", "+", "-", "=", ",", "k", "lr", "1e9", "-1", "nan"]
    pieces += ["0", "x", "momentum", "ema_nesterov", " ", "((", "inf", "true"]
    keys = ["steps", "n_layer", "n_head", "block_size", "threads", "device", "autocast", "warmup", "data", "seed"]
    keys += ["unique_tokens", "schedule", "workers", "grad_clip", "lr", "nope", "tie_head", "bpe_vocab", "out"]
    values = ["0", "-1", "1e30", "nan", "abc", "", "true", "none", "3.5", "cuda:7", "999999999", "-0", "inf"]
    began = time.monotonic()
    for _ in range(60):
        spec_ = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 8)))
        sets = [f"--set={rng.choice(keys)}={rng.choice(values)}" for _ in range(rng.randint(0, 2))]
        # no --resume into a finished run: whatever is valid is refused as an overwrite, and nothing trains
        args = [*argv(out, corpus_file, *sets), "--optimizer", spec_]
        code = main(args)
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and err.startswith("snoo: error: "), (args, err)
    assert time.monotonic() - began < 30

    good = (finished / "ckpt.pt").read_bytes()
    rejected = 0
    for trial in range(24):
        damaged = bytearray(good)
        if trial % 3 == 0:
            damaged = damaged[: rng.randrange(len(good))]
        else:
            at = rng.randrange(len(good))
            damaged[at] ^= 1 << rng.randrange(8)
        (out / "ckpt.pt").write_bytes(bytes(damaged))
        try:
            checkpoint.load(out, *_empty(finished), torch.device("cpu"))  # what --resume would accept
        except ValueError:
            pass
        else:
            continue  # the flip fell where nothing is read (zip padding, a timestamp): the checkpoint is whole
        rejected += 1
        before = files(out)
        assert main([*argv(out, corpus_file, "--optimizer", SPEC), "--resume"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "ckpt.pt" in err and "Traceback" not in err, err
        assert files(out) == before
    assert rejected >= 20


def _empty(run: Path) -> tuple:
    """A fresh model and optimizer shaped like ``run``'s, with the run's identity: what checkpoint.load needs."""
    from snoo.lab.data import load_corpus
    from snoo.lab.workers import World

    saved = json.loads((run / "config.json").read_text())
    cfg = config.TrainConfig(**{**saved["config"], "out": str(run)})
    corpus = load_corpus(cfg.data)
    model, opt = train._model_and_optimizer(cfg, corpus, World(), torch.device("cpu"))
    return model, opt, World(), cfg, saved["run"]
