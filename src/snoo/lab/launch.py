"""Where a run runs: in this process, or on ``workers`` ranks under torchrun, with the rank entry point.

``run(cfg)`` trains in this process when ``cfg.workers`` is 1 (or when this process is already a torchrun rank:
``torchrun --nproc-per-node N -m snoo.lab.cli train ...``). With ``workers = N`` it claims ``OUT``, checks what a
resume needs, writes ``OUT/launch.json`` and starts N ranks with torchrun, each running ``python -m snoo.lab.launch
OUT/launch.json``; rank 0 writes the run's files. See docs/distributed.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from snoo.lab import checkpoint, workers
from snoo.lab.config import TrainConfig, identity, validate
from snoo.lab.data import fingerprint
from snoo.lab.train import train
from snoo.lab.workers import World


class LaunchFailed(RuntimeError):
    """The processes of a launched run (torchrun's ranks, or the workers of ``--jobs``) stopped before its end;
    ``status`` is the exit status to give (torchrun's)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def run(
    cfg: TrainConfig, *, resume: bool = False, snapshots: Sequence[int] = (), start_from: Path | None = None
) -> dict:
    """Train ``cfg`` here, or on its ``workers`` ranks; return what ``result.json`` holds. ``snapshots`` and
    ``start_from``: see :func:`snoo.lab.train.train` (one process only)."""
    validate(cfg)
    if cfg.workers == 1 or World.from_env().launched:
        return train(cfg, resume=resume, snapshots=snapshots, start_from=start_from)
    if snapshots or start_from is not None:
        raise ValueError("snapshots and start_from are for runs in one process, not on several workers")
    if resume and cfg.fault_tolerant == "on":
        raise ValueError(
            "a fault-tolerant run writes no checkpoint (a restarted rank heals from the live ones), so it cannot "
            "--resume: start it again"
        )
    out = Path(cfg.out)
    with checkpoint.claimed(out, fresh=not resume):  # held while the ranks run
        if resume:
            checkpoint.check_kind(cfg)
            found = checkpoint.latest_sharded(out)
            if found is not None:  # here, before any rank starts
                run_id = identity(cfg, fingerprint(cfg.data))
                checkpoint.check_same_run(found, checkpoint.read_progress(found).get("run"), run_id)
        return _launch_replicas(cfg) if cfg.fault_tolerant == "on" else _launch(cfg, resume=resume)


def _launch(cfg: TrainConfig, *, resume: bool) -> dict:
    """Train ``cfg`` on ``cfg.workers`` ranks of this machine under torchrun; return rank 0's ``result.json``.

    The config travels whole in ``OUT/launch.json``. torchrun stops every rank when one fails; then this raises
    :class:`LaunchFailed` with what to do next (unless rank 0 wrote a result, e.g. of a diverged run).
    """
    out = Path(cfg.out)
    request = out / "launch.json"
    checkpoint.write_json({"config": dataclasses.asdict(cfg), "resume": resume}, request)
    result = out / "result.json"
    result.unlink(missing_ok=True)  # what is there now is from an earlier run
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={cfg.workers}"),
        f"--max-restarts={cfg.max_restarts}",
        *("-m", "snoo.lab.launch", str(request)),
    ]
    # torchrun sets one thread per rank anyway, and says so unless asked
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.Popen(command, env=env)
    try:
        status = proc.wait()
    except BaseException:  # Ctrl-C: torchrun stops its ranks on SIGTERM
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
    if result.exists():
        return json.loads(result.read_text())
    found = checkpoint.latest_sharded(out)
    then = (
        f"the last checkpoint is {found} (step {checkpoint.read_progress(found)['step']}): continue with --resume"
        if found
        else "no checkpoint was written yet: start it again"
    )
    raise LaunchFailed(
        f"the run on {cfg.workers} ranks stopped before its end (torchrun exit status {status}; the ranks' "
        f"messages are above): {then}",
        status or 1,
    )


#: how many times a fault-tolerant run restarts each of its ranks before it gives up
RESTARTS = 3
#: the exit status of a rank that refused its settings (``main``)
USAGE = 2


