"""Sphinx configuration of the snoo documentation site.

Pages are MyST Markdown (the same files read on GitHub), the API pages are generated from docstrings (autodoc with
napoleon for the Google-style ``Args:``), math is rendered by MathJax in the browser, and the theme is furo. Nothing
is fetched over the network at build time (no intersphinx).

Build it as CI does (``tests/test_docs.py``), with warnings as errors::

    python -m sphinx -W --keep-going -b html docs docs/_build/html
"""

from __future__ import annotations

import re
import sys
from importlib.util import find_spec
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Document the package of this checkout, whether or not it is the one installed.
sys.path.insert(0, str(ROOT / "src"))

import snoo  # noqa: E402

project = "snoo"
author = "the snoo authors"
copyright = "the snoo authors, MIT license"
release = snoo.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"

exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "results"]  # results/: data of long studies, not pages

# MyST: $...$ and $$...$$ math, and anchors for headings so that links like snoo.md#cost work as on GitHub.
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3

# autodoc and napoleon: Google-style docstrings, members in source order, type hints in the signature.
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
# The integrations' frameworks and the lab's statistics (numpy, scipy) are not in the [docs] extra: where they are
# missing, autodoc imports their modules against stand-ins, so that the site builds from `pip install -e ".[docs]"`
# alone (tests/test_docs.py) and shows the same pages (every member documented in snoo's own docstrings) as where they
# are installed.
autodoc_mock_imports = [
    name for name in ("transformers", "accelerate", "lightning", "numpy", "scipy") if find_spec(name) is None
]
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

html_theme = "furo"
html_title = f"snoo {release}"
html_static_path: list[str] = []


#: the line (an HTML comment: invisible on the forge) that marks a list of links to pages as the page's toctree
TOCTREE_MARK = "<!-- toctree -->"


def toctrees_from_link_lists(app, docname: str, source: list[str]) -> None:
    """Each list of links to pages after a ``<!-- toctree -->`` line is also a hidden toctree, captioned by the
    ``##`` heading above it: the forge shows the pages as plain links, and Sphinx takes its navigation from the same
    lines. An item is ``- [text](page.md)`` (anything after the link, and indented lines, are its description)."""
    lines, caption, trees = source[0].splitlines(), None, []
    for i, line in enumerate(lines):
        if line.startswith("## "):
            caption = line[3:].strip()
        if line.strip() != TOCTREE_MARK:
            continue
        pages = []
        for item in lines[i + 1 :]:
            link = re.match(r"[-*] \[[^\]]+\]\(([\w/-]+)\.md\)", item)
            if link:
                pages.append(link.group(1))
            elif item.strip() and not item.startswith(" "):
                break
        if not pages:
            raise ValueError(f"{docname}: {TOCTREE_MARK} is followed by no list of links to pages")
        head = f":caption: {caption}\n" if caption else ""
        trees.append(f"```{{toctree}}\n:hidden:\n{head}:maxdepth: 1\n\n" + "\n".join(pages) + "\n```\n")
    if trees:
        source[0] += "\n\n" + "\n".join(trees)


def setup(app) -> None:
    app.connect("source-read", toctrees_from_link_lists)
