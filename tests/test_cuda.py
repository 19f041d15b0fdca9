"""On a CUDA device: every wrapper and inner optimizer in float32 and bf16 (SNOO and Lookahead also fused, compiled)
against the CPU float64 references of the other test files; host-offloaded SNOO state bit for bit equal to state on
the GPU, with work queued on the streams, and each synchronisation of the offload shown to matter; eval()/train() and
resume; the lab's loop with bf16 autocast and torch.compile, resumed bit for bit; MuonAdamW.

Marked ``cuda`` and skipped where there is no CUDA device (``pytest -m cuda`` selects it; benchmarks/gpu_check.sh
runs it). ``SNOO_TEST_DEVICE=cpu pytest -m cuda tests/test_cuda.py`` runs the tests that do not need streams on the
CPU, to check the harness and its tolerances without a GPU.
"""

# ruff: noqa: E402  (the imports of the other test files come after the stand-in for hypothesis)
from __future__ import annotations

import importlib.machinery
import io
import os
import sys
import types
from collections.abc import Callable
from pathlib import Path

import pytest
import torch


def _without_hypothesis() -> types.ModuleType:
    """A stand-in for ``hypothesis`` on a GPU machine that has torch and pytest only (benchmarks/gpu_check.sh installs
    nothing): the test files whose references these tests import use it for their own property tests, which then
    skip."""
    stub = types.ModuleType("hypothesis")
    stub.__spec__ = importlib.machinery.ModuleSpec("hypothesis", None)  # torch._dynamo looks modules up by spec
    stub.given = lambda *args, **kwargs: pytest.mark.skip(reason="hypothesis is not installed")  # type: ignore[attr-defined]
    stub.settings = lambda *args, **kwargs: lambda test: test  # type: ignore[attr-defined]
    strategies = types.ModuleType("hypothesis.strategies")
    strategies.__spec__ = importlib.machinery.ModuleSpec("hypothesis.strategies", None)

    def strategy(name: str) -> Callable:
        if name.startswith("__"):
            raise AttributeError(name)
        return lambda *args, **kwargs: None

    strategies.__getattr__ = strategy  # type: ignore[method-assign]
    stub.strategies = strategies  # type: ignore[attr-defined]
    sys.modules["hypothesis.strategies"] = strategies
    return stub


try:
    import hypothesis  # noqa: F401
except ImportError:
    sys.modules["hypothesis"] = _without_hypothesis()

import snoo
import test_combined
import test_scale
import test_sgd_ll
from helpers import make_model, params_of, train_step
from snoo.lab import config as lab_config
from snoo.lab import train as lab_train
from test_ema_nesterov import reference as ema_nesterov_reference
from test_nesterov import reference as nesterov_reference
from test_snoo import reference_snoo
from test_stacking import reference as stacked_reference

#: what the lab test calls, looked up here so that CPU-only CI sees it if the lab moves them
LAB_ENTRY_POINTS = (lab_config.make_config, lab_train.train)
DEVICE = torch.device(os.environ.get("SNOO_TEST_DEVICE", "cuda"))
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="no CUDA device"),
]
needs_cuda = pytest.mark.skipif(DEVICE.type != "cuda", reason="streams, events and pinned memory need CUDA")
DTYPES = [torch.float32, torch.bfloat16]
STEPS = 12

#: how far a float32 run may end from the float64 reference (float32 rounding through a dozen steps)
FLOAT32 = dict(rtol=1e-5, atol=1e-5)


def rms_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    """The root mean square over all elements of ``got - want``: steadier than the largest, which one unlucky
    rounding decides."""
    diff = torch.cat([(g.detach().cpu().double() - w.double()).flatten() for g, w in zip(got, want, strict=True)])
    return diff.square().mean().sqrt().item()


