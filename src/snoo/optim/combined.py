"""Muon for the hidden matrices and AdamW for everything else, driven as one ``torch.optim.Optimizer``."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch.optim import AdamW, Muon, Optimizer

from snoo import checks
from snoo.checks import NON_NEGATIVE, UNIT, Range
from snoo.optim.declaration import Declared
from snoo.optim.groups import evaluate_closure, role_group

__all__ = ["MuonAdamW"]

_MUON_ROLES = ("matrix",)


class MuonAdamW(Optimizer, Declared):
    r"""``torch.optim.Muon`` on the ``"matrix"`` groups and ``torch.optim.AdamW`` on all other roles, as one optimizer.

    Needs role-tagged parameter groups (:func:`snoo.param_groups`). Hidden 2-D weights take Muon's step and the
    embedding, the output head and the vectors take AdamW's:

    .. code-block:: text

        "matrix" (Muon):  B = mu * B + g;   O = NewtonSchulz5(g + mu * B if nesterov else B)
                          p = p * (1 - lr * wd) - lr * sqrt(max(1, rows / cols)) * O
        other roles (AdamW, bias-corrected):
                          p = p * (1 - adamw_lr * adamw_wd) - adamw_lr * a_hat / (sqrt(v_hat) + adamw_eps)

    (``torch.optim.Muon`` applies momentum as ``B = lerp(B, g, 1 - mu)``; see its documentation for the exact
    form and for ``adjust_lr_fn``.)

    It is a real :class:`~torch.optim.Optimizer`: ``param_groups`` is one list, in the order the groups were given,
    whose dicts are the very dicts the inner ``Muon`` and ``AdamW`` read, so an LR scheduler on this optimizer
    moves both learning rates (a ``LambdaLR`` keeps their ratio). ``state_dict()`` keys all state by parameter
    position over that list, like any torch optimizer, and ``load_state_dict`` restores both halves.

    Each group's keys mean what they mean for the optimizer that owns it: ``lr``, ``weight_decay`` and ``eps`` of a
    ``"matrix"`` group are Muon's, of any other group AdamW's. A group may set any of them itself; the
    constructor's arguments are the defaults (``adamw_*`` for the AdamW groups).

    Args:
        params: role-tagged parameter groups. ``"matrix"`` tensors must be 2-D (``torch.optim.Muon`` handles
            nothing else): give a convolution kernel another role, or reshape it in the model.
        lr, momentum, weight_decay, nesterov, ns_steps, adjust_lr_fn: Muon's (the Muon authors' speedrun:
            lr 0.02 with momentum 0.95; torch's default ``adjust_lr_fn=None`` scales by sqrt(max(1, rows/cols))).
        adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay: AdamW's for the other roles (modded-nanogpt uses
            betas (0.9, 0.95) and a separate, larger lr for embeddings: give that group its own ``lr``).
        adamw_foreach: AdamW's ``foreach`` (``None``: torch picks).
    """

    #: Per-parameter state is the parameter's shape or one number (what ``Wrapper.load_state_dict`` checks).
    elementwise_state: ClassVar[bool] = True
    spec_name = "muon"
    hyperparameter_ranges: ClassVar[dict[str, Range]] = {
        "lr": NON_NEGATIVE,
        "momentum": UNIT,
        "weight_decay": NON_NEGATIVE,
        "ns_steps": Range(1, 100, high_open=True),
        "adamw_lr": NON_NEGATIVE,
        "adamw_eps": NON_NEGATIVE,
        "adamw_weight_decay": NON_NEGATIVE,
    }

    def __init__(
        self,
        params: Iterable[dict[str, Any]],
        lr: float = 0.02,
        momentum: float = 0.95,
        weight_decay: float = 0.0,
        nesterov: bool = True,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
        adamw_lr: float = 3e-3,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float = 0.0,
        adamw_foreach: bool | None = None,
    ) -> None:
        owner = "MuonAdamW"
        checks.flag(nesterov, "nesterov", owner=owner)
        ranges = MuonAdamW.hyperparameter_ranges

        def number(value: Any, name: str) -> float:
            return checks.number(value, name, ranges[name], owner=owner)

        checks.integer(ns_steps, "ns_steps", ranges["ns_steps"], owner=owner)
        if adjust_lr_fn not in (None, "original", "match_rms_adamw"):
            raise ValueError(
                f"{owner}: adjust_lr_fn must be None, 'original' or 'match_rms_adamw', got {adjust_lr_fn!r}"
            )
        if adamw_foreach is not None and not isinstance(adamw_foreach, bool):
            raise TypeError(f"{owner}: adamw_foreach must be True, False or None, got {adamw_foreach!r}")
        self._muon_defaults: dict[str, Any] = {
            "lr": number(lr, "lr"),
            "momentum": number(momentum, "momentum"),
            "weight_decay": number(weight_decay, "weight_decay"),
            "nesterov": nesterov,
            "ns_steps": ns_steps,
            "adjust_lr_fn": adjust_lr_fn,
        }
        self._adamw_defaults: dict[str, Any] = {
            "lr": number(adamw_lr, "adamw_lr"),
            "betas": checks.pair(adamw_betas, "adamw_betas", UNIT, owner=owner),
            "eps": number(adamw_eps, "adamw_eps"),
            "weight_decay": number(adamw_weight_decay, "adamw_weight_decay"),
            "foreach": adamw_foreach,
        }
        self._muon: Muon | None = None
        self._adamw: AdamW | None = None
        defaults = {
            **self._muon_defaults,
            **{f"adamw_{k}": v for k, v in self._adamw_defaults.items()},
        }
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a role-tagged group; it goes to Muon (role ``"matrix"``) or AdamW (any other role)."""
        group, role = role_group("MuonAdamW", param_group)
        if isinstance(group["params"], torch.Tensor):
            group["params"] = [group["params"]]
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        if any(id(p[1] if isinstance(p, tuple) else p) in seen for p in group["params"]):
            raise ValueError("MuonAdamW: some parameters appear in more than one parameter group")
        # The inner optimizer fills in its defaults and keeps this very dict; so do we.
        if role in _MUON_ROLES:
            for p in group["params"]:
                if isinstance(p, torch.Tensor) and p.ndim != 2:
                    raise ValueError(
                        f"MuonAdamW: torch.optim.Muon handles 2-D matrices only, but a 'matrix' group holds a "
                        f"tensor of shape {tuple(p.shape)}; give it the role 'vector' (AdamW) or reshape it"
                    )
            if self._muon is None:
                self._muon = Muon([group], **self._muon_defaults)
            else:
                self._muon.add_param_group(group)
        elif self._adamw is None:
            self._adamw = AdamW([group], **self._adamw_defaults)
        else:
            self._adamw.add_param_group(group)
        self.param_groups.append(group)
        self._link()

    def _link(self) -> None:
        """Point the inner optimizers at our group dicts (in our order) and at our one ``state``."""
        if self._muon is not None:
            self._muon.param_groups = [g for g in self.param_groups if g["role"] in _MUON_ROLES]
            self._muon.state = self.state
        if self._adamw is not None:
            self._adamw.param_groups = [g for g in self.param_groups if g["role"] not in _MUON_ROLES]
            self._adamw.state = self.state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``state_dict()``; torch replaces the group dicts, so the inner optimizers are re-linked."""
        saved_roles = [g.get("role") for g in state_dict["param_groups"]]
        roles = [g["role"] for g in self.param_groups]
        if saved_roles != roles:
            raise ValueError(
                f"MuonAdamW.load_state_dict: the saved groups have roles {saved_roles}, this optimizer's are "
                f"{roles}; build it from the same param_groups as the one that was saved"
            )
        super().load_state_dict(state_dict)
        self._link()

    def __getstate__(self) -> dict[str, Any]:
        # Optimizer.__getstate__ keeps only defaults/state/param_groups; deepcopy and pickle need the inner pair.
        return {
            **super().__getstate__(),
            "_muon": self._muon,
            "_adamw": self._adamw,
            "_muon_defaults": self._muon_defaults,
            "_adamw_defaults": self._adamw_defaults,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._link()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Take one Muon step on the matrices and one AdamW step on the rest."""
        loss = evaluate_closure(closure)
        for inner in (self._muon, self._adamw):
            if inner is not None:
                inner.step()
        return loss
