"""Split a model's parameters into the role-tagged groups that SCALE, SGD-LL and Muon+AdamW need.

Every group is a plain ``torch.optim`` parameter group (a dict with ``"params"``) plus a ``"role"``:

- ``"embedding"``: input embedding tables (``nn.Embedding``/``nn.EmbeddingBag`` weights), ``[vocab, dim]``.
- ``"head"``: the output layer whose rows are token classes (``[vocab, dim]``).
- ``"matrix"``: every other weight with two or more dimensions; a higher-rank weight (a convolution kernel)
  is treated as a matrix over its first dimension, ``w.view(w.shape[0], -1)``.
- ``"vector"``: tensors with at most one dimension (norm gains, biases, scalars).

The module also holds the argument checks that the three optimizers share, and :class:`RoleOptimizer`, the base of
SCALE and SGD-LL.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from snoo import checks
from snoo.optim.declaration import Declared

__all__ = ["ROLES", "param_groups"]

ROLES: tuple[str, ...] = ("embedding", "matrix", "head", "vector")
_MATRIX_ROLES = ("embedding", "matrix", "head")


def param_groups(model: nn.Module, head: nn.Module | torch.Tensor | str | bool | None = None) -> list[dict[str, Any]]:
    """Return ``model``'s trainable parameters as groups tagged with a ``"role"``.

    Args:
        model: the network.
        head: the output layer whose rows are token classes. One of: a module with a ``weight`` (``model.lm_head``),
            the weight tensor itself, a parameter name (``"lm_head.weight"``) or a module name (``"lm_head"``);
            ``False`` for a model without such a layer (every 2-D weight that is not an embedding is then a
            ``"matrix"``); ``None`` (default) to find it: the last ``nn.Linear`` whose ``out_features`` equals the
            size of an input embedding table.

    Returns:
        Up to four groups, in the order embedding, matrix, head, vector (empty ones left out); inside a group the
        parameters keep ``model.named_parameters()`` order. Each dict is new, so it may be given its own ``lr`` or
        other options before it is passed to an optimizer.

    Raises:
        ValueError: when the head cannot be found, when ``head`` names nothing in ``model``, or when the output
            layer shares its weight with the input embedding and ``head`` was not given (one tensor cannot be
            normalised both per row and per column: say which role it takes).

    Parameters with ``requires_grad=False`` are left out (they never have a gradient); add them later with
    ``optimizer.add_param_group`` if they are unfrozen. A tensor shared by several modules (tied weights) is listed
    once, under the first name ``model.named_parameters()`` gives it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"param_groups: model must be an nn.Module, got {type(model).__name__}")
    names = _tensor_names(model)
    embeddings = {id(m.weight): m for m in model.modules() if isinstance(m, nn.Embedding | nn.EmbeddingBag)}
    head_weight = _find_head(model, head, names, embeddings)

    grouped: dict[str, list[torch.Tensor]] = {role: [] for role in ROLES}
    for _, p in model.named_parameters():  # remove_duplicate=True: a tied tensor appears once
        if not p.requires_grad:
            continue
        if head_weight is not None and p is head_weight:
            role = "head"
        elif id(p) in embeddings:
            role = "embedding"
        elif p.ndim >= 2:
            role = "matrix"
        else:
            role = "vector"
        grouped[role].append(p)
    return [{"params": ps, "role": role} for role, ps in grouped.items() if ps]


def _tensor_names(model: nn.Module) -> dict[int, str]:
    """First name of every parameter tensor, by id (tied tensors keep the name listed first)."""
    names: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), name)
    return names


def _find_head(
    model: nn.Module,
    head: nn.Module | torch.Tensor | str | bool | None,
    names: dict[int, str],
    embeddings: dict[int, nn.Module],
) -> torch.Tensor | None:
    if head is False:
        return None
    if head is True:
        raise TypeError("param_groups: head=True is not a layer; pass the module, its weight or its name")
    if head is not None:
        return _resolve_head(model, head, names)

    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    tied = [(name, m) for name, m in linears if id(m.weight) in embeddings]
    if tied:
        name, lin = tied[-1]
        raise ValueError(
            f"param_groups: the output layer {name!r} shares its weight with the input embedding "
            f"{names[id(lin.weight)]!r} (tied weights), and one tensor cannot take both roles. Pass "
            f"head={name!r} to give the shared tensor the 'head' role (per-row updates, one row per token), "
            "or head=False to keep it an 'embedding' (per-column updates)."
        )
    vocab_sizes = {m.weight.shape[0] for m in embeddings.values()}
    if linears and linears[-1][1].out_features in vocab_sizes:
        return linears[-1][1].weight
    last = repr(linears[-1][0]) if linears else "none"
    raise ValueError(
        "param_groups: cannot tell which layer is the output head (rows = token classes): the last nn.Linear "
        f"is {last} and no input embedding has as many rows as it has outputs. Pass head= (the module, its "
        "weight, or its name, e.g. head='lm_head'), or head=False if the model has no such layer."
    )


