"""The FLOP count of a training step; benchmarks/throughput.py, which measures the lab against the matmul peak, and
benchmarks/precision.py, which compares bf16 autocast with fp32 paired by seed."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from snoo.lab.model import GPT, ModelConfig, training_flops_per_token

ROOT = Path(__file__).resolve().parents[1]


def _linear_weights(model: GPT) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


@pytest.mark.parametrize(
    "cfg",
    [
        ModelConfig(vocab_size=256, block_size=16, n_layer=2, n_head=2, n_embd=32),
        ModelConfig(vocab_size=100, block_size=8, n_layer=1, n_head=4, n_embd=16, flavour="gpt", tie_head=False),
        ModelConfig(vocab_size=64, block_size=12, n_layer=3, n_head=1, n_embd=24, flavour="gpt", bias=True),
    ],
)
def test_training_flops_are_six_per_weight_and_fourteen_ltc_for_attention(cfg, one_thread):
    torch.manual_seed(0)
    model = GPT(cfg)
    model.head.weight.grad = torch.ones_like(model.head.weight)
    # from the shapes alone: 2 FLOPs per weight forward, 4 backward; attention's q k^T and (scores) v, 2 T C each
    # forward, and five such products backward (the fused kernel computes the scores again)
    per_token = 6 * _linear_weights(model) + 14 * cfg.n_layer * cfg.block_size * cfg.n_embd
    assert training_flops_per_token(model) == per_token
    assert torch.equal(model.head.weight.grad, torch.ones_like(model.head.weight))  # .grad is left alone


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # throughput imports regime and step_overhead from there
    module = importlib.import_module("throughput")
    yield module
    for name in ("throughput", "regime", "step_overhead"):
        sys.modules.pop(name, None)


def test_the_peak_replays_the_products_of_every_linear_layer(bench, one_thread):
    """The products a step records are all of its Linear layers' FLOPs (6 per weight and token), and nothing else."""
    tokens = torch.randint(0, 256, (4096,))
    step, model = bench.train_step(2, 32, 2, 16, tokens)
    products = bench.step_products(step)
    assert bench.product_flops(products) == 6 * _linear_weights(model) * 2 * 16
    assert {len(a) for a, _, _, _ in products} == {2}  # attention runs in its own kernel, not as bmm
    bench.replay(products, torch.bfloat16)()  # the shapes and strides make valid operands


def test_within_pairs_each_round(bench):
    fast = bench.Contender("step", lambda: None, 1, seconds=[2.0, 4.0, 8.0])
    slow = bench.Contender("alone", lambda: None, 1, seconds=[1.0, 2.0, 4.0])
    assert bench.within(fast, slow, 3.0) == pytest.approx((1.5, 1.5, 1.5))


def test_quick_form_prints_both_tables():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--quick"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    rows = {line.split(" | ")[0][2:]: line for line in out.splitlines() if line.startswith("| ")}
    assert {"1x32", "2x32", "1 run x 1 thread", "1 run x 2 threads", "2 runs x 1 thread"} <= set(rows)
    cells = rows["2x32"].strip("| ").split(" | ")
    assert cells[1] == "41,120" and float(cells[2]) == pytest.approx(0.274, abs=5e-4)  # params, MFLOP per token
    assert float(cells[4].replace(",", "")) > 0 and float(cells[6]) > 0  # tokens/s and peak GFLOP/s, measured


def test_precision_trains_each_seed_in_both_precisions_and_pairs_them(monkeypatch, tmp_path, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    precision = importlib.import_module("precision")
    try:
        argv = [
            "precision.py",
            "--preset",
            "tiny",
            "--steps",
            "3",
            "--seeds",
            "2",
            "--jobs",
            "1",
            "--out",
            str(tmp_path),
        ]
        monkeypatch.setattr(sys, "argv", argv)
        precision.main()
    finally:
        sys.modules.pop("precision", None)
    out = capsys.readouterr().out
    for seed in (0, 1):
        for i, optimizer in enumerate(("adamw", "snoo+adamw")):
            info = {p: json.loads((tmp_path / f"{p}-{i}-s{seed}" / "config.json").read_text()) for p in ("off", "bf16")}
            assert [info[p]["bf16"] for p in ("off", "bf16")] == [False, True]
            assert {info[p]["spec"] for p in info} == {optimizer}
            assert {info[p]["config"]["schedule"] for p in info} == {"wsd"}
    losses = {
        p: [json.loads((tmp_path / f"{p}-0-s{s}" / "result.json").read_text())["final_val_loss"] for s in (0, 1)]
        for p in ("off", "bf16")
    }
    mean = (losses["bf16"][0] - losses["off"][0] + losses["bf16"][1] - losses["off"][1]) / 2
    row = next(line for line in out.splitlines() if line.startswith("| adamw |"))
    assert f"| {mean:+.4f} [" in row
    assert "seeds [0, 1]" in out
