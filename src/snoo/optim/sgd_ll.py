"""SGD-LL: momentum SGD at a very large learning rate, kept stable by clipping the head's rows and each update.

Glentis, Yau, Li, Hong (2026).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor

from snoo import checks
from snoo.checks import NON_NEGATIVE, POSITIVE, UNIT
from snoo.optim.groups import RoleOptimizer, evaluate_closure, pick_foreach

__all__ = ["SGDLL", "sgd_ll_update"]

ROW_NORM_FLOOR = 1e-8  # floor on ||d_r|| in the head's row clip
RMS_FLOOR = 1e-9  # floor on rms(d) in the update clip


class SGDLL(RoleOptimizer):
    r"""SGD-LL: EMA-momentum SGD whose update is clipped per head row and per tensor.

    Needs role-tagged parameter groups (:func:`snoo.param_groups`); only the ``"head"`` role is treated apart.
    With ``g`` the gradient and the group's ``lr``, ``beta`` (``momentum``), ``tau``, ``delta``:

    .. code-block:: text

        m = beta * m + (1 - beta) * g                     # every tensor; m starts at 0 and is stored unclipped
        d = m
        head only, each row r (token class):  d_r = d_r * min(1, delta / max(||d_r||_2, 1e-8))
        every tensor:  d = d * min(1, tau / (lr * max(rms(d), 1e-9)))        # so that lr * rms(d) <= tau
        p = p - lr * d

    ``rms(d) = sqrt(mean(d^2))`` over the whole tensor. The clip makes ``tau`` the largest RMS change a step can
    make to any tensor, which is what lets ``lr`` be 200-600 times what plain SGD tolerates. State: one buffer
    per parameter.

    Args:
        params: role-tagged parameter groups; each group may set its own ``lr``, ``momentum``, ``tau``, ``delta``.
        lr: learning rate (paper: 100 to 300, cosine to 0.1x).
        momentum: EMA coefficient ``beta`` (paper: 0.9).
        tau: largest RMS of ``lr * d`` for any tensor (paper: 5e-4).
        delta: largest l2 norm of a head row of ``d`` (paper: 1e-3).
        foreach: use the multi-tensor ``torch._foreach_*`` path; ``None`` picks it when the parameters are on an
            accelerator.

    The paper trains without weight decay, and so does this optimizer (there is no ``weight_decay`` argument).
    """

    spec_name = "sgdll"
    hyperparameter_ranges: ClassVar[dict[str, checks.Range]] = {
        "lr": NON_NEGATIVE,
        "momentum": UNIT,
        "tau": POSITIVE,
        "delta": POSITIVE,
    }

    def __init__(
        self,
        params: Iterable[dict[str, Any]],
        lr: float = 100.0,
        momentum: float = 0.9,
        tau: float = 5e-4,
        delta: float = 1e-3,
        *,
        foreach: bool | None = None,
    ) -> None:
        super().__init__(params, lr=lr, momentum=momentum, tau=tau, delta=delta, foreach=foreach)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Take one step; ``closure`` re-evaluates the model and returns the loss."""
        loss = evaluate_closure(closure)
        for group, params, grads in self._groups_with_grads():
            sgd_ll_update(
                params,
                grads,
                self._momentum_buffers(params),
                lr=group["lr"],
                momentum=group["momentum"],
                tau=group["tau"],
                delta=group["delta"] if group["role"] == "head" else None,
                foreach=pick_foreach(group["foreach"], params),
            )
        return loss


def sgd_ll_update(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    *,
    lr: float,
    momentum: float,
    tau: float,
    delta: float | None,
    foreach: bool = False,
) -> None:
    """SGD-LL's step for one group: momentum, head-row clip (when ``delta`` is given), update clip, descent.

    The clip factor stays on the device (no host sync): ``p.addcmul_(d, min(1, tau / (lr * rms)), value=-lr)``.
    ``foreach`` picks the multi-tensor twin, which computes the same.
    """
    assert len(momentum_buffers) == len(params)
    # tau / lr: the bound on rms(d); no bound when lr == 0 (the step moves nothing then).
    rms_limit = tau / lr if lr > 0 else math.inf
    twin = _sgd_ll_foreach if foreach else _sgd_ll_single_tensor
    twin(params, grads, momentum_buffers, lr, momentum, rms_limit, delta)


def _sgd_ll_single_tensor(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    lr: float,
    momentum: float,
    rms_limit: float,
    delta: float | None,
) -> None:
    for i, p in enumerate(params):
        m = momentum_buffers[i].lerp_(grads[i], 1 - momentum)
        direction = m if delta is None else _clip_rows(m, delta)
        factor = torch.linalg.vector_norm(direction).mul_(1.0 / math.sqrt(direction.numel()))
        factor = factor.clamp_min_(RMS_FLOOR).reciprocal_().mul_(rms_limit).clamp_max_(1.0)
        p.addcmul_(direction, factor, value=-lr)


def _sgd_ll_foreach(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    lr: float,
    momentum: float,
    rms_limit: float,
    delta: float | None,
) -> None:
    torch._foreach_lerp_(momentum_buffers, grads, 1 - momentum)  # m
    directions = momentum_buffers if delta is None else [_clip_rows(m, delta) for m in momentum_buffers]
    factors = torch._foreach_norm(directions)
    torch._foreach_mul_(factors, [1.0 / math.sqrt(d.numel()) for d in directions])  # rms(d)
    torch._foreach_clamp_min_(factors, RMS_FLOOR)
    torch._foreach_reciprocal_(factors)
    torch._foreach_mul_(factors, rms_limit)
    torch._foreach_clamp_max_(factors, 1.0)
    torch._foreach_addcmul_(params, directions, factors, value=-lr)


def _clip_rows(m: Tensor, delta: float) -> Tensor:
    """``d_r = m_r * min(1, delta / max(||m_r||, 1e-8))`` for each row ``r`` (first dimension); ``m`` is kept."""
    norms = torch.linalg.vector_norm(m, dim=tuple(range(1, m.ndim)), keepdim=True)
    return m * norms.clamp_min_(ROW_NORM_FLOOR).reciprocal_().mul_(delta).clamp_max_(1.0)
