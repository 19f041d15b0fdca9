"""``snoo`` command line: train, compare, sweep, scale-out, scaling, reproduce, report. See docs/lab.md,
docs/reproduce.md and docs/distributed.md.

Bad input (an unknown optimizer, key or preset, a bad value, missing or empty data, an ``--out`` that cannot be
written or is in use, a checkpoint of another run or a damaged one, a full disk) exits with status 2 and one line
on stderr; a diverged run exits with status 1, and so does a run on several workers that stopped before its end
(with torchrun's status); Ctrl-C exits with status 130 and one line (pressed while torch loads, once it has
loaded). ``SNOO_DEBUG=1`` shows the traceback instead.

The lab's heavy modules (training, experiments, matplotlib) are imported only once a command runs, so that
``snoo --help`` is quick; torch itself loads first, since the parser names the SPECs and versions.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from snoo.lab import ladder
from snoo.lab.ladder import LADDERS

if TYPE_CHECKING:
    from snoo.lab.config import TrainConfig

BUDGETS = ",".join(f"{b:g}" for b in ladder.BUDGETS)  # the default --budgets of compare and scaling
JOBS = min(2, os.cpu_count() or 1)  # runs at once: one per core, each on one thread
#: compare's and scaling's schedule: their default ladder (wsd) trains every run on the wsd schedule
WSD_SCHEDULE = "wsd, as the default --ladder wsd needs; cosine or constant with --ladder cosine"


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    takes_specs = False  # a command that takes SPECs: its --help lists the optimizer names, read from the library then

    def error(self, message: str) -> NoReturn:  # one line, not usage + error
        raise UsageError(f"{message} (see `{self.prog} --help`)")

    def format_help(self) -> str:
        if self.takes_specs:
            from snoo import spec

            names = ", ".join(f"{n} ({e.kind})" for n, e in spec.NAMES.items())
            self.epilog = f"{SPEC_HELP} Names: {names}. See docs/lab.md."
        for action in self._actions:
            if action.dest == "data":  # the built-in corpora, named by the module that has them
                from snoo.lab.data import BUILTIN_CORPORA

                action.help = DATA_HELP.format(", ".join(BUILTIN_CORPORA))
        return super().format_help()


DATA_HELP = (
    "a built-in corpus ({}; default python-stdlib, the standard library's source), a text file, a directory or "
    "glob of text files, or .bin files"
)
SPEC_HELP = (
    "SPEC: name[(key=value,...)][+name...], outermost first, e.g. adamw, snoo-adamw, "
    "'snoo(k=20,lr=0.7,momentum=0.5)+adamw(lr=2e-3)'; an optimizer's settings (lr, ...) go in its SPEC."
)


def _load_toml(path: str) -> dict[str, Any]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise ImportError("--config needs Python 3.11+ or the `tomli` package: pip install tomli") from None
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise UsageError(f"--config {path}: cannot read it ({e.strerror})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"--config {path}: not valid TOML ({e})") from None


def _value(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def _config(args: argparse.Namespace, out_default: str) -> tuple[TrainConfig, dict[str, Any]]:
    """Defaults < preset < --config file < --set < the other flags. Returns the config and the file's other keys."""
    from snoo import spec
    from snoo.lab.config import make_config

    file = _load_toml(args.config) if args.config else {}
    extra = {k: file.pop(k) for k in ("optimizers", "grid") if k in file}
    if "optimizer" in file:
        file["optimizer"] = spec.from_config(file["optimizer"])
    preset = args.preset or file.pop("preset", "compare" if args.command == "compare" else "small")
    file.pop("preset", None)
    if not isinstance(preset, str):
        raise UsageError(f"preset must be a name, got {preset!r}")
    flags: dict[str, Any] = {}
    for item in args.set or []:
        key, eq, value = item.partition("=")
        if not eq:
            raise UsageError(f"--set {item!r}: expected key=value")
        flags[key] = _value(value)
    for key in ("data", "steps", "seed", "tokenizer", "unique_tokens", "schedule", "device", "workers"):
        if getattr(args, key, None) is not None:
            flags[key] = getattr(args, key)
    if getattr(args, "optimizer", None):
        flags["optimizer"] = args.optimizer
    if args.tensorboard:
        flags["tensorboard"] = True
    if args.wandb:
        flags["wandb"] = True
    if args.no_progress:
        flags["progress"] = False
    if args.out is not None:
        flags["out"] = args.out
    elif "out" not in flags:
        flags["out"] = file.pop("out", None) or out_default
    return make_config(preset, **{**file, **flags}), extra


