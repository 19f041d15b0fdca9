"""Schedule-free AdamW from the `schedulefree` package in every SPEC: how it is built, the stacks it refuses, the
one-line error without the package, and the lab's constant lr for it, end to end."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from helpers import make_model
from snoo import spec
from snoo.lab import checkpoint, config, train
from snoo.lab.cli import main
from snoo.lab.model import GPT, ModelConfig


def _gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=8))


def test_the_spec_builds_the_packages_optimizer_ready_to_step_with_decay_on_matrices_only():
    schedulefree = pytest.importorskip("schedulefree")
    model = _gpt()
    opt = spec.build("schedulefree-adamw(lr=1e-2,warmup_steps=3)", model)
    assert type(opt) is schedulefree.AdamWScheduleFree and isinstance(opt, torch.optim.Optimizer)
    assert all(g["train_mode"] for g in opt.param_groups), "built in train mode: step() works at once"
    decay = {g["weight_decay"] for g in opt.param_groups if all(p.dim() >= 2 for p in g["params"])}
    no_decay = {g["weight_decay"] for g in opt.param_groups if all(p.dim() < 2 for p in g["params"])}
    assert decay == {0.1} and no_decay == {0.0}
    assert {(g["lr"], g["betas"], g["eps"], g["warmup_steps"]) for g in opt.param_groups} == {
        (1e-2, (0.9, 0.95), 1e-8, 3)
    }

    # the same steps as the package's optimizer built by hand over the same groups
    twin = _gpt()
    groups = [
        {"params": [p for p in twin.parameters() if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for p in twin.parameters() if p.dim() < 2], "weight_decay": 0.0},
    ]
    by_hand = schedulefree.AdamWScheduleFree(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, warmup_steps=3)
    by_hand.train()
    x = torch.randint(16, (2, 8))
    for _ in range(5):
        for m, o in ((model, opt), (twin, by_hand)):
            m(x, x).backward()
            o.step()
            o.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
    opt.eval()  # the package's own eval(): the parameters become its average x
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


def test_names_with_an_underscore_may_be_written_with_a_hyphen():
    assert spec.canonical("schedulefree-adamw") == spec.canonical("schedulefree_adamw") == "schedulefree_adamw"
    assert spec.canonical("ema-nesterov+snoo-adamw") == "ema_nesterov+snoo+adamw"
    assert spec.canonical("schedulefree-adamw(lr=3e-3)") == "schedulefree_adamw(lr=0.003)"
    assert spec.is_schedule_free("schedulefree-adamw") and not spec.is_schedule_free("gpa+adamw")


@pytest.mark.parametrize(
    "bad", ["snoo+schedulefree-adamw", "gpa+schedulefree_adamw", "ema_nesterov+schedulefree_adamw"]
)
def test_it_cannot_be_wrapped(bad):
    """Its parameters hold y, an interpolation between its own average x and its iterate z: a wrapper would take y
    for the model (SNOO's pseudo-gradient, GPA's u), and the package's eval() is not called by the wrappers."""
    with pytest.raises(ValueError, match=r"cannot be wrapped.*use it alone"):
        spec.parse(bad)


def test_without_the_package_the_spec_and_the_cli_say_how_to_install_it(tmp_path, corpus_file, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "schedulefree", None)  # as if it were not installed: importing it raises
    with pytest.raises(ImportError, match="pip install schedulefree"):
        spec.parse("schedulefree-adamw")
    assert spec.canonical("adamw") == "adamw", "the other names do not need it"
    args = ["train", "--preset", "tiny", "--data", corpus_file, "--out", str(tmp_path), "--steps", "2"]
    assert main([*args, "--optimizer", "schedulefree-adamw"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("snoo: error: ") and "pip install schedulefree" in err and err.count("\n") == 1
    with pytest.raises(ImportError, match="pip install schedulefree"):  # and the builder, used on its own
        spec.NAMES["schedulefree_adamw"].make(make_model().parameters(), **spec.NAMES["schedulefree_adamw"].defaults)


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_the_lab_gives_it_the_warm_up_then_a_constant_lr_whatever_the_schedule(schedule):
    pytest.importorskip("schedulefree")
    cfg = config.make_config("tiny", optimizer="schedulefree-adamw", schedule=schedule, steps=100, warmup=0.1)
    lr = config.lr_schedule(cfg)
    assert [lr(s) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert {lr(s) for s in range(10, 100)} == {1.0}
    if schedule != "constant":  # the others keep theirs
        assert config.lr_schedule(config.make_config("tiny", schedule=schedule, steps=100, warmup=0.1))(99) < 0.5


def test_a_tiny_lab_run_trains_evaluates_at_x_and_resumes(tmp_path, corpus_file):
    pytest.importorskip("schedulefree")
    kw = dict(data=corpus_file, progress=False, optimizer="schedulefree-adamw", threads=1)
    r = train.train(config.make_config("tiny", out=str(tmp_path / "whole"), **kw))
    assert r["status"] == "ok" and math.isfinite(r["final_val_loss"]) and r["final_val_loss"] < math.log(256)
    metrics = checkpoint.read_metrics(tmp_path / "whole" / "metrics.jsonl")
    logged_lr = {m["lr"] for m in metrics if "lr" in m}
    assert logged_lr == {2.5e-3}, "after the warm-up the lr is the SPEC's, constant"
    losses = [m["val_loss"] for m in metrics if "val_loss" in m]
    assert losses[-1] < losses[0]
    # the checkpoint holds y, where gradients are taken; the evaluation (and its weight norm) is at x
    ckpt = torch.load(tmp_path / "whole" / "ckpt.pt", weights_only=True)
    y_norm = math.sqrt(sum(v.float().pow(2).sum().item() for k, v in ckpt["model"].items() if k != "head.weight"))
    assert r["weight_norm"] != pytest.approx(y_norm, rel=1e-4)

    def interrupt(step, loss):
        if step == 25:
            raise KeyboardInterrupt

    cut = config.make_config("tiny", out=str(tmp_path / "cut"), **kw)
    with pytest.raises(KeyboardInterrupt):
        train.train(cut, callback=interrupt)
    resumed = train.train(cut, resume=True)
    assert resumed["final_val_loss"] == r["final_val_loss"]
    whole = torch.load(tmp_path / "whole" / "ckpt.pt", weights_only=True)
    again = torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=True)
    assert all(torch.equal(whole["model"][k], again["model"][k]) for k in whole["model"])
