"""EMA-Nesterov: a Nesterov lookahead along an exponential moving average of the base optimizer's updates.

Yau, Li, Glentis, Boreiko, Wai, Hong 2026, arXiv 2605.25395.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch.optim import Optimizer

from snoo import checks
from snoo.checks import NON_NEGATIVE, POSITIVE, UNIT
from snoo.optim.declaration import Trial
from snoo.optim.schedules import Coefficient, lr_ratio, value_at
from snoo.optim.tensors import as_state_tensors, foreach_copy_, state_dtype
from snoo.optim.wrapper import LookaheadPointWrapper, StateSpec


class EMANesterov(LookaheadPointWrapper):
    r"""EMA-Nesterov around any optimizer :math:`A`: gradients are taken at a lookahead point along an EMA of the
    updates of the real iterate.

    The wrapper keeps the real iterate :math:`x` and :math:`m`, an EMA of its updates (the state keys ``"x"`` and
    ``"m"``, ``"ema_nesterov.x"`` and ``"ema_nesterov.m"`` in ``state_dict()``); the parameters hold the lookahead
    point :math:`y` where the next gradient is taken (kept as ``"y"`` while ``eval()`` puts :math:`x` in):

    .. math::
       \begin{aligned}
            &\textbf{input}: A \text{ (inner optimizer)}, \beta_t \text{ (lookahead, a schedule)},
                \gamma \text{ (EMA)}, p \text{ (params)} \\
            &\textbf{initialize}: x_1 \leftarrow p,\; m_1 \leftarrow 0,\; y_1 \leftarrow x_1 + \beta_1 m_1 = p \\
            &\textbf{for} \: t = 1 \: \textbf{to} \: \ldots \: \textbf{do} \\
            &\hspace{5mm} x_{t+1} \leftarrow A_t(y_t) \qquad\text{(the inner optimizer's step, taken from } y_t) \\
            &\hspace{5mm} m_{t+1} \leftarrow \gamma m_t + (1 - \gamma)(x_{t+1} - x_t) \\
            &\hspace{5mm} y_{t+1} \leftarrow x_{t+1} + \beta_{t+1} m_{t+1} \\
            &\textbf{return}: x \text{ (by } \texttt{eval()})
       \end{aligned}

    After ``step()`` number :math:`t` the parameters hold :math:`y_{t+1}`, formed with :math:`\beta_{t+1}`: the
    coefficient of a step is the one of the lookahead point at which that step's gradient is taken, so a schedule
    for :math:`\beta` is a function ``n -> beta_n`` that the wrapper calls with ``n = t + 1`` right after step
    ``t`` (:mod:`snoo.optim.schedules`). :math:`\gamma = 0` is classical Nesterov lookahead:
    ``EMANesterov(SGD(lr), beta=mu, gamma=0)`` takes the same steps as ``SGD(lr, momentum=mu, nesterov=True)``, whose
    parameters also hold the point where the gradient is taken (:math:`y`); its real iterate is
    ``p + lr * mu * momentum_buffer``.

    ``eval()`` puts :math:`x` into the parameters (evaluate, export, save the model then; the published code evaluates
    and saves :math:`x` too); ``train()`` puts :math:`y` back exactly, and ``step()`` refuses to run in eval mode.

    Args:
        inner: the base optimizer :math:`A` (AdamW, SGD, ``torch.optim.Muon``, :class:`snoo.SCALE`, :class:`snoo.SNOO`
            around any of them, ...). Its ``param_groups`` are this optimizer's.
        beta: lookahead coefficient :math:`\beta \ge 0`: a number or a schedule ``n -> beta_n``; stored in each group
            as ``"ema_beta"``.
        gamma: EMA coefficient :math:`0 \le \gamma < 1`; stored in each group as ``"ema_gamma"``.
        scale_by_lr: multiply :math:`\beta_n` by the group's ``lr / lr_peak`` (the paper's default; see
            :func:`snoo.optim.schedules.follow_lr` for when the lr is read: right after step ``n - 1``, so with a torch
            LR scheduler stepped after ``step()`` it is the lr of step ``n - 1``).
        lr_peak: the lr that counts as 1 for ``scale_by_lr``; stored in each group as ``"ema_lr_peak"``. ``None``:
            the group's ``"max_lr"`` or ``"initial_lr"``, which torch LR schedulers record.
        warmup_steps: lookahead off (:math:`\beta_n = 0`) for steps ``n <= warmup_steps``; :math:`m` accumulates.
        rest_steps: lookahead off for the last ``rest_steps`` steps of a run of ``total_steps`` (``n > total_steps -
            rest_steps``, and any step after the run); :math:`m` accumulates. The parameters then hold :math:`x`
            after the last step.
        total_steps: the number of steps of the run; needed by ``rest_steps`` only.
        state_device: where :math:`x` and :math:`m` live (``None``: beside each parameter). ``"cpu"`` with a model on
            a GPU keeps them in pinned host memory at the cost of copying the parameters to the host and back at
            every step: worth it only when GPU memory is what stops the run.

    Defaults: ``beta=0.5, gamma=0.99`` are the published ones, with a constant :math:`\beta`, no warm-up and no
    rest (the published runs also scale by the lr and rest at the end: pass ``scale_by_lr``, ``warmup_steps``,
    ``rest_steps`` and ``total_steps`` for those).

    Per-parameter details: memory is two parameter-sized tensors (:math:`x, m`), float32 for bf16/fp16 parameters. A
    parameter with no gradient at a step (``p.grad is None`` after it: frozen, unused, an MoE expert nobody picked)
    is left as it is: the inner optimizers of torch do not move it, and neither :math:`x`, :math:`m` nor the
    lookahead point change, as if the step had not happened for it. The state of a parameter starts at the first
    ``step()`` that sees it, from the value it has then.

    Stacking: this wrapper must be the outermost (see :attr:`Wrapper.holds_lookahead`):
    ``EMANesterov(SNOO(AdamW(...)))`` is EMA-Nesterov with ``SNOO(AdamW)`` as its base optimizer, and ``eval()`` then
    gives SNOO's slow weights; ``SNOO(EMANesterov(...))`` raises ``TypeError``.
    """

    spec_name = "ema_nesterov"
    #: x and m; y while eval() puts x in. Saved as "iterate", "update_ema", "lookahead_point" before: those load too.
    state_spec = StateSpec(
        prefix="ema_nesterov",
        names=("x", "m"),
        evaluation="x",
        required=("x", "m"),
        train_point="y",
        renamed={"iterate": "x", "update_ema": "m", "lookahead_point": "y"},
    )
    hyperparameter_ranges: ClassVar[dict[str, checks.Range]] = {
        "beta": NON_NEGATIVE,
        "gamma": UNIT,
        "lr_peak": POSITIVE,
        "warmup_steps": NON_NEGATIVE,
        "rest_steps": NON_NEGATIVE,
        "total_steps": POSITIVE,
    }
    #: the published (beta, gamma) = (0.5, 0.99) with the inner lr both ways, then a shorter lookahead and a faster EMA
    tuning_trials: ClassVar[tuple[Trial, ...]] = (
        (1.0, {"beta": 0.5, "gamma": 0.99}),
        (2.0, {"beta": 0.5, "gamma": 0.99}),
        (0.5, {"beta": 0.5, "gamma": 0.99}),
        (1.0, {"beta": 0.25, "gamma": 0.99}),
        (1.0, {"beta": 0.5, "gamma": 0.95}),
        (2.0, {"beta": 0.25, "gamma": 0.99}),
    )

    def __init__(
        self,
        inner: Optimizer,
        beta: Coefficient = 0.5,
        gamma: float = 0.99,
        *,
        scale_by_lr: bool = False,
        lr_peak: float | None = None,
        warmup_steps: int = 0,
        rest_steps: int = 0,
        total_steps: int | None = None,
        state_device: torch.device | str | None = None,
    ) -> None:
        checks.flag(scale_by_lr, "scale_by_lr")
        checks.integer(warmup_steps, "warmup_steps", NON_NEGATIVE)
        checks.integer(rest_steps, "rest_steps", NON_NEGATIVE)
        if total_steps is not None:
            checks.integer(total_steps, "total_steps (or None)", POSITIVE)
        if rest_steps and total_steps is None:
            raise ValueError(
                f"rest_steps={rest_steps} needs total_steps: the rest is the last rest_steps steps of the run"
            )
        if rest_steps and rest_steps > total_steps:  # type: ignore[operator]
            raise ValueError(f"rest_steps ({rest_steps}) must be at most total_steps ({total_steps})")
        self.scale_by_lr = scale_by_lr
        self.warmup_steps = warmup_steps
        self.rest_steps = rest_steps
        self.total_steps = total_steps
        super().__init__(
            inner,
            {"ema_beta": beta, "ema_gamma": gamma, "ema_lr_peak": lr_peak},
            state_device=state_device,
        )

    def _check_group(self, group: dict[str, Any]) -> None:
        beta, gamma, peak = group["ema_beta"], group["ema_gamma"], group["ema_lr_peak"]
        if not callable(beta):
            _check_beta(beta)
        checks.number(gamma, "gamma (EMA coefficient)", UNIT)
        if peak is not None:
            checks.number(peak, "lr_peak (or None)", POSITIVE)

    def lookahead_coefficient(self, group: dict[str, Any], n: int) -> float:
        """:math:`\\beta_n` of ``group``: the coefficient of the lookahead point where step ``n``'s gradient is
        taken, with the warm-up, the rest and the lr scaling applied."""
        if n <= self.warmup_steps:
            return 0.0
        if self.rest_steps and n > self.total_steps - self.rest_steps:  # type: ignore[operator]
            return 0.0
        beta = group["ema_beta"]
        if callable(beta):
            beta = _check_beta(value_at(beta, n), f" (the value of its schedule at step {n})")
        if self.scale_by_lr:
            beta = beta * lr_ratio(group, group["ema_lr_peak"])
        return float(beta)

    def _before_inner_step(self) -> None:
        if self.scale_by_lr:  # an unknown peak lr is an error before the inner optimizer moves anything
            for group in self.param_groups:
                lr_ratio(group, group["ema_lr_peak"])

    def _init_param_state(self, param: torch.Tensor, group: dict[str, Any]) -> dict[str, torch.Tensor]:
        x = self._new_state(param, param, state_dtype(param))  # x_1 = p
        return {"x": x, "m": torch.zeros_like(x)}  # m_1 = 0, so y_1 = x_1: the parameters as they are

    def _coefficients(self, group: dict[str, Any], t: int) -> dict[str, float]:
        # after step t the parameters get y_{t+1}, formed with beta_{t+1}
        return {"beta": self.lookahead_coefficient(group, t + 1), "gamma": group["ema_gamma"]}

    def _update(self, params: list[torch.Tensor], x: list[torch.Tensor], m: list[torch.Tensor], **kw: float) -> None:
        ema_nesterov_update(params, x, m, **kw)


def _check_beta(beta: Any, where: str = "") -> float:
    return checks.number(beta, "beta (lookahead coefficient)", NON_NEGATIVE, where=where)


@torch.no_grad()
def ema_nesterov_update(
    params: list[torch.Tensor],
    x: list[torch.Tensor],
    m: list[torch.Tensor],
    *,
    beta: float,
    gamma: float,
) -> None:
    r"""EMA-Nesterov's update after an inner step, over tensors that share device and dtype, in foreach passes.

    On entry ``params`` hold :math:`x_{t+1} = A_t(y_t)`, ``x`` :math:`x_t`, ``m`` :math:`m_t`; on exit ``x`` holds
    :math:`x_{t+1}`, ``m`` :math:`m_{t+1}` and ``params`` :math:`y_{t+1} = x_{t+1} + \beta m_{t+1}` (``beta`` is
    :math:`\beta_{t+1}`). The state may be float32 for low-precision parameters and may live on another device.
    """
    x_next = as_state_tensors(params, x[0])
    # m_{t+1} = gamma m_t + (1 - gamma)(x_{t+1} - x_t), x serving as scratch for x_t - x_{t+1} before it gets x_{t+1}
    torch._foreach_sub_(x, x_next)
    torch._foreach_mul_(m, gamma)
    torch._foreach_add_(m, x, alpha=-(1 - gamma))
    foreach_copy_(x, x_next)
    # y_{t+1} = x_{t+1} + beta_{t+1} m_{t+1}
    if x_next is params:  # the parameters hold x_{t+1} already
        if beta:
            torch._foreach_add_(params, m, alpha=beta)
    else:
        y = torch._foreach_add(x, m, alpha=beta) if beta else x
        foreach_copy_(params, y, non_blocking=True)
