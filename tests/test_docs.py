"""The documentation site (Sphinx + MyST + furo, docs/conf.py) builds with warnings as errors, as CI builds it."""

import inspect
import re
import subprocess
import sys
from pathlib import Path

import snoo
from helpers import python_with_only

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

# Where the API reference documents each public module of ``snoo.__all__`` (classes and functions are on "api").
API_PAGE_OF_MODULE = {"snoo.optim.schedules": "api", "snoo.distributed": "api-integrations"}


def linked_pages(page: str) -> list[str]:
    """The pages that the ``<!-- toctree -->`` lists of ``docs/<page>.md`` link to, in order (docs/conf.py)."""
    text = (DOCS / f"{page}.md").read_text(encoding="utf-8")
    return re.findall(r"^- \[[^\]]+\]\(([\w-]+)\.md\)", text, flags=re.M)


def test_the_index_is_a_plain_list_of_links_to_every_page():
    """On the forge a toctree is a code fence; the index and the integrations guide are lists of links instead,
    which docs/conf.py also makes their toctrees."""
    pages = {md.stem for md in DOCS.glob("*.md")} - {"index"}
    for page in ("index", "integrations"):
        assert "{toctree}" not in (DOCS / f"{page}.md").read_text(encoding="utf-8"), page
    listed = linked_pages("index") + linked_pages("integrations")
    assert sorted(listed) == sorted(pages), "every page once, from the index or the integrations guide"


def test_docs_build_without_warnings(tmp_path):
    out = tmp_path / "html"
    done = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(DOCS), str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr

    # every page of docs/ is in the site
    pages = {md.stem for md in DOCS.glob("*.md")}
    assert {"index", "getting-started", "snoo", "lab", "faq", "api", "changelog"} <= pages
    missing = sorted(page for page in pages if not (out / f"{page}.html").is_file())
    assert not missing, f"pages not built: {missing}"

    # the API reference is generated from the docstrings: every public name is documented
    api = (out / "api.html").read_text(encoding="utf-8")
    assert "Step-K Nesterov Outer Optimizer" in api
    for name in snoo.__all__:
        obj = getattr(snoo, name)
        page, anchor = "api", f"snoo.{name}"
        if inspect.ismodule(obj):
            page, anchor = API_PAGE_OF_MODULE.get(obj.__name__, "api"), f"module-{obj.__name__}"
        assert f'id="{anchor}"' in (out / f"{page}.html").read_text(encoding="utf-8"), f"{name} not in {page}.html"
    for name in ("build", "parse", "from_config"):
        assert f'id="snoo.spec.{name}"' in api

    # the index's plain list of links (readable on the forge) is the site's navigation, in its order, with captions
    index = (out / "index.html").read_text(encoding="utf-8")
    sidebar = re.findall(r'<li class="toctree-l1[^"]*"><a class="reference internal" href="([\w-]+)\.html"', index)
    assert sidebar[: len(linked_pages("index"))] == linked_pages("index")
    assert '<span class="caption-text">Optimizers</span>' in index
    assert '<li class="toctree-l2"><a class="reference internal" href="hf.html">' in index

    # the lab guide's plots from a real run are in the site, and math is rendered by MathJax
    for image in ("compare_val_loss.png", "compare_weight_norm.png", "ksweep_heatmap.png"):
        assert (out / "_images" / image).is_file(), image
    assert "mathjax" in (out / "snoo.html").read_text(encoding="utf-8").lower()


def test_docs_build_from_the_docs_extra_alone(tmp_path):
    """The README's `pip install -e ".[docs]" && python -m sphinx -W -b html docs docs/_build/html` in a fresh
    environment, simulated without a download: a directory that holds links to exactly the packages that install
    would bring (torch, Sphinx and their dependencies; no transformers, accelerate, lightning, numpy, matplotlib),
    and a Python that sees only it, the standard library and this checkout (``-I -S``: no site-packages)."""
    check = "from importlib.util import find_spec\n"
    check += "found = [m for m in ('transformers', 'accelerate', 'lightning', 'numpy', 'matplotlib') if find_spec(m)]\n"
    check += "assert not found, f'installed in the simulated environment: {found}'\n"
    build = check + "from sphinx.cmd.build import main\nsys.exit(main(sys.argv[1:]))"
    out = tmp_path / "html"
    done = python_with_only(tmp_path, {"docs"}, build, "-W", "--keep-going", "-q", "-b", "html", str(DOCS), str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    # the integrations are documented from snoo's own docstrings, hooks included, as where their frameworks are
    page = (out / "api-integrations.html").read_text(encoding="utf-8")
    for anchor in (
        "snoo.integrations.hf.create_optimizer",
        "snoo.integrations.hf.EvaluationWeights.on_step_end",
        "snoo.integrations.lightning.EvaluationWeights.on_save_checkpoint",
    ):
        assert f'id="{anchor}"' in page, anchor
    for module in ("hf", "lightning"):  # no stand-in's (*args, **kwargs) for the callbacks' signature
        assert (
            f'EvaluationWeights</span></span><a class="reference internal" href="_modules/snoo/integrations/{module}'
            in page
        )
