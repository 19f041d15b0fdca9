"""What several test files share: a small model, deterministic batches, a training step, an op counter, the
harness that resumes a run in a fresh process, and a Python that sees only what an install of snoo would bring."""

from __future__ import annotations

import importlib.metadata
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from torch.utils._python_dispatch import TorchDispatchMode

import snoo

ROOT = Path(__file__).resolve().parents[1]


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).to(dtype)


#: the lab tests' corpus (the `corpus_file` fixture): small, and shaped like code (~70 KB)
LAB_TEXT = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(2000))


class WithRareParameter(torch.nn.Module):
    """A small MLP with a parameter `rare` that only some steps use, like a rarely picked expert. Its own parameter
    comes first in `parameters()`."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
        self.rare = torch.nn.Parameter(torch.randn(3))

    def forward(self, x: torch.Tensor, use_rare: bool) -> torch.Tensor:
        out = self.body(x)
        return out + self.rare if use_rare else out


# -- the inner optimizers the wrapper tests run over ------------------------------------------------------------------

#: torch's own optimizers over a list of tensors.
TORCH_INNER: dict[str, Callable[[Iterable[torch.Tensor]], torch.optim.Optimizer]] = {
    "Adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "SGD-nesterov": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True),
    "RMSprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-2),
}


def inner_optimizers(adam: type[torch.optim.Optimizer] = torch.optim.AdamW) -> dict[str, Callable]:
    """Factories ``model -> optimizer`` of torch's and this package's inner optimizers, for a `make_model()` model
    (its last layer is the head); ``adam`` is the Adam-family optimizer to include (AdamW or Adam)."""
    return {
        adam.__name__: lambda m: adam(m.parameters(), lr=1e-2),
        "SGD": lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9),
        "SCALE": lambda m: snoo.SCALE(snoo.param_groups(m, head=m[2]), lr=1e-2),
        "SGDLL": lambda m: snoo.SGDLL(snoo.param_groups(m, head=m[2]), lr=100.0),
        "MuonAdamW": lambda m: snoo.MuonAdamW(snoo.param_groups(m, head=m[2]), lr=0.02),
    }


def batch(t: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of step ``t``: the same in every process."""
    g = torch.Generator().manual_seed(1000 + t)
    return torch.randn(32, 6, generator=g).to(dtype), torch.randn(32, 3, generator=g).to(dtype)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, t: int) -> float:
    """One step on the batch of step ``t``, in the dtype and on the device of the model's parameters."""
    p = next(model.parameters())
    x, y = (b.to(p.device) for b in batch(t, p.dtype))
    loss = (model(x) - y).square().mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.item()


def params_of(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


class CountOps(TorchDispatchMode):
    """Counts the aten ops dispatched at the top level: a foreach op counts once, whatever its number of tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def ops_in_wrapper_step(wrap: Callable[[torch.optim.Optimizer], torch.optim.Optimizer], n_tensors: int) -> int:
    """How many kernels a wrapper's own work launches in a step over ``n_tensors`` parameters (``wrap`` builds it
    around SGD; the inner step is made a no-op): the same for 3 tensors as for 50 when its update is foreach."""
    params = [torch.nn.Parameter(torch.randn(8)) for _ in range(n_tensors)]
    opt = wrap(torch.optim.SGD(params, lr=0.1))
    for p in params:
        p.grad = torch.ones(8)
    opt.step()
    counter = CountOps()
    opt.inner.step = lambda closure=None: None  # count the wrapper's own work only
    with counter:
        opt.step()
    return counter.count


# -- resuming in a fresh process ----------------------------------------------------------------------------------
# A test file that checks resume defines build() -> (model, optimizer, scheduler) and run(model, opt, sched, start,
# stop), saves checkpoints with `save_checkpoints`, and ends with
#     if __name__ == "__main__": resume_and_finish(Path(sys.argv[1]), build, run, STEPS)
# so that running the file as a script is the fresh process that loads each checkpoint and finishes the run.

Build = Callable[[], tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]]
Run = Callable[[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler, int, int], None]


def run_without_a_bias_gradient_every(every: int) -> Run:
    """A ``run`` that trains steps ``start + 1 .. stop`` on :func:`batch` (the scheduler stepped after each step), in
    which the first layer's bias gets no gradient every ``every``-th step (as a frozen or unused parameter would)."""

    def run(model: torch.nn.Module, opt: torch.optim.Optimizer, sched, start: int, stop: int) -> None:
        for t in range(start + 1, stop + 1):
            x, y = batch(t)
            out = model(x) if t % every else model[2](model[1](x @ model[0].weight.T))
            (out - y).square().mean().backward()
            opt.step()
            sched.step()
            opt.zero_grad()

    return run