def _common(p: argparse.ArgumentParser, out: str, workers: bool = True, schedule: str = "cosine") -> None:
    if workers:
        p.add_argument(
            "--workers",
            type=int,
            help="worker processes on this machine, under torchrun (default 1; docs/distributed.md)",
        )
    p.add_argument("--data", help=DATA_HELP.format("see --help"))
    p.add_argument("--preset", help="tiny, compare (compare's default), small (the others' default) or base")
    p.add_argument("--steps", type=int, help="training steps (default: the preset's)")
    p.add_argument("--seed", type=int, help="seed of the initial weights and the batch order (default 0)")
    p.add_argument("--out", help=f"output directory (default {out}); a new run refuses one that holds a run")
    p.add_argument("--tokenizer", choices=("byte", "bpe"), help="byte (default) or bpe (needs `tokenizers`)")
    p.add_argument("--unique-tokens", type=int, help="train on only the first N tokens, for several epochs")
    p.add_argument("--schedule", choices=("cosine", "wsd", "constant"), help=f"inner lr schedule (default {schedule})")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if there is one)")
    p.add_argument("--config", help="TOML file with any of these settings (flags win)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any TrainConfig field, e.g. n_layer=6")
    p.add_argument("--tensorboard", action="store_true", help="also log to DIR/tb (needs `tensorboard`)")
    p.add_argument(
        "--wandb",
        action="store_true",
        help="also log to Weights & Biases (needs `wandb`; WANDB_MODE=offline: no network)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _experiment_flags(
    p: argparse.ArgumentParser, budgets: str, seeds: int = 1, ladder: str = "cosine", tune_seeds: int = 1
) -> None:
    p.add_argument("--seeds", type=int, default=seeds, help=f"seeds per optimizer (default {seeds})")
    p.add_argument("--budgets", default=budgets, help=f"baseline budgets, multiples of --steps (default {budgets})")
    p.add_argument("--tune-baseline", action="store_true", help="sweep the baseline lr first; use the best")
    p.add_argument(
        "--tune",
        type=int,
        default=0,
        metavar="N",
        help="first give every optimizer N trial runs of its own knobs (AdamW: lr; a wrapper: the inner lr and its "
        "own knobs, as its class declares) on unreported seeds; compare the best of each (default 0: off)",
    )
    p.add_argument(
        "--tune-seeds",
        type=int,
        default=tune_seeds,
        metavar="N",
        help=f"seeds each tuning trial (and --tune-baseline) trains on, none of them reported; a trial's loss is their "
        f"mean (default {tune_seeds})",
    )
    p.add_argument(
        "--tune-widen",
        type=int,
        default=0,
        metavar="N",
        help="with --tune: a contender whose best trial has the lowest or highest lr tried gets a trial at the next lr "
        "beyond, up to N times while its best stays at the edge (default 0: off)",
    )
    p.add_argument(
        "--ladder",
        choices=LADDERS,
        default=ladder,
        help="the baseline's budgets: cosine (one full run each) or wsd (one warm-up-stable-decay trunk with a "
        f"decay branch per budget, about half the cost; every run then uses the wsd schedule) (default {ladder})",
    )
    p.add_argument("--resume", action="store_true", help="keep finished runs, continue interrupted ones")
    p.add_argument(
        "--jobs",
        type=int,
        default=JOBS,
        metavar="N",
        help=f"train N runs at once, each in its own process with one thread; same results (default {JOBS}: this "
        "machine's cores, at most 2)",
    )