def _resolve_head(model: nn.Module, head: nn.Module | torch.Tensor | str, names: dict[int, str]) -> torch.Tensor:
    if isinstance(head, str):
        params = dict(model.named_parameters(remove_duplicate=False))
        modules = dict(model.named_modules())
        if head in params:
            head = params[head]
        elif head in modules:
            head = modules[head]
        else:
            raise ValueError(
                f"param_groups: head={head!r} is neither a parameter nor a module name of the model; "
                f"2-D parameters are: {[n for n, p in params.items() if p.ndim == 2]}"
            )
    if isinstance(head, nn.Module):
        weight = getattr(head, "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise ValueError(f"param_groups: head module {type(head).__name__} has no 'weight' tensor")
        head = weight
    if not isinstance(head, torch.Tensor):
        raise TypeError(f"param_groups: head must be a module, tensor, name or False, got {type(head).__name__}")
    if id(head) not in names:
        raise ValueError("param_groups: the head tensor given is not a parameter of the model")
    if head.ndim != 2:
        raise ValueError(f"param_groups: the head must be a 2-D weight, got shape {tuple(head.shape)}")
    return head


def role_group(owner: str, group: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """A shallow copy of ``group`` (so one list from ``param_groups`` can build several optimizers) and its role.

    Refuses groups without a role or with an unknown one, and tensors too flat for their role.
    """
    if not isinstance(group, dict):
        raise TypeError(f"{owner}: a parameter group must be a dict, got {type(group).__name__}")
    group = dict(group)
    if "role" not in group:
        raise ValueError(
            f"{owner} needs parameter groups with a 'role' ({', '.join(ROLES)}): build them with "
            "snoo.param_groups(model), or add 'role' to each group dict yourself"
        )
    role = group["role"]
    if role not in ROLES:
        raise ValueError(f"{owner}: unknown role {role!r}; expected one of {ROLES}")
    params = group.get("params")
    if not isinstance(params, torch.Tensor | set) and params is not None:
        group["params"] = list(params)  # a generator would be used up by the check below
    if role in _MATRIX_ROLES:
        for p in _tensors(group["params"]):
            if isinstance(p, torch.Tensor) and p.ndim < 2:
                raise ValueError(
                    f"{owner}: a group with role {role!r} holds a tensor of shape {tuple(p.shape)}; "
                    "that role needs at least 2 dimensions (1-D tensors take the role 'vector')"
                )
    return group, role


def _tensors(params: Any) -> Iterable[Any]:
    if isinstance(params, torch.Tensor):
        return [params]
    return [p[1] if isinstance(p, tuple) else p for p in params]


class RoleOptimizer(Optimizer, Declared):
    """Base of the optimizers whose update depends on each group's ``"role"`` (SCALE, SGD-LL): groups are refused
    without a role, each group's options are checked by :meth:`_check_hyperparameters`, and ``step`` walks the groups
    through :meth:`_groups_with_grads`."""

    #: Per-parameter state is the parameter's shape or one number (what ``Wrapper.load_state_dict`` checks).
    elementwise_state: ClassVar[bool] = True

    def __init__(self, params: Iterable[dict[str, Any]], *, foreach: bool | None, **defaults: Any) -> None:
        """``defaults``: the subclass's hyperparameters, in the order of its signature, checked here."""
        if foreach is not None and not isinstance(foreach, bool):
            raise TypeError(f"{type(self).__name__}: foreach must be True, False or None, got {foreach!r}")
        defaults["foreach"] = foreach
        self._check_hyperparameters(defaults)
        super().__init__(params, defaults)

    def _check_hyperparameters(self, group: dict[str, Any]) -> None:
        """Validate (and normalise to floats) the options of ``group`` against :attr:`hyperparameter_ranges`; raise
        ValueError/TypeError naming a bad one. A subclass extends it for options that are not numbers."""
        owner = type(self).__name__
        for name, within in self.hyperparameter_ranges.items():
            group[name] = checks.number(group[name], name, within, owner=owner)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        group, _ = role_group(type(self).__name__, param_group)
        for name, default in self.defaults.items():
            group.setdefault(name, default)
        self._check_hyperparameters(group)
        super().add_param_group(group)

    def _momentum_buffers(self, params: list[Tensor]) -> list[Tensor]:
        """Each parameter's ``"momentum_buffer"``, created as zeros the first time."""
        buffers = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            buffers.append(state["momentum_buffer"])
        return buffers

    def _groups_with_grads(self) -> Iterator[tuple[dict[str, Any], list[Tensor], list[Tensor]]]:
        """``(group, params, grads)`` for each group, over the parameters that have a gradient (and any element:
        a 0-element tensor has no row to normalise and nothing to update)."""
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None and p.numel() > 0]
            if not params:
                continue
            grads = [p.grad for p in params]
            if any(g.is_sparse for g in grads):
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            yield group, params, grads


def evaluate_closure(closure: Callable[[], Any] | None) -> Any:
    """The loss from ``closure`` (with gradients enabled), or None: the first thing a ``step(closure)`` does."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def pick_foreach(foreach: bool | None, params: list[Tensor]) -> bool:
    """``foreach`` as given, else True when every parameter is on an accelerator (on CPU the loop is as fast)."""
    if foreach is not None:
        return foreach
    return all(p.device.type != "cpu" for p in params) and not torch.jit.is_scripting()