def assert_near(got, want, start, dtype: torch.dtype, on_cpu: list[torch.Tensor] | None, slack: float = 1e-4) -> None:
    """``got`` (on the device, in ``dtype``) follows the float64 reference ``want``: within float32 rounding, or
    (where ``on_cpu`` is given, as for bf16, where rounding the weights at every step costs far more) at most twice
    as far from it (root mean square) as the same code in the same dtype on the CPU (``on_cpu``) ends. In bf16 that
    is a few times less than the inner optimizer alone would end from a wrapper's reference. And ``want`` moved from
    ``start`` by several times the bound, so that a step that did nothing or the wrong thing fails."""
    for g in got:
        assert g.device.type == DEVICE.type and g.dtype == dtype
    if not on_cpu:
        assert dtype == torch.float32
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g.detach().cpu().double(), w, **FLOAT32)
        bound = FLOAT32["atol"]
    else:
        bound = 2 * rms_error(on_cpu, want) + slack
        error = rms_error(got, want)
        assert error <= bound, (
            f"{dtype} on {DEVICE}: {error:.2e} from float64 (rms), on the CPU {rms_error(on_cpu, want):.2e}"
        )
    moved = rms_error(start, want)
    assert moved > 5 * bound, f"the reference moved only {moved} (rms): the test could not tell a wrong step"


