"""Every ```python block of README.md and docs/*.md runs as written.

A page is run the way a reader pastes it: its blocks in order, in one fresh namespace (a later block may use what an
earlier block of the same page defined, never what another page defined), in an empty temporary folder. A block
that cannot run here (it needs a GPU, torchrun with several processes, or the network) is preceded by the comment
``<!-- not run: REASON -->`` on the line before its fence (blank lines between are allowed); the reason is required.
A block preceded by ``<!-- new session -->`` is a separate program: it and the page's blocks after it run in a fresh
process and namespace (for a framework whose global state one process cannot set twice).

All pages run in one child process (``python tests/test_docs_snippets.py PAGE...``, which imports torch once) that
forks a fresh process per page (and per session), so pages cannot leak state into each other and a hung page is
killed on its own. ``python tests/test_docs_snippets.py docs/faq.md`` runs one page and prints what happened.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PAGE_TIMEOUT_S = 120.0  # one page, all its blocks; the slowest today takes a few seconds

FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<ticks>`{3,})\s*(?P<info>[^`\n]*?)\s*$")
PYTHON_INFO = re.compile(r"^(python3?|py|\{code-block\}\s+python3?|\{code\}\s+python3?)$")
NOT_RUN = re.compile(r"<!--\s*not run\b(?P<rest>.*?)-->", re.S)
NEW_SESSION = re.compile(r"<!--\s*new session\s*-->")


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the first line of code in the page
    source: str
    not_run: str | None  # the reason, when the block is marked not to run
    new_session: bool = False  # the block starts a fresh process and namespace


def blocks_of(page: Path) -> list[Block]:
    """The page's Python code blocks, with the markers in the one-line HTML comments right above each fence."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        ticks, indent = fence["ticks"], len(fence["indent"])
        end = i + 1
        while end < len(lines) and not re.match(rf"^[ \t]*{ticks}\s*$", lines[end]):
            end += 1
        if PYTHON_INFO.match(fence["info"]):
            body = [line[indent:] for line in lines[i + 1 : end]]
            first = 0
            while first < len(body) and body[first].startswith(":"):  # MyST directive options
                first += 1
            comments, before = [], i - 1  # the HTML comments right above the fence
            while before >= 0 and (not lines[before].strip() or lines[before].strip().startswith("<!--")):
                comments.append(lines[before].strip())
                before -= 1
            marker = next(filter(None, (NOT_RUN.fullmatch(c) for c in comments)), None)
            reason = marker["rest"].strip().lstrip(":").strip() if marker else None
            new_session = any(NEW_SESSION.fullmatch(c) for c in comments)
            blocks.append(Block(page, i + 2 + first, "\n".join(body[first:]) + "\n", reason, new_session))
        i = end + 1
    return blocks


def relative(page: Path) -> str:
    return str(page.relative_to(ROOT)) if page.is_relative_to(ROOT) else str(page)


# ---------------------------------------------------------------------------------------------------------------
# the child: runs pages, one forked process each, and prints one JSON object {page: result}


def _out_of_time(signum, frame) -> None:
    raise TimeoutError(f"the page took more than {PAGE_TIMEOUT_S:.0f} s")


def sessions_of(page: Path) -> list[list[Block]]:
    """The page's blocks to run, split where a block starts a new session."""
    sessions: list[list[Block]] = [[]]
    for block in blocks_of(page):
        if block.new_session and sessions[-1]:
            sessions.append([])
        if block.not_run is None:
            sessions[-1].append(block)
    return [session for session in sessions if session]


def _run_session_here(page: Path, session: list[Block], out_path: Path) -> None:
    """In the forked child: run the blocks in order, write the result as JSON, never return."""
    result: dict = {"ok": True, "ran": 0}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            os.chdir(tmp)
            log = os.open(Path(tmp) / "output.txt", os.O_WRONLY | os.O_CREAT)
            os.dup2(log, 1)
            os.dup2(log, 2)
            namespace = {"__name__": "__main__", "__file__": str(page)}
            signal.signal(signal.SIGALRM, _out_of_time)
            signal.alarm(int(PAGE_TIMEOUT_S))
            for block in session:
                try:
                    # pad with empty lines so that a traceback gives the line number in the markdown page
                    code = compile("\n" * (block.line - 1) + block.source, relative(page), "exec")
                    exec(code, namespace)
                except BaseException:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    output = (Path(tmp) / "output.txt").read_text(errors="replace")[-3000:]
                    result = {"ok": False, "line": block.line, "error": traceback.format_exc(), "output": output}
                    break
                result["ran"] += 1
            sys.stdout.flush()
            sys.stderr.flush()
    except BaseException:
        result = {"ok": False, "line": 0, "error": traceback.format_exc(), "output": ""}
    out_path.write_text(json.dumps(result))
    os._exit(0)


