"""snoo.checkpoint: the evaluation weights of every wrapper from a torch.distributed.checkpoint directory, and what a
crafted checkpoint may not do (docs/faq.md, "Optimizer state and checkpoints")."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import pytest
import torch

import snoo
import snoo.checkpoint
from helpers import make_model, train_step


def dcp_save(model: torch.nn.Module, opt: torch.optim.Optimizer, path: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    with warnings.catch_warnings():  # saving in one process is the point here
        warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process")
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)


WRAPPERS = {
    "SNOO": lambda m: snoo.SNOO(torch.optim.AdamW(m.parameters(), lr=1e-2), k=2),
    "Lookahead": lambda m: snoo.Lookahead(torch.optim.SGD(m.parameters(), lr=0.1), k=2),
    "EMANesterov": lambda m: snoo.EMANesterov(torch.optim.AdamW(m.parameters(), lr=1e-2), gamma=0.9),
    "Nesterov": lambda m: snoo.Nesterov(torch.optim.Adam(m.parameters(), lr=1e-2)),
    "GPA": lambda m: snoo.GPA(torch.optim.AdamW(m.parameters(), lr=1e-2), mu_x=0.5),
    "EMANesterov(SNOO)": lambda m: snoo.EMANesterov(snoo.SNOO(torch.optim.AdamW(m.parameters(), lr=1e-2), k=2)),
}


@pytest.mark.parametrize("name", list(WRAPPERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_evaluation_weights_reads_every_wrappers_checkpoint(name, dtype, tmp_path):
    model = make_model(dtype=dtype)
    opt = WRAPPERS[name](model)
    for t in range(3):  # SNOO: an outer step at 2, then a step that moves the fast weights away from the slow ones
        train_step(model, opt, t)
    dcp_save(model, opt, tmp_path / "ckpt")
    training_point = [p.detach().clone() for p in model.parameters()]
    opt.eval()
    evaluation = [p.detach().clone() for p in model.parameters()]
    assert not all(map(torch.equal, evaluation, training_point)), "the test needs the two points to differ"

    fresh = make_model(seed=1, dtype=dtype)
    fresh.load_state_dict(snoo.checkpoint.load_evaluation_weights(tmp_path / "ckpt", fresh))
    assert all(map(torch.equal, fresh.parameters(), evaluation))


def test_the_old_spelling_and_a_plain_optimizers_checkpoint(tmp_path):
    assert snoo.distributed.load_evaluation_weights is snoo.checkpoint.load_evaluation_weights
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_step(model, opt, 0)
    dcp_save(model, opt, tmp_path / "ckpt")
    fresh = make_model(seed=1)
    fresh.load_state_dict(snoo.checkpoint.load_evaluation_weights(tmp_path / "ckpt", fresh))
    assert all(map(torch.equal, fresh.parameters(), model.parameters()))  # no wrapper: the model's own weights


def test_a_stack_can_be_read_at_either_level_by_name(tmp_path):
    model = make_model()
    opt = WRAPPERS["EMANesterov(SNOO)"](model)
    for t in range(3):
        train_step(model, opt, t)
    dcp_save(model, opt, tmp_path / "ckpt")
    fresh = make_model(seed=1)
    got = snoo.checkpoint.load_evaluation_weights(tmp_path / "ckpt", fresh, state_key="ema_nesterov.x")
    assert torch.equal(got["0.weight"], opt.state[model[0].weight]["x"])


class _WritesMarker:
    """Unpickled by plain pickle, this creates the file ``path``: a stand-in for any payload."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_a_crafted_metadata_file_is_refused_and_runs_nothing(tmp_path):
    model = make_model()
    opt = WRAPPERS["SNOO"](model)
    train_step(model, opt, 0)
    dcp_save(model, opt, tmp_path / "ckpt")
    snoo.checkpoint.check_dcp_metadata(tmp_path / "ckpt")  # a real checkpoint is accepted

    marker = tmp_path / "marker"
    metadata = tmp_path / "ckpt" / ".metadata"
    metadata.write_bytes(pickle.dumps(_WritesMarker(marker)))
    for read in (
        lambda: snoo.checkpoint.check_dcp_metadata(tmp_path / "ckpt"),
        lambda: snoo.checkpoint.load_evaluation_weights(tmp_path / "ckpt", make_model()),
        lambda: snoo.distributed.load_evaluation_weights(tmp_path / "ckpt", make_model()),
        lambda: snoo.checkpoint.load_dcp({"model": make_model().state_dict()}, tmp_path / "ckpt"),
    ):
        with pytest.raises(ValueError, match=r"\.metadata is not.*io\.open"):
            read()
    assert not marker.exists()

    metadata.write_bytes(b"\x80\x04not a pickle")  # a truncated or bit-flipped file: one clear error
    with pytest.raises(ValueError, match=r"\.metadata cannot be read"):
        snoo.checkpoint.check_dcp_metadata(tmp_path / "ckpt")
    metadata.unlink()
    with pytest.raises(ValueError, match=r"no \.metadata"):
        snoo.checkpoint.check_dcp_metadata(tmp_path / "ckpt")