def _version() -> str:
    """snoo's version, with the torch and Python it runs on (what a result depends on)."""
    import platform

    import torch

    from snoo import __version__

    return f"snoo {__version__} (torch {torch.__version__}, Python {platform.python_version()})"


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="snoo",
        description="Train small language models and measure what SNOO saves.",
        epilog=f"{SPEC_HELP} `snoo train --help` lists the names. See docs/lab.md.",
    )
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    t = sub.add_parser("train", help="train one model with one optimizer")
    t.add_argument("--optimizer", help="a SPEC, e.g. adamw or 'snoo(k=20)+adamw' (default adamw)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out, with the same settings")
    _common(t, "runs/train")
    t.takes_specs = True
    c = sub.add_parser("compare", help="the baseline (first SPEC) at several budgets against the others")
    c.add_argument(
        "--optimizers",
        help="SPEC,SPEC,... the first is the baseline (default: the preset's optimizer and SNOO around it; for the "
        "compare preset adamw(lr=0.004),snoo+adamw(lr=0.004))",
    )
    _common(c, "runs/compare", schedule=WSD_SCHEDULE)
    c.takes_specs = True
    _experiment_flags(c, BUDGETS, seeds=3, ladder="wsd")
    s = sub.add_parser("sweep", help="one SPEC over a grid of its keys, against its base optimizer")
    s.add_argument("--optimizer", help="the SPEC to sweep (default snoo-adamw)")
    s.add_argument("--grid", help="e.g. 'k=10,20,50 lr=0.3,0.5,0.7'; name.key picks a stage, e.g. adamw.lr=1e-3")
    _common(s, "runs/sweep")
    s.takes_specs = True
    _experiment_flags(s, "1")
    o = sub.add_parser("scale-out", help="SNOO on 1 worker against DiLoCo and DDP on N workers, at the same tokens")
    o.add_argument("--optimizer", help="the SNOO SPEC of the 1-worker and the DiLoCo runs (default snoo-adamw)")
    o.add_argument("--baseline", help="the SPEC of the 1-worker baseline and the DDP runs (default adamw)")
    o.add_argument(
        "--workers",
        dest="worker_counts",
        default="2,4",
        help="worker counts N, each run for steps/N steps (default 2,4)",
    )
    o.add_argument(
        "--bandwidth",
        action="store_true",
        help="also DiLoCo with bf16/int8/int4 pseudo-gradients (without and with error feedback) and streaming "
        "(F=4 fragments and/or tau=1 overlapped step), for each N",
    )
    o.add_argument("--resume", action="store_true", help="keep finished runs, continue interrupted ones")
    _common(o, "runs/scale-out", workers=False)
    g = sub.add_parser("scaling", help="the compute factor against model size and tokens per parameter")
    g.add_argument("--optimizers", help="SPEC,SPEC,... the first is the baseline (default adamw,snoo-adamw)")
    g.add_argument("--sizes", default="2x64,4x64,4x128", help="LAYERSxWIDTH,... (default 2x64,4x64,4x128)")
    g.add_argument("--tokens-per-param", default="10", help="training tokens per parameter, one or more (default 10)")
    _common(g, "runs/scaling", workers=False, schedule=WSD_SCHEDULE)
    _experiment_flags(g, BUDGETS, seeds=3, ladder="wsd", tune_seeds=2)
    g.takes_specs = True
    rp = sub.add_parser("reproduce", help="test the papers' claims one by one, each with a verdict (docs/reproduce.md)")
    rp.add_argument("claims", nargs="*", metavar="CLAIM", help="claim ids or numbers (default: all; see --list)")
    rp.add_argument("--list", action="store_true", help="print the claims with their sources and stop")
    rp.add_argument(
        "--scale",
        choices=("quick", "cpu", "gpu"),
        default="quick",
        help="quick: a smoke test in seconds, decides nothing; cpu: the laptop run (under an hour); gpu: larger "
        "presets (default quick)",
    )
    rp.add_argument("--seeds", type=int, help="seeds per measurement (default: 1 at quick, 3 at cpu and gpu)")
    rp.add_argument("--out", help="output directory (default runs/reproduce)")
    rp.add_argument("--resume", action="store_true", help="keep finished runs, continue interrupted ones")
    rp.add_argument("--data", help=DATA_HELP.format("see --help"))
    rp.add_argument("--set", action="append", metavar="KEY=VALUE", help="any TrainConfig field, e.g. threads=1")
    r = sub.add_parser("report", help="redraw the tables and plots of a finished compare, sweep, scaling or scale-out")
    r.add_argument("dir")
    return p


def _budgets(text: str, flag: str = "--budgets") -> list[float]:
    try:
        values = [float(b) for b in text.split(",")]
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected numbers like 1,1.5,2") from None
    if not all(0 < v < float("inf") for v in values):  # (nan too)
        raise UsageError(f"{flag} {text!r}: each must be a positive, finite number, like 1,1.5,2")
    return values


def _counts(text: str) -> list[int]:
    try:
        counts = [int(n) for n in text.split(",")]
    except ValueError:
        raise UsageError(f"--workers {text!r}: expected worker counts like 2,4") from None
    if min(counts) < 2:
        raise UsageError(f"--workers {text!r}: each count is 2 or more (the 1-worker runs are always there)")
    return counts


def _finish(summary: dict, out: Path) -> None:
    print((out / "summary.md").read_text(), end="")
    plots = [str(p) for p in sorted(out.glob("*.png"))]
    print(f"\nwrote {', '.join([str(out / 'summary.json'), str(out / 'summary.md'), *plots])}")


