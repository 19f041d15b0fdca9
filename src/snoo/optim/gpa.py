"""GPA: generalised primal averaging around any optimizer.

Defazio et al. 2025, arXiv 2512.17131. The published code is AdamW-specific; this wrapper takes the inner optimizer
as a black box.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch.optim import Optimizer

from snoo import checks
from snoo.optim.declaration import Trial
from snoo.optim.tensors import as_state_tensors, foreach_copy_, state_dtype
from snoo.optim.wrapper import LookaheadPointWrapper, StateSpec

#: :math:`\mu_y \in [0, 1]`: 1 takes the gradients at the average (primal averaging).
MU_Y_RANGE = checks.Range(0, 1)
#: :math:`\mu_x \in [0, 1)`: 1 would never move the average.
MU_X_RANGE = checks.UNIT


class GPA(LookaheadPointWrapper):
    r"""Generalised primal averaging around any optimizer :math:`A`: gradients are taken at an interpolation
    :math:`y` between the base iterate :math:`z` and its running average :math:`x`, and :math:`x` is evaluated.

    The wrapper keeps :math:`z` (the sequence the inner optimizer's updates :math:`u` accumulate into) and :math:`x`
    (an exponential moving average of :math:`z`); the parameters hold :math:`y`, where the next gradient is taken:

    .. math::
       \begin{aligned}
            &\textbf{input}: A \text{ (inner optimizer)}, \mu_y \text{ (gradient point)}, \mu_x \text{ (averaging)},
                p \text{ (params)} \\
            &\textbf{initialize}: x_1 \leftarrow p,\; z_1 \leftarrow p,\; y_1 \leftarrow p \\
            &\textbf{for} \: t = 1 \: \textbf{to} \: \ldots \: \textbf{do} \\
            &\hspace{5mm} u_t \leftarrow A_t(y_t) - y_t \qquad\text{(the inner optimizer's step, taken from } y_t) \\
            &\hspace{5mm} z_{t+1} \leftarrow z_t + u_t \\
            &\hspace{5mm} x_{t+1} \leftarrow \mu_x x_t + (1 - \mu_x) z_{t+1} \\
            &\hspace{5mm} y_{t+1} \leftarrow \mu_y x_{t+1} + (1 - \mu_y) z_{t+1} \\
            &\textbf{return}: x \text{ (by } \texttt{eval()})
       \end{aligned}

    Special cases: :math:`\mu_x = 0` keeps :math:`x = z = y`, the inner optimizer alone (bit for bit: the update
    is written so that its terms cancel exactly, see :func:`gpa_update`). :math:`\mu_y = 0` takes every gradient at
    :math:`z`, so the parameters follow the inner optimizer alone (bit for bit too) and :math:`x`, what is evaluated,
    is an EMA of its iterates. :math:`\mu_y = 1` takes every gradient at the average :math:`x` (primal averaging):
    around SGD with learning rate :math:`\alpha` it is heavy-ball momentum :math:`\mu_x` with learning rate
    :math:`(1 - \mu_x)\alpha`. :math:`\mu_x = 1` would never move :math:`x` and is refused.

    ``eval()`` puts :math:`x` into the parameters (evaluate, export, save the model then); ``train()`` puts
    :math:`y` back exactly, and ``step()`` refuses to run in eval mode.

    Args:
        inner: the base optimizer :math:`A` (AdamW, SGD, ``torch.optim.Muon``, :class:`snoo.SCALE`, :class:`snoo.SNOO`
            around any of them, ...). Its ``param_groups`` are this optimizer's.
        mu_y: interpolation :math:`0 \le \mu_y \le 1` of the gradient point towards the average; stored in each group
            as ``"gpa_mu_y"``.
        mu_x: averaging coefficient :math:`0 \le \mu_x < 1` of :math:`x`; stored in each group as ``"gpa_mu_x"``.
            The average spans about :math:`1 / (1 - \mu_x)` steps (300 for the default).
        state_device: where :math:`x` and :math:`z` live (``None``: beside each parameter). ``"cpu"`` with a model on
            a GPU keeps them in pinned host memory at the cost of copying the parameters to the host and back at
            every step: worth it only when GPU memory is what stops the run.

    Defaults: ``mu_y=0.7, mu_x=0.9967`` are the paper's (:math:`0.9967 \approx 0.9^{1/32}`: the paper relates it to
    DiLoCo with 32 local steps).

    Per-parameter details: memory is two parameter-sized tensors (:math:`x, z`), float32 for bf16/fp16 parameters,
    under the state keys ``"x"`` (the evaluation weights, ``"gpa.x"`` in ``state_dict()``) and ``"z"`` (and
    :math:`y` as ``"y"`` while ``eval()`` puts :math:`x` in). A parameter
    with no gradient at a step (``p.grad is None`` after it) is left as it is: the inner optimizers of torch do not
    move it, and neither :math:`x`, :math:`z` nor :math:`y` change, as if the step had not happened for it. The state
    of a parameter starts at the first ``step()`` that sees it, from the value it has then.

    Stacking: the parameters hold :math:`y`, a point derived from this wrapper's state, so it must be the outermost
    (see :attr:`Wrapper.holds_lookahead`): ``GPA(SNOO(AdamW(...)))`` is GPA with ``SNOO(AdamW)`` as its base
    optimizer (and, as for every stack, ``eval()`` then ends on the innermost evaluation weights, SNOO's slow
    weights); ``SNOO(GPA(...))`` raises ``TypeError``.
    """

    spec_name = "gpa"
    #: x and z; y while eval() puts x in. Saved as "train_point" before: that loads too.
    state_spec = StateSpec(
        prefix="gpa",
        names=("x", "z"),
        evaluation="x",
        required=("x", "z"),
        train_point="y",
        renamed={"train_point": "y"},
    )
    hyperparameter_ranges: ClassVar[dict[str, checks.Range]] = {
        "mu_y": MU_Y_RANGE,
        "mu_x": MU_X_RANGE,
    }
    #: the published (mu_y, mu_x) = (0.7, 0.9967) with the inner lr both ways, then a gradient point nearer z and a
    #: shorter average (0.9 ** (1/8): DiLoCo's 8 local steps)
    tuning_trials: ClassVar[tuple[Trial, ...]] = (
        (1.0, {"mu_y": 0.7, "mu_x": 0.9967}),
        (2.0, {"mu_y": 0.7, "mu_x": 0.9967}),
        (0.5, {"mu_y": 0.7, "mu_x": 0.9967}),
        (1.0, {"mu_y": 0.5, "mu_x": 0.9967}),
        (1.0, {"mu_y": 0.7, "mu_x": 0.9869}),
        (2.0, {"mu_y": 0.5, "mu_x": 0.9967}),
    )

    def __init__(
        self,
        inner: Optimizer,
        mu_y: float = 0.7,
        mu_x: float = 0.9967,
        *,
        state_device: torch.device | str | None = None,
    ) -> None:
        super().__init__(inner, {"gpa_mu_y": mu_y, "gpa_mu_x": mu_x}, state_device=state_device)

    def _check_group(self, group: dict[str, Any]) -> None:
        checks.number(group["gpa_mu_y"], "mu_y", MU_Y_RANGE)
        checks.number(group["gpa_mu_x"], "mu_x (1 would never move the average)", MU_X_RANGE)

    def _init_param_state(self, param: torch.Tensor, group: dict[str, Any]) -> dict[str, torch.Tensor]:
        dtype = state_dtype(param)
        return {"x": self._new_state(param, param, dtype), "z": self._new_state(param, param, dtype)}  # x_1 = z_1 = p

    def _coefficients(self, group: dict[str, Any], t: int) -> dict[str, float]:
        return {"mu_y": float(group["gpa_mu_y"]), "mu_x": float(group["gpa_mu_x"])}  # the same at every step t

    def _update(self, params: list[torch.Tensor], x: list[torch.Tensor], z: list[torch.Tensor], **kw: float) -> None:
        gpa_update(params, x, z, **kw)


@torch.no_grad()
def gpa_update(
    params: list[torch.Tensor],
    x: list[torch.Tensor],
    z: list[torch.Tensor],
    *,
    mu_y: float,
    mu_x: float,
) -> None:
    r"""GPA's update after an inner step, over tensors that share device and dtype, in six foreach passes.

    On entry ``params`` hold :math:`y_t + u_t` (the inner step taken from :math:`y_t = \mu_y x_t + (1 - \mu_y)
    z_t`), ``x`` :math:`x_t` and ``z`` :math:`z_t`; on exit ``z`` holds :math:`z_{t+1}`, ``x`` :math:`x_{t+1}` and
    ``params`` :math:`y_{t+1}`. The state may be float32 for low-precision
    parameters and may live on another device.

    Since :math:`z_t - y_t = \mu_y (z_t - x_t)`, :math:`z_{t+1} = (y_t + u_t) + \mu_y (z_t - x_t)` needs no copy
    of :math:`y_t`; the averages are lerps. Written so, the special cases are exact in floating point: with
    :math:`\mu_x = 0`, :math:`x = z` so :math:`z_t - x_t = 0` and a lerp of weight 1 or 0 returns an end point, and
    with :math:`\mu_y = 0` the correction is 0 and :math:`y = z`; either way the parameters are the inner
    optimizer's bit for bit.
    """
    stepped = as_state_tensors(params, x[0])
    # z_{t+1} = (y_t + u_t) + mu_y (z_t - x_t)
    torch._foreach_sub_(z, x)
    torch._foreach_mul_(z, mu_y)
    torch._foreach_add_(z, stepped)
    # x_{t+1} = mu_x x_t + (1 - mu_x) z_{t+1}
    torch._foreach_lerp_(x, z, 1.0 - mu_x)
    # y_{t+1} = mu_y x_{t+1} + (1 - mu_y) z_{t+1}
    if stepped is params:
        foreach_copy_(params, z)
        torch._foreach_lerp_(params, x, mu_y)
    else:
        foreach_copy_(params, torch._foreach_lerp(z, x, mu_y), non_blocking=True)
