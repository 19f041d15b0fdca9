"""What several test files share: a small model, deterministic batches, a training step, and an op counter."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).to(dtype)


def batch(t: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of step ``t``: the same in every process."""
    g = torch.Generator().manual_seed(1000 + t)
    return torch.randn(32, 6, generator=g).to(dtype), torch.randn(32, 3, generator=g).to(dtype)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, t: int) -> float:
    x, y = batch(t, next(model.parameters()).dtype)
    loss = (model(x) - y).square().mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.item()


def params_of(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


class CountOps(TorchDispatchMode):
    """Counts the aten ops dispatched at the top level: a foreach op counts once, whatever its number of tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))
