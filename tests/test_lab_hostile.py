"""The lab's experiments under hostile use, round two (issue 24): nothing mixed, nothing orphaned, nothing followed.

Each test reproduces one finding of the probe; processes and signals are real processes.
"""

import errno
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import LAB_TEXT, snoo_process
from snoo.lab import checkpoint, claims, experiments, train
from snoo.lab.cli import main
from snoo.lab.config import make_config

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = dict(steps=8, eval_every=4, ckpt_every=4, log_every=4, progress=False)


def tiny(out: Path, data: str, **fields) -> object:
    return make_config("tiny", data=data, out=str(out), **{**TINY, **fields})


def one_line(capsys, args: list[str], status: int = 2) -> str:
    assert main(args) == status
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


# ---------------------------------------------------------------------------------------------- 1. mixed data


@pytest.mark.parametrize("ladder", ["cosine", "wsd"])
def test_data_that_changes_during_an_experiment_is_refused(tmp_path, ladder):
    data = tmp_path / "corpus3.txt"
    data.write_text(LAB_TEXT)
    said = []

    def say(line: str) -> None:
        said.append(line)
        if "val loss" in line and len([s for s in said if "val loss" in s]) == 1:
            with data.open("a") as f:  # someone appends to the corpus after the first run
                f.write(LAB_TEXT[:5000])

    cfg = tiny(tmp_path / "dc3", str(data))
    with pytest.raises(ValueError, match="data") as e:
        experiments.run_experiment("compare", cfg, ["adamw", "snoo+adamw"], budgets=[0.5, 1, 2], ladder=ladder, say=say)
    assert "changed during the experiment" in str(e.value)
    assert not (tmp_path / "dc3" / "summary.json").exists()


@pytest.fixture(scope="module")
def finished(tmp_path_factory, corpus_file) -> Path:
    """A finished compare on a wsd ladder (a trunk with snapshots, two branches): tests copy it and spoil it."""
    out = tmp_path_factory.mktemp("exp") / "done"
    cfg = tiny(out, corpus_file)
    experiments.run_experiment("compare", cfg, ["adamw", "snoo+adamw"], budgets=[0.5, 1, 2], ladder="wsd", say=print)
    return out


def spoiled(finished: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(finished, out)
    return out


def test_a_summary_of_runs_on_different_data_is_refused(finished, tmp_path, capsys):
    out = spoiled(finished, tmp_path)
    result = sorted((out / "runs").glob("*/result.json"))[-1]
    changed = {**json.loads(result.read_text()), "corpus_sha256": "0123456789abcdef"}
    result.write_text(json.dumps(changed))  # as a run of an older snoo, which did not stop at the change, left it
    err = one_line(capsys, ["report", str(out)])
    assert "did not all see the same data" in err and "0123456789abcdef" in err


@pytest.mark.parametrize("where", ["dir", "glob"])
def test_out_inside_data_is_refused(tmp_path, capsys, where):
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "a.txt").write_text(LAB_TEXT)
    data = str(proj) if where == "dir" else f"{proj}/**/*.txt"
    args = ["compare", "--preset", "tiny", "--data", data, "--out", str(proj / "runs"), "--steps", "8"]
    err = one_line(capsys, [*args, "--budgets", "1,2", "--no-progress"])
    assert "is inside --data" in err
    assert sorted(p.name for p in proj.iterdir()) == ["a.txt"]


# ---------------------------------------------------------------------------------------------- 2. --tune


def test_contenders_tuned_to_the_same_setting_keep_their_rows_and_share_their_runs(tmp_path, corpus_file):
    out = tmp_path / "t"
    contenders = ["adamw", "snoo(lr=0.5)+adamw", "snoo(lr=0.9,momentum=0.8)+adamw"]
    said = []
    summary = experiments.run_experiment(
        "compare", tiny(out, corpus_file, steps=4), contenders, budgets=[1, 2], tune_trials=2, say=said.append
    )
    # the two SNOO contenders try the same two settings: each trial is trained once
    assert len(list((out / "tune").iterdir())) == 4
    rows = [r["optimizer"] for r in summary["table"]]
    assert len(rows) == 3
    tuned_from = {t["from"] for t in summary["tuning"].values()}
    assert tuned_from == {experiments.spec.canonical(c) for c in contenders}
    twins = [r for r in summary["table"] if "(tuned from" in r["optimizer"]]
    assert len(twins) == 2 and twins[0]["final_val_loss"] == twins[1]["final_val_loss"]
    assert any("were tuned to the same setting" in line for line in said)
    # the baseline's two budgets and one run for the two SNOO rows
    assert len(list((out / "runs").iterdir())) == 3
    for label, t in summary["tuning"].items():
        assert len(t["trials"]) == 2 and label in rows