def test_a_crafted_entry_of_the_data_files_is_refused_and_runs_nothing(tmp_path):
    import torch.distributed.checkpoint as dcp

    marker = tmp_path / "marker"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process")
        dcp.save({"w": torch.ones(2), "progress": _WritesMarker(marker)}, checkpoint_id=tmp_path / "ckpt")
    assert not marker.exists()
    snoo.checkpoint.check_dcp_metadata(tmp_path / "ckpt")  # the metadata itself is DCP's own
    state = {"w": torch.zeros(2), "progress": None}
    with pytest.raises(ValueError, match=r"'progress'.*weights_only"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        snoo.checkpoint.load_dcp(state, tmp_path / "ckpt")
    assert not marker.exists()

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*in a single process")
        dcp.save({"w": torch.ones(2), "progress": {"step": 7, "name": "run"}}, checkpoint_id=tmp_path / "plain")
        state = {"w": torch.zeros(2), "progress": {"step": None, "name": None}}
        snoo.checkpoint.load_dcp(state, tmp_path / "plain")  # plain values load
    assert state["progress"] == {"step": 7, "name": "run"} and torch.equal(state["w"], torch.ones(2))


#: new key -> the key snoo saved before (up to f6ad21c)
OLD_NAMES = {"ema_nesterov.x": "ema_nesterov.iterate", "ema_nesterov.m": "ema_nesterov.update_ema"}


def test_a_checkpoint_in_the_old_key_names_loads_and_continues_bit_for_bit(tmp_path):
    """DCP loads by name: state saved as "ema_nesterov.iterate" loads into "ema_nesterov.x", and the evaluation
    weights are found under the old name."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = make_model()
    opt = WRAPPERS["EMANesterov"](model)
    for t in range(3):
        train_step(model, opt, t)
    x = opt.state[model[0].weight]["x"].clone()
    msd, osd = get_state_dict(model, opt)
    osd["state"] = {fqn: {OLD_NAMES.get(k, k): v for k, v in st.items()} for fqn, st in osd["state"].items()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*in a single process")
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=tmp_path / "ckpt")
        fresh_model = make_model(seed=1)
        fresh = WRAPPERS["EMANesterov"](fresh_model)
        train_step(fresh_model, fresh, 0)  # the state a template needs
        msd, osd = get_state_dict(fresh_model, fresh)
        state = {"model": msd, "optim": osd}
        snoo.checkpoint.load_dcp(state, tmp_path / "ckpt")
    assert all(set(OLD_NAMES) <= set(st) for st in state["optim"]["state"].values()), "named back after the load"
    set_state_dict(fresh_model, fresh, model_state_dict=state["model"], optim_state_dict=state["optim"])
    for t in range(3, 6):
        train_step(model, opt, t)
        train_step(fresh_model, fresh, t)
    assert all(map(torch.equal, fresh_model.parameters(), model.parameters()))
    got = snoo.checkpoint.load_evaluation_weights(tmp_path / "ckpt", make_model(seed=2))
    assert set(snoo.checkpoint.evaluation_keys()) >= {"ema_nesterov.x", "ema_nesterov.iterate"}
    assert torch.equal(got["0.weight"], x)  # x, found under its old name
