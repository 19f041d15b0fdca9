"""The CPU outer step runs block by block (snoo.optim.outer.cache_blocks) so that its passes find p, w and b in the
cache: the blocks cover every element exactly once, and the blocked step is the unblocked one, bit for bit."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import snoo
import snoo.optim.outer as outer

ROOT = Path(__file__).resolve().parents[1]


def tensors(seed: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """Shapes that cross block edges (elements=7 below), a 0-d tensor, and a transposed (non-contiguous) one."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(3,), (4, 5), (), (2,), (17,), (6, 6)]
    out = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    out[-1] = out[-1].t()  # not contiguous: it stays whole
    return out


def test_the_blocks_cover_every_element_exactly_once_and_stay_aligned_across_lists():
    a, b = tensors(0), tensors(1)
    counts = [torch.zeros_like(t) for t in a]
    blocks = list(outer.cache_blocks([counts, None, b], elements=7))
    assert len(blocks) > 3
    for block in blocks:
        assert block[1] is None
        assert [t.shape for t in block[0]] == [t.shape for t in block[2]]
        size = sum(t.numel() for t in block[0])
        assert size <= 7 or len(block[0]) == 1, "only a tensor that cannot be cut makes a block above the limit"
        torch._foreach_add_(block[0], 1.0)
    assert all(torch.equal(c, torch.ones_like(c)) for c in counts)
    assert any(len(block[0]) > 1 for block in blocks), "small tensors share a block"


@pytest.mark.parametrize(
    "momentum, nesterov, param_dtype, track_norms",
    [
        (0.5, True, torch.float32, True),
        (0.6, False, torch.float32, False),
        (0.0, False, torch.float32, True),
        (0.5, True, torch.bfloat16, False),
    ],
    ids=["nesterov", "heavy-ball", "lookahead", "bf16-params"],
)
@pytest.mark.parametrize("form", ["outer_step", "outer_update"])
def test_the_blocked_outer_step_is_the_unblocked_one_bit_for_bit(
    monkeypatch, momentum, nesterov, param_dtype, track_norms, form
):
    calls = []
    original = getattr(outer, f"_{form}")  # the step of one block
    monkeypatch.setattr(outer, f"_{form}", lambda *a, **k: calls.append(1) or original(*a, **k))

    monkeypatch.setattr(outer, "CPU_BLOCKS_FROM", 0)  # these few elements in blocks all the same

    def run(block: int):
        monkeypatch.setattr(outer, "CPU_BLOCK_ELEMENTS", block)
        params = [t.to(param_dtype) for t in tensors(0)]
        slow = [p.float() + 0.1 * t for p, t in zip(params, tensors(1))]
        mom = [0.3 * t for t in tensors(2)] if momentum else None
        kwargs = dict(lr=0.7, momentum=momentum, nesterov=nesterov, track_norms=track_norms)
        calls.clear()
        if form == "outer_step":
            norms = outer.outer_step(params, slow, mom, **kwargs)
        else:  # the DiLoCo form, from -s = p - w
            neg_s = [p.float() - w for p, w in zip(params, slow)]
            norms = outer.outer_update(params, neg_s, slow, mom, **kwargs)
        return params, slow, mom, norms, len(calls)

    *blocked, blocked_calls = run(7)
    *whole, whole_calls = run(10**9)
    assert blocked_calls > 3 and whole_calls == 1
    for got, want in zip(blocked[:3], whole[:3]):
        assert (got is None) == (want is None)
        assert all(torch.equal(g, w) for g, w in zip(got or [], want or []))
    assert blocked[3].keys() == whole[3].keys()
    for name in whole[3]:
        torch.testing.assert_close(blocked[3][name], whole[3][name])  # the same sum in another order


def test_blocks_are_left_to_other_devices_and_to_lists_that_fit_a_cache(monkeypatch):
    calls = []
    original = outer._outer_step
    monkeypatch.setattr(outer, "_outer_step", lambda *a, **k: calls.append(1) or original(*a, **k))
    monkeypatch.setattr(outer, "CPU_BLOCK_ELEMENTS", 7)

    def step(params, slow):
        calls.clear()
        outer.outer_step(params, slow, None, lr=0.5, momentum=0.0, nesterov=False)
        return len(calls)

    monkeypatch.setattr(outer, "CPU_BLOCKS_FROM", 78)  # tensors(0) has 79 elements
    assert step(tensors(0), tensors(1)) > 1
    monkeypatch.setattr(outer, "CPU_BLOCKS_FROM", 79)
    assert step(tensors(0), tensors(1)) == 1, "lists of at most CPU_BLOCKS_FROM elements are one call"
    monkeypatch.setattr(outer, "CPU_BLOCKS_FROM", 0)
    meta = [torch.empty(100, device="meta")] * 3
    assert step(meta, [torch.empty(100, device="meta")] * 3) == 1, "only CPU tensors are cut into blocks"


def test_snoo_on_parameters_larger_than_a_block_trains_as_without_blocks(monkeypatch):
    """Through SNOO's step, on nn.Parameters (views of leaves that require grad, stepped under no_grad), with the
    non-finite check and track_norms: the same weights and state to the last bit as without blocks."""

    monkeypatch.setattr(outer, "CPU_BLOCKS_FROM", 0)

    def run(block: int):
        monkeypatch.setattr(outer, "CPU_BLOCK_ELEMENTS", block)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.Tanh(), torch.nn.Linear(48, 8))
        opt = snoo.SNOO(torch.optim.AdamW(model.parameters(), lr=1e-2), k=2, track_norms=True)
        x, y = torch.randn(32, 64), torch.randn(32, 8)
        for _ in range(6):
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        state = [opt.state[p][k] for p in model.parameters() for k in ("slow", "momentum")]
        return [p.detach().clone() for p in model.parameters()], state, dict(opt.outer_norms)

    blocked, whole = run(100), run(10**9)
    for got, want in zip(blocked[0] + blocked[1], whole[0] + whole[1]):
        assert torch.equal(got, want)
    for name, value in whole[2].items():
        torch.testing.assert_close(blocked[2][name], value)


def test_the_block_benchmark_runs_both_sweeps_and_restores_the_constants(monkeypatch, capsys, one_thread):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # as when run as a script: it imports step_overhead
    spec = importlib.util.spec_from_file_location("cache_blocks_bench", ROOT / "benchmarks" / "cache_blocks.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    constants = outer.CPU_BLOCK_ELEMENTS, outer.CPU_BLOCKS_FROM
    bench.block_sizes(layers=2, powers=[12, 14], rounds=2)
    bench.thresholds(rounds=1, cases=[(3, 5000), (200, 50)])
    printed = capsys.readouterr().out
    for row in (
        "| floor |",
        "| whole tensors |",
        "| blocks of 2^12 |",
        "| blocks of 2^14 |",
        "| 3 x 5000 |",
        "| 200 x 50 |",
    ):
        assert row in printed
    assert constants == (outer.CPU_BLOCK_ELEMENTS, outer.CPU_BLOCKS_FROM)
