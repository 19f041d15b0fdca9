"""The files git tracks stay `ruff` clean (lint and format), so CI's one test command also checks style.

Only tracked files are checked: a scratch ``.py`` beside the checkout is nobody else's business until it is added.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECKS = {"check": ["check", "--force-exclude"], "format": ["format", "--check", "--force-exclude"]}


def tracked_python_files(root: Path) -> list[str]:
    """The Python files in git's index under ``root`` that exist in the work tree, relative to ``root``."""
    done = subprocess.run(
        ["git", "ls-files", "-z", "--", "*.py", "*.pyi"], cwd=root, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        pytest.skip(f"not a git checkout, so nothing is tracked: {done.stderr.strip()}")
    return sorted(name for name in done.stdout.split("\0") if name and (root / name).is_file())


def ruff(check: str, root: Path) -> subprocess.CompletedProcess:
    files = tracked_python_files(root)
    assert files, f"git tracks no Python file under {root}"
    executable = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    return subprocess.run([executable, *CHECKS[check], *files], cwd=root, capture_output=True, text=True)


@pytest.mark.parametrize("check", sorted(CHECKS))
def test_ruff(check):
    done = ruff(check, ROOT)
    assert done.returncode == 0, done.stdout + done.stderr


def test_only_tracked_files_are_linted_and_a_tracked_error_fails(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")  # the project's ruff settings
    (tmp_path / "clean.py").write_text('"""A tracked, clean module."""\n\nVALUE = 1\n')
    (tmp_path / "scratch.py").write_text("import os\nx=1\n")  # untracked: an unused import, bad format
    subprocess.run(["git", "add", "clean.py", "pyproject.toml"], cwd=tmp_path, check=True)

    assert tracked_python_files(tmp_path) == ["clean.py"]
    for check in CHECKS:
        done = ruff(check, tmp_path)
        assert done.returncode == 0, done.stdout + done.stderr

    subprocess.run(["git", "add", "scratch.py"], cwd=tmp_path, check=True)  # now it is the project's
    lint, style = ruff("check", tmp_path), ruff("format", tmp_path)
    assert lint.returncode != 0 and "scratch.py" in lint.stdout and "F401" in lint.stdout, lint.stdout + lint.stderr
    assert style.returncode != 0 and "scratch.py" in style.stdout, style.stdout + style.stderr
