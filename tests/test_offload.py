"""Host offload (snoo.optim.offload): the chunk plan, and the chunked outer step bit for bit equal to the whole-tensor
one. On a machine without a GPU the same chunked code runs with ordinary tensors, which is what these tests run;
tests/test_cuda.py runs it with streams and pinned memory."""

from __future__ import annotations

import copy
import itertools
import pickle

import pytest
import torch

import snoo
from helpers import make_model, params_of, train_step
from snoo.optim.offload import ALIGN, HostOffload, plan_chunks
from snoo.optim.outer import outer_step

SHAPES = [(37,), (300, 3), (64,), (5, 7), (0,), (2000,), (3,), (9, 40)]


def tensors(dtype: torch.dtype, seed: int, transposed: bool = True) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ts = [torch.randn(s, generator=g).to(dtype) for s in SHAPES]
    if transposed:  # one non-contiguous tensor, which is moved whole, never cut
        ts[-1] = torch.randn(40, 9, generator=g).to(dtype).t()
    return ts


@pytest.mark.parametrize("chunk_numel", [64, 100, 640, 10_000])
def test_plan_covers_every_element_once_within_the_chunk_size_cut_on_aligned_points(chunk_numel):
    params = tensors(torch.float32, 0)
    slow = [torch.empty(p.shape) for p in params]  # contiguous, like state in host memory
    chunks = plan_chunks([params, slow], chunk_numel)
    seen = {i: [] for i in range(len(params))}
    for chunk in chunks:
        ends = [p.offset + p.stop - p.start for p in chunk]
        whole = [p for p in chunk if p.whole]
        assert max(ends) <= chunk_numel or (len(chunk) == 1 and whole), "a chunk fits its staging slot"
        assert all(p.offset % ALIGN == 0 for p in chunk)
        for a, b in itertools.pairwise(chunk):
            assert b.offset >= a.offset + a.stop - a.start, "pieces do not overlap in the slot"
        for p in chunk:
            seen[p.index].append((p.start, p.stop))
            assert p.whole == (not params[p.index].is_contiguous())
    for i, ranges in seen.items():
        n = params[i].numel()
        cuts = [start for start, _ in ranges]
        assert all(c % ALIGN == 0 for c in cuts), "a tensor is cut on multiples of ALIGN"
        covered = [e for a, b in ranges for e in range(a, b)]
        assert covered == list(range(n)), f"tensor {i} covered exactly once, in order"
    if chunk_numel <= 100:
        assert any(len({p.index for p in c}) < len(c) or c[0].start > 0 for c in chunks[1:]), "tensors were cut"


@pytest.mark.parametrize(
    "param_dtype, state_dtype",
    [(torch.float32, torch.float32), (torch.float64, torch.float64), (torch.bfloat16, torch.float32)],
)
@pytest.mark.parametrize("momentum, nesterov", [(0.6, True), (0.6, False), (0.0, False)])
@pytest.mark.parametrize("chunk_numel", [64, 200, 1 << 22])
@pytest.mark.parametrize("threads", [1, 2])
def test_chunked_outer_step_is_the_whole_tensor_outer_step_bit_for_bit(
    param_dtype, state_dtype, momentum, nesterov, chunk_numel, threads
):
    torch.set_num_threads(threads)
    try:
        params, slow = tensors(param_dtype, 1), tensors(state_dtype, 2, transposed=False)
        buffers = tensors(state_dtype, 3, transposed=False) if momentum else None
        twins = [copy.deepcopy(ts) for ts in (params, slow, buffers)]
        hyper = dict(lr=0.7, momentum=momentum, nesterov=nesterov, track_norms=True)
        want = outer_step(params, slow, buffers, **hyper)
        offload = HostOffload(chunk_numel)
        got = offload.apply(outer_step, *twins, **hyper)
    finally:
        torch.set_num_threads(2)
    for name, ours, theirs in zip(("params", "slow", "momentum"), twins, (params, slow, buffers)):
        if theirs is not None:
            assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True)), name
    assert got.keys() == want.keys() == ({"pseudo_grad", "slow", "momentum"} if momentum else {"pseudo_grad", "slow"})
    for name in want:  # summed over chunks: the same up to the order of the additions
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=0)
    assert not twins[0][-1].is_contiguous(), "the non-contiguous parameter stayed what it was"
    # the staging slots are kept for the next outer step, two of at most chunk_numel elements per state tensor
    (slots,) = offload._staging.values()
    assert len(slots) == 2 and all(len(s) == (2 if momentum else 1) for s in slots)
    assert slots[0][0].numel() <= max(chunk_numel, params[-1].numel())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("make", ["snoo", "heavy ball", "lookahead"])
