"""Where a run's numbers go: ``metrics.jsonl`` always; TensorBoard, Weights & Biases and a tqdm bar when asked.

Only rank 0 writes (``RunLog(enabled=False)`` on the other ranks does nothing). Every record carries ``step``,
``tokens`` and ``time`` (training seconds); the same numbers go to every logger.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from snoo.lab.checkpoint import open_to_append
from snoo.lab.config import TrainConfig


class RunLog:
    """The loggers of one run; ``emit`` one record, ``advance`` the bar, ``close`` at the end (or use ``with``)."""

    def __init__(
        self, cfg: TrainConfig, out: Path, *, enabled: bool, step: int, tokens_per_step: int, info: dict[str, Any]
    ) -> None:
        self.tokens_per_step = tokens_per_step
        self.file = open_to_append(out / "metrics.jsonl") if enabled else None
        self.tensorboard = _tensorboard(out) if enabled and cfg.tensorboard else None
        self.wandb = _wandb(cfg, out, info) if enabled and cfg.wandb else None
        self.bar = None
        if enabled and cfg.progress and sys.stderr.isatty() and "PYTEST_CURRENT_TEST" not in os.environ:
            from tqdm import tqdm

            self.bar = tqdm(total=cfg.steps, initial=step, desc=info["spec"], dynamic_ncols=True)

    def emit(self, step: int, wall: float, record: dict[str, Any]) -> None:
        if self.file is None:
            return
        record = {"step": step, "tokens": step * self.tokens_per_step, "time": round(wall, 3), **record}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        numbers = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self.tensorboard is not None:
            for key, value in numbers.items():
                self.tensorboard.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(numbers, step=step)

    def advance(self, step: int, wall: float, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{self.tokens_per_step * step / max(wall, 1e-9):.0f}")

    def close(self) -> None:
        for closing in (self.file, self.bar, self.tensorboard):
            if closing is not None:
                closing.close()
        if self.wandb is not None:
            self.wandb.finish()

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _tensorboard(out: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ImportError("--tensorboard needs the `tensorboard` package: pip install tensorboard") from None
    return SummaryWriter(str(out / "tb"))


def _wandb(cfg: TrainConfig, out: Path, info: dict[str, Any]) -> Any:
    """A W&B run in ``OUT/wandb``; the project is ``WANDB_PROJECT`` (default ``snoo-lab``), the name the run
    directory's. ``WANDB_MODE=offline`` logs with no network (``wandb sync OUT/wandb/offline-run-*`` uploads)."""
    try:
        import wandb
    except ImportError:
        raise ImportError(
            "--wandb needs the `wandb` package: pip install 'snoo-optim[wandb]' (or pip install wandb)"
        ) from None
    return wandb.init(
        project=os.environ.get("WANDB_PROJECT", "snoo-lab"),
        name=out.name,
        dir=str(out),
        config={**info["config"], "spec": info["spec"], "params": info["params"]},
        reinit="finish_previous",
    )
