"""The documentation site (Sphinx + MyST + furo, docs/conf.py) builds with warnings as errors, as CI builds it."""

import inspect
import subprocess
import sys
from pathlib import Path

import snoo

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

# Where the API reference documents each public module of ``snoo.__all__`` (classes and functions are on "api").
API_PAGE_OF_MODULE = {"snoo.optim.schedules": "api", "snoo.distributed": "api-integrations"}


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

    # the lab guide's plots from a real run are in the site, and math is rendered by MathJax
    for image in ("compare_val_loss.png", "compare_weight_norm.png", "ksweep_heatmap.png"):
        assert (out / "_images" / image).is_file(), image
    assert "mathjax" in (out / "snoo.html").read_text(encoding="utf-8").lower()