def run(
    dtype: torch.dtype, build: Callable, device: torch.device = DEVICE, steps: int = STEPS
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = make_model(0, dtype).to(device)
    opt = build(model.parameters())
    for t in range(1, steps + 1):
        train_step(model, opt, t)
    return model, opt


def adamw(ps, **kw):
    return torch.optim.AdamW(ps, lr=1e-2, **kw)


# name: (build the optimizer from the parameters, the float64 reference of the parameters after STEPS steps)
WRAPPERS: dict[str, tuple[Callable, Callable[[], list[torch.Tensor]]]] = {
    "snoo": (
        lambda ps: snoo.SNOO(adamw(ps), k=3, lr=0.7, momentum=0.5),
        lambda: reference_snoo(STEPS, 3, 0.7, 0.5, True),
    ),
    "snoo, heavy ball": (
        lambda ps: snoo.SNOO(adamw(ps), k=3, lr=0.7, momentum=0.5, nesterov=False),
        lambda: reference_snoo(STEPS, 3, 0.7, 0.5, False),
    ),
    "snoo, state in host memory": (
        lambda ps: snoo.SNOO(adamw(ps), k=3, lr=0.7, momentum=0.5, state_device="cpu"),
        lambda: reference_snoo(STEPS, 3, 0.7, 0.5, True),
    ),
    "lookahead": (
        lambda ps: snoo.Lookahead(adamw(ps), k=3, alpha=0.6),
        lambda: reference_snoo(STEPS, 3, 0.6, 0.0, False),
    ),
    "ema-nesterov": (
        lambda ps: snoo.EMANesterov(adamw(ps, weight_decay=0.05), beta=0.5, gamma=0.9),
        lambda: ema_nesterov_reference(STEPS, 0.5, 0.9)[0],
    ),
    "ema-nesterov, state in host memory": (
        lambda ps: snoo.EMANesterov(adamw(ps, weight_decay=0.05), beta=0.5, gamma=0.9, state_device="cpu"),
        lambda: ema_nesterov_reference(STEPS, 0.5, 0.9)[0],
    ),
    "nesterov": (
        lambda ps: snoo.Nesterov(torch.optim.Adam(ps, lr=1e-2), momentum=0.9, weight_decay=0.5),
        lambda: nesterov_reference(STEPS, 0.9, 0.5)[0],
    ),
    "ema-nesterov around snoo": (
        lambda ps: snoo.EMANesterov(snoo.SNOO(adamw(ps), k=3, lr=0.7, momentum=0.5), beta=0.5, gamma=0.8),
        lambda: stacked_reference(STEPS, 3, 0.5, 0.8)[0],
    ),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", WRAPPERS)
def test_wrapper_on_the_device_follows_the_float64_reference(name, dtype):
    build, reference = WRAPPERS[name]
    model, opt = run(dtype, build)
    on_cpu = list(run(dtype, build, torch.device("cpu"))[0].parameters()) if dtype == torch.bfloat16 else None
    assert_near(list(model.parameters()), reference(), params_of(make_model(0, torch.float64)), dtype, on_cpu)
    for p in model.parameters():
        for key, value in opt.state[p].items():
            if isinstance(value, torch.Tensor) and value.ndim:  # the wrapper's own state: float32 for bf16
                assert value.dtype == (torch.float32 if dtype == torch.bfloat16 else dtype), key
                assert value.device.type == ("cpu" if "host" in name else DEVICE.type), key
                if name.startswith("snoo"):  # what HostOffload streams must be pinned for the copies to overlap
                    assert value.is_pinned() == ("host" in name and DEVICE.type == "cuda"), key


FUSED: dict[str, tuple[Callable, Callable[[], list[torch.Tensor]]]] = {
    "snoo": (
        lambda ps: snoo.SNOO(adamw(ps), k=3, lr=0.7, momentum=0.5, fused=True),
        lambda: reference_snoo(STEPS, 3, 0.7, 0.5, True),
    ),
    "lookahead": (
        lambda ps: snoo.Lookahead(adamw(ps), k=3, alpha=0.6, fused=True),
        lambda: reference_snoo(STEPS, 3, 0.6, 0.0, False),
    ),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", FUSED)
def test_fused_outer_step_on_the_device_follows_the_float64_reference(name, dtype):
    build, reference = FUSED[name]
    model, opt = run(dtype, build)
    on_cpu = list(run(dtype, build, torch.device("cpu"))[0].parameters()) if dtype == torch.bfloat16 else None
    assert_near(list(model.parameters()), reference(), params_of(make_model(0, torch.float64)), dtype, on_cpu)
    assert opt.fused and opt.skipped_outer_steps == 0
    assert all(opt.state[p]["slow"].dtype == torch.float32 for p in model.parameters())


def _leaves(params: dict[str, list[torch.Tensor]], device: torch.device, dtype: torch.dtype):
    return {role: [p.detach().to(device, dtype).requires_grad_() for p in ps] for role, ps in params.items()}


def scale_run(device: torch.device, dtype: torch.dtype) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """SCALE in ``dtype`` on ``device`` and its float64 reference (test_scale's), 5 steps; returns both."""
    lr, options = 0.05, test_scale.OPTIONS
    params = test_scale.make_params()
    ref = {role: [p.detach().clone() for p in ps] for role, ps in params.items()}
    states: dict[tuple[str, int], dict] = {}
    ours = _leaves(params, device, dtype)
    opt = snoo.SCALE([{"params": ps, "role": role} for role, ps in ours.items()], lr=lr, **options)
    for step in range(5):
        grads = test_scale.make_grads(params, step)
        for role, ps in ours.items():
            for i, p in enumerate(ps):
                g = grads[role][i]
                p.grad = None if g is None else g.to(device, dtype)
                if g is not None:
                    state = states.setdefault((role, i), {})
                    ref[role][i] = test_scale.scale_reference(ref[role][i], g, state, role, lr, **options)
        opt.step()
    return [p for ps in ours.values() for p in ps], [r for rs in ref.values() for r in rs]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scale_on_the_device_follows_the_float64_reference(dtype):
    got, want = scale_run(DEVICE, dtype)
    start = [p.detach() for ps in test_scale.make_params().values() for p in ps]
    assert_near(got, want, start, dtype, scale_run(torch.device("cpu"), dtype)[0] if dtype == torch.bfloat16 else None)


def sgd_ll_run(device: torch.device, dtype: torch.dtype) -> tuple[list[torch.Tensor], list[torch.Tensor], set[str]]:
    """SGD-LL in ``dtype`` on ``device`` and its float64 reference (test_sgd_ll's), 5 steps, with tau and delta
    large enough that an update is many bf16 ulps and small enough that both clips fire."""
    lr, momentum, tau, delta = 100.0, 0.9, 3e-2, 0.2
    gen = torch.Generator().manual_seed(0)
    params = {
        role: [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
        for role, shapes in test_sgd_ll.SHAPES.items()
    }
    ref = {role: [p.clone() for p in ps] for role, ps in params.items()}
    states: dict[tuple[str, int], dict] = {}
    flags: set[str] = set()
    ours = _leaves(params, device, dtype)
    groups = [{"params": ps, "role": role} for role, ps in ours.items()]
    opt = snoo.SGDLL(groups, lr=lr, momentum=momentum, tau=tau, delta=delta)
    for _ in range(5):
        for role, ps in ours.items():
            for i, p in enumerate(ps):
                g = torch.randn(p.shape, generator=gen, dtype=torch.float64) * (1 + 3 * (i % 2))
                p.grad = g.to(device, dtype)
                state = states.setdefault((role, i), {})
                ref[role][i] = test_sgd_ll.sgd_ll_reference(
                    ref[role][i], g, state, role, lr, momentum, tau, delta, flags
                )
        opt.step()
    return [p for ps in ours.values() for p in ps], [r for rs in ref.values() for r in rs], flags


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sgd_ll_on_the_device_follows_the_float64_reference(dtype):
    got, want, flags = sgd_ll_run(DEVICE, dtype)
    assert {"row clipped", "tensor clipped"} <= flags
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=gen, dtype=torch.float64) for ss in test_sgd_ll.SHAPES.values() for s in ss]
    assert_near(got, want, start, dtype, sgd_ll_run(torch.device("cpu"), dtype)[0] if dtype == torch.bfloat16 else None)


def muon_adamw_run(device: torch.device, dtype: torch.dtype, combined: bool = True) -> list[torch.Tensor]:
    """4 steps of MuonAdamW (or of torch's Muon and AdamW side by side) on test_combined's parameters, groups and
    gradients, in ``dtype`` on ``device``; the weights scaled to the size of a trained layer's (0.1), so that an
    update is many bf16 ulps."""
    ps = [(0.1 * p.detach()).to(device, dtype).requires_grad_() for p in test_combined.make_params()]
    groups = test_combined.make_groups(ps)
    if combined:
        opts = [snoo.MuonAdamW(groups, **test_combined.HYPER)]
    else:
        matrices = [g for g in groups if g["role"] == "matrix"]
        rest = [g for g in groups if g["role"] != "matrix"]
        opts = [
            torch.optim.Muon(matrices, lr=0.02, momentum=0.95, weight_decay=0.01),
            torch.optim.AdamW(rest, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0),
        ]
    for step in range(4):
        gen = torch.Generator().manual_seed(10 + step)  # test_combined.set_grads's gradients, in our dtype
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen).to(device, dtype)
        for opt in opts:
            opt.step()
    return [p.detach() for p in ps]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_muon_adamw_on_the_device_is_torch_muon_and_adamw_and_follows_float64(dtype):
    ours = muon_adamw_run(DEVICE, dtype)
    assert all(map(torch.equal, ours, muon_adamw_run(DEVICE, dtype, combined=False)))
    if dtype == torch.bfloat16:
        # Muon keeps its momentum in the parameters' dtype, and orthogonalising a bf16-rounded momentum moves a
        # small square matrix by a third of its update: bf16 is held to torch's own Muon and AdamW, above
        return
    want = muon_adamw_run(torch.device("cpu"), torch.float64, combined=False)
    start = [0.1 * p.detach().double() for p in test_combined.make_params()]
    # Muon orthogonalises in bf16 whatever the parameters' dtype: float32 follows float64 as closely as the same code
    # on the CPU does, up to the bf16 matmuls of another device, which may round each update differently by about a
    # bf16 ulp (2^-8 of lr = 0.02, over 4 steps: 3e-4)
    assert_near(ours, want, start, dtype, muon_adamw_run(torch.device("cpu"), dtype), slack=1e-3)


# -- state in host memory: streamed through the GPU --------------------------------------------------------------


def wide_model(dtype: torch.dtype) -> torch.nn.Module:
    """Large enough that copies take a while (1.6M parameters), small enough for a fast test."""
    torch.manual_seed(0)
    layers = [torch.nn.Linear(6, 512), torch.nn.Tanh(), torch.nn.Linear(512, 1024), torch.nn.Tanh()]
    layers += [torch.nn.Linear(1024, 1024), torch.nn.Tanh(), torch.nn.Linear(1024, 3)]
    return torch.nn.Sequential(*layers).to(DEVICE, dtype)


def queue_work(stream: torch.cuda.Stream | None = None, cycles: int = 20_000_000) -> None:
    """Keep ``stream`` (the current one by default) busy for ``cycles`` GPU clock cycles (10 ms at 2 GHz): a copy
    read before it lands, or a buffer reused before its copy is done, then reads the wrong bytes instead of passing
    by luck."""
    with torch.cuda.stream(stream or torch.cuda.current_stream()):
        torch.cuda._sleep(cycles)


def build_snoo(dtype: torch.dtype, state_device: str | None, chunk_numel: int = 1 << 16):
    model = wide_model(dtype)
    opt = snoo.SNOO(adamw(model.parameters()), k=3, lr=0.7, momentum=0.5, state_device=state_device)
    if opt.offload is not None:
        opt.offload.chunk_numel = chunk_numel  # 26 chunks, tensors cut across chunks
    return model, opt


def assert_same_run(a: tuple, b: tuple) -> None:
    (ma, oa), (mb, ob) = a, b
    assert all(map(torch.equal, params_of(ma), params_of(mb)))
    for p, q in zip(ma.parameters(), mb.parameters()):
        for key in oa.state[p]:
            assert torch.equal(oa.state[p][key].cpu(), ob.state[q][key].cpu()), key


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_host_state_is_bit_for_bit_the_state_on_the_gpu_with_work_queued_between_steps(dtype):
    on_gpu, on_host = build_snoo(dtype, None), build_snoo(dtype, "cpu")
    for t in range(1, 10):
        for model, opt in (on_gpu, on_host):
            queue_work()
            train_step(model, opt, t)
        if t % 3 == 0:
            # read on the host right after the outer step: every copy into host memory has landed
            assert_same_run(on_gpu, on_host)
    assert all(st[k].is_pinned() for st in on_host[1].state.values() for k in ("slow", "momentum"))
    # what the GPU holds for the host state: two staging slots of at most one chunk of slow weights and momentum
    (slots,) = on_host[1].offload._staging.values()
    assert len(slots) == 2 and all(len(slot) == 2 and b.numel() <= 1 << 16 for slot in slots for b in slot)
    for _, opt in (on_gpu, on_host):
        queue_work()
        opt.eval()
    assert_same_run(on_gpu, on_host)


def _outer_step_with_a_late_stream(monkeypatch, removed: str | None, late: str) -> tuple:
    """Two runs to the first outer step, state on the GPU and in host memory; before the host run's outer step the
    offload's ``late`` stream is kept busy, and the synchronisation ``removed`` (a method of the offload's lanes)
    does nothing. Returns the runs and a copy of the host state taken right after the step."""
    on_gpu, on_host = build_snoo(torch.float32, None), build_snoo(torch.float32, "cpu")
    for t in (1, 2):
        train_step(*on_gpu, t)
        train_step(*on_host, t)
    train_step(*on_gpu, 3)
    torch.cuda.synchronize()
    lanes = on_host[1].offload.lanes(next(on_host[0].parameters()).device)
    if removed:
        monkeypatch.setattr(type(lanes), removed, lambda self, *args: None)
    queue_work(getattr(lanes, late), cycles=400_000_000)  # far longer than it takes the host to queue the step
    train_step(*on_host, 3)
    seen = [on_host[1].state[p]["slow"].clone() for p in on_host[0].parameters()]
    torch.cuda.synchronize()
    return on_gpu, on_host, seen


@needs_cuda
@pytest.mark.parametrize(
    "removed, late",
    [
        (None, "h2d"),
        (None, "d2h"),
        ("wait_loaded", "h2d"),  # the update reads its chunk before the copy to the GPU landed
        ("finish", "d2h"),  # the host reads its state before the copy back landed
        ("wait_slot_free", "d2h"),  # a staging slot is refilled before its copy back has read it
    ],
)
def test_each_synchronisation_of_the_offload_is_needed(monkeypatch, removed, late):
    on_gpu, on_host, seen = _outer_step_with_a_late_stream(monkeypatch, removed, late)
    want = [on_gpu[1].state[p]["slow"].cpu() for p in on_gpu[0].parameters()]
    right = all(map(torch.equal, seen, want)) and all(map(torch.equal, params_of(on_gpu[0]), params_of(on_host[0])))
    right = right and all(
        torch.equal(on_host[1].state[q]["slow"], w) for q, w in zip(on_host[0].parameters(), want, strict=True)
    )
    assert right == (removed is None), f"without {removed}, the result must be wrong" if removed else "must be right"


# -- eval()/train() and resume ------------------------------------------------------------------------------------


@pytest.mark.parametrize("state_device", [None, "cpu"])
@pytest.mark.parametrize(
    "make",
    [
        lambda ps, sd: snoo.SNOO(adamw(ps), k=3, state_device=sd),
        lambda ps, sd: snoo.EMANesterov(snoo.SNOO(adamw(ps), k=3, state_device=sd), beta=0.5, gamma=0.9),
    ],
    ids=["snoo", "ema-nesterov around snoo"],
)
def test_eval_train_and_resume_from_a_checkpoint_saved_in_eval_mode_are_bit_exact(make, state_device):
    def build():
        model = make_model(0, torch.bfloat16).to(DEVICE)
        return model, make(model.parameters(), state_device)

    whole = build()
    for t in range(1, 12):
        train_step(*whole, t)

    model, opt = build()
    for t in range(1, 6):  # mid-cycle
        train_step(model, opt, t)
    fast = params_of(model)
    if DEVICE.type == "cuda":
        queue_work()
    opt.eval()
    innermost = opt.inner if isinstance(opt.inner, snoo.SNOO) else opt
    assert all(torch.equal(p, innermost.state[p]["slow"].to(p)) for p in model.parameters())
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)  # read on the host at once
    opt.train()
    assert all(map(torch.equal, params_of(model), fast))

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = build()
    resumed[0].load_state_dict(saved["model"])
    resumed[1].load_state_dict(saved["opt"])
    resumed[1].train()
    for t in range(6, 12):
        train_step(*resumed, t)
    assert all(map(torch.equal, params_of(whole[0]), params_of(resumed[0])))