def _launch_replicas(cfg: TrainConfig) -> dict:
    """Train ``cfg`` on ``cfg.workers`` torchft replicas of this machine, one process each; return rank 0's
    ``result.json`` with ``restarts`` (how many times each rank was restarted) added.

    This process runs torchft's lighthouse and each replica group's store, and restarts a rank that stops before
    the end (up to :data:`RESTARTS` times each); the restarted rank heals from the live ones, which go on without it
    meanwhile. torchrun cannot do this: its agent stops or restarts every rank when one fails.
    """
    import torch.distributed as dist

    from snoo.integrations.torchft import lighthouse

    out = Path(cfg.out)
    request = out / "launch.json"
    request.write_text(json.dumps({"config": dataclasses.asdict(cfg), "resume": False}, indent=2) + "\n")
    result = out / "result.json"
    result.unlink(missing_ok=True)
    # a quorum waits up to dist_timeout for the replicas that heartbeat: a restarted rank waits for the others' window
    house = lighthouse(min_replicas=1, join_timeout_ms=int(cfg.dist_timeout * 1000))
    # one store per replica group (its Manager's), and one where the ranks meet before the first quorum
    stores = [dist.TCPStore("localhost", 0, is_master=True, wait_for_workers=False) for _ in range(cfg.workers + 1)]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "WORLD_SIZE": str(cfg.workers),
        "TORCHFT_LIGHTHOUSE": house.address(),
        "MASTER_ADDR": "localhost",
        workers.START_ENV: str(stores[-1].port),
    }

    def start(rank: int) -> subprocess.Popen:
        ranked = {"RANK": str(rank), "LOCAL_RANK": str(rank), "MASTER_PORT": str(stores[rank].port)}
        ranked[workers.RESTARTED_ENV] = str(int(restarts[rank] > 0))
        return subprocess.Popen([sys.executable, "-m", "snoo.lab.launch", str(request)], env={**env, **ranked})

    restarts, stopped, ended = dict.fromkeys(range(cfg.workers), 0), {}, False
    procs = {rank: start(rank) for rank in range(cfg.workers)}
    try:
        while procs and USAGE not in stopped.values():
            time.sleep(0.1)
            for rank, proc in list(procs.items()):
                status = proc.poll()
                if status is None:
                    continue
                del procs[rank]
                ended = ended or status == 0  # the run is over: a rank that stops now is not restarted
                if status == 0:
                    continue
                if ended or restarts[rank] == RESTARTS or status == USAGE:  # USAGE: it refused its settings
                    stopped[rank] = status  # the others go on without it
                    continue
                print(f"snoo: rank {rank} stopped (exit status {status}): restarting it", file=sys.stderr)
                restarts[rank] += 1
                procs[rank] = start(rank)
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            proc.wait()
        house.shutdown()
    if result.exists():
        ranks = {"restarts": restarts, "stopped": stopped}
        done = {**json.loads(result.read_text()), **{k: {str(r): n for r, n in v.items()} for k, v in ranks.items()}}
        checkpoint.write_json(done, result)
        return done
    raise LaunchFailed(
        f"the fault-tolerant run on {cfg.workers} ranks stopped before its end: rank 0 wrote no result (exit "
        f"statuses of the ranks that stopped: {stopped}; restarts: {restarts}; their messages are above); start it "
        f"again",
        stopped.get(0) or 1,
    )


def main(argv: list[str] | None = None) -> int:
    """What torchrun runs on each rank of a launched run: ``python -m snoo.lab.launch OUT/launch.json``."""
    (path,) = sys.argv[1:] if argv is None else argv
    request = json.loads(Path(path).read_text())
    rank = World.from_env().rank
    # torchrun restarted every rank after one died (max_restarts): continue from the last checkpoint
    restarted = int(os.environ.get(workers.RESTART_ENV, "0")) > 0
    try:
        # the launching process holds OUT's lock and checked the directory
        result = train(TrainConfig(**request["config"]), resume=request["resume"] or restarted, claim=False)
    except (ValueError, OSError, ImportError, RuntimeError) as e:
        if os.environ.get("SNOO_DEBUG"):
            raise
        print(f"snoo: rank {rank}: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 1 if isinstance(e, RuntimeError) else USAGE
    if result["status"] != "ok":
        if rank != 0:  # rank 0's message is in result.json, which the launching process reports
            print(f"snoo: rank {rank}: {result['message']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