def _reproduce(args: argparse.Namespace) -> int:
    from snoo.lab import claims

    if args.list:
        print(claims.describe())
        return 0
    settings: dict[str, Any] = {}
    for item in args.set or []:
        key, eq, value = item.partition("=")
        if not eq:
            raise UsageError(f"--set {item!r}: expected key=value")
        settings[key] = _value(value)
    if args.data:
        settings["data"] = args.data
    out = Path(args.out or "runs/reproduce")
    results = claims.reproduce(
        args.claims, scale=args.scale, seeds=args.seeds, out=out, resume=args.resume, settings=settings
    )
    width = max(len(c) for c in results)
    print("\n" + "\n".join(f"{cid:<{width}}  {r['verdict']}" for cid, r in results.items()))
    print(f"wrote {out / 'report.md'}, {out / 'claims.json'}")
    return 0


def run(argv: list[str] | None = None) -> int:
    _load_torch()  # the parser imports it too (--version, the SPEC names in --help)
    args = parser().parse_args(argv)
    if args.command == "reproduce":
        return _reproduce(args)

    if args.command == "report":
        return _report(Path(args.dir))

    from snoo.lab.launch import run as run_one
    from snoo.lab.workers import World

    if not World.from_env().launched:  # under torchrun the elastic agent stops the ranks on SIGTERM
        _sigterm_stops()
    cfg, extra = _config(args, f"runs/{args.command}")
    if args.command == "train":
        result = run_one(cfg, resume=args.resume)
        if World.from_env().rank != 0:  # under torchrun, rank 0 speaks for the run
            return 0 if result["status"] == "ok" else 1
        if result["status"] != "ok":
            print(f"snoo: {result['message']}", file=sys.stderr)
            return 1
        on = f" on {result['workers']} workers ({result['parallel']})" if result["workers"] > 1 else ""
        print(
            f"{result['spec']}{on}: final val loss {result['final_val_loss']:.4f}, weight norm "
            f"{result['weight_norm']:.2f}, {result['wall_time']:.1f}s; wrote {cfg.out}"
        )
        return 0
    if args.command == "scale-out":
        from snoo.lab.scale_out import run_scale_out

        summary = run_scale_out(
            cfg,
            snoo_spec=args.optimizer or "snoo-adamw",
            baseline=args.baseline or "adamw",
            worker_counts=_counts(args.worker_counts),
            bandwidth=args.bandwidth,
            resume=args.resume,
        )
        _finish(summary, Path(cfg.out))
        return 0
    _finish(_experiment(args, cfg, extra), Path(cfg.out))
    return 0


def _report(out: Path) -> int:
    """``snoo report DIR``: the summary written again; a directory that cannot be written: its summary as it is."""
    from snoo.lab.report import summarize

    if out.is_dir() and not os.access(out, os.W_OK) and (out / "summary.md").exists():
        print(f"snoo: {out} cannot be written: its summary as written when it finished", file=sys.stderr)
        print((out / "summary.md").read_text(), end="")
        return 0
    _finish(summarize(out), out)
    return 0


def _experiment(args: argparse.Namespace, cfg: TrainConfig, extra: dict[str, Any]) -> dict:
    """``snoo compare``, ``snoo sweep`` or ``snoo scaling``: its summary."""
    from snoo import spec
    from snoo.lab import experiments
    from snoo.lab.config import TrainConfig

    if args.ladder == "wsd" and args.schedule not in (None, "wsd"):
        raise UsageError(
            f"--schedule {args.schedule}: the wsd ladder trains every run on the wsd schedule; for another schedule "
            "give --ladder cosine too"
        )
    common = dict(
        seeds=args.seeds,
        budgets=_budgets(args.budgets),
        tune_baseline=args.tune_baseline,
        tune_trials=args.tune,
        tune_seeds=args.tune_seeds,
        tune_widen=args.tune_widen,
        ladder=args.ladder,
        resume=args.resume,
        processes=args.jobs,
    )
    if args.command == "scaling":
        if args.tune_baseline:
            raise UsageError("scaling tunes with --tune N (every contender, every point), not --tune-baseline")
        from snoo.lab import scaling

        derived = [f"--set {k}" for k in scaling.SCALING_DERIVED if any(s.startswith(f"{k}=") for s in args.set or [])]
        if derived or args.steps is not None:
            raise UsageError(
                f"scaling sets each point's steps from --tokens-per-param, and its eval_every, ckpt_every and "
                f"log_every from its steps: {(['--steps'] if args.steps is not None else derived)[0]} cannot be given"
            )
        del common["tune_baseline"]
        return scaling.run_scaling(
            cfg,
            spec.split_list(args.optimizers or "adamw,snoo-adamw"),
            sizes=scaling.parse_sizes(args.sizes),
            tokens_per_param=_budgets(args.tokens_per_param, "--tokens-per-param"),
            **common,
        )
    if args.command == "compare":
        # the preset's optimizer (the compare preset's AdamW has its tuned lr), and SNOO around it
        listed = args.optimizers or extra.get("optimizers") or f"{cfg.optimizer},snoo+{cfg.optimizer}"
        optimizers = spec.split_list(listed) if isinstance(listed, str) else [spec.from_config(o) for o in listed]
        if len(optimizers) < 2:
            raise UsageError("--optimizers needs at least two SPECs: the baseline first, then the others")
        return experiments.run_experiment("compare", cfg, optimizers, **common)
    sweep_spec = args.optimizer or (cfg.optimizer if cfg.optimizer != TrainConfig.optimizer else "snoo-adamw")
    grid_text = args.grid or extra.get("grid")
    if not grid_text:
        raise UsageError("sweep needs --grid, e.g. --grid 'k=10,20,50 lr=0.3,0.5,0.7'")
    points = spec.grid(sweep_spec, grid_text)
    grid = {o: settings for settings, o in points}
    cfg = dataclasses.replace(cfg, optimizer=sweep_spec)
    return experiments.run_experiment("sweep", cfg, [spec.base(sweep_spec), *grid], grid=grid, **common)