def run_pages(pages: list[Path]) -> dict[str, dict]:
    import torch  # noqa: F401  (imported once here, before forking: each page starts with it loaded)

    import snoo  # noqa: F401

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n, page in enumerate(pages):
            result = {"ok": True, "ran": 0}
            for m, session in enumerate(sessions_of(page)):
                out = run_session(page, session, Path(tmp) / f"{n}.{m}.json")
                if not out["ok"]:
                    result = out
                    break
                result["ran"] += out["ran"]
            results[relative(page)] = result
    return results


def run_session(page: Path, session: list[Block], out_path: Path) -> dict:
    pid = os.fork()
    if pid == 0:
        _run_session_here(page, session, out_path)
    deadline = time.monotonic() + PAGE_TIMEOUT_S + 10
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            status = None
            break
        select.select([], [], [], 0.05)
    if out_path.exists():
        return json.loads(out_path.read_text())
    why = "timed out" if status is None else f"died with wait status {status}"
    return {"ok": False, "line": session[0].line, "error": f"the page's process {why}", "output": ""}


def run_in_child(pages: list[Path]) -> dict[str, dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, __file__, *map(str, pages)],
        capture_output=True,
        text=True,
        env=env,
        timeout=len(pages) * (PAGE_TIMEOUT_S + 20),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------------
# the tests


SELF_TEST_PAGES = {
    "passes.md": "```python\nx = 1\n```\n\ntext\n\n```py\nassert x == 1  # the same namespace\nprint('hi')\n```\n",
    "fails.md": "```python\nx = 1\n```\n\n```python\n\nassert x == 2, 'wrong'\n```\n",
    "skipped.md": "<!-- not run: needs eight GPUs -->\n```python\nraise SystemExit(3)\n```\n",
    "isolated.md": "```python\nassert 'x' not in globals()\n```\n",
    "sessions.md": "```python\nx = 1\n```\n<!-- new session -->\n\n```python\nassert 'x' not in globals()\ny = 2\n```\n"
    "```python\nassert y == 2\n```\n",
}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict]:
    """The docs' pages and the harness's own test pages, run in one child process (torch is imported once)."""
    folder = tmp_path_factory.mktemp("pages")
    for name, text in SELF_TEST_PAGES.items():
        (folder / name).write_text(text)
    return run_in_child([*PAGES, *(folder / name for name in SELF_TEST_PAGES)])


def test_harness_reports_what_fails(results):
    """The runner itself: a failing block fails with its markdown line, pages share nothing, markers skip."""
    by_name = {Path(page).name: result for page, result in results.items() if Path(page).name in SELF_TEST_PAGES}
    assert by_name["passes.md"] == {"ok": True, "ran": 2}
    assert not by_name["fails.md"]["ok"]
    assert by_name["fails.md"]["line"] == 6
    assert "AssertionError: wrong" in by_name["fails.md"]["error"]
    assert 'fails.md", line 7' in by_name["fails.md"]["error"]  # the line of the assert in the markdown
    assert by_name["skipped.md"] == {"ok": True, "ran": 0}
    assert by_name["isolated.md"] == {"ok": True, "ran": 1}
    assert by_name["sessions.md"] == {"ok": True, "ran": 3}


def test_not_run_markers_have_a_reason_and_a_block():
    all_blocks = [block for page in PAGES for block in blocks_of(page)]
    assert len(all_blocks) >= 20, "the extractor found almost no blocks: has the fence syntax changed?"
    marked = [block for block in all_blocks if block.not_run is not None]
    for block in marked:
        where = f"{relative(block.page)}:{block.line}"
        assert len(block.not_run.split()) >= 3, f"{where}: say why the block cannot run here: <!-- not run: why -->"
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        markers = len(NOT_RUN.findall(text))
        attached = sum(1 for block in blocks_of(page) if block.not_run is not None)
        assert markers == attached, f"{relative(page)}: a 'not run' marker is not right before a ```python block"
    # the exception, not the rule: almost every block is executed
    assert len(marked) <= len(all_blocks) // 5, [f"{relative(b.page)}:{b.line}" for b in marked]
    readme = [block for block in all_blocks if block.page.name == "README.md"]
    assert readme and readme[0].not_run is None, "the README's first snippet runs"


def test_every_python_block_runs(results):
    failures = []
    for page in map(relative, PAGES):
        result = results[page]
        if not result["ok"]:
            failures.append(f"--- {page}, the block at line {result['line']}:\n{result['error']}\n{result['output']}")
    assert not failures, "\n".join(failures)
    assert results["README.md"]["ran"] >= 1


if __name__ == "__main__":
    print(json.dumps(run_pages([Path(arg).resolve() for arg in sys.argv[1:]])))
