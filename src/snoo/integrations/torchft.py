"""SNOO as the outer optimizer of a fault-tolerant DiLoCo run on torchft.

torchft (``pip install 'snoo-optim[ft]'``; wheels for Linux x86_64) keeps a run going when replicas die: a
``torchft.Manager`` per replica group asks a lighthouse for a quorum of the live replicas, averages tensors over them
with ``Manager.allreduce``, votes with ``Manager.should_commit`` on whether a step may be applied, and sends the state
registered with ``Manager.register_state_dict_fn`` from a live replica to one that (re)joins.

:class:`FaultTolerantSNOO` is :class:`snoo.SNOO` driven by those calls at each outer step (every K inner steps):

1. the negated pseudo-gradients :math:`p - w` and a flag per parameter (touched this window) go through
   ``Manager.allreduce``: the mean over the replicas of this quorum;
2. ``Manager.should_commit()`` votes; on True, SNOO's outer step runs on the average (slow weights, momentum,
   schedules, ``state_device`` as in :class:`snoo.SNOO`); on False the window is thrown away: the slow weights and
   momentum stay those of the last committed outer step, and the fast weights restart from them;
3. ``Manager.start_quorum()`` forms the quorum of the next window (and, in the constructor, of the first one). A
   replica that is behind (new, restarted, or whose vote failed while the others committed) heals there, before its
   next forward pass: it receives a live replica's fast weights and ``state_dict()`` (slow weights, momentum, inner
   optimizer state, step counters) and the Manager's committed-step counter.

So every replica of a quorum starts each window from the same weights and state, and a failure costs the window in
flight (K inner steps of each replica of that quorum) plus the time the lighthouse takes to see it (its heartbeat
timeout). See docs/distributed.md.

This goes through the Manager's own calls rather than ``torchft.local_sgd.DiLoCo`` so that the outer optimizer is
SNOO itself (its state layout, ``eval()`` weights, schedules on the inner-step clock, host offload, skipped
non-finite steps), and so that the quorum is formed at the start of a window: torchft's ``DiLoCo`` forms it at the
end, where a healing replica takes a peer's fast weights and counts that peer's pseudo-gradient twice.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.optim import Optimizer
from torch.utils._pytree import tree_map_only

from snoo.optim.outer import all_finite, total_norms
from snoo.optim.schedules import Coefficient
from snoo.optim.snoo import SNOO
from snoo.optim.tensors import as_state_tensors, foreach_copy_, local

if TYPE_CHECKING:
    from torchft import Manager
    from torchft.coordination import LighthouseServer

__all__ = ["FaultTolerantSNOO", "lighthouse", "require_torchft"]


def require_torchft() -> None:
    """Raise a one-line ``ImportError`` saying how to get torchft when it cannot be imported."""
    try:
        import torchft  # noqa: F401
    except ImportError as e:
        raise ImportError(
            f"snoo.integrations.torchft needs torchft ({e}): pip install 'snoo-optim[ft]' (torchft publishes wheels "
            f"for Linux x86_64 only)"
        ) from e


def lighthouse(
    min_replicas: int = 1,
    *,
    bind: str = "[::]:0",
    join_timeout_ms: int = 60_000,
    heartbeat_timeout_ms: int = 5_000,
) -> LighthouseServer:
    """Start torchft's lighthouse in this process; its ``address()`` is what each Manager's ``lighthouse_addr``
    (or ``TORCHFT_LIGHTHOUSE``) takes. ``shutdown()`` it at the end.

    A quorum forms when every replica that heartbeats has asked for one, or when ``min_replicas`` have and
    ``join_timeout_ms`` has passed; a replica that sends no heartbeat for ``heartbeat_timeout_ms`` is left out, which
    is how long the survivors wait after a replica dies. Keep ``join_timeout_ms`` above the time of one window (K
    inner steps): a replica that joins asks at once, and the others ask only at the end of their window.
    """
    require_torchft()
    from torchft.coordination import LighthouseServer

    return LighthouseServer(
        bind=bind,
        min_replicas=min_replicas,
        join_timeout_ms=join_timeout_ms,
        heartbeat_timeout_ms=heartbeat_timeout_ms,
    )


class FaultTolerantSNOO(SNOO):
    r""":class:`snoo.SNOO` whose outer step is averaged over the live replicas of a torchft ``Manager`` and applied
    only when the replicas vote to commit it.

    Each outer step (after inner steps :math:`K, 2K, \dots`), with :math:`Q` the replicas of the current quorum:

    .. math::

        &\bar s = \tfrac{1}{|Q|} \textstyle\sum_{r \in Q} (w - p_r) \qquad\text{(Manager.allreduce)} \\
        &\text{if should\_commit():}\quad b \leftarrow \mu b + \bar s,\quad
            w \leftarrow w - \eta(\bar s + \mu b),\quad p \leftarrow w \\
        &\text{else:}\quad p \leftarrow w \qquad\text{(the window is thrown away; } w, b \text{ unchanged)}

    then the quorum of the next window is formed, and a replica that is behind heals from a live one.

    Args:
        inner: the optimizer taking the K inner steps, as for :class:`snoo.SNOO`.
        manager: this replica group's ``torchft.Manager``, built with ``use_async_quorum=False`` (the quorum is
            formed between windows, not during a forward pass) and with neither ``state_dict`` nor
            ``load_state_dict``, or others under their own keys: this optimizer registers what a healing replica
            needs under ``state_key``. The constructor forms the first quorum (it blocks until the lighthouse has
            one); with ``init_sync=True`` (torchft's default) every replica then starts from replica 0's weights.
        k, lr, momentum, nesterov, state_device, track_norms: as for :class:`snoo.SNOO`. Schedules must pickle
            (those of :mod:`snoo.optim.schedules` do) only if a group of the inner optimizer holds them; SNOO's own
            travel as placeholders, like in its ``state_dict()``.
        skip_nonfinite: as for :class:`snoo.SNOO`, checked on the averaged pseudo-gradient (the same on every
            replica, so every replica takes or skips the step alike).
        fused: must be False: the fused outer step is one process's, and this one averages over the quorum first.
        fragments, overlap_steps, fragment_mix, error_feedback, compression_block: :class:`snoo.SNOO`'s streaming
            and compression knobs, here so that a SPEC builds either class; the first three must keep their defaults
            (this class averages the whole model at each outer step) and ``compression_block`` stays unset (it sends
            full precision), so ``error_feedback`` does nothing.
        state_key: the key of this optimizer's state among the Manager's registered state.

    Attributes:
        outer_steps: one dict per outer step of this replica: ``inner_step``, ``committed`` (the vote),
            ``outer_step`` (the Manager's count of committed outer steps after it), ``quorum_id``, ``replica_rank``
            and ``replicas`` (this replica's rank in and the size of the quorum that averaged it), ``healed`` (state
            received from a peer when the next quorum formed) and ``seconds`` (wall time of the all-reduce, vote,
            outer step and next quorum).
        discarded_windows: outer steps thrown away by a failed vote.
        heals: times this replica received its state from a peer.
    """

    def __init__(
        self,
        inner: Optimizer,
        manager: Manager,
        k: int = 20,
        lr: Coefficient = 0.7,
        momentum: Coefficient = 0.5,
        nesterov: bool = True,
        *,
        state_device: torch.device | str | None = None,
        track_norms: bool = False,
        skip_nonfinite: bool = True,
        fused: bool = False,
        fragments: int = 1,
        overlap_steps: int = 0,
        fragment_mix: float = 1.0,
        error_feedback: bool = True,
        compression_block: int | None = None,
        state_key: str = "snoo",
    ) -> None:
        require_torchft()
        if fused:
            raise ValueError(
                "fused=True compiles the outer step of one process; FaultTolerantSNOO averages over a torchft quorum "
                "before it: use fused=False"
            )
        if (fragments, overlap_steps, fragment_mix) != (1, 0, 1.0):
            raise ValueError(
                "FaultTolerantSNOO averages the whole model at each outer step through the Manager: streaming "
                "(fragments, overlap_steps, fragment_mix) is SNOO(process_group=...)'s; leave them at 1, 0, 1.0"
            )
        if compression_block is not None:
            raise ValueError(
                "FaultTolerantSNOO sends full-precision pseudo-gradients through the Manager: compression "
                "(compression_block) is SNOO(process_group=...)'s; leave compression_block unset"
            )
        from torchft import Manager

        if not isinstance(manager, Manager):
            raise TypeError(f"manager must be a torchft.Manager, got {type(manager).__name__}")
        if manager._use_async_quorum:
            raise ValueError(
                "the Manager was built with use_async_quorum=True: build it with use_async_quorum=False, so that the "
                "quorum of each window (and a replica's healing) is complete before the window's first forward pass"
            )
        super().__init__(
            inner,
            k,
            lr,
            momentum,
            nesterov,
            state_device=state_device,
            track_norms=track_norms,
            skip_nonfinite=skip_nonfinite,
        )
        self.manager = manager
        self.outer_steps: list[dict[str, Any]] = []
        self.discarded_windows = 0
        self.heals = 0
        manager.register_state_dict_fn(state_key, self._load_live_state, self._live_state)
        manager.start_quorum()

    @property
    def inner_steps(self) -> int:
        """Inner steps taken so far by the run: after healing, the live replica's count, so a restarted replica goes
        on from there (its data, schedules and outer steps follow this count)."""
        return self._inner_steps

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _live_state(self) -> dict[str, Any]:
        """What a healing replica receives: the fast weights and the state dict, copied, since this replica trains on
        while the healing one reads them (torchft's HTTP transport serves host tensors without copying)."""
        state = {"fast": [p.detach() for p in self._params()], "optimizer": self.state_dict()}
        return tree_map_only(torch.Tensor, lambda t: local(t).clone(), state)

    @torch.no_grad()
    def _load_live_state(self, state: dict[str, Any]) -> None:
        params = [local(p) for p in self._params()]
        foreach_copy_(params, [t.to(p.device) for t, p in zip(state["fast"], params)])
        self.load_state_dict(state["optimizer"])
        self.heals += 1

    def _after_inner_step(self) -> None:
        self._touched.update(p for g in self.param_groups for p in g["params"] if p.grad is not None)
        if self._inner_steps % self.k:
            return
        started = time.perf_counter()
        # every replica sends every parameter, so that the all-reduces match; the flags say which were touched
        touched, self._touched = self._touched, set(self.state)
        plans = self._plans()
        self._touched = touched
        neg_s = [torch._foreach_sub(as_state_tensors(plan.params, plan.slow()[0]), plan.slow()) for plan in plans]
        params = [p for plan in plans for p in plan.params]
        flags = torch.tensor([float(p in touched) for p in params], device=plans[0].slow()[0].device if plans else None)
        if params:
            self._average([t for ts in neg_s for t in ts] + [flags])
        committed = self.manager.should_commit()
        if not committed:
            for plan in plans:  # the window is thrown away: restart from the last committed slow weights
                foreach_copy_(plan.params, plan.slow(), non_blocking=True)
            self.discarded_windows += 1
            squares = None
        elif self.skip_nonfinite and not all_finite(neg_s):
            squares = self._skip_outer_step(plans, "the averaged pseudo-gradient")
        else:
            squares = self._averaged_update(plans, neg_s, iter((flags > 0).tolist()))
        self._touched.clear()
        if self.track_norms and squares:
            self.outer_norms = total_norms(squares)
        record = {
            "inner_step": self._inner_steps,
            "committed": committed,
            "quorum_id": self.manager._quorum_id,
            "replica_rank": self.manager.participating_rank(),
            "replicas": self.manager.num_participants(),
        }
        heals = self.heals
        self.manager.start_quorum()  # the next window's; a replica that is behind heals here
        self.outer_steps.append(
            {
                **record,
                "outer_step": self.manager.current_step(),
                "healed": self.heals > heals,
                "seconds": time.perf_counter() - started,
            }
        )

    def _average(self, tensors: list[torch.Tensor]) -> None:
        """Replace ``tensors`` by their mean over the quorum: one ``Manager.allreduce`` per dtype. A failed one is
        recorded by the Manager, whose vote then fails; the tensors hold garbage then and are not used."""
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(local(t))
        for group in by_dtype.values():
            flat = _flatten_dense_tensors(group)
            self.manager.allreduce(flat).wait()
            self.communicated_bytes += flat.numel() * flat.element_size()
            foreach_copy_(group, list(_unflatten_dense_tensors(flat, group)))
