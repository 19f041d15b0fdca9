"""SNOO (Step-K Nesterov Outer Optimizer) and Lookahead, its special case without momentum.

SNOO: Kallusky, Rao, Nandavanam, Shi, arXiv 2510.15830. Lookahead: Zhang, Lucas, Ba, Hinton 2019.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Optimizer

from snoo.optim.schedules import Coefficient, value_at
from snoo.optim.wrapper import Wrapper, as_state_tensors, bucket_by_device_and_dtype, state_dtype


class SNOO(Wrapper):
    r"""Step-K Nesterov Outer Optimizer: Nesterov momentum on the pseudo-gradient of K inner steps.

    The parameters hold the *fast* weights :math:`p`, which ``inner`` updates at every step. SNOO keeps the *slow*
    weights :math:`w` (the model that counts) and a momentum buffer :math:`b`:

    .. math::

        &\text{at the first step:}\quad w = p,\quad b = 0 \\
        &\text{after inner steps } K, 2K, 3K, \dots: \\
        &\qquad s = w - p \qquad\text{(pseudo-gradient)} \\
        &\qquad b \leftarrow \mu b + s \\
        &\qquad w \leftarrow w - \eta\,(s + \mu b) \qquad\text{(without Nesterov: } w \leftarrow w - \eta b) \\
        &\qquad p \leftarrow w

    which is ``torch.optim.SGD(lr=eta, momentum=mu, nesterov=True)`` applied to the "gradient" :math:`s`. The inner
    optimizer's own state (Adam moments, Muon momentum) is kept across outer steps. With :math:`\mu = 0` no momentum
    buffer is allocated and the outer step is :math:`w \leftarrow w + \eta (p - w)` (a lerp) and one copy: that is
    :class:`Lookahead`. With :math:`K = 1, \eta = 1, \mu = 0` it is the inner optimizer alone.

    Args:
        inner: the optimizer taking the K inner steps (AdamW, SGD, ``torch.optim.Muon``, :class:`snoo.SCALE`, ...).
            Its ``param_groups`` are this optimizer's: an LR scheduler on either moves the same inner ``lr``.
        k: inner steps per outer step, :math:`K`.
        lr: outer learning rate :math:`\eta`, stored in each group as ``"outer_lr"``. A number, or a schedule
            ``n -> eta`` (:mod:`snoo.optim.schedules`) evaluated at the *inner* step ``n = jK`` at which outer step
            ``j`` fires: the same clock as the inner lr and every other coefficient of this package, so a schedule
            written for a run of T steps does not change when K does.
        momentum: outer momentum :math:`\mu \in [0, 1)`, stored in each group as ``"outer_momentum"``; a number or
            a schedule, like ``lr``. A step whose momentum is 0 leaves the buffer as it is, like ``torch.optim.SGD``.
        nesterov: Nesterov (the paper) or heavy-ball momentum; stored in each group as ``"outer_nesterov"``.
        state_device: where the slow weights and momentum live. ``None``: beside each parameter. ``"cpu"`` with a
            model on a GPU: in pinned host memory, so the GPU holds no extra state; each outer step then copies the
            fast weights to the host and the new weights back (one transfer each way every K steps) and does the
            outer arithmetic on the host.
        track_norms: after each outer step, put the l2 norms of the pseudo-gradient, momentum and slow weights over
            all parameters in :attr:`outer_norms` (0-d tensors, so reading them is the caller's synchronisation).
            Costs one extra read of each of those tensors per outer step.

    Defaults: ``lr=0.7, momentum=0.5`` are a published public run (0.7, 0.5, K=30), inside the paper's good ranges
    (eta 0.2-0.8, mu 0.5-0.9; higher mu is more sensitive to K). ``k=20`` is the low end of the good range
    (20-100): it is the least sensitive choice at mu=0.5 and still gives many outer steps in short runs.

    Per-parameter details:

    - The slow weights start from the parameter's value at the first ``step()`` that sees it (so weights loaded into
      the model after building the optimizer count), or at the ``step()`` after ``add_param_group``.
    - A parameter that receives no gradient during a whole cycle of K steps (frozen, or unused, like an MoE expert
      that no token picked) is left exactly as it is: neither its slow weights nor its momentum move.
    - For bf16/fp16 parameters the slow weights and momentum are float32; the parameter gets the rounded slow
      weights, and the rounding error is part of the next pseudo-gradient, so nothing is lost to it.
    - ``eval()`` puts the slow weights into the parameters (evaluate, export, save the model then); ``train()``
      restores the fast ones exactly. In the middle of a cycle the slow weights are those of the last outer step.
    """

    state_prefix = "snoo"

    def __init__(
        self,
        inner: Optimizer,
        k: int = 20,
        lr: Coefficient = 0.7,
        momentum: Coefficient = 0.5,
        nesterov: bool = True,
        *,
        state_device: torch.device | str | None = None,
        track_norms: bool = False,
    ) -> None:
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"k (inner steps per outer step) must be a positive int, got {k!r}")
        if k < 1:
            raise ValueError(f"k (inner steps per outer step) must be a positive int, got {k}")
        if not isinstance(nesterov, bool):
            raise TypeError(f"nesterov must be a bool, got {nesterov!r}")
        self.k = k
        self.track_norms = track_norms
        #: l2 norms over all parameters after the last outer step, when ``track_norms`` is set.
        self.outer_norms: dict[str, torch.Tensor] = {}
        self._touched: set[torch.Tensor] = set()
        super().__init__(
            inner,
            {"outer_lr": lr, "outer_momentum": momentum, "outer_nesterov": nesterov},
            state_device=state_device,
        )

    def _check_group(self, group: dict[str, Any]) -> None:
        if not callable(group["outer_lr"]):
            _check_outer_lr(group["outer_lr"])
        if not callable(group["outer_momentum"]):
            _check_outer_momentum(group["outer_momentum"])

    def _init_param_state(self, param: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"slow": self._new_state(param, param, state_dtype(param))}

    def _state_dtypes(self, param: torch.Tensor) -> dict[str, torch.dtype]:
        return {**super()._state_dtypes(param), "slow": state_dtype(param), "momentum": state_dtype(param)}

    def _evaluation_weights(self, param: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        return state["slow"]

    def _after_inner_step(self) -> None:
        self._touched.update(p for g in self.param_groups for p in g["params"] if p.grad is not None)
        if self._inner_steps % self.k:
            return
        squares: dict[str, list[torch.Tensor]] = {"pseudo_grad": [], "momentum": [], "slow": []}
        for group in self.param_groups:
            params = [p for p in group["params"] if p in self._touched]
            if not params:
                continue
            lr, momentum = group["outer_lr"], group["outer_momentum"]
            if callable(lr) or callable(momentum):
                where = f" (the value of its schedule at step {self._inner_steps})"
                lr = _check_outer_lr(value_at(lr, self._inner_steps), where)
                momentum = _check_outer_momentum(value_at(momentum, self._inner_steps), where)
            for bucket, bucket_states in bucket_by_device_and_dtype(params, self.state, "slow"):
                norms = outer_step(
                    bucket,
                    [st["slow"] for st in bucket_states],
                    self._momentum_buffers(bucket_states, momentum),
                    lr=lr,
                    momentum=momentum,
                    nesterov=group["outer_nesterov"],
                    track_norms=self.track_norms,
                )
                for name, value in norms.items():
                    squares[name].append(value.to(squares[name][0].device if squares[name] else value.device))
        self._touched.clear()
        if self.track_norms:
            self.outer_norms = {name: torch.stack(v).sum().sqrt() for name, v in squares.items() if v}

    def _momentum_buffers(self, states: list[dict[str, torch.Tensor]], momentum: float) -> list[torch.Tensor] | None:
        if momentum == 0:
            return None
        for st in states:
            if "momentum" not in st:  # b = 0 at start, allocated at the first outer step that needs it
                st["momentum"] = torch.zeros_like(st["slow"])
        return [st["momentum"] for st in states]

    def _extra_state(self, index: dict[torch.Tensor, int]) -> dict[str, Any]:
        return {
            **super()._extra_state(index),
            "k": self.k,
            "touched": sorted(index[p] for p in self._touched),
        }

    def _load_extra_state(self, extra: dict[str, Any], params: list[torch.Tensor]) -> Callable[[], None]:
        apply_base = super()._load_extra_state(extra, params)
        if extra.get("k") != self.k:
            raise ValueError(
                f"the state dict was saved with k={extra.get('k')!r}, this {type(self).__name__} has k={self.k}: "
                f"build it with the same k to continue the run"
            )
        touched = extra.get("touched")
        if not isinstance(touched, list) or not all(isinstance(i, int) and 0 <= i < len(params) for i in touched):
            raise ValueError(f"state_dict['{self.state_prefix}']['touched'] must be a list of parameter positions")

        def apply() -> None:
            apply_base()
            self._touched = {params[i] for i in touched}
            self.outer_norms = {}

        return apply


def _check_outer_lr(lr: Any, where: str = "") -> float:
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr (outer learning rate) must be a finite number > 0, got {lr!r}{where}")
    return lr


def _check_outer_momentum(momentum: Any, where: str = "") -> float:
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
        raise ValueError(f"momentum (outer momentum) must be in [0, 1), got {momentum!r}{where}")
    return momentum


@torch.no_grad()
def outer_step(
    params: list[torch.Tensor],
    slow: list[torch.Tensor],
    momentum_buffers: list[torch.Tensor] | None,
    *,
    lr: float,
    momentum: float,
    nesterov: bool,
    track_norms: bool = False,
) -> dict[str, torch.Tensor]:
    r"""One outer step of SNOO over tensors that share device and dtype, in a few ``torch._foreach_*`` passes.

    ``params`` hold the fast weights :math:`p` and receive the new slow weights. ``slow`` (:math:`w`) and
    ``momentum_buffers`` (:math:`b`; ``None`` when ``momentum == 0``) may be float32 for low-precision parameters
    and may live on another device (host memory). Returns the squared l2 norms of :math:`s`, :math:`b` and the new
    :math:`w` when ``track_norms`` is set, else an empty dict.
    """
    # the fast weights as state tensors: the parameters themselves, or float32 / host copies; a scratch either way,
    # since p <- w overwrites the parameters at the end
    fast = as_state_tensors(params, slow[0])
    squares: dict[str, torch.Tensor] = {}

    def squared_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(torch._foreach_norm(tensors)).square().sum()

    if momentum == 0:
        if track_norms:
            squares["pseudo_grad"] = squared_norm(torch._foreach_sub(slow, fast))
        # w <- w + eta (p - w); lerp returns p exactly when eta == 1
        torch._foreach_lerp_(slow, fast, lr)
    else:
        assert momentum_buffers is not None
        neg_s = fast  # neg_s = p - w = -s
        torch._foreach_sub_(neg_s, slow)
        if track_norms:
            squares["pseudo_grad"] = squared_norm(neg_s)
        # b <- mu b + s
        torch._foreach_mul_(momentum_buffers, momentum)
        torch._foreach_sub_(momentum_buffers, neg_s)
        if nesterov:
            # w <- w - eta (s + mu b): neg_s becomes -(s + mu b), the same rounding as SGD(nesterov=True)
            torch._foreach_add_(neg_s, momentum_buffers, alpha=-momentum)
            torch._foreach_add_(slow, neg_s, alpha=lr)
        else:
            torch._foreach_add_(slow, momentum_buffers, alpha=-lr)
        if track_norms:
            squares["momentum"] = squared_norm(momentum_buffers)
    if track_norms:
        squares["slow"] = squared_norm(slow)
    # p <- w
    torch._foreach_copy_(params, slow, non_blocking=True)
    return squares


class Lookahead(SNOO):
    r"""Lookahead: every K steps, :math:`w \leftarrow w + \alpha (p - w)` and :math:`p \leftarrow w`.

    This is :class:`SNOO` with ``momentum=0`` and ``lr=alpha`` (stored in each group as ``"outer_lr"``): no momentum
    buffer, one lerp and one copy per outer step. ``eval()``/``train()``, checkpoints and the per-parameter details
    are SNOO's. Defaults ``k=5, alpha=0.5`` are the paper's.
    """

    def __init__(
        self,
        inner: Optimizer,
        k: int = 5,
        alpha: float = 0.5,
        *,
        state_device: torch.device | str | None = None,
        track_norms: bool = False,
    ) -> None:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha <= 1:
            raise ValueError(f"alpha (slow weights step size) must be in (0, 1], got {alpha!r}")
        super().__init__(
            inner,
            k=k,
            lr=alpha,
            momentum=0.0,
            nesterov=False,
            state_device=state_device,
            track_norms=track_norms,
        )
