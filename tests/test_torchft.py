"""SNOO on torchft (snoo.integrations.torchft), tested the way torchft tests itself: replicas as real processes on
gloo around a lighthouse in this process, with failures injected at given inner steps: a replica killed (SIGKILL)
mid-window and restarted, an all-reduce made to fail, a replica that joins late. After each: every replica that reached
committed outer step n holds the same slow weights, momentum and fast weights there (the healed ones included), so no
outer step was committed twice with different content; and the run matches DiLoCo's equations where nothing failed.
docs/distributed.md quotes the recovery times these tests print (pytest -s)."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import snoo
from helpers import WithRareParameter as Net
from test_distributed import LR, OUTER, STEPS, K, loss_of, simulated_diloco

pytest.importorskip("torchft", reason="torchft publishes wheels for Linux x86_64 only (pip install 'snoo-optim[ft]')")

from snoo.integrations.torchft import FaultTolerantSNOO, lighthouse

#: each scenario's processes must finish within this; a hang fails the test instead of blocking CI
TIMEOUT = 90
#: how long the lighthouse waits for a replica's heartbeat before it leaves it out of the next quorum
HEARTBEAT_TIMEOUT_MS = 1000


# -- one replica: `python tests/test_torchft.py ARGS_JSON` ----------------------------------------------------------


def replica(replica_id: int, lighthouse_addr: str, directory: Path, outer_steps: int, faults: dict) -> None:
    """Train replica ``replica_id`` until ``outer_steps`` outer steps are committed; save what it saw after each."""
    from datetime import timedelta

    import torch.distributed as dist
    from torchft import Manager, ProcessGroupGloo

    class FailingGloo(ProcessGroupGloo):
        """torchft's gloo group whose next all-reduce raises on this replica once the data has moved (so the
        others' all-reduce completes): the Manager records the error and this replica's vote fails."""

        fail_next = False

        def allreduce(self, tensors, opts):
            work = super().allreduce(tensors, opts)
            if self.fail_next:
                self.fail_next = False
                work.wait()
                raise RuntimeError("injected all-reduce failure")
            return work

    started = float(faults.get("started", time.time()))
    store = dist.TCPStore("localhost", 0, is_master=True, wait_for_workers=False)
    pg = FailingGloo(timeout=timedelta(seconds=10))
    manager = Manager(
        pg=pg,
        load_state_dict=None,
        state_dict=None,
        min_replica_size=1,
        use_async_quorum=False,
        replica_id=f"replica_{replica_id}",
        store_addr="localhost",
        store_port=store.port,
        rank=0,
        world_size=1,
        lighthouse_addr=lighthouse_addr,
        timeout=timedelta(seconds=10),
        quorum_timeout=timedelta(seconds=40),
        connect_timeout=timedelta(seconds=10),
        heartbeat_interval=timedelta(milliseconds=50),
    )
    model = Net()
    if replica_id:  # a different start: the first quorum (init_sync) gives every replica replica 0's weights
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * replica_id)
    inner = torch.optim.AdamW(model.parameters(), lr=LR)
    # this replica asks for its first quorum right after this; with "barrier", no replica does before all are here
    (directory / f"ready-{replica_id}-{faults.get('incarnation', 0)}").touch()
    while "barrier" in faults and not (directory / "go").exists():
        time.sleep(0.05)
    opt = FaultTolerantSNOO(inner, manager, **OUTER)
    params = list(model.parameters())

    def snapshot(**record) -> dict:
        return {
            **record,
            "time": time.time(),
            "fast": [p.detach().clone() for p in params],
            "slow": [opt.state[p]["slow"].clone() for p in params] if opt.state else None,
            "momentum": [opt.state[p]["momentum"].clone() for p in params] if opt.state else None,
        }

    records = [snapshot(outer_step=manager.current_step(), healed=opt.heals > 0, initial=True)]
    while manager.current_step() < outer_steps:
        t = opt._inner_steps
        if faults.get("kill_at") == t:
            os.kill(os.getpid(), signal.SIGKILL)
        if faults.get("fail_allreduce_at") == t:
            pg.fail_next = True
        loss_of(model, t, replica_id).backward()
        opt.step()
        opt.zero_grad()
        if opt._inner_steps % K == 0:
            records.append(snapshot(**opt.outer_steps[-1]))
            if faults.get("wait_for") and faults["wait_for"][0] == manager.current_step():
                # the harness's pacing: train on once the replica named there asks for a quorum (the lighthouse
                # forms a quorum of the last one's members at once when they all ask, without a newcomer that
                # asks later)
                while not (directory / faults["wait_for"][1]).exists():
                    time.sleep(0.05)
                time.sleep(1)
    torch.save(
        {"records": records, "started": started, "discarded": opt.discarded_windows, "heals": opt.heals},
        directory / f"replica{replica_id}-{faults.get('incarnation', 0)}.pt",
    )
    manager.shutdown(wait=False)


# -- the harness ----------------------------------------------------------------------------------------------------


class Replicas:
    """Replica processes around one lighthouse; everything they save is in ``directory``."""

    def __init__(self, directory: Path, outer_steps: int) -> None:
        self.directory = directory
        self.outer_steps = outer_steps
        self.lighthouse = lighthouse(min_replicas=1, join_timeout_ms=30_000, heartbeat_timeout_ms=HEARTBEAT_TIMEOUT_MS)
        self.procs: list[subprocess.Popen] = []
        self.logs: dict[subprocess.Popen, Path] = {}
        self.deadline = time.monotonic() + TIMEOUT

    def start(self, replica_id: int, **faults) -> subprocess.Popen:
        args = [replica_id, self.lighthouse.address(), str(self.directory), self.outer_steps, faults]
        log = self.directory / f"replica{replica_id}-{faults.get('incarnation', 0)}.log"
        with log.open("w") as sink:  # torchft logs a lot: a pipe nobody reads would block the replica
            proc = subprocess.Popen(
                [sys.executable, __file__, json.dumps(args)],
                stdout=sink,
                stderr=subprocess.STDOUT,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )
        self.procs.append(proc)
        self.logs[proc] = log
        return proc

    def start_together(self, replica_ids: list[int], **faults: dict) -> list[subprocess.Popen]:
        procs = [self.start(r, barrier=True, **faults.get(str(r), {})) for r in replica_ids]
        while not all((self.directory / f"ready-{r}-0").exists() for r in replica_ids):
            self.check_time()
            time.sleep(0.05)
        (self.directory / "go").touch()
        return procs

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise TimeoutError(f"the replicas did not finish within {TIMEOUT} s")

    def wait(self, proc: subprocess.Popen) -> int:
        while proc.poll() is None:
            self.check_time()
            time.sleep(0.05)
        return proc.returncode

    def finish(self) -> None:
        for proc in self.procs:
            code = self.wait(proc)
            assert code in (0, -signal.SIGKILL), f"a replica failed ({code}):\n{self.logs[proc].read_text()[-3000:]}"

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()
        self.lighthouse.shutdown()

    def load(self, replica_id: int, incarnation: int = 0) -> dict:
        return torch.load(self.directory / f"replica{replica_id}-{incarnation}.pt", weights_only=False)


@pytest.fixture
def replicas(tmp_path):
    made = []

    def make(outer_steps: int) -> Replicas:
        made.append(Replicas(tmp_path, outer_steps))
        return made[-1]

    yield make
    for r in made:
        r.close()


def check_consistent(runs: dict[str, dict], outer_steps: int) -> dict[int, dict]:
    """Every record of every replica at committed outer step n holds the same slow weights, momentum and fast weights
    (so step n was committed once, with one content); each replica's count of committed steps grows by one per
    committed vote and not otherwise. Returns one record per outer step."""
    at: dict[int, dict] = {}
    for name, run in runs.items():
        last = None
        for rec in run["records"]:
            if not rec.get("initial"):
                assert rec["outer_step"] == last + (1 if rec["committed"] else 0) or rec["healed"], (name, rec)
            last = rec["outer_step"]
            if rec["slow"] is None:  # before the first step: no state yet
                continue
            ref = at.setdefault(rec["outer_step"], rec)
            for key in ("slow", "momentum", "fast"):
                for a, b in zip(rec[key], ref[key]):
                    assert torch.equal(a, b), f"{name} differs in {key} at outer step {rec['outer_step']}"
        assert last == outer_steps, name
    assert sorted(at) == list(range(1, outer_steps + 1))
    return at


def report(name: str, **numbers) -> None:
    print(f"\n[torchft {name}] " + ", ".join(f"{k}={v}" for k, v in numbers.items()))


# -- tests ------------------------------------------------------------------------------------------------------------


@pytest.fixture
def one_replica():
    """A Manager of one replica in this process, around a lighthouse of its own: ``make(**manager_kwargs)``."""
    from datetime import timedelta

    import torch.distributed as dist
    from torchft import Manager, ProcessGroupGloo

    made = []
    house = lighthouse(min_replicas=1)

    def make(**kwargs) -> Manager:
        store = dist.TCPStore("localhost", 0, is_master=True, wait_for_workers=False)
        manager = Manager(
            pg=ProcessGroupGloo(timeout=timedelta(seconds=10)),
            load_state_dict=None,
            state_dict=None,
            min_replica_size=1,
            **{"use_async_quorum": False, "timeout": timedelta(seconds=10), **kwargs},
            replica_id="solo",
            store_addr="localhost",
            store_port=store.port,
            rank=0,
            world_size=1,
            lighthouse_addr=house.address(),
        )
        made.append((manager, store))
        return manager

    yield make
    for manager, _ in made:
        manager.shutdown(wait=False)
    house.shutdown()


def test_one_replica_is_snoo_bit_for_bit(one_replica):
    """The mean over a quorum of one is the pseudo-gradient itself: the same outer steps as SNOO, schedule and the
    parameter that some steps do not touch included."""
    from snoo.optim.schedules import cosine

    outer = {"k": K, "lr": cosine(0.7, 0.2, STEPS), "momentum": 0.5, "track_norms": True}
    model, reference = Net(), Net()
    opt = FaultTolerantSNOO(torch.optim.AdamW(model.parameters(), lr=LR), one_replica(), **outer)
    ref = snoo.SNOO(torch.optim.AdamW(reference.parameters(), lr=LR), **outer)
    for t in range(STEPS):
        for m, o in ((model, opt), (reference, ref)):
            loss_of(m, t, 0).backward()
            o.step()
            o.zero_grad()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["slow"], ref.state[q]["slow"])
        assert torch.equal(opt.state[p]["momentum"], ref.state[q]["momentum"])
    assert torch.equal(opt.outer_norms["pseudo_grad"], ref.outer_norms["pseudo_grad"])
    assert [rec["outer_step"] for rec in opt.outer_steps] == [1, 2, 3]
    assert all(rec["committed"] and rec["replicas"] == 1 for rec in opt.outer_steps)
    assert opt.communicated_bytes > 0 and opt.discarded_windows == 0


def test_a_failed_vote_throws_the_window_away(one_replica):
    """An error reported to the Manager in a window (what a failed all-reduce does) fails its vote: the slow weights
    and momentum stay, the fast weights restart from the slow ones, and the next window commits."""
    model = Net()
    manager = one_replica()
    opt = FaultTolerantSNOO(torch.optim.AdamW(model.parameters(), lr=LR), manager, k=K)
    for t in range(2 * K):
        if t == 2 * K - 1:
            before = [(opt.state[p]["slow"].clone(), opt.state[p]["momentum"].clone()) for p in model.parameters()]
            manager.report_error(RuntimeError("lost a peer"))
        loss_of(model, t, 0).backward()
        opt.step()
        opt.zero_grad()
    assert [rec["committed"] for rec in opt.outer_steps] == [True, False]
    assert manager.current_step() == 1 and opt.discarded_windows == 1
    for p, (slow, momentum) in zip(model.parameters(), before):
        assert torch.equal(opt.state[p]["slow"], slow) and torch.equal(opt.state[p]["momentum"], momentum)
        assert torch.equal(p, slow)
    for t in range(2 * K, 3 * K):
        loss_of(model, t, 0).backward()
        opt.step()
        opt.zero_grad()
    assert opt.outer_steps[-1]["committed"] and manager.current_step() == 2


def test_bad_arguments_are_refused_clearly(one_replica, monkeypatch):
    params = list(Net().parameters())
    with pytest.raises(TypeError, match=r"torchft\.Manager"):
        FaultTolerantSNOO(torch.optim.AdamW(params), object())
    with pytest.raises(ValueError, match="use_async_quorum=False"):
        FaultTolerantSNOO(torch.optim.AdamW(params), one_replica(use_async_quorum=True))
    with pytest.raises(ValueError, match=r"leave them at 1, 0, 1\.0"):
        FaultTolerantSNOO(torch.optim.AdamW(params), one_replica(), fragments=2)
    with pytest.raises(ValueError, match="leave compression_block unset"):
        FaultTolerantSNOO(torch.optim.AdamW(params), one_replica(), compression_block=64)
    monkeypatch.setitem(sys.modules, "torchft", None)
    with pytest.raises(ImportError, match=r"pip install 'snoo-optim\[ft\]'"):
        FaultTolerantSNOO(torch.optim.AdamW(params), object())


def test_a_replica_killed_mid_window_is_restarted_and_healed(replicas):
    """Replica 1 starts from other weights, which the first quorum replaces by replica 0's (init_sync); the first
    3 windows are DiLoCo from its equations (test_distributed's simulation, which also leaves a parameter no replica
    touched alone). Then replica 1 dies (SIGKILL) in the middle of window 4: replica 0's all-reduce fails, the vote
    throws the window away, the next quorum leaves replica 1 out and replica 0 trains on alone; the restarted
    replica 1 heals from it."""
    clean = STEPS // K
    outer_steps, kill_at = clean + 5, clean * K + 1
    run = replicas(outer_steps)
    # replica 0 trains on alone for a window, then waits until the restarted replica 1 is up
    wait = {"wait_for": [clean + 1, "ready-1-1"]}
    _, victim = run.start_together([0, 1], **{"0": wait, "1": {"kill_at": kill_at}})
    assert run.wait(victim) == -signal.SIGKILL
    restarted_at = time.time()
    run.start(1, incarnation=1, started=restarted_at)
    run.finish()
    runs = {"replica 0": run.load(0), "replica 1 (restarted)": run.load(1, 1)}
    at = check_consistent(runs, outer_steps)
    fast, slow = simulated_diloco(2)
    for got, want in zip(at[clean]["slow"], slow):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    for got, want in zip(at[clean]["fast"], fast):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    survivor = runs["replica 0"]["records"][1:]
    assert all(rec["replicas"] == 2 for rec in survivor[: clean + 1])
    discarded = [rec for rec in survivor if not rec["committed"]]
    assert len(discarded) == 1 and discarded[0]["inner_step"] == (clean + 1) * K  # the window in flight, no other
    assert discarded[0]["outer_step"] == clean
    healed = runs["replica 1 (restarted)"]["records"][0]
    assert healed["healed"] and healed["outer_step"] >= clean + 1
    alone = [rec for rec in survivor if rec["committed"] and rec["replicas"] == 1]
    assert alone and alone[0]["outer_step"] == clean + 1  # the survivor went on alone after the failed window
    # the healed replica's counters are the survivor's: its next window ends where the survivor's does
    assert runs["replica 1 (restarted)"]["records"][1]["inner_step"] % K == 0
    assert runs["replica 1 (restarted)"]["records"][-1]["replicas"] == 2
    pause = discarded[0]["seconds"]
    assert pause < 10  # all-reduce error, vote, and a quorum without the dead replica
    report(
        "kill",
        survivor_pause_s=round(pause, 2),
        normal_outer_step_s=round(min(rec["seconds"] for rec in survivor if rec["committed"]), 3),
        restart_to_healed_s=round(healed["time"] - restarted_at, 2),
        steps_lost_by_survivor=K * len(discarded),
        steps_lost_by_victim=kill_at - clean * K,
        healed_at_outer_step=healed["outer_step"],
    )


def test_three_replicas_a_failed_all_reduce_and_a_late_joiner(replicas):
    """Replica 1's all-reduce fails at the end of window 2: it votes no and throws the window away while replicas 0
    and 2 commit, and it heals from them at the next quorum. Replica 2 starts late and heals when it joins."""
    outer_steps = 5
    run = replicas(outer_steps)
    # replicas 0 and 1 wait after window 2 until replica 2 is up, so that it joins in the middle of the run
    wait = {"wait_for": [2, "ready-2-0"]}
    run.start_together([0, 1], **{"0": wait, "1": {**wait, "fail_allreduce_at": 2 * K - 1}})
    joined_at = time.time()
    run.start(2, started=joined_at)
    run.finish()
    runs = {f"replica {r}": run.load(r) for r in range(3)}
    check_consistent(runs, outer_steps)
    late = runs["replica 2"]["records"][0]
    assert late["healed"] and late["outer_step"] == 3
    voted_no = [rec for rec in runs["replica 1"]["records"][1:] if not rec["committed"]]
    assert len(voted_no) == 1 and voted_no[0]["inner_step"] == 2 * K
    # healed right away by the next quorum: its count of committed steps is the others'
    assert voted_no[0]["healed"] and voted_no[0]["outer_step"] == 2
    assert runs["replica 1"]["discarded"] == 1 and runs["replica 0"]["discarded"] == 0
    assert runs["replica 0"]["records"][-1]["replicas"] == 3
    # who was in each quorum: every replica that averaged in it says how many did
    members: dict[int, set] = {}
    for name, r in runs.items():
        for rec in r["records"][1:]:
            members.setdefault(rec["quorum_id"], set()).add(name)
    for name, r in runs.items():
        for rec in r["records"][1:]:
            assert rec["replicas"] == len(members[rec["quorum_id"]]), (name, rec["quorum_id"], members)
    sizes = [len(members[q]) for q in sorted(members)]
    assert sizes[0] == 2 and sizes[-1] == 3, members  # {0, 1} (re-formed after the failed vote), then {0, 1, 2}
    report("three", late_join_to_healed_s=round(late["time"] - joined_at, 2), healed_at_outer_step=late["outer_step"])


# -- the lab: snoo train --workers N --set fault_tolerant=on ----------------------------------------------------------


def test_fault_tolerant_settings_are_checked(tmp_path):
    from snoo.lab import config, launch

    with pytest.raises(ValueError, match="set workers > 1"):
        config.validate(config.make_config("tiny", fault_tolerant="on"))
    with pytest.raises(ValueError, match="not ddp"):
        config.validate(config.make_config("tiny", workers=2, parallel="ddp", fault_tolerant="on"))
    with pytest.raises(ValueError, match="cannot --resume"):
        ft = config.make_config("tiny", workers=2, optimizer="snoo+adamw", fault_tolerant="on", out=str(tmp_path))
        launch.run(ft, resume=True)


def test_the_lab_restarts_a_rank_that_dies_and_it_heals(tmp_path, corpus_file):
    """`snoo train --workers 2 --set fault_tolerant=on`: rank 1 exits in window 3; rank 0 throws that window away and
    goes on alone; the launching process restarts rank 1, which heals from rank 0 and averages with it again.
    metrics.jsonl says who averaged at each outer step and how each vote went."""
    from snoo.lab import checkpoint

    out, k, steps = tmp_path / "run", 6, 480  # long enough for a restarted rank to start on a busy machine
    done = subprocess.run(
        [
            *(sys.executable, "-m", "snoo", "train", "--preset", "tiny", "--data", corpus_file, "--out", str(out)),
            *("--no-progress", "--workers", "2", "--steps", str(steps), "--optimizer", f"snoo(k={k})+adamw"),
            *("--set", "fault_tolerant=on"),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "OMP_NUM_THREADS": "1", "SNOO_LAB_FAULT": "1:13"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "ok" and result["restarts"] == {"0": 0, "1": 1} and result["stopped"] == {}
    quorums = [m["quorum"] for m in checkpoint.read_metrics(out / "metrics.jsonl") if "quorum" in m]
    assert [q["inner_step"] for q in quorums] == list(range(k, steps + 1, k))
    assert [q["committed"] for q in quorums].count(False) == 1 and not quorums[2]["committed"]  # steps 13-18
    assert [q["outer_step"] for q in quorums] == list(itertools.accumulate(int(q["committed"]) for q in quorums))
    assert [q["replicas"] for q in quorums[:3]] == [2, 2, 2]  # the failed window was averaged over 2
    # how many windows rank 0 trains alone depends on how fast rank 1 restarts on this machine (none or a few)
    assert all(q["replicas"] in (1, 2) for q in quorums[3:])
    assert quorums[-1]["replicas"] == 2  # the restarted rank healed and averages again
    pause = quorums[2]["seconds"]
    back = next(i for i, q in enumerate(quorums) if i > 2 and q["replicas"] == 2)
    report("lab", pause_s=round(pause, 2), rank_1_back_after_outer_steps=back - 2, steps_lost=k)
    assert not list(out.glob("ckpt*"))  # no checkpoints: a restarted rank heals from the live one


if __name__ == "__main__":
    replica_id, address, directory, steps, faults = json.loads(sys.argv[1])
    replica(replica_id, address, Path(directory), steps, faults)