# -- the lab ------------------------------------------------------------------------------------------------------


@pytest.fixture
def deterministic():
    # torch.compile's embedding backward adds with atomics on CUDA, in an order that changes from run to run, unless
    # deterministic algorithms are asked for (warn_only: cuBLAS would otherwise want CUBLAS_WORKSPACE_CONFIG)
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(False)


@needs_cuda
def test_lab_loop_with_bf16_autocast_and_compile_resumes_bit_for_bit(tmp_path: Path, corpus_file, deterministic):
    make_config, train = LAB_ENTRY_POINTS

    def config(out: Path):
        return make_config(
            "tiny", data=corpus_file, out=str(out), optimizer="snoo(k=3)+adamw", steps=12, eval_every=6,
            ckpt_every=4, log_every=2, device="cuda", autocast="bf16", compile="on",
        )  # fmt: skip

    whole = train(config(tmp_path / "whole"))
    assert whole["status"] == "ok"
    info = (tmp_path / "whole" / "config.json").read_text()
    assert '"bf16": true' in info and '"device": "cuda' in info

    def interrupt(step: int, loss: float) -> None:
        if step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config(tmp_path / "cut"), callback=interrupt)
    assert torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=True)["step"] == 4  # mid outer step (k=3)
    resumed = train(config(tmp_path / "cut"), resume=True)
    a = torch.load(tmp_path / "whole" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=True)
    assert a["step"] == b["step"] == 12
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert resumed["final_val_loss"] == whole["final_val_loss"]
