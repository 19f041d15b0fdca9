"""Nesterov momentum for any optimizer, treated as a black box, with the next step's momentum.

From the note "Fixes for Nesterov momentum in ML" (research.novelai.net/nesterov).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch.optim import Optimizer

from snoo import checks
from snoo.checks import NON_NEGATIVE, UNIT, is_number
from snoo.optim.declaration import Trial
from snoo.optim.schedules import Coefficient, value_at
from snoo.optim.tensors import as_state_tensors, foreach_copy_, state_dtype
from snoo.optim.wrapper import LookaheadPointWrapper, StateSpec


class Nesterov(LookaheadPointWrapper):
    r"""Nesterov lookahead around any optimizer :math:`A`, used as a black box.

    Let :math:`u_t` be the update :math:`A` applies when its gradient is taken at :math:`\phi_t`. The real iterate
    :math:`\theta` follows :math:`A` and the parameters hold :math:`\phi`, the point where the next gradient is taken;
    the wrapper keeps :math:`\theta` and the lookahead :math:`d = \phi - \theta` (the state keys ``"theta"`` and
    ``"d"``, ``"nesterov.theta"`` and ``"nesterov.d"`` in ``state_dict()``; :math:`\phi` is kept as ``"phi"`` while
    ``eval()`` puts :math:`\theta` in):

    .. math::
       \begin{aligned}
            &\textbf{input}: A \text{ (inner optimizer)}, \mu_t \text{ (momentum, a schedule)},
                \lambda \text{ (weight decay)}, p \text{ (params)} \\
            &\textbf{initialize}: \theta_1 \leftarrow p,\; d_1 \leftarrow 0,\; \phi_1 \leftarrow \theta_1 + d_1 = p \\
            &\textbf{for} \: t = 1 \: \textbf{to} \: \ldots \: \textbf{do} \\
            &\hspace{5mm} u_t \leftarrow A_t(\phi_t) - \phi_t \qquad\text{(the inner optimizer's step from } \phi_t) \\
            &\hspace{5mm} \theta_{t+1} \leftarrow (1 - \text{lr}_t\,\lambda)\,\theta_t + u_t \\
            &\hspace{5mm} d_{t+1} \leftarrow \mu_{t+1} u_t \\
            &\hspace{5mm} \phi_{t+1} \leftarrow \theta_{t+1} + d_{t+1} \\
            &\textbf{return}: \theta \text{ (by } \texttt{eval()})
       \end{aligned}

    With :math:`\lambda = 0` that is :math:`\phi_{t+1} = \phi_t + (1 + \mu_{t+1}) u_t - \mu_t u_{t-1}` and
    :math:`\theta_t = \phi_t - \mu_t u_{t-1}`. The lookahead after step :math:`t` uses the momentum of step
    :math:`t + 1`: a schedule for :math:`\mu` is a function ``n -> mu_n`` (the coefficient of the lookahead point at
    which step ``n``'s gradient is taken), called with ``n = t + 1`` right after step ``t``
    (:mod:`snoo.optim.schedules`). With heavy-ball SGD as :math:`A` and the same constant :math:`\mu`,
    ``Nesterov(SGD(lr, momentum=mu), momentum=mu)`` is ``SGD(lr, momentum=mu, nesterov=True)``. With Adam it is not
    NAdam: NAdam puts the lookahead in Adam's numerator and divides it by the *new* denominator, so when the
    denominator changes (a loss spike, a small ``beta2``) its lookahead and the retraction at the next step do not
    cancel; here :math:`\theta` is exactly Adam's iterate, whatever the denominator does (docs/nesterov.md).

    ``eval()`` puts :math:`\theta` into the parameters; ``train()`` puts :math:`\phi` back exactly, and ``step()``
    refuses to run in eval mode.

    Args:
        inner: the optimizer :math:`A` (Adam, SGD with momentum, ``torch.optim.Muon``, :class:`snoo.SCALE`,
            :class:`snoo.SNOO` around any of them, ...). Its ``param_groups`` are this optimizer's. For the forms
            above, :math:`\mu` matches the inner's own momentum (Adam's ``beta1``, SGD's ``momentum``).
        momentum: :math:`0 \le \mu < 1`, a number or a schedule ``n -> mu_n``; stored in each group as
            ``"nesterov_momentum"``.
        weight_decay: decoupled weight decay :math:`\lambda` on the real iterate, scaled by the group's ``lr`` like
            AdamW's; stored in each group as ``"nesterov_weight_decay"``. The decay is not part of the lookahead.
            Default 0: the wrapper changes nothing of what the inner optimizer does. An inner optimizer's own weight
            decay acts on :math:`\phi`, the lookahead point, and is then extrapolated by the lookahead with the rest
            of :math:`u`; the note puts decay on :math:`\theta` instead: give it here and set the inner's to 0
            (giving both raises ``ValueError``).
        state_device: where :math:`\theta` and the lookahead :math:`\phi - \theta` live (``None``: beside each
            parameter). ``"cpu"`` with a model on a GPU keeps them in pinned host memory at the cost of copying the
            parameters to the host and back at every step.

    Per-parameter details: memory is two parameter-sized tensors, :math:`\theta` and the lookahead
    :math:`d = \phi - \theta = \mu u` actually applied (so the retraction is exact even if ``"nesterov_momentum"`` is
    changed by hand between steps), float32 for bf16/fp16 parameters. A parameter with no gradient at a step
    (``p.grad is None`` after it) is left as it is: the inner optimizers of torch do not move it, and :math:`\theta`,
    the lookahead and the parameter stay as they are, as if the step had not happened for it.

    Stacking: this wrapper must be the outermost (see :attr:`Wrapper.holds_lookahead`):
    ``Nesterov(SNOO(AdamW(...)))`` is Nesterov with ``SNOO(AdamW)`` as its black box; ``SNOO(Nesterov(...))`` raises
    ``TypeError``.
    """

    spec_name = "nesterov"
    #: theta and d; phi while eval() puts theta in. Saved as "iterate", "lookahead", "lookahead_point" before: those
    #: load too.
    state_spec = StateSpec(
        prefix="nesterov",
        names=("theta", "d"),
        evaluation="theta",
        required=("theta", "d"),
        train_point="phi",
        renamed={"iterate": "theta", "lookahead": "d", "lookahead_point": "phi"},
    )
    hyperparameter_ranges: ClassVar[dict[str, checks.Range]] = {"momentum": UNIT, "weight_decay": NON_NEGATIVE}
    #: the default momentum 0.9 with the inner lr both ways, then less and more momentum
    tuning_trials: ClassVar[tuple[Trial, ...]] = (
        (1.0, {"momentum": 0.9}),
        (2.0, {"momentum": 0.9}),
        (0.5, {"momentum": 0.9}),
        (1.0, {"momentum": 0.8}),
        (1.0, {"momentum": 0.95}),
        (0.5, {"momentum": 0.95}),
    )

    def __init__(
        self,
        inner: Optimizer,
        momentum: Coefficient = 0.9,
        *,
        weight_decay: float = 0.0,
        state_device: torch.device | str | None = None,
    ) -> None:
        super().__init__(
            inner,
            {"nesterov_momentum": momentum, "nesterov_weight_decay": weight_decay},
            state_device=state_device,
        )

    def _check_group(self, group: dict[str, Any]) -> None:
        momentum, decay = group["nesterov_momentum"], group["nesterov_weight_decay"]
        if not callable(momentum):
            _check_momentum(momentum)
        checks.number(decay, "weight_decay", NON_NEGATIVE)
        inner_decay = group.get("weight_decay", 0)
        if decay and is_number(inner_decay) and inner_decay:
            raise ValueError(
                f"weight_decay={decay} is given to Nesterov while the inner optimizer's group has "
                f"weight_decay={inner_decay}: the decay would act twice. Set the inner optimizer's to 0 (Nesterov "
                f"applies it to the real iterate, where it belongs)"
            )

    def momentum_at(self, group: dict[str, Any], n: int) -> float:
        """:math:`\\mu_n` of ``group``: the coefficient of the lookahead point where step ``n``'s gradient is taken."""
        momentum = group["nesterov_momentum"]
        if callable(momentum):
            return _check_momentum(value_at(momentum, n), f" (the value of its schedule at step {n})")
        return float(momentum)

    def _init_param_state(self, param: torch.Tensor, group: dict[str, Any]) -> dict[str, torch.Tensor]:
        theta = self._new_state(param, param, state_dtype(param))  # theta_1 = p
        return {"theta": theta, "d": torch.zeros_like(theta)}  # d_1 = 0, so phi_1 = theta_1: the parameters as they are

    def _coefficients(self, group: dict[str, Any], t: int) -> dict[str, float]:
        # after step t: theta_{t+1} with lr_t's decay, then phi_{t+1} with mu_{t+1}
        decay = float(group["lr"]) * group["nesterov_weight_decay"] if group["nesterov_weight_decay"] else 0.0
        return {"momentum": self.momentum_at(group, t + 1), "decay": decay}

    def _update(
        self, params: list[torch.Tensor], theta: list[torch.Tensor], d: list[torch.Tensor], **kw: float
    ) -> None:
        nesterov_update(params, theta, d, **kw)


def _check_momentum(momentum: Any, where: str = "") -> float:
    return checks.number(momentum, "momentum", UNIT, where=where)


@torch.no_grad()
def nesterov_update(
    params: list[torch.Tensor],
    theta: list[torch.Tensor],
    d: list[torch.Tensor],
    *,
    momentum: float,
    decay: float,
) -> None:
    r"""The black-box Nesterov update after an inner step, over tensors that share device and dtype, in foreach
    passes.

    On entry ``params`` hold :math:`\phi_t + u_t` (the inner step taken from :math:`\phi_t`), ``theta``
    :math:`\theta_t` and ``d`` :math:`d_t = \phi_t - \theta_t` as applied at the last step. On exit ``theta`` holds
    :math:`\theta_{t+1} = (1 - \text{decay})\theta_t + u_t`, ``d`` :math:`d_{t+1} = \mu_{t+1} u_t` (``momentum`` is
    :math:`\mu_{t+1}`) and ``params`` :math:`\phi_{t+1} = \theta_{t+1} + d_{t+1}`. The state may be float32 for
    low-precision parameters and may live on another device.
    """
    stepped = as_state_tensors(params, theta[0])
    # -u_t = phi_t - (phi_t + u_t), with phi_t = theta_t + d_t rounded as it was formed; d serves as scratch
    torch._foreach_add_(d, theta)
    torch._foreach_sub_(d, stepped)
    # theta_{t+1} = (1 - lr wd) theta_t + u_t
    if decay:
        torch._foreach_mul_(theta, 1.0 - decay)
    torch._foreach_sub_(theta, d)
    # d_{t+1} = mu_{t+1} u_t
    torch._foreach_mul_(d, -momentum)
    # phi_{t+1} = theta_{t+1} + d_{t+1}
    if stepped is params:
        foreach_copy_(params, theta)
        torch._foreach_add_(params, d)
    else:
        foreach_copy_(params, torch._foreach_add(theta, d), non_blocking=True)