def save_checkpoints(directory: Path, build: Build, run: Run, cuts: list[tuple[int, bool]]) -> torch.optim.Optimizer:
    """Train from scratch to each cut and save everything there (in eval mode where asked); returns the last
    optimizer, for the caller to look at its state dict."""
    for cut, in_eval in cuts:
        model, opt, sched = build()
        run(model, opt, sched, 0, cut)
        if in_eval:
            opt.eval()
        saved = {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "step": cut}
        torch.save(saved, directory / f"ckpt-{cut}.pt")
    return opt


def resume_and_finish(directory: Path, build: Build, run: Run, steps: int) -> None:
    """Load each checkpoint into a freshly built model, optimizer and scheduler, finish the run, save the weights."""
    for checkpoint in sorted(directory.glob("ckpt-*.pt")):
        model, opt, sched = build()
        saved = torch.load(checkpoint, weights_only=True)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        sched.load_state_dict(saved["sched"])
        opt.train()  # a checkpoint saved in eval mode holds the evaluation weights in the model
        run(model, opt, sched, saved["step"], steps)
        torch.save(params_of(model), checkpoint.with_suffix(".final"))


def assert_resumes_bit_for_bit(
    script: str, directory: Path, build: Build, run: Run, steps: int, cuts: list[tuple[int, bool]]
) -> torch.optim.Optimizer:
    """Train ``steps`` in one go; then from scratch to each cut, saved there (:func:`save_checkpoints`), and assert that
    ``script`` run as a fresh process finishes each to the same weights. Returns the last saved optimizer, for the
    caller to look at its state dict."""
    model, opt, sched = build()
    run(model, opt, sched, 0, steps)
    expected = params_of(model)
    opt = save_checkpoints(directory, build, run, cuts)
    assert_fresh_process_finishes_the_same(script, directory, cuts, expected)
    return opt


def assert_fresh_process_finishes_the_same(script: str, directory: Path, cuts: list[tuple[int, bool]], expected):
    done = subprocess.run([sys.executable, script, str(directory)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for cut, _ in cuts:
        got = torch.load(directory / f"ckpt-{cut}.final", weights_only=True)
        assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True)), f"resumed at step {cut}"


# -- a fresh environment, simulated -----------------------------------------------------------------------------------


def installed_by(name: str, extras: set[str]) -> dict[str, importlib.metadata.Distribution]:
    """The installed distributions that ``pip install "name[extras]"`` pulls in: ``name`` and its requirements under
    those extras, recursively (each dependency with the extras it is asked for)."""
    found: dict[str, importlib.metadata.Distribution] = {}
    seen, todo = set(), [(name, frozenset(extras))]
    while todo:
        dist_name, wanted = todo.pop()
        if (canonicalize_name(dist_name), wanted) in seen:
            continue
        seen.add((canonicalize_name(dist_name), wanted))
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError:  # an optional dependency of a dependency, not installed here
            continue
        found[canonicalize_name(dist_name)] = dist
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in wanted or {""}):
                todo.append((req.name, frozenset(req.extras)))
    return found


def python_with_only(tmp_path: Path, extras: set[str], code: str, *args: str) -> subprocess.CompletedProcess:
    """Run ``code`` (with ``args`` as its argv) as it would run after ``pip install -e ".[extras]"`` in a fresh
    environment, without a download: a Python that sees the standard library, this checkout's ``src/`` and a
    directory of links to exactly the installed packages that install would bring (``-I -S``: no site-packages)."""
    site = tmp_path / "site-packages"
    site.mkdir()
    for name, dist in installed_by("snoo-optim", extras).items():
        if name == "snoo-optim":
            continue  # this checkout's src/ stands for it
        for top in {f.parts[0] for f in dist.files or [] if f.parts[0] not in ("..", "__pycache__")}:
            if dist.locate_file(top).exists() and not (site / top).exists():
                (site / top).symlink_to(dist.locate_file(top))
    paths = f"import sys\nsys.path[:0] = [{str(ROOT / 'src')!r}, {str(site)!r}]\n"
    return subprocess.run(
        [sys.executable, "-I", "-S", "-c", paths + code, *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def _interruptible() -> None:
    """In the child before it runs: Ctrl-C at its default, whatever the test runner's (a shell starts a background
    job with SIGINT ignored, and a child inherits that; Python then never raises KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def snoo_process(args: list[str], **kwargs) -> subprocess.Popen:
    """`python -m snoo ARGS` in a process of its own, one thread, its output captured, Ctrl-C able to reach it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "snoo", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=_interruptible,
        **kwargs,
    )