def _load_torch() -> None:
    """Import torch with Ctrl-C held back until it has loaded, then raise it as the one-line interruption.

    A ``KeyboardInterrupt`` raised inside torch's import can be swallowed by it (the run then goes on as if nothing
    had been pressed) or abort the process from C++ (``pybind11::error_already_set``); held back, it costs the rest
    of the import, a second or so."""
    if "torch" in sys.modules:
        return
    pressed: list[int] = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: pressed.append(signum))
        held = True
    except ValueError:  # not the main thread (main() called from a thread): nothing can be held back
        held = False
    try:
        import torch  # noqa: F401
    finally:
        if held:
            signal.signal(signal.SIGINT, previous)
    if pressed:
        raise KeyboardInterrupt


class Terminated(BaseException):
    """SIGTERM outside a run's training loop (where it is :class:`snoo.lab.train.Stopped` instead)."""


def _sigterm_stops() -> None:
    """From here on SIGTERM raises :class:`Terminated` (``main`` restores the handler it found): the runs in flight
    save their checkpoints at their current step, and the command ends with one line and status 143."""

    def stop(signum: int, frame: object) -> None:
        raise Terminated

    with contextlib.suppress(ValueError):  # not the main thread: SIGTERM keeps its default
        signal.signal(signal.SIGTERM, stop)


def main(argv: list[str] | None = None) -> int:
    found = signal.getsignal(signal.SIGTERM)  # the handler to restore: main may be called in a process that has one
    try:
        return run(argv)
    except KeyboardInterrupt:
        if os.environ.get("SNOO_DEBUG"):
            raise
        print("snoo: interrupted: the last checkpoint is kept; continue with --resume", file=sys.stderr)
        return 130
    except Terminated:
        print(
            "snoo: stopped by SIGTERM: every run in flight saved its checkpoint at its current step; continue with "
            "--resume",
            file=sys.stderr,
        )
        return 143
    except Exception as e:
        status = _status(e)
        if status is None or (status == 2 and os.environ.get("SNOO_DEBUG")):
            raise
        return status
    except BaseException as e:
        train = sys.modules.get("snoo.lab.train")
        if train is None or not isinstance(e, train.Stopped):
            raise
        print(f"snoo: {e}", file=sys.stderr)  # one run in this process, checkpointed at its step
        return 143
    finally:
        if found is not None:
            with contextlib.suppress(ValueError):  # not the main thread: nothing was set
                signal.signal(signal.SIGTERM, found)


def _status(e: Exception) -> int | None:
    """Print the one line for ``e`` and return the exit status; None: a bug, whose traceback is shown."""
    # the lab's own exceptions, if their modules were imported at all (not for a bad command line)
    train, launch = sys.modules.get("snoo.lab.train"), sys.modules.get("snoo.lab.launch")
    if train is not None and isinstance(e, train.Diverged):  # an experiment with nothing left to compare against
        print(f"snoo: {e}", file=sys.stderr)
        return 1
    if launch is not None and isinstance(e, launch.LaunchFailed):  # a rank died or hung; torchrun stopped the others
        print(f"snoo: error: {e}", file=sys.stderr)
        return e.status
    if isinstance(e, (UsageError, ValueError, OSError, ImportError)):  # OSError: a full disk, a read-only place, ...
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"snoo: error: {message}", file=sys.stderr)
        return 2
    return None


if __name__ == "__main__":
    sys.exit(main())
