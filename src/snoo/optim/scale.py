"""SCALE: SGD with per-row RMS-normalised updates and momentum on the last layer only.

Glentis, Li, Han, Hong, "SCALE: Stochastic Column-normalised Last-layer momEntum" (ICML 2026).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim.adamw import adamw as torch_adamw

from snoo import checks
from snoo.checks import NON_NEGATIVE, UNIT
from snoo.optim.groups import RoleOptimizer, evaluate_closure, pick_foreach

__all__ = ["SCALE", "adamw_update", "scale_update"]

# Floor on the RMS of a row (or column) before dividing by it: a row whose gradient is all zero stays put.
RMS_FLOOR = 1e-8


class SCALE(RoleOptimizer):
    r"""SCALE: plain SGD with each weight's update normalised to unit RMS per output unit.

    Needs role-tagged parameter groups (:func:`snoo.param_groups`). With ``g`` the gradient, ``t`` the number of
    steps this tensor has taken, ``lr``, ``wd`` the group's learning rate and weight decay:

    .. code-block:: text

        every tensor:        p = p * (1 - lr * wd)                                 # decoupled, default wd = 0
        "matrix":            u = g / max(rms(g[i, ...]), 1e-8)      for each row i  (first dimension)
        "head":              m = momentum * m + (1 - momentum) * g                   # m starts at 0
                             u = m / max(rms(m[i, ...]), 1e-8)      for each row i  (one row per token)
        "embedding":         u = g / max(rms(g[:, j]), 1e-8)        for each column j (hidden feature)
                             p = p - lr * u
        "vector" (AdamW):    a = beta1 * a + (1 - beta1) * g;  v = beta2 * v + (1 - beta2) * g^2
                             p = p - lr * (a / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)

    where ``rms(x) = sqrt(mean(x^2))``. Matrices and embeddings keep no state, the head keeps one buffer (none
    when ``momentum=0``), vectors keep Adam's two, so the optimizer state is about one head-sized tensor.

    Args:
        params: role-tagged parameter groups; each group may set its own ``lr``, ``momentum``, ``betas``,
            ``eps``, ``weight_decay``.
        lr: learning rate for every role (paper: 1e-3 for 60M-350M models, 2e-4 at 1B, 1e-4 at 7B, cosine to
            0.1x after 10% warm-up).
        momentum: EMA coefficient of the head's momentum (paper: 0.9).
        betas: AdamW's coefficients for the vectors (paper: (0.9, 0.999)).
        eps: AdamW's denominator term for the vectors.
        weight_decay: decoupled weight decay for every role (paper: none).
        foreach: use the multi-tensor ``torch._foreach_*`` path; ``None`` picks it when the parameters are on an
            accelerator.
    """

    spec_name = "scale"
    hyperparameter_ranges: ClassVar[dict[str, checks.Range]] = {
        "lr": NON_NEGATIVE,
        "momentum": UNIT,
        "eps": NON_NEGATIVE,
        "weight_decay": NON_NEGATIVE,
    }

    def __init__(
        self,
        params: Iterable[dict[str, Any]],
        lr: float = 1e-3,
        momentum: float = 0.9,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        foreach: bool | None = None,
    ) -> None:
        super().__init__(
            params, lr=lr, momentum=momentum, betas=betas, eps=eps, weight_decay=weight_decay, foreach=foreach
        )

    def _check_hyperparameters(self, group: dict[str, Any]) -> None:
        super()._check_hyperparameters(group)
        group["betas"] = checks.pair(group["betas"], "betas", UNIT, owner="SCALE")

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Take one step; ``closure`` re-evaluates the model and returns the loss."""
        loss = evaluate_closure(closure)
        for group, params, grads in self._groups_with_grads():
            foreach = pick_foreach(group["foreach"], params)
            role = group["role"]
            if role == "vector":
                states = [self._adam_state(p) for p in params]
                beta1, beta2 = group["betas"]
                adamw_update(
                    params,
                    grads,
                    [s["exp_avg"] for s in states],
                    [s["exp_avg_sq"] for s in states],
                    [s["step"] for s in states],
                    lr=group["lr"],
                    beta1=beta1,
                    beta2=beta2,
                    eps=group["eps"],
                    weight_decay=group["weight_decay"],
                    foreach=foreach,
                )
                continue
            momentum_buffers = self._momentum_buffers(params) if role == "head" and group["momentum"] > 0 else None
            scale_update(
                params,
                grads,
                momentum_buffers,
                lr=group["lr"],
                momentum=group["momentum"],
                weight_decay=group["weight_decay"],
                per_column=role == "embedding",
                foreach=foreach,
            )
        return loss

    def _adam_state(self, p: Tensor) -> dict[str, Any]:
        """``torch.optim.AdamW``'s state for ``p``: a float32 step count and the two moments."""
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        elif not isinstance(state["step"], Tensor):  # an int, as snoo <= 0.1.0.dev0 saved it
            state["step"] = torch.tensor(float(state["step"]))
        return state


