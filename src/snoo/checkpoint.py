"""Reading checkpoints that may come from elsewhere: the evaluation weights of any wrapper, and the safety checks.

A ``torch.distributed.checkpoint`` (DCP) directory is read by torch with plain ``pickle``: its ``.metadata`` file,
and the non-tensor entries of its data files, can run any code when they are loaded. A checkpoint a user downloads
is untrusted input, so this module reads one only after :func:`check_dcp_metadata` has unpickled its metadata with
an unpickler that knows nothing but the classes DCP itself writes there, and it loads non-tensor entries with
``torch.load(weights_only=True)`` (:func:`safe_load_planner`). :func:`load_dcp` does both around ``dcp.load``.

This module sits above :mod:`snoo.optim` (it asks the wrappers which state holds their evaluation weights), so
:mod:`snoo.distributed`, at the bottom of the package, stays free of any one wrapper's names.
"""

from __future__ import annotations

import functools
import io
import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

from snoo.optim.wrapper import Wrapper

__all__ = ["check_dcp_metadata", "evaluation_keys", "load_dcp", "load_evaluation_weights", "safe_load_planner"]

# What DCP's metadata holds (torch 2.9 to 2.13): its dataclasses, torch's dtypes, sizes and layouts, paths, and
# builtin containers. Nothing here runs code of the file's choosing when it is called with the file's arguments.
_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_ALLOWED: dict[str, set[str]] = {
    _DCP_METADATA: {
        "Metadata",
        "TensorStorageMetadata",
        "TensorProperties",
        "ChunkStorageMetadata",
        "BytesStorageMetadata",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.distributed.checkpoint.planner": {"WriteItemType", "LoadItemType"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "tuple", "list", "dict", "slice", "complex", "bytearray"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, where: Path) -> None:
        super().__init__(file)
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        raise ValueError(
            f"{self.where} is not a checkpoint's metadata that this package reads: it names {module}.{name}, which "
            f"torch.distributed.checkpoint does not write there. A crafted checkpoint can run code when its "
            f"metadata is unpickled, so it was not loaded. Use checkpoints you made, or that come from people you "
            f"trust."
        )


def check_dcp_metadata(checkpoint_id: str | os.PathLike) -> None:
    """Refuse a ``torch.distributed.checkpoint`` directory whose metadata could run code when torch reads it.

    Each ``*.metadata`` file of the directory is unpickled with an unpickler that allows only the classes DCP writes
    there (``torch.distributed.checkpoint.metadata``'s dataclasses, torch dtypes, ``torch.Size``, layouts, paths,
    builtin containers); anything else, a file that is not a pickle, or a directory without ``.metadata``, raises
    ``ValueError`` naming the file, before torch reads it with plain ``pickle``. Nothing of the file runs.
    """
    directory = Path(checkpoint_id)
    if not directory.is_dir():
        raise ValueError(f"{directory} is not a torch.distributed.checkpoint directory (no such directory)")
    files = sorted(f for f in directory.iterdir() if f.name.endswith(".metadata"))
    if not any(f.name == ".metadata" for f in files):
        raise ValueError(f"{directory} is not a torch.distributed.checkpoint directory: it has no .metadata file")
    for path in files:
        try:
            with path.open("rb") as f:
                metadata = _MetadataUnpickler(f, path).load()
        except ValueError:
            raise
        except Exception as e:  # truncated, bit-flipped, not a pickle at all
            raise ValueError(f"{path} cannot be read as a checkpoint's metadata ({type(e).__name__}: {e})") from None
        if type(metadata).__module__ != _DCP_METADATA or type(metadata).__name__ != "Metadata":
            raise ValueError(f"{path} holds a {type(metadata).__name__}, not a checkpoint's Metadata")


@functools.cache
def _safe_planner() -> Any:
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class SafeLoadPlanner(DefaultLoadPlanner):
        """DCP's default load planner, with non-tensor entries loaded by ``torch.load(weights_only=True)``."""

        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            try:
                loaded = torch.load(value, weights_only=True)
            except pickle.UnpicklingError as e:
                raise ValueError(
                    f"the checkpoint's entry {read_item.dest_index.fqn!r} holds an object that torch.load "
                    f"(weights_only=True) refuses: {str(e).splitlines()[0]}"
                ) from None
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
            else:
                self.state_dict[read_item.dest_index.fqn] = loaded

    return SafeLoadPlanner


def safe_load_planner() -> Any:
    """A load planner for ``torch.distributed.checkpoint.load``: DCP's default one, except that non-tensor entries
    (parameter groups, progress counters) are read with ``torch.load(weights_only=True)``, which refuses objects
    that could run code."""
    return _safe_planner()()


def load_dcp(state_dict: dict[str, Any], checkpoint_id: str | os.PathLike, **kwargs: Any) -> None:
    """``torch.distributed.checkpoint.load(state_dict, checkpoint_id=...)`` for a checkpoint that may come from
    elsewhere: :func:`check_dcp_metadata` first, and non-tensor entries loaded with ``weights_only=True``. Other
    keyword arguments go to ``dcp.load`` (``planner`` defaults to :func:`safe_load_planner`)."""
    import torch.distributed.checkpoint as dcp

    check_dcp_metadata(checkpoint_id)
    kwargs.setdefault("planner", safe_load_planner())
    renamed = _as_saved_before_a_rename(state_dict, dcp.FileSystemReader(checkpoint_id).read_metadata())
    try:
        _unwrapped(dcp.load, state_dict, checkpoint_id=checkpoint_id, **kwargs)
    finally:
        for entry, old, new in renamed:
            entry[new] = entry.pop(old)


def _as_saved_before_a_rename(state_dict: dict[str, Any], metadata: Any) -> list[tuple[dict, str, str]]:
    """Rename, in place, each wrapper state entry of ``state_dict`` that the checkpoint holds only under the name it
    had before a rename (``StateSpec.renamed``: ``"ema_nesterov.iterate"`` for ``"ema_nesterov.x"``), so that DCP,
    which loads by name, finds it; return (the dict, old name, new name) of each, for the caller to name back."""
    saved = metadata.state_dict_metadata
    old_names: dict[str, list[str]] = {}
    for cls in _wrapper_classes():
        spec = cls.state_spec
        for old, new in spec.renamed.items():
            old_names.setdefault(f"{spec.prefix}.{new}", []).append(f"{spec.prefix}.{old}")
    renamed = []
    pending: list[tuple[str, dict]] = [("", state_dict)]
    while pending:
        path, entries = pending.pop()
        for key in list(entries):
            where = f"{path}{key}"
            if isinstance(entries[key], dict):
                pending.append((where + ".", entries[key]))
            elif where not in saved:
                old = next((o for o in old_names.get(str(key), []) if f"{path}{o}" in saved), None)
                if old is not None:
                    entries[old] = entries.pop(key)
                    renamed.append((entries, old, key))
    return renamed


def _unwrapped(load: Any, *args: Any, **kwargs: Any) -> None:
    """``load(*args, **kwargs)``, with the first ValueError of any rank raised as itself: DCP wraps what its planner
    raises in a ``CheckpointException`` (a ``BaseException``, which ``except Exception`` does not catch)."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        load(*args, **kwargs)
    except CheckpointException as e:
        refused = [exc for exc, _ in e.failures.values() if isinstance(exc, ValueError)]
        if refused:
            raise ValueError(str(refused[0])) from None
        raise


def evaluation_keys() -> dict[str, type[Wrapper]]:
    """``"<prefix>.<evaluation>"`` of the ``state_spec`` of every wrapper class defined (this package's and any
    subclass a user made), e.g. ``"snoo.slow"``: the state entry of a parameter that holds its evaluation weights;
    also under the name it had before a rename (``"ema_nesterov.iterate"``), as checkpoints saved then hold it."""
    keys: dict[str, type[Wrapper]] = {}
    for cls in _wrapper_classes():
        spec = cls.state_spec
        old = [name for name, new in spec.renamed.items() if new == spec.evaluation]
        for name in (spec.evaluation, *old):
            keys.setdefault(f"{spec.prefix}.{name}", cls)
    return keys


def _wrapper_classes() -> list[type[Wrapper]]:
    """Every wrapper class defined that declares its state (this package's and any subclass a user made)."""
    found, pending = [], list(Wrapper.__subclasses__())
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if hasattr(cls, "state_spec"):
            found.append(cls)
    return found


def load_evaluation_weights(
    checkpoint_id: str | os.PathLike,
    model: torch.nn.Module,
    *,
    model_key: str = "model",
    optimizer_key: str = "optim",
    state_key: str | None = None,
) -> dict[str, torch.Tensor]:
    """The evaluation weights of a ``torch.distributed.checkpoint`` checkpoint, as a state dict for ``model``.

    The checkpoint is one that a distributed run saved with the usual recipe::

        model_sd, optim_sd = torch.distributed.checkpoint.state_dict.get_state_dict(model, optimizer)
        torch.distributed.checkpoint.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)

    where the model's parameters hold the training point (SNOO's fast weights, EMA-Nesterov's lookahead point).
    This reads, in one process or on any number of ranks, each parameter's evaluation weights from the optimizer's
    state (``"snoo.slow"`` for :class:`snoo.SNOO` and :class:`snoo.Lookahead`, ``"ema_nesterov.x"``,
    ``"nesterov.theta"``: each wrapper declares its own, see :func:`evaluation_keys`) in place of the parameter,
    and the model's own entry for everything else (buffers, and parameters that have no such state yet), cast to
    the model's dtypes; the names of a tied weight share one tensor. ``model_key`` and ``optimizer_key`` name the
    two parts of the checkpoint.

    Which wrapper saved it is read from the checkpoint. For a stack (``EMANesterov(SNOO(AdamW))``) it is the
    innermost wrapper's weights, the ones ``eval()`` gives; ``state_key`` (e.g. ``"snoo.slow"``) picks one by hand.

    The checkpoint's metadata is checked first (:func:`check_dcp_metadata`): a crafted checkpoint raises
    ``ValueError`` instead of running code. Under DiLoCo the ranks' fast weights and inner state differ, and DCP
    writes one copy of what every rank saves under the same key: save rank 0's as above (their slow weights are
    the same on every rank).
    """
    import torch.distributed.checkpoint as dcp

    check_dcp_metadata(checkpoint_id)
    metadata = dcp.FileSystemReader(checkpoint_id).read_metadata().state_dict_metadata
    prefix = f"{optimizer_key}.state."
    key = state_key if state_key is not None else _saved_evaluation_key(metadata, prefix, checkpoint_id)
    # a tied weight (a head sharing the embedding) has several names in the state dict but state under one
    aliases: dict[int, list[str]] = {}
    entries = model.state_dict(keep_vars=True)
    for name, t in entries.items():
        aliases.setdefault(id(t), []).append(name)
    target: dict[str, torch.Tensor] = {}
    request: dict[str, dict] = {model_key: {}, optimizer_key: {"state": {}}}
    for tied in aliases.values():
        t = torch.empty_like(entries[tied[0]].detach())
        target.update(dict.fromkeys(tied, t))
        with_state = [name for name in tied if key is not None and f"{prefix}{name}.{key}" in metadata]
        if with_state:
            # in the dtype the wrapper kept it in (float32 for a bf16 model), as the checkpoint says
            dtype = metadata[f"{prefix}{with_state[0]}.{key}"].properties.dtype
            request[optimizer_key]["state"][with_state[0]] = {key: torch.empty_like(t, dtype=dtype)}
        else:
            request[model_key][tied[0]] = t
    with warnings.catch_warnings():  # loading in one process is what this function is for
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        _unwrapped(dcp.load, request, checkpoint_id=checkpoint_id, planner=safe_load_planner())
    for name, entry in request[optimizer_key]["state"].items():
        target[name].copy_(entry[key])
    return target


def _saved_evaluation_key(metadata: dict[str, Any], prefix: str, where: Any) -> str | None:
    """The one evaluation key the checkpoint holds; of a stack's, the innermost wrapper's (the one whose ``eval()``
    the parameters end with). None when it holds none (a checkpoint of a plain optimizer)."""
    known = evaluation_keys()
    found = {
        key: cls for key, cls in known.items() if any(n.startswith(prefix) and n.endswith("." + key) for n in metadata)
    }
    if len(found) > 1:
        # a wrapper holding a lookahead point is always outermost: the other one is inside it
        found = {key: cls for key, cls in found.items() if not cls.holds_lookahead} or found
    if len(found) > 1:
        raise ValueError(
            f"the checkpoint {where} holds the evaluation weights of several wrappers ({', '.join(sorted(found))}): "
            f"pass state_key= to say which to read"
        )
    return next(iter(found), None)