def test_snoo_with_state_device_streams_its_state_and_equals_snoo_bit_for_bit(dtype, make, one_thread):
    def build(state_device):
        model = make_model(0, dtype)
        inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
        if make == "lookahead":
            opt = snoo.Lookahead(inner, k=3, alpha=0.6, state_device=state_device, track_norms=True)
        else:
            opt = snoo.SNOO(inner, k=3, nesterov=make == "snoo", state_device=state_device, track_norms=True)
        return model, opt

    model, opt = build(None)
    streamed_model, streamed = build("cpu")
    assert opt.offload is None and isinstance(streamed.offload, HostOffload)
    streamed.offload.chunk_numel = ALIGN  # the 163 parameters in 5 chunks, tensors cut
    for t in range(1, 11):
        train_step(model, opt, t)
        train_step(streamed_model, streamed, t)
        assert all(map(torch.equal, params_of(model), params_of(streamed_model))), f"step {t}"
        if t % 3 == 0:
            for name in opt.outer_norms:
                torch.testing.assert_close(streamed.outer_norms[name], opt.outer_norms[name], rtol=1e-6, atol=0)
    assert streamed.offload._staging, "the outer steps went through the staging slots"
    for p, q in zip(model.parameters(), streamed_model.parameters()):
        assert opt.state[p].keys() == streamed.state[q].keys()
        assert all(torch.equal(opt.state[p][k], streamed.state[q][k]) for k in opt.state[p])
    opt.eval()
    streamed.eval()
    assert all(map(torch.equal, params_of(model), params_of(streamed_model)))


def test_chunk_size_is_checked_and_a_copy_makes_its_own_buffers(one_thread):
    for bad in (0, ALIGN - 1, 1.5, True, None):
        with pytest.raises(ValueError, match="chunk_numel"):
            HostOffload(bad)
    model = make_model()
    opt = snoo.SNOO(torch.optim.AdamW(model.parameters(), lr=1e-2), k=2, state_device="cpu")
    opt.offload.chunk_numel = 96
    for t in range(1, 3):
        train_step(model, opt, t)
    assert opt.offload._staging
    for clone in (copy.deepcopy(opt.offload), pickle.loads(pickle.dumps(opt.offload))):
        assert clone.chunk_numel == 96 and not clone._staging and not clone._lanes
    assert repr(opt.offload) == "HostOffload(chunk_numel=96)"


def test_staging_slots_are_kept_across_buckets_and_outer_steps_and_shrink_with_the_chunk(one_thread):
    model = make_model()
    *body, last = list(model.parameters())
    inner = torch.optim.AdamW([{"params": body}, {"params": [last], "lr": 1e-3}], lr=1e-2)  # two buckets
    opt = snoo.SNOO(inner, k=2, state_device="cpu")
    opt.offload.chunk_numel = 96
    seen = set()
    for t in range(1, 7):
        train_step(model, opt, t)
        if t % 2 == 0:
            (slots,) = opt.offload._staging.values()
            seen.add(tuple(b.data_ptr() for slot in slots for b in slot))
    assert len(seen) == 1, "the same two slots served both buckets at every outer step"
    assert slots[0][0].numel() == 96
    opt.offload.chunk_numel = 64
    train_step(model, opt, 7)
    train_step(model, opt, 8)
    (slots,) = opt.offload._staging.values()
    assert slots[0][0].numel() == 64
