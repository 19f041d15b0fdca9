"""``snoo report DIR``: the summary of a finished (or partly finished) experiment written again from its runs, by the
kind of experiment it is: each kind's own summary (a compare or sweep: ``summary.py``; ``scale_out.py``;
``scaling.py``).
"""

from __future__ import annotations

from pathlib import Path

from snoo.lab.scale_out import summarize_scale_out
from snoo.lab.scaling import summarize_scaling
from snoo.lab.summary import read_experiment, summarize_compare

SUMMARIES = {
    "compare": summarize_compare,
    "sweep": summarize_compare,
    "scale-out": summarize_scale_out,
    "scaling": summarize_scaling,
}


def summarize(out: Path | str) -> dict:
    """Read an experiment directory's runs; write summary.json, summary.md and the plots; return the summary."""
    out = Path(out)
    experiment = read_experiment(out)
    if experiment.get("kind") not in SUMMARIES:
        raise ValueError(
            f"{out / 'experiment.json'} is damaged: its kind is {experiment.get('kind')!r}, not one of "
            f"{', '.join(SUMMARIES)}"
        )
    return SUMMARIES[experiment["kind"]](out, experiment)