# ---------------------------------------------------------------------------------------------- 3. settings not dropped


def test_the_wsd_ladder_keeps_the_warmup_steps_asked_for(tmp_path, corpus_file):
    out = tmp_path / "w"
    cfg = tiny(out, corpus_file, warmup_steps=3)
    experiments.run_experiment("compare", cfg, ["adamw", "snoo+adamw"], budgets=[1, 2], ladder="wsd", say=print)
    used = {json.loads(p.read_text())["config"]["warmup_steps"] for p in (out / "runs").glob("*/config.json")}
    assert used == {3}


@pytest.mark.parametrize("flag", [["--steps", "7"], ["--set", "eval_every=3"], ["--set", "log_every=2"]])
def test_scaling_refuses_the_settings_it_derives(tmp_path, corpus_file, capsys, flag):
    args = ["scaling", "--preset", "tiny", "--data", corpus_file, "--out", str(tmp_path / "s"), "--sizes", "1x32"]
    err = one_line(capsys, [*args, *flag])
    named = "--steps" if flag[0] == "--steps" else f"--set {flag[1].split('=')[0]}"
    assert f"{named} cannot be given" in err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    ("sizes", "ratios", "point"), [("2x32,1x32,2x32", "1", "2x32-r1"), ("1x32", "1,1.0", "1x32-r1")]
)
def test_scaling_refuses_a_point_listed_twice_before_training_any(tmp_path, corpus_file, capsys, sizes, ratios, point):
    """Listed twice, a point used to train once, then stop at its second turn on its own directory."""
    out = tmp_path / "s"
    args = ["scaling", "--preset", "tiny", "--data", corpus_file, "--out", str(out), "--sizes", sizes]
    err = one_line(capsys, [*args, "--tokens-per-param", ratios])
    assert f"the point {point} is listed twice" in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("flag", "said"),
    [
        (["--seeds", "0"], "--seeds must be at least 1"),
        (["--tune", "-1"], "--tune must be 0 (off)"),
        (["--tune-seeds", "0"], "--tune-seeds must be at least 1"),
        (["--tune-widen", "1"], "give --tune too"),
    ],
)
def test_scaling_refuses_bad_experiment_settings_before_writing_anything(tmp_path, corpus_file, capsys, flag, said):
    """They were checked at the first point, after experiment.json was written: the corrected command was then
    refused, as if an earlier run were there."""
    out = tmp_path / "s"
    args = ["scaling", "--preset", "tiny", "--data", corpus_file, "--out", str(out), "--sizes", "1x32"]
    assert said in one_line(capsys, [*args, "--tokens-per-param", "0.05", *flag])
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- 4, 9. reproduce


def _stub_claim(number: int) -> "claims.Claim":
    """A claim whose run is one 2-step training run in its directory: what `reproduce` must keep apart."""

    def run(ctx, setup):
        result = train.train(ctx.config("run", steps=2), resume=ctx.resume)
        return claims.Outcome(measured=f"loss {result['final_val_loss']:.3f}", values={})

    return claims.Claim(
        id=f"stub-{number}",
        number=number,
        claim="a stub",
        source="-",
        paper="-",
        criterion="-",
        setup={"quick": {}},
        run=run,
        decide=lambda values: claims.HOLDS,
    )


def test_reproduce_says_each_claims_data_and_settings_and_its_regenerate_line_works(
    tmp_path, corpus_file, capsys, monkeypatch
):
    stubs = {c.id: c for c in (_stub_claim(1), _stub_claim(2))}
    monkeypatch.setattr(claims, "registry", lambda: stubs)
    out = str(tmp_path / "rp")
    assert main(["reproduce", "1", "--out", out, "--data", corpus_file]) == 0
    assert main(["reproduce", "2", "--out", out, "--data", corpus_file, "--set", "n_embd=64", "--resume"]) == 0
    report = (tmp_path / "rp" / "report.md").read_text()
    assert f"with --data {corpus_file}). " in report
    assert f"with --data {corpus_file} --set n_embd=64). " in report
    commands = re.findall(r"`(snoo reproduce [^`]*)`", report.split("Regenerate with")[1].split("\n")[0])
    assert len(commands) == 2
    capsys.readouterr()
    for command in commands:  # each claim again with its own data and settings: kept, not refused
        assert main(shlex.split(command)[1:]) == 0, capsys.readouterr().err