def scale_update(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor] | None,
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    per_column: bool,
    foreach: bool = False,
) -> None:
    """SCALE's step for matrices: ``p = p*(1 - lr*wd) - lr * d / max(rms(d) per row, 1e-8)``.

    ``d`` is the gradient, or its EMA ``m = lerp(m, g, 1 - momentum)`` when ``momentum_buffers`` is given (the
    head). ``per_column`` takes the RMS over the first dimension instead (embeddings: one scale per feature).
    """
    if momentum_buffers is not None:
        assert len(momentum_buffers) == len(params)
    if foreach:
        _scale_foreach(params, grads, momentum_buffers, lr, momentum, weight_decay, per_column)
    else:
        _scale_single_tensor(params, grads, momentum_buffers, lr, momentum, weight_decay, per_column)


def _rms_dims(t: Tensor, per_column: bool) -> tuple[tuple[int, ...], float]:
    """Dimensions to reduce for one RMS per row (or column), and 1/sqrt(number of entries reduced)."""
    if per_column:
        return (0,), 1.0 / math.sqrt(t.shape[0])
    return tuple(range(1, t.ndim)), 1.0 / math.sqrt(t[0].numel())


def _scale_single_tensor(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor] | None,
    lr: float,
    momentum: float,
    weight_decay: float,
    per_column: bool,
) -> None:
    for i, p in enumerate(params):
        direction = grads[i]
        if momentum_buffers is not None:
            direction = momentum_buffers[i].lerp_(direction, 1 - momentum)  # m: the head's momentum
        if weight_decay != 0:
            p.mul_(1 - lr * weight_decay)
        dims, inv_sqrt_n = _rms_dims(p, per_column)
        rms = torch.linalg.vector_norm(direction, dim=dims, keepdim=True).mul_(inv_sqrt_n).clamp_min_(RMS_FLOOR)
        p.addcdiv_(direction, rms, value=-lr)


def _scale_foreach(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor] | None,
    lr: float,
    momentum: float,
    weight_decay: float,
    per_column: bool,
) -> None:
    directions = grads
    if momentum_buffers is not None:
        torch._foreach_lerp_(momentum_buffers, grads, 1 - momentum)
        directions = momentum_buffers
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    # No multi-tensor reduction over a dimension exists: one norm kernel per tensor, the rest is batched.
    dims_and_scales = [_rms_dims(p, per_column) for p in params]
    rms = [
        torch.linalg.vector_norm(d, dim=dims, keepdim=True)
        for d, (dims, _) in zip(directions, dims_and_scales, strict=True)
    ]
    torch._foreach_mul_(rms, [s for _, s in dims_and_scales])
    torch._foreach_clamp_min_(rms, RMS_FLOOR)
    torch._foreach_addcdiv_(params, directions, rms, value=-lr)


def adamw_update(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    foreach: bool = False,
) -> None:
    """Bias-corrected AdamW with decoupled weight decay, by ``torch.optim.adamw.adamw`` (torch's own single-tensor
    or foreach kernel); ``steps`` holds each tensor's float32 step count ``t``, which this increments.

    ``p = p*(1 - lr*wd) - lr * (a / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)``.
    """
    torch_adamw(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        [],
        steps,
        foreach=foreach,
        amsgrad=False,
        beta1=beta1,
        beta2=beta2,
        lr=lr,
        weight_decay=weight_decay,
        eps=eps,
        maximize=False,
    )
