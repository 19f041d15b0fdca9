"""SNOO (Step-K Nesterov Outer Optimizer) and Lookahead, its special case without momentum.

SNOO: Kallusky, Rao, Nandavanam, Shi, arXiv 2510.15830. Lookahead: Zhang, Lucas, Ba, Hinton 2019.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from functools import partial
from itertools import compress
from typing import Any, ClassVar, NamedTuple

import torch
import torch.distributed as dist
from torch.optim import Optimizer

from snoo import checks
from snoo.optim.collectives import check_process_group
from snoo.optim.compression import COMPRESSIONS, Compression
from snoo.optim.declaration import Trial
from snoo.optim.offload import HostOffload
from snoo.optim.outer import (
    FUSED_REFUSED,
    all_finite,
    check_fusable,
    compiled_outer_step,
    finite_flag,
    outer_step,
    outer_update,
    total_norms,
)
from snoo.optim.schedules import Coefficient, value_at
from snoo.optim.streaming import Streaming
from snoo.optim.tensors import (
    bucket_by_device_and_dtype,
    foreach_copy_,
    is_dtensor,
    state_dtype,
)
from snoo.optim.wrapper import LoadPlan, StateSpec, Wrapper

#: :math:`K \ge 1`.
K_RANGE = checks.Range(1)
#: :math:`\eta > 0` (above 1 overshoots the fast weights, which some runs want).
OUTER_LR_RANGE = checks.POSITIVE
#: :math:`\mu \in [0, 1)`.
OUTER_MOMENTUM_RANGE = checks.UNIT


class SNOO(Wrapper):
    r"""Step-K Nesterov Outer Optimizer: Nesterov momentum on the pseudo-gradient of K inner steps.

    The parameters hold the *fast* weights :math:`p`, which ``inner`` updates at every step. SNOO keeps the *slow*
    weights :math:`w` (the model that counts) and a momentum buffer :math:`b` (the state keys ``"slow"`` and
    ``"momentum"``, ``"snoo.slow"`` and ``"snoo.momentum"`` in ``state_dict()``; :math:`p` is kept as ``"fast"`` while
    ``eval()`` puts :math:`w` in):

    .. math::
       \begin{aligned}
            &\textbf{input}: A \text{ (inner optimizer)}, K, \eta_t \text{ (outer lr)}, \mu_t \text{ (outer momentum)},
                p \text{ (params)} \\
            &\textbf{initialize}: w \leftarrow p,\; b \leftarrow 0 \\
            &\textbf{for} \: t = 1 \: \textbf{to} \: \ldots \: \textbf{do} \\
            &\hspace{5mm} p \leftarrow A_t(p) \qquad\text{(the inner optimizer's step)} \\
            &\hspace{5mm} \textbf{if} \: t \bmod K = 0: \\
            &\hspace{10mm} s \leftarrow w - p \qquad\text{(pseudo-gradient)} \\
            &\hspace{10mm} b \leftarrow \mu_t b + s \\
            &\hspace{10mm} w \leftarrow w - \eta_t\,(s + \mu_t b) \qquad\text{(without Nesterov: }
                w \leftarrow w - \eta_t b) \\
            &\hspace{10mm} p \leftarrow w \\
            &\textbf{return}: w \text{ (by } \texttt{eval()})
       \end{aligned}

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
            model on a GPU: in pinned host memory, so the GPU holds no extra state between outer steps; each outer
            step streams them through the GPU in chunks, double-buffered, and updates them there (:attr:`offload`,
            a :class:`snoo.optim.offload.HostOffload`: set its ``chunk_numel`` to trade GPU memory for launches),
            bit for bit the same as with the state on the GPU.
        track_norms: after each outer step, put the l2 norms of the pseudo-gradient, momentum and slow weights over
            all parameters in :attr:`outer_norms` (0-d tensors, so reading them is the caller's synchronisation).
            Costs one extra read of each of those tensors per outer step.
        process_group: DiLoCo (Douillard et al. 2023). Each rank of this ``torch.distributed`` group takes its own
            inner steps on its own data with no communication; at each outer step the pseudo-gradient :math:`s` is
            averaged over the group (one ``all_reduce`` per dtype, see :func:`snoo.distributed.all_reduce_mean_`)
            before the momentum update, so all ranks keep the same slow weights. One rank is plain SNOO. ``None``
            (the default) communicates nothing: under DDP the gradients are already averaged, and under FSDP2 the
            outer step runs on each rank's shard. The ranks must start from the same weights.
        reduce_dtype: the dtype the pseudo-gradients travel in, e.g. ``torch.bfloat16`` to halve the bytes of a
            float32 model (they are averaged in that precision and cast back). ``None``: the state dtype.
        fragments: streaming DiLoCo (Douillard et al. 2025), with ``process_group``: a count :math:`F` (the
            parameters cut in module order into :math:`F` runs of about equal size) or the fragments themselves
            (lists of parameters, each parameter in one). Fragment :math:`f` exchanges its pseudo-gradients after
            the inner steps :math:`t` with :math:`(t - fK/F) \bmod K = 0` (``k`` a multiple of :math:`F`), so a
            :math:`1/F` of the model is on the wire at a time. 1: every parameter at :math:`t = K, 2K, \dots`.
        overlap_steps: :math:`\tau \in [0, K)`. A fragment's exchange is started without waiting
            (``async_op=True``) and its outer step is applied after :math:`\tau` more inner steps, from the
            pseudo-gradient of its sync step, so the transfer runs behind those steps. An exchange in flight when
            ``state_dict()`` is called is waited for and its average saved (state ``"pending"``).
        fragment_mix: :math:`\alpha \in (0, 1]`: when a fragment's outer step is applied, each of its parameters
            becomes :math:`\alpha w + (1 - \alpha) p` (:math:`w` the new slow weights, :math:`p` the local fast
            weights, :math:`\tau` steps on). 1: :math:`p = w`. (torchft's ``fragment_update_alpha`` is
            :math:`1 - \alpha`.) ``fragments=1, overlap_steps=0, fragment_mix=1`` is plain DiLoCo, bit for bit.
        compression: what each rank sends instead of its pseudo-gradient :math:`x = p - w`
            (:mod:`snoo.optim.compression`): ``"bf16"``, or ``"int8"`` / ``"int4"`` codes with a float32 scale per
            row (or per ``compression_block`` elements). The codes and scales of every rank are all-gathered and
            their mean taken locally, in rank order. ``None``: the all-reduce above.
        compression_block: elements per scale for ``"int8"``/``"int4"``; ``None``: one scale per row.
        error_feedback: with ``compression``, each rank keeps the error :math:`e` of what it sent (state
            ``"error"``) and sends :math:`Q(x + e)`, keeping :math:`e \leftarrow (x + e) - Q(x + e)`.
        fused: run the outer step as one ``torch.compile``\d kernel per tensor (:func:`fused_outer_step`: it reads
            :math:`p, w, b` once and writes them once, at the memory floor) instead of six ``torch._foreach_*``
            passes. Equal to the foreach path within float32 rounding (:data:`FUSED_ROUNDING`). The first outer
            step compiles it (tens of seconds on a CPU, see ``docs/snoo.md``); a cycle in which some parameter with
            state got no gradient runs the foreach path. Not with ``process_group`` or ``state_device``, nor for
            sharded (DTensor) parameters: ``ValueError``.
        skip_nonfinite: check the fast weights for NaN and infinite values at each outer step and skip the step
            when any is found (below). One read of the parameters and one host synchronisation per outer step;
            ``False`` takes neither, for runs that keep non-finite values out of the inner optimizer themselves.

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
    - Sharded parameters (DTensors, as ``fully_shard`` makes them) get state sharded the same way, and the outer step
      runs on each rank's shard.
    - With a ``process_group``, a parameter takes the outer step when any rank gave it a gradient in the cycle.
    """

    spec_name = "snoo"
    #: w and b (none while the momentum is 0); p while eval() puts w in
    state_spec = StateSpec(
        prefix="snoo", names=("slow", "momentum", "error", "pending"), evaluation="slow", train_point="fast"
    )
    hyperparameter_ranges: ClassVar[dict[str, checks.Range]] = {
        "k": K_RANGE,
        "lr": OUTER_LR_RANGE,
        "momentum": OUTER_MOMENTUM_RANGE,
    }
    #: the package default, the inner lr re-tuned both ways, then the paper's ablation point (0.8, 0.75) and the
    #: published range's corners
    tuning_trials: ClassVar[tuple[Trial, ...]] = (
        (1.0, {"lr": 0.7, "momentum": 0.5}),
        (2.0, {"lr": 0.7, "momentum": 0.5}),
        (0.5, {"lr": 0.7, "momentum": 0.5}),
        (1.0, {"lr": 0.8, "momentum": 0.75}),
        (2.0, {"lr": 0.8, "momentum": 0.75}),
        (2.0, {"lr": 0.5, "momentum": 0.9}),
    )
    #: the grammar's short names are ambiguous in a plot: SNOO's lr is its outer lr
    knob_labels: ClassVar[dict[str, str]] = {
        "lr": "SNOO outer lr",
        "momentum": "SNOO outer momentum",
        "k": "K (inner steps per outer step)",
    }

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
        process_group: dist.ProcessGroup | None = None,
        reduce_dtype: torch.dtype | None = None,
        fragments: int | Sequence[Sequence[torch.Tensor]] = 1,
        overlap_steps: int = 0,
        fragment_mix: float = 1.0,
        compression: str | None = None,
        compression_block: int | None = None,
        error_feedback: bool = True,
        fused: bool = False,
        skip_nonfinite: bool = True,
    ) -> None:
        if checks.flag(fused, "fused"):
            check_fusable(inner, state_device=state_device, process_group=process_group)
        check_process_group(process_group)
        if reduce_dtype is not None:
            if process_group is None:
                raise ValueError("reduce_dtype sets what the pseudo-gradients are averaged in: it needs process_group")
            if not isinstance(reduce_dtype, torch.dtype) or not reduce_dtype.is_floating_point:
                raise TypeError(f"reduce_dtype must be a floating-point torch.dtype, got {reduce_dtype!r}")
        streaming = (fragments, overlap_steps, fragment_mix) != (1, 0, 1.0)
        if process_group is None and (streaming or compression is not None):
            raise ValueError(
                "fragments, overlap_steps, fragment_mix and compression shape DiLoCo's exchange: they "
                "need process_group"
            )
        if compression is not None and compression not in COMPRESSIONS:
            raise ValueError(
                f"compression must be None or one of {sorted(COMPRESSIONS)}, got {checks.show(compression)}"
            )
        if compression is not None and reduce_dtype is not None:
            raise ValueError("give compression or reduce_dtype, not both: compression decides what travels")
        if compression_block is not None and (compression not in ("int8", "int4")):
            raise ValueError(f"compression_block sets the elements per scale of int8/int4, not of {compression!r}")
        if compression_block is not None:
            checks.integer(compression_block, "compression_block", checks.Range(1))
        #: what the pseudo-gradients travel as (:mod:`snoo.optim.compression`), or None: as they are.
        self.compression = None if compression is None else Compression(compression, compression_block)
        self.error_feedback = checks.flag(error_feedback, "error_feedback") and compression is not None
        checks.flag(nesterov, "nesterov")
        #: streaming DiLoCo's fragment schedule and the exchanges in flight (:mod:`snoo.optim.streaming`)
        self.streaming: Streaming | None = None
        self.k = k
        if process_group is not None:
            self.streaming = Streaming(fragments, self.k, overlap_steps, fragment_mix)
        self.fused = fused
        self.skip_nonfinite = checks.flag(skip_nonfinite, "skip_nonfinite")
        self.track_norms = checks.flag(track_norms, "track_norms")
        #: l2 norms over all parameters after the last outer step, when ``track_norms`` is set.
        self.outer_norms: dict[str, torch.Tensor] = {}
        #: outer steps skipped because the fast weights (or, with a process group, the averaged pseudo-gradient)
        #: held NaN or infinite values; saved in ``state_dict()``.
        self.skipped_outer_steps = 0
        self._touched: set[torch.Tensor] = set()
        self.process_group = process_group
        self.reduce_dtype = reduce_dtype
        #: bytes this rank has handed to the collectives that average pseudo-gradients (DiLoCo); 0 without a process
        #: group.
        self.communicated_bytes = 0
        # -- host offload (offload.py): the outer step of state kept on state_device streams through the device --
        #: streams the state through the parameters' device when ``state_device`` is set; None otherwise.
        self.offload = HostOffload() if state_device is not None else None
        super().__init__(
            inner,
            {"outer_lr": lr, "outer_momentum": momentum, "outer_nesterov": nesterov},
            state_device=state_device,
        )

    @property
    def k(self) -> int:
        """Inner steps per outer step, :math:`K`; checked when set (``opt.k = 0`` raises ``ValueError``)."""
        return self._k

    @k.setter
    def k(self, k: int) -> None:
        self._k = checks.integer(k, "k (inner steps per outer step)", K_RANGE)
        if self.streaming is not None:
            self.streaming.k = self.streaming.check_k(self._k)

    def _check_group(self, group: dict[str, Any]) -> None:
        if not callable(group["outer_lr"]):
            _check_outer_lr(group["outer_lr"])
        if not callable(group["outer_momentum"]):
            _check_outer_momentum(group["outer_momentum"])
        checks.flag(group["outer_nesterov"], "nesterov (outer_nesterov)")

    def _init_param_state(self, param: torch.Tensor, group: dict[str, Any]) -> dict[str, torch.Tensor]:
        state = {"slow": self._new_state(param, param, state_dtype(param))}  # w = p
        if group["outer_momentum"] != 0:  # a schedule too: b = 0 at the start; Lookahead keeps none
            state["momentum"] = self._zeros_like_state(state["slow"])
        if self.error_feedback:  # e = 0 at the start
            state["error"] = self._zeros_like_state(state["slow"])
        return state

    @staticmethod
    def _zeros_like_state(like: torch.Tensor) -> torch.Tensor:
        # host offload: zeros_like does not pin, and copies to or from pageable memory make the host wait
        if like.device.type == "cpu" and like.is_pinned():
            return torch.zeros(like.shape, dtype=like.dtype, pin_memory=True)
        return torch.zeros_like(like)

    def _after_inner_step(self) -> None:
        if len(self._touched) < len(self.state):  # once every parameter with state is touched, nothing to add
            self._touched.update(p for g in self.param_groups for p in g["params"] if p.grad is not None)
        if self.streaming is not None:
            squares = self.streaming.after_inner_step(self)
            if self.track_norms and squares:
                self.outer_norms = total_norms(squares)
            return
        if self._inner_steps % self.k:
            return
        plans = self._plans()
        if self.fused and plans and len(self._touched) == len(self.state):
            squares = self._fused_outer_step(plans)
        elif self.skip_nonfinite and not all_finite([plan.params for plan in plans]):
            squares = self._skip_outer_step(plans, "the fast weights")
        else:
            squares = [
                # host offload hook: with state_device set, the same outer_step runs chunk by chunk (offload.py)
                (outer_step if self.offload is None else partial(self.offload.apply, outer_step))(
                    plan.params,
                    [st["slow"] for st in plan.states],
                    self._momentum_buffers(plan.states, plan.momentum),
                    **plan.hyperparameters(),
                    track_norms=self.track_norms,
                )
                for plan in plans
            ]
        self._touched.clear()
        if self.track_norms and squares is not None:
            self.outer_norms = total_norms(squares)

    def _fused_outer_step(self, plans: list[OuterPlan]) -> list[dict] | None:
        """The outer step of every plan by :func:`fused_outer_step`, compiled. The non-finite check is one reduction
        over the fast weights that stays on the device: each kernel takes the flag and, where it is set, keeps the
        slow weights and momentum and restarts the fast weights from them, so the host reads the flag once, after
        the work is queued, only to count and warn."""
        if any(is_dtensor(p) for plan in plans for p in plan.params):
            raise ValueError(FUSED_REFUSED.format(what="sharded (DTensor) parameters"))
        finite = finite_flag([plan.params for plan in plans]) if self.skip_nonfinite else None
        squares = []
        for plan in plans:
            slow = plan.slow()
            device, dtype = slow[0].device, slow[0].dtype
            try:
                squares.append(
                    compiled_outer_step()(
                        plan.params,
                        slow,
                        self._momentum_buffers(plan.states, plan.momentum),
                        torch.full((), plan.lr, dtype=dtype, device=device),  # tensors: a new value does not recompile
                        torch.full((), plan.momentum, dtype=dtype, device=device),
                        None if finite is None else finite.to(device, non_blocking=True),
                        nesterov=plan.nesterov,
                        track_norms=self.track_norms,
                    )
                )
            except (torch._dynamo.exc.BackendCompilerFailed, torch._dynamo.exc.Unsupported) as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                raise RuntimeError(
                    f"fused=True: torch.compile could not build the fused outer step for {device} "
                    f"({type(e).__name__}: {first}); build {type(self).__name__} with fused=False (the foreach path)"
                ) from e
        if finite is not None and not bool(finite):  # the one host synchronisation of this outer step
            return self._count_skipped("the fast weights")
        return squares

    def _plans(self, among: set[torch.Tensor] | None = None, at: int | None = None) -> list[OuterPlan]:
        """One :class:`OuterPlan` per run of tensors that foreach can take at once, for the outer step of inner step
        ``at`` (this one if None), of the parameters ``among`` (one fragment) when given."""
        at = self._inner_steps if at is None else at
        plans = []
        for group in self.param_groups:
            # with a process group, every rank sends every parameter, so that the collectives match
            params = [p for p in group["params"] if (p in self.state if self.process_group else p in self._touched)]
            params = params if among is None else [p for p in params if p in among]
            if not params:
                continue
            lr, momentum = group["outer_lr"], group["outer_momentum"]
            if callable(lr) or callable(momentum):
                where = f" (the value of its schedule at step {at})"
                lr = _check_outer_lr(value_at(lr, at), where)
                momentum = _check_outer_momentum(value_at(momentum, at), where)
            for bucket, states in bucket_by_device_and_dtype(params, self.state, "slow"):
                plans.append(OuterPlan(bucket, states, lr, momentum, group["outer_nesterov"]))
        return plans

    def _skip_outer_step(self, plans: list[OuterPlan], what: str) -> None:
        """Keep the slow weights and momentum of the last good outer step and restart the fast weights from them."""
        for plan in plans:
            foreach_copy_(plan.params, [st["slow"] for st in plan.states], non_blocking=True)
        return self._count_skipped(what)

    def _count_skipped(self, what: str) -> None:
        self.skipped_outer_steps += 1
        if self.skipped_outer_steps == 1:
            warnings.warn(
                f"{type(self).__name__}: {what} held NaN or infinite values at outer step "
                f"{self._inner_steps // self.k} (inner step {self._inner_steps}): the outer step was skipped, the slow "
                f"weights and momentum are those of the last good outer step, and the fast weights restart from them. "
                f"The inner optimizer's own state is its own: if its moments took the bad gradient, they keep it. "
                f"Counted in .skipped_outer_steps; this warning is not repeated.",
                RuntimeWarning,
                stacklevel=5,
            )

    def _outer_step_on_average(
        self, plans: list[OuterPlan], neg_s: list[list[torch.Tensor]], touched: list[bool]
    ) -> list[dict] | None:
        """The outer step on averaged pseudo-gradients (:meth:`_averaged_update`), or, if they hold NaN or infinite
        values, the skipped step (None)."""
        # every rank holds the same average, so every rank takes the same decision
        if not all_finite(neg_s):
            return self._skip_outer_step(plans, "the averaged pseudo-gradient")
        return self._averaged_update(plans, neg_s, iter(touched))

    def _averaged_update(
        self, plans: list[OuterPlan], neg_s: list[list[torch.Tensor]], touched: Iterator[bool]
    ) -> list[dict]:
        """The outer step on averaged pseudo-gradients ``neg_s`` (``w - p``, one list per plan), for the parameters
        ``touched`` says some worker gave a gradient in the cycle (one flag per parameter, in the plans' order)."""
        squares = []
        for plan, neg in zip(plans, neg_s):
            keep = [next(touched) for _ in plan.params]
            if not any(keep):
                continue
            kept_states = list(compress(plan.states, keep))
            squares.append(
                outer_update(
                    list(compress(plan.params, keep)),
                    list(compress(neg, keep)),
                    [st["slow"] for st in kept_states],
                    self._momentum_buffers(kept_states, plan.momentum),
                    **plan.hyperparameters(),
                    track_norms=self.track_norms,
                )
            )
        return squares

    def _momentum_buffers(self, states: list[dict[str, torch.Tensor]], momentum: float) -> list[torch.Tensor] | None:
        if momentum == 0:
            return None
        for st in states:
            if "momentum" not in st:  # the momentum of a group was 0 when its state was made, and is not now
                st["momentum"] = self._zeros_like_state(st["slow"])
        return [st["momentum"] for st in states]

    def state_dict(self) -> dict[str, Any]:
        # an exchange in flight is saved as the state 'pending' of its parameters (streaming.py), not kept after
        pending = self.streaming.settle(self) if self.streaming is not None else []
        try:
            return super().state_dict()
        finally:
            for st in pending:
                del st["pending"]

    def _extra_state(self) -> dict[str, Any]:
        return {**super()._extra_state(), "k": self.k, "skipped_outer_steps": self.skipped_outer_steps}

    def _group_extra_state(self, params: list[torch.Tensor]) -> dict[str, Any]:
        extra = {
            **super()._group_extra_state(params),
            "touched": [i for i, p in enumerate(params) if p in self._touched],
        }
        in_flight = [i for i, p in enumerate(params) if "pending" in self.state.get(p, {})]
        return {**extra, "in_flight": in_flight} if in_flight else extra  # saved while an exchange is in flight

    def _parse_extra_state(self, extras: list[dict[str, Any]], groups: list[list[torch.Tensor]]) -> dict[str, Any]:
        values = super()._parse_extra_state(extras, groups)
        saved_k = extras[0].get("k")
        if saved_k != self.k or isinstance(saved_k, bool):
            raise ValueError(
                f"the state dict was saved with k={checks.show(saved_k)}, this {type(self).__name__} has k={self.k}: "
                f"build it with the same k to continue the run"
            )
        skipped = extras[0].get("skipped_outer_steps", 0)  # absent from state dicts of snoo <= 0.1.0.dev0
        checks.integer(
            skipped, f"param_groups[0]['{self.state_spec.prefix}']['skipped_outer_steps']", checks.NON_NEGATIVE
        )
        listed: dict[str, set[torch.Tensor]] = {"touched": set(), "in_flight": set()}
        for name, found in listed.items():
            for g, (extra, params) in enumerate(zip(extras, groups)):
                positions = extra.get(name, [])  # 'in_flight' is absent from state dicts of snoo <= 0.1.0.dev0
                if not isinstance(positions, list) or not all(
                    isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(params) for i in positions
                ):
                    raise ValueError(
                        f"param_groups[{g}]['{self.state_spec.prefix}']['{name}'] must be a list of positions"
                    )
                found.update(params[i] for i in positions)
        return {**values, **listed, "skipped_outer_steps": skipped}

    def _plan_load(self, state_dict: Any) -> LoadPlan:
        plan = super()._plan_load(state_dict)
        pending = {p for p, own in plan.own.items() if "pending" in own}
        if pending != plan.extra["in_flight"] or (pending and self.streaming is None):
            raise ValueError(
                f"the state dict lists {len(plan.extra['in_flight'])} parameters as in flight "
                f"('{self.state_spec.prefix}.in_flight') and holds 'pending' for {len(pending)}: every parameter "
                f"listed needs its pending average, and only a SNOO with a process_group takes them. "
                f"(torch.distributed.checkpoint loads only the entries a fresh optimizer has: save it at a step "
                f"with no exchange in flight.)"
            )
        return plan

    def _apply_extra_state(self, values: dict[str, Any]) -> None:
        super()._apply_extra_state(values)
        self._touched = values["touched"]
        self.skipped_outer_steps = values["skipped_outer_steps"]
        self.outer_norms = {}
        if self.streaming is not None:
            self.streaming.resume(self, values["in_flight"])


class OuterPlan(NamedTuple):
    """The tensors of one outer step that ``torch._foreach_*`` can take at once (same devices and dtypes, one
    parameter group), with the group's outer hyperparameters at this step."""

    params: list[torch.Tensor]
    states: list[dict[str, torch.Tensor]]
    lr: float
    momentum: float
    nesterov: bool

    def slow(self) -> list[torch.Tensor]:
        return [st["slow"] for st in self.states]

    def hyperparameters(self) -> dict[str, Any]:
        return {"lr": self.lr, "momentum": self.momentum, "nesterov": self.nesterov}


def _check_outer_lr(lr: Any, where: str = "") -> float:
    return checks.number(lr, "lr (outer learning rate)", OUTER_LR_RANGE, where=where)


def _check_outer_momentum(momentum: Any, where: str = "") -> float:
    return checks.number(momentum, "momentum (outer momentum)", OUTER_MOMENTUM_RANGE, where=where)


class Lookahead(SNOO):
    r"""Lookahead: every K steps, :math:`w \leftarrow w + \alpha (p - w)` and :math:`p \leftarrow w`.

    .. math::
       \begin{aligned}
            &\textbf{input}: A \text{ (inner optimizer)}, K, \alpha, p \text{ (params)} \\
            &\textbf{initialize}: w \leftarrow p \\
            &\textbf{for} \: t = 1 \: \textbf{to} \: \ldots \: \textbf{do} \\
            &\hspace{5mm} p \leftarrow A_t(p) \\
            &\hspace{5mm} \textbf{if} \: t \bmod K = 0: \; w \leftarrow w + \alpha (p - w),\; p \leftarrow w \\
            &\textbf{return}: w \text{ (by } \texttt{eval()})
       \end{aligned}

    This is :class:`SNOO` with ``momentum=0`` and ``lr=alpha`` (stored in each group as ``"outer_lr"``): no momentum
    buffer, one lerp and one copy per outer step (one pass with ``fused=True``). ``eval()``/``train()``,
    checkpoints, ``fused``, ``skip_nonfinite``, DiLoCo's ``process_group`` and ``reduce_dtype``, and the
    per-parameter details are SNOO's. Defaults ``k=5, alpha=0.5`` are the paper's.
    """

    spec_name = "lookahead"
    hyperparameter_ranges: ClassVar[dict[str, checks.Range]] = {
        "k": K_RANGE,
        "alpha": checks.Range(0, 1, low_open=True),
    }
    #: the paper's default alpha with the inner lr both ways, then the other published alpha (0.8) and a slower one
    tuning_trials: ClassVar[tuple[Trial, ...]] = (
        (1.0, {"alpha": 0.5}),
        (2.0, {"alpha": 0.5}),
        (0.5, {"alpha": 0.5}),
        (1.0, {"alpha": 0.8}),
        (2.0, {"alpha": 0.8}),
        (1.0, {"alpha": 0.3}),
    )
    knob_labels: ClassVar[dict[str, str]] = {"alpha": "Lookahead alpha"}

    def __init__(
        self,
        inner: Optimizer,
        k: int = 5,
        alpha: float = 0.5,
        *,
        state_device: torch.device | str | None = None,
        track_norms: bool = False,
        process_group: dist.ProcessGroup | None = None,
        reduce_dtype: torch.dtype | None = None,
        fused: bool = False,
        skip_nonfinite: bool = True,
    ) -> None:
        checks.number(alpha, "alpha (slow weights step size)", Lookahead.hyperparameter_ranges["alpha"])
        super().__init__(
            inner,
            k=k,
            lr=alpha,
            momentum=0.0,
            nesterov=False,
            state_device=state_device,
            track_norms=track_norms,
            process_group=process_group,
            reduce_dtype=reduce_dtype,
            fused=fused,
            skip_nonfinite=skip_nonfinite,
        )
