"""The examples: the plain loop runs and resumes exactly; without their extra, the others say so in one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

# Runs each example with some top-level modules made impossible to import, and prints how each one exited.
WITHOUT = """
import contextlib, io, runpy, sys

blocked = set(sys.argv[1].split(","))


class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


sys.meta_path.insert(0, Blocker())
for script in sys.argv[2:]:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            runpy.run_path(script, run_name="__main__")
        print(script, "ran to the end")
    except SystemExit as e:
        print(script, "exit:", e.code, "|", err.getvalue().strip())
"""


def run(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_plain_loop_trains_evaluates_and_resumes_exactly(tmp_path):
    done = run([str(EXAMPLES / "plain_loop.py"), "--steps", "60", "--out", str(tmp_path)])
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1] == "the resumed run ends on exactly the same slow weights: True"
    assert "step   30  saved ckpt.pt (step 10 of a cycle of 20)" in lines
    # step 50 is mid-cycle: the slow weights (of step 40) and the fast ones differ; step 60 ends on an outer step
    step50 = next(line for line in lines if line.startswith("step   50  train"))
    slow, fast = (float(part.split()[-1]) for part in step50.split(": ")[1].split(", "))
    assert slow != fast
    assert (tmp_path / "model.pt").is_file() and (tmp_path / "ckpt.pt").is_file()
    assert any(line.startswith(f"saved {tmp_path / 'model.pt'}: the slow weights") for line in lines)  # where it is


def test_examples_name_their_missing_extra_in_one_line():
    scripts = ["hf_trainer.py", "accelerate_loop.py", "lightning_fit.py"]
    done = run(["-c", WITHOUT, "transformers,accelerate,lightning", *(str(EXAMPLES / s) for s in scripts)])
    assert done.returncode == 0, done.stdout + done.stderr
    results = done.stdout.strip().splitlines()
    assert len(results) == len(scripts), done.stdout
    for script, result in zip(scripts, results, strict=True):
        path, _, message = result.partition(" exit: ")
        assert Path(path).name == script and message, result
        assert message.startswith(f"{script} needs the integrations extra ("), result
        message, _, stderr = message.partition(" |")
        assert message.endswith('is missing): pip install -e ".[integrations]"'), result
        assert not stderr.strip(), result  # nothing else printed: no traceback
