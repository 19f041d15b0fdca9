"""A config-driven trainer: the optimizer comes from the run file's [optimizer] table, so SNOO is a config change.

    python examples/config_driven.py                                  # examples/adamw.toml, then examples/snoo.toml
    python examples/config_driven.py my_run.toml

The training loop below never names an optimizer: ``build_optimizer`` reads the table (nested, a list of tables or
a SPEC string; see docs/config.md), and the loop evaluates on the optimizer's evaluation weights when it has them
(``opt.eval()``; SNOO's slow weights), as any trainer should for SNOO, EMA-Nesterov or schedule-free optimizers.
Needs Python 3.11+ (``tomllib``).
"""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

try:
    import tomllib
except ImportError:  # Python 3.10
    try:
        import tomli as tomllib
    except ImportError:
        raise SystemExit(
            f"{Path(__file__).name} reads TOML: it needs Python 3.11+ (tomllib), or on 3.10 `pip install tomli`"
        ) from None

from snoo import spec
from snoo.integrations.config import build_optimizer, parse_config

HERE = Path(__file__).parent


@functools.cache
def teacher() -> nn.Module:
    """The network the model learns to imitate: one for every run, built without touching the global RNG."""
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        return nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 4))


def batch(step: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch ``step`` of the teacher's regression task, the same in every run; step -1 is the validation set."""
    g = torch.Generator().manual_seed(10_000 + step)
    x = torch.randn(size, 16, generator=g)
    with torch.no_grad():
        return x, teacher()(x) + 0.01 * torch.randn(size, 4, generator=g)


def train(config: dict[str, Any]) -> dict[str, Any]:
    run = config["training"]
    torch.manual_seed(run["seed"])
    model = nn.Sequential(nn.Linear(16, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 4))
    opt = build_optimizer(model, config["optimizer"])
    start = time.perf_counter()
    for step in range(run["steps"]):
        x, y = batch(step, run["batch_size"])
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    evaluation_weights = callable(getattr(opt, "eval", None))
    if evaluation_weights:
        opt.eval()  # the weights to evaluate and to save; opt.train() would put the training point back
    with torch.no_grad():
        x, y = batch(-1, 4096)
        val_loss = nn.functional.mse_loss(model(x), y).item()
    return {
        "optimizer": type(opt).__name__,
        "train_loss": loss.item(),
        "val_loss": val_loss,
        "evaluation_weights": evaluation_weights,
        "seconds": time.perf_counter() - start,
    }


def main(paths: list[Path]) -> None:
    torch.set_num_threads(1)
    for path in paths:
        with open(path, "rb") as f:
            config = tomllib.load(f)
        print(f"{path.name}: optimizer {spec.canonical(parse_config(config['optimizer']))}")
        result = train(config)
        where = "the evaluation weights" if result["evaluation_weights"] else "the trained weights"
        print(
            f"  {result['optimizer']}, {config['training']['steps']} steps in {result['seconds']:.1f} s: "
            f"last train loss {result['train_loss']:.5f}, val loss {result['val_loss']:.5f} on {where}"
        )


if __name__ == "__main__":
    main([Path(p) for p in sys.argv[1:]] or [HERE / "adamw.toml", HERE / "snoo.toml"])
