r"""Streaming DiLoCo (Douillard et al. 2025, arXiv 2501.18512): the parameters in fragments that synchronise at
staggered steps, each fragment's exchange overlapped with the next inner steps.

With :math:`F` fragments and :math:`K` inner steps per outer step, fragment :math:`f` starts its exchange after
the inner steps :math:`t` with :math:`(t - fK/F) \bmod K = 0`, so at most :math:`1/F` of the model is on the wire
at a time; its outer step is applied :math:`\tau` inner steps later (``overlap_steps``), when the exchange has had
those steps to finish. This module holds the schedule and what is in flight; :class:`snoo.SNOO` does the outer
step itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import compress
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from snoo import checks
from snoo.optim.collectives import InFlight, start_all_reduce_mean
from snoo.optim.compression import start_compressed_mean_
from snoo.optim.tensors import as_state_tensors, foreach_copy_, local

if TYPE_CHECKING:
    from snoo.optim.snoo import SNOO


def split_fragments(params: list[torch.Tensor], count: int) -> list[list[torch.Tensor]]:
    """``params`` (in module order) cut into ``count`` runs of about equal numbers of elements: a parameter goes to
    the fragment in which the middle of its elements falls. Raises ValueError if a fragment would be empty."""
    total = sum(p.numel() for p in params)
    out: list[list[torch.Tensor]] = [[] for _ in range(count)]
    before = 0
    for p in params:
        out[min(count - 1, int(count * (before + p.numel() / 2) / max(total, 1)))].append(p)
        before += p.numel()
    empty = [f for f, fragment in enumerate(out) if not fragment]
    if empty:
        raise ValueError(
            f"fragments={count} leaves fragment {empty[0]} empty: the {len(params)} parameters cannot be cut into "
            f"{count} runs of similar size. Use fewer fragments, or give them as lists of parameters"
        )
    return out


class Sync(NamedTuple):
    """One fragment's exchange, started after inner step ``apply_at - overlap_steps`` and applied after inner step
    ``apply_at``: the outer plans of its parameters, the averaged negated pseudo-gradients (valid once ``exchanges``
    are waited for) and the flags saying which parameters some rank gave a gradient in the cycle."""

    fragment: int
    apply_at: int
    plans: list
    neg_pseudo_grads: list[list[torch.Tensor]]
    flags: torch.Tensor
    exchanges: list[InFlight]

    def wait(self) -> None:
        for exchange in self.exchanges:
            exchange.wait()


class Streaming:
    """The fragment schedule and the exchanges in flight of one :class:`snoo.SNOO`.

    ``fragments``: a count :math:`F` (the parameters cut in module order by :func:`split_fragments`) or the
    fragments themselves, lists of parameters covering each parameter once. ``k`` must be a multiple of :math:`F`
    (set :attr:`k` through :meth:`check_k`), ``overlap_steps`` :math:`\\tau \\in [0, K)`, ``mix``
    :math:`\\alpha \\in (0, 1]`."""

    def __init__(
        self, fragments: int | Sequence[Sequence[torch.Tensor]], k: int, overlap_steps: int, mix: float
    ) -> None:
        if isinstance(fragments, int) and not isinstance(fragments, bool):
            self.count = checks.integer(fragments, "fragments", checks.Range(1))
            self.given: list[list[torch.Tensor]] | None = None
        elif isinstance(fragments, Sequence) and fragments and all(isinstance(f, Sequence) for f in fragments):
            self.given = [list(f) for f in fragments]
            self.count = len(self.given)
            if not all(self.given) or not all(isinstance(p, torch.Tensor) for f in self.given for p in f):
                raise ValueError("fragments given as lists must each hold at least one parameter (tensors)")
        else:
            raise TypeError(f"fragments must be a count or a list of lists of parameters, got {checks.show(fragments)}")
        self.overlap_steps = checks.integer(overlap_steps, "overlap_steps", checks.NON_NEGATIVE)
        self.mix = checks.number(mix, "fragment_mix", checks.Range(0, 1, low_open=True))
        self.k = self.check_k(k)
        self.in_flight: list[Sync] = []
        self._cut: tuple[tuple[int, ...], list[set[torch.Tensor]]] = ((), [])

    def check_k(self, k: int) -> int:
        """``k`` if the fragments can sync K/F steps apart and each exchange is applied before its next one."""
        if k % self.count:
            raise ValueError(f"k={k} must be a multiple of fragments={self.count}, so that they sync K/F steps apart")
        if self.overlap_steps >= k:
            raise ValueError(
                f"overlap_steps={self.overlap_steps} must be below k={k}: a fragment's outer step is applied before "
                f"its next exchange starts"
            )
        return k

    def syncing(self, t: int) -> int | None:
        """The fragment whose exchange starts after inner step ``t``, if any."""
        phase, every = t % self.k, self.k // self.count
        return None if phase % every else phase // every

    def fragment(self, f: int, params: list[torch.Tensor]) -> set[torch.Tensor]:
        """The parameters of fragment ``f`` among ``params`` (all of the optimizer's, in order)."""
        if self.count == 1 and self.given is None:
            return set(params)
        key = tuple(map(id, params))
        if key != self._cut[0]:
            if self.given is not None:
                listed = [p for fragment in self.given for p in fragment]
                if len(listed) != len(params) or set(map(id, listed)) != set(key):
                    raise ValueError(
                        "the fragments given must hold every parameter of the optimizer exactly once "
                        f"({len(listed)} listed, the optimizer has {len(params)})"
                    )
                self._cut = (key, [set(fragment) for fragment in self.given])
            else:
                self._cut = (key, [set(fragment) for fragment in split_fragments(params, self.count)])
        return self._cut[1][f]

    def due(self, t: int) -> list[Sync]:
        """Take out the exchanges whose outer step is applied after inner step ``t``."""
        due = [sync for sync in self.in_flight if sync.apply_at == t]
        self.in_flight = [sync for sync in self.in_flight if sync.apply_at != t]
        return due

    # -- what SNOO calls ------------------------------------------------------------------------------------------

    def after_inner_step(self, opt: SNOO) -> list[dict[str, Any]]:
        """Apply the fragments whose exchange is due after this inner step, then start the exchange of the fragment
        that syncs now (and apply it at once when ``overlap_steps`` is 0). Returns the outer steps' squared norms."""
        squares = []
        for sync in self.due(opt._inner_steps):
            squares += self.apply(opt, sync)
        f = self.syncing(opt._inner_steps)
        sync = None if f is None else self.start(opt, f)
        if sync is not None and self.overlap_steps == 0:
            squares += self.apply(opt, sync)
        elif sync is not None:
            self.in_flight.append(sync)
        return squares

    def start(self, opt: SNOO, f: int) -> Sync | None:
        """Start averaging fragment ``f``'s pseudo-gradients over ``opt``'s process group (one all-reduce per dtype,
        or compressed: :mod:`snoo.optim.compression`), with a flag per parameter saying whether any rank gave it a
        gradient since the fragment's last exchange."""
        assert opt.process_group is not None
        plans = opt._plans(self.fragment(f, [p for group in opt.param_groups for p in group["params"]]))
        params = [p for plan in plans for p in plan.params]
        if not params:
            return None
        neg_s = [  # -s = p - w
            torch._foreach_sub(as_state_tensors(plan.params, plan.slow()[0]), plan.slow()) for plan in plans
        ]
        flags = torch.tensor([float(p in opt._touched) for p in params], device=local(neg_s[0][0]).device)
        opt._touched.difference_update(params)
        now = opt._inner_steps
        when = f"outer step {now // self.k}" if self.count == 1 else f"fragment {f} at inner step {now}"
        what = f"the pseudo-gradients of {when}"
        tensors = [t for ts in neg_s for t in ts]
        if opt.compression is None:
            exchanges = [
                start_all_reduce_mean([*tensors, flags], opt.process_group, reduce_dtype=opt.reduce_dtype, what=what)
            ]
        else:
            errors = [st["error"] for plan in plans for st in plan.states] if opt.error_feedback else None
            exchanges = [
                start_compressed_mean_(tensors, errors, opt.compression, opt.process_group, what=what),
                start_all_reduce_mean([flags], opt.process_group, what=what),
            ]
        opt.communicated_bytes += sum(exchange.sent for exchange in exchanges)
        return Sync(f, opt._inner_steps + self.overlap_steps, plans, neg_s, flags, exchanges)

    def apply(self, opt: SNOO, sync: Sync) -> list[dict[str, Any]]:
        r"""Wait for a fragment's exchange and take its outer step; the parameters some rank touched become
        :math:`\alpha w + (1 - \alpha) p` (:math:`p` the local fast weights now)."""
        sync.wait()
        touched = (sync.flags > 0).tolist()
        local_fast = None
        if self.mix != 1:  # the local fast weights, before the outer step overwrites them
            local_fast = [
                [local(t).clone() for t in as_state_tensors(plan.params, plan.slow()[0])] for plan in sync.plans
            ]
        squares = opt._outer_step_on_average(sync.plans, sync.neg_pseudo_grads, touched)
        if squares is None:  # skipped: the fast weights restart from the slow ones
            return []
        flags = iter(touched)
        for plan, fast in zip(sync.plans, local_fast or []):
            keep = [next(flags) for _ in plan.params]
            kept = list(compress(fast, keep))
            if kept:  # p <- alpha w + (1 - alpha) p: a lerp from the local fast weights to the new slow ones
                torch._foreach_lerp_(kept, [local(w) for w in compress(plan.slow(), keep)], self.mix)
                foreach_copy_(list(compress(plan.params, keep)), kept, non_blocking=True)
        return squares

    def settle(self, opt: SNOO) -> list[dict[str, torch.Tensor]]:
        """Wait for the exchanges in flight and put each average into ``opt``'s state as ``"pending"`` of the
        parameters some rank touched, for ``state_dict()``; returns those states (the caller takes it out again)."""
        settled = []
        for sync in self.in_flight:
            sync.wait()
            negs = [t for ts in sync.neg_pseudo_grads for t in ts]
            for p, neg, hit in zip((p for plan in sync.plans for p in plan.params), negs, (sync.flags > 0).tolist()):
                if hit:
                    opt.state[p]["pending"] = neg
                    settled.append(opt.state[p])
        return settled

    def resume(self, opt: SNOO, touched: set[torch.Tensor]) -> None:
        """The exchanges in flight at the step ``opt`` was loaded at, as :meth:`settle` saved them: done, their
        averages taken out of the state's ``"pending"`` (zeros for the parameters no rank touched: they stay)."""
        self.in_flight = []
        every = [p for group in opt.param_groups for p in group["params"]]
        now = opt._inner_steps
        for t in range(max(1, now - self.overlap_steps + 1), now + 1):
            f = self.syncing(t)
            plans = [] if f is None else opt._plans(self.fragment(f, every), at=t)
            if plans:
                neg_s = [
                    [st.pop("pending") if "pending" in st else torch.zeros_like(st["slow"]) for st in plan.states]
                    for plan in plans
                ]
                flags = torch.tensor([float(p in touched) for plan in plans for p in plan.params])
                self.in_flight.append(Sync(f, t + self.overlap_steps, plans, neg_s, flags, []))