def wait_until(condition, proc: subprocess.Popen, timeout: float = 60) -> None:
    began = time.monotonic()
    while not condition():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - began < timeout
        time.sleep(0.05)


def holds_lock(out: Path, pid: int) -> bool:
    lock = out / ".lock"
    return lock.exists() and lock.read_text().strip() == str(pid)


def test_two_reproduce_into_one_out_the_second_is_refused(tmp_path, corpus_file, capsys):
    out = tmp_path / "x"
    first = snoo_process(["reproduce", "3", "--out", str(out), "--data", corpus_file])
    try:
        wait_until(lambda: holds_lock(out, first.pid), first)
        # the second, in this process (flock locks conflict between any two opens of the lock file)
        err = one_line(capsys, ["reproduce", "9", "--out", str(out), "--data", corpus_file])
        assert (
            err == f"snoo: error: {out} is in use by another run (process {first.pid}): wait for it to end, or "
            "choose another --out\n"
        )
    finally:
        first.kill()
        first.communicate(timeout=60)


# ---------------------------------------------------------------------------------------------- 5, 6. --jobs workers


def descendants(pid: int) -> list[int]:
    """The living processes below ``pid`` (zombies are dead), read from /proc."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        frontier = [child for child, parent in parents.items() if parent in frontier]
        found += frontier
    return found


def alive(pids: list[int]) -> list[int]:
    def living(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    return [p for p in pids if living(p)]


def long_compare(out: Path, data: str) -> list[str]:
    """A compare whose runs train for minutes, two at a time."""
    return [
        *("compare", "--preset", "tiny", "--data", data, "--out", str(out), "--budgets", "1,2", "--seeds", "1"),
        *("--ladder", "cosine", "--jobs", "2", "--steps", "100000", "--no-progress"),
        *("--set", "eval_every=100000"),
    ]


def two_training(out: Path, proc: subprocess.Popen) -> list[int]:
    """Wait until two runs train in worker processes (past the pool's initializer); their pids."""
    wait_until(lambda: len(list(out.glob("runs/*/config.json"))) == 2, proc, timeout=120)
    workers = [p for p in descendants(proc.pid) if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text()]
    assert len(workers) == 2, workers
    return workers


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_end_when_the_main_process_is_killed(tmp_path, corpus_file):
    out = tmp_path / "c"
    main_process = snoo_process(long_compare(out, corpus_file))
    try:
        two_training(out, main_process)
        below = descendants(main_process.pid)  # the workers and multiprocessing's resource tracker
        main_process.send_signal(signal.SIGKILL)
        main_process.communicate(timeout=30)  # returns: no orphan holds its stdout
        began = time.monotonic()
        while alive(below) and time.monotonic() - began < 10:
            time.sleep(0.1)
        assert not alive(below)
    finally:
        main_process.kill()
        for pid in alive(descendants(main_process.pid)):
            os.kill(pid, signal.SIGKILL)
    for run in [out, *out.glob("runs/*")]:  # no lock of the dead is in the way of --resume
        with checkpoint.claimed(run, fresh=False):
            pass


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_worker_killed_from_outside_is_one_line_saying_resume(tmp_path, corpus_file):
    out = tmp_path / "c"
    main_process = snoo_process(long_compare(out, corpus_file))
    try:
        workers = two_training(out, main_process)
        os.kill(workers[0], signal.SIGKILL)  # as the out-of-memory killer would
        _, err = main_process.communicate(timeout=60)
    finally:
        main_process.kill()
    assert main_process.returncode == 1
    assert err.startswith("snoo: error: a worker process of --jobs 2 ended abruptly") and err.count("\n") == 1, err
    assert "continue with --resume" in err
    assert not alive(workers)


# ---------------------------------------------------------------------------------------------- 7. a full disk


def can_mount_tmpfs() -> bool:
    """Whether this machine lets an unprivileged mount namespace mount a tmpfs (a real disk that fills up)."""
    try:
        probe = ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /tmp"]
        return subprocess.run(probe, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not can_mount_tmpfs(), reason="needs unshare and a tmpfs mount")
def test_a_full_disk_is_one_line_with_no_temporary_file_left(tmp_path, corpus_file):
    disk = tmp_path / "disk"
    disk.mkdir()
    # a 256 KB disk: the run's config fits, its first checkpoint (about 500 KB) does not
    script = (
        'mount -t tmpfs -o size=256k tmpfs "$1" || exit 99; shift; "$@"; echo "status $?"; ls -a "$OUT"; '
        'cat "$OUT/config.json" > /dev/null'
    )
    out = disk / "run"
    run = subprocess.run(
        [
            "unshare",
            "-rm",
            "sh",
            "-c",
            script,
            "sh",
            str(disk),
            sys.executable,
            "-m",
            "snoo",
            *argv_train(out, corpus_file, "--set", "ckpt_every=1"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "OUT": str(out)},
    )
    assert run.returncode == 0, run.stderr
    assert "status 2\n" in run.stdout, run.stdout
    assert run.stderr.startswith(f"snoo: error: cannot write {out / 'ckpt.pt'} (No space left on device)"), run.stderr
    assert run.stderr.count("\n") == 1 and "continue with --resume" in run.stderr
    listed = run.stdout.split("status 2\n")[1].split()
    assert "ckpt.pt.tmp" not in listed and "ckpt.pt" not in listed and "config.json" in listed


def argv_train(out: Path, data: str, *extra: str) -> list[str]:
    return ["train", "--preset", "tiny", "--data", data, "--out", str(out), "--no-progress", "--steps", "8", *extra]


def test_a_write_that_fails_midway_leaves_the_last_checkpoint_and_no_temporary_file(
    tmp_path, corpus_file, capsys, monkeypatch
):
    out = tmp_path / "r"
    real_save, saved = torch.save, []

    def disk_full(obj, f, *args, **kwargs):  # the second checkpoint: half of it gets onto the disk, then no room
        saved.append((out / "ckpt.pt").read_bytes() if saved else None)
        real_save(obj, f, *args, **kwargs)
        if len(saved) == 2:
            f.truncate(f.tell() // 2)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", disk_full)
    err = one_line(capsys, argv_train(out, corpus_file, "--set", "ckpt_every=4"))
    assert f"cannot write {out / 'ckpt.pt'} (No space left on device)" in err
    assert len(saved) == 2 and (out / "ckpt.pt").read_bytes() == saved[1]  # the step-4 checkpoint, as it was
    assert not (out / "ckpt.pt.tmp").exists()


# ---------------------------------------------------------------------------------------------- 8. symbolic links


@pytest.mark.parametrize("planted", [".lock", "config.json.tmp", "metrics.jsonl", "runs"])
def test_a_link_planted_in_out_is_never_written_through(tmp_path, corpus_file, capsys, planted):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / planted).symlink_to(victim)
    err = one_line(capsys, argv_train(evil, corpus_file))
    assert f"{evil / planted} is a symbolic link" in err
    assert victim.read_text() == "precious\n"


def test_the_file_primitives_do_not_follow_links(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (tmp_path / "config.json.tmp").symlink_to(victim)
    checkpoint.write_json({"a": 1}, tmp_path / "config.json")
    assert json.loads((tmp_path / "config.json").read_text()) == {"a": 1}
    (tmp_path / "metrics.jsonl").symlink_to(victim)
    with pytest.raises(ValueError, match="is a symbolic link"):
        checkpoint.open_to_append(tmp_path / "metrics.jsonl")
    assert victim.read_text() == "precious\n"


# ---------------------------------------------------------------------------------------------- 10. damaged files


def test_a_damaged_trunk_snapshot_is_branched_around_not_fatal(finished, tmp_path, capfd):
    out = spoiled(finished, tmp_path)
    experiment = json.loads((out / "experiment.json").read_text())
    branch = next(j for j in experiment["jobs"] if "branch_of" in j)
    snapshot = out / "runs" / branch["branch_of"] / checkpoint.snapshot_name(branch["from_step"])
    data = bytearray(snapshot.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, in a tensor
    snapshot.write_bytes(bytes(data))
    before = json.loads((out / "runs" / branch["dir"] / "result.json").read_text())
    shutil.rmtree(out / "runs" / branch["dir"])  # the branch must be trained again
    cfg = tiny(out, experiment["config"]["data"])
    experiments.run_experiment(
        "compare", cfg, ["adamw", "snoo+adamw"], budgets=[0.5, 1, 2], ladder="wsd", resume=True, say=print
    )
    err = capfd.readouterr().err
    assert f"{snapshot} is damaged: its contents do not match the sha256" in err and "from scratch" in err
    after = json.loads((out / "runs" / branch["dir"] / "result.json").read_text())
    assert after["final_val_loss"] == before["final_val_loss"]  # from scratch, to the same end


@pytest.mark.parametrize("content", ['{"status": "ok", "final_', "[]", "NULL_LOSS"])
def test_a_damaged_result_is_named_and_finished_again_on_resume(finished, tmp_path, capsys, content):
    out = spoiled(finished, tmp_path)
    result = sorted((out / "runs").glob("*/result.json"))[0]
    kept = json.loads(result.read_text())
    result.write_text(json.dumps({**kept, "final_val_loss": None}) if content == "NULL_LOSS" else content)
    err = one_line(capsys, ["report", str(out)])
    assert f"{result} is damaged" in err and "--resume" in err
    experiment = json.loads((out / "experiment.json").read_text())
    said = []
    experiments.run_experiment(
        "compare",
        tiny(out, experiment["config"]["data"]),
        ["adamw", "snoo+adamw"],
        budgets=[0.5, 1, 2],
        ladder="wsd",
        resume=True,
        say=said.append,
    )
    assert any("finished again from its checkpoint" in line for line in said)
    assert json.loads(result.read_text())["final_val_loss"] == kept["final_val_loss"]


# ---------------------------------------------------------------------------------------------- 13, 14. inputs


@pytest.mark.parametrize("budgets", ["inf", "1,inf", "nan", "0.01,1,2"])
def test_bad_budgets_are_one_line_naming_budgets(tmp_path, corpus_file, capsys, budgets):
    out = tmp_path / "b"
    args = ["compare", "--preset", "tiny", "--data", corpus_file, "--out", str(out), "--steps", "200"]
    err = one_line(capsys, [*args, "--budgets", budgets])
    assert "--budgets" in err
    assert not out.exists()


def test_jobs_0_is_refused_before_anything_is_written(tmp_path, corpus_file, capsys):
    out = tmp_path / "j"
    args = ["compare", "--preset", "tiny", "--data", corpus_file, "--out", str(out), "--jobs", "0"]
    assert "--jobs must be at least 1, got 0" in one_line(capsys, args)
    assert not out.exists()  # so the corrected command is not taken for a second run


@pytest.mark.parametrize("size", [0, 4097])
def test_a_bin_file_of_no_whole_tokens_is_named(tmp_path, capsys, size):
    data = tmp_path / "tokens.bin"
    data.write_bytes(bytes(size))
    err = one_line(capsys, ["train", "--preset", "tiny", "--data", str(data), "--out", str(tmp_path / "r")])
    assert f"--data {data}: a .bin file holds uint16 token ids (2 bytes each), and this one has {size:,} bytes" in err


def test_ctrl_c_while_torch_loads_is_one_line(tmp_path, corpus_file):
    process = snoo_process(argv_train(tmp_path / "r", corpus_file))
    time.sleep(0.5)  # Python is up, torch is still loading
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert err == "snoo: interrupted: the last checkpoint is kept; continue with --resume\n"


def test_ctrl_c_inside_torchs_import_waits_for_the_import_to_finish(tmp_path):
    """Raised inside torch's import, a KeyboardInterrupt can be swallowed there (the run went on, status 0) or abort
    the process from C++; the lab holds Ctrl-C back until torch has loaded, then raises it. Here a stand-in torch
    presses Ctrl-C as it starts loading and says when it has finished."""
    fake = tmp_path / "site" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "import os, signal, time\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "time.sleep(0.2)\n"
        "print('torch loaded', flush=True)\n"
    )
    code = (  # the handler is given back as it was found (ignored, in a background job's process)
        f"import signal, sys\nsys.path.insert(0, {str(fake.parent)!r})\nfrom snoo.lab import cli\n"
        "found = signal.getsignal(signal.SIGINT)\n"
        "try:\n    cli._load_torch()\nexcept KeyboardInterrupt:\n    print('then interrupted')\n"
        "print(signal.getsignal(signal.SIGINT) is found)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.stdout.split("\n") == ["torch loaded", "then interrupted", "True", ""], run.stdout + run.stderr


def _wait_for_steps(runs: Path, pattern: str, count: int, step: int, process: subprocess.Popen) -> None:
    """Until ``count`` runs matching ``pattern`` under ``runs`` have logged ``step`` (so their loops are running)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        logged = [p for p in runs.glob(pattern) if any(f'"step": {step},' in line for line in _lines(p))]
        if len(logged) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"no {count} runs reached step {step}: {process.communicate()}")


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()  # the last one may be half written: only whole lines are matched


def _checkpoint_step(run: Path) -> int:
    return torch.load(run / "ckpt.pt", map_location="cpu", weights_only=False)["step"]


def test_sigterm_checkpoints_the_step_the_run_is_on_and_resume_ends_where_it_would_have(tmp_path, corpus_file):
    """A scheduler's preemption (SIGTERM) is one line and status 143, with a checkpoint of the step the run had just
    finished: ckpt_every is past the end here, so there is no other. --resume from it ends bit for bit where a run
    that was never stopped ends."""
    steps = ["--steps", "600", "--set", "ckpt_every=5000", "--set", "log_every=1"]
    found = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "stopped"
    process = snoo_process([*argv_train(out, corpus_file), *steps])
    _wait_for_steps(tmp_path, "stopped/metrics.jsonl", 1, 10, process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143, err
    said = re.fullmatch(
        r"snoo: stopped by SIGTERM after step (\d+) of 600: its checkpoint is saved; continue with --resume\n", err
    )
    assert said, err
    assert 10 <= int(said[1]) < 600 and _checkpoint_step(out) == int(said[1])
    assert not (out / "result.json").exists()
    assert main([*argv_train(out, corpus_file), *steps, "--resume"]) == 0
    assert main([*argv_train(tmp_path / "whole", corpus_file), *steps]) == 0
    stopped, whole = (json.loads((tmp_path / d / "result.json").read_text()) for d in ("stopped", "whole"))
    assert stopped["final_val_loss"] == whole["final_val_loss"] and stopped["steps"] == whole["steps"] == 600
    assert signal.getsignal(signal.SIGTERM) is found  # main() gave back the handler it found


STOPPED = (
    "snoo: stopped by SIGTERM: every run in flight saved its checkpoint at its current step; continue with --resume"
)
INTERRUPTED = "snoo: interrupted: the last checkpoint is kept; continue with --resume"


@pytest.mark.parametrize(
    "how, status, line",
    [("SIGTERM to the command alone", 143, STOPPED), ("Ctrl-C at the terminal", 130, INTERRUPTED)],
)
def test_an_experiment_stopped_stops_its_workers_at_a_step_each_with_a_checkpoint(
    tmp_path, corpus_file, how, status, line
):
    """`snoo compare --jobs 2` stopped by SIGTERM (to it alone: it passes it on) or by Ctrl-C (to its process group,
    as a terminal sends it; the workers ignore it and get SIGTERM from the command): each worker checkpoints the step
    it is on, the command waits for them, and says one line; no process is left, no worker prints a traceback."""
    out = tmp_path / "c"
    args = ["compare", "--preset", "tiny", "--data", corpus_file, "--out", str(out), "--no-progress", "--jobs", "2"]
    process = snoo_process(
        [*args, "--steps", "1000", "--seeds", "1", "--set", "ckpt_every=5000"], start_new_session=True
    )
    _wait_for_steps(out / "runs", "*/metrics.jsonl", 2, 10, process)
    if how.startswith("SIGTERM"):
        process.send_signal(signal.SIGTERM)
    else:
        os.killpg(process.pid, signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert (process.returncode, err) == (status, line + "\n")
    stopped = [run for run in (out / "runs").iterdir() if not (run / "result.json").exists()]
    assert len(stopped) == 2
    for run in stopped:
        assert 10 <= _checkpoint_step(run) < 2500
        worker = int((run / ".lock").read_text())
        with pytest.raises(ProcessLookupError):
            os.kill(worker, 0)


@pytest.mark.skipif(not can_mount_tmpfs(), reason="needs unshare and a mount namespace")
def test_report_prints_a_read_only_experiments_summary(finished, tmp_path):
    out = spoiled(finished, tmp_path)
    script = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"'
    run = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script, "sh", str(out), sys.executable, "-m", "snoo", "report", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout == (out / "summary.md").read_text()
    assert run.stderr == f"snoo: {out} cannot be written: its summary as written when it finished\n"
