"""SNOO on torch.distributed, with 2 and 4 gloo processes on the CPU.

Each test launches this file as a script once per rank (``python test_distributed.py SCENARIO RANK WORLD DIR``); the
ranks meet through a file store in DIR, train, and save what they end with there. The test then checks it against a
single process: plain SNOO, or a simulation of DiLoCo written from its equations.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import torch

import snoo
from helpers import WithRareParameter as Net

K, STEPS, LR = 4, 12, 1e-2
OUTER = {"k": K, "lr": 0.7, "momentum": 0.5}


def batch(t: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * rank + t)
    return torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)


def loss_of(model: torch.nn.Module, t: int, rank: int, rare_ranks: tuple[int, ...] = (0,)) -> torch.Tensor:
    """The loss of rank `rank` at step t; the ranks in `rare_ranks` use the rare parameter at one step per cycle.
    (FSDP2 needs every rank to use the same parameters at each step, so its runs pass both ranks.)"""
    x, y = batch(t, rank)
    return (model(x, rank in rare_ranks and t % K == 1) - y).square().mean()


# -- the ranks ------------------------------------------------------------------------------------------------------


def worker(scenario: str, rank: int, world: int, directory: Path) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{directory}/store-{scenario}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    model = Net()
    data_rank = 0 if scenario == "diloco-same-data" else rank
    if scenario.startswith("diloco"):
        reduce_dtype = torch.bfloat16 if scenario == "diloco-bf16" else None
        inner = torch.optim.AdamW(model.parameters(), lr=LR)
        opt = snoo.SNOO(inner, **OUTER, process_group=dist.group.WORLD, reduce_dtype=reduce_dtype)
    elif scenario == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        opt = snoo.SNOO(torch.optim.AdamW(model.parameters(), lr=LR), **OUTER)
    elif scenario.startswith("fsdp") or scenario == "hsdp-reshard":
        from torch.distributed.fsdp import fully_shard

        fully_shard(model.body[0])
        fully_shard(model.body[2])
        fully_shard(model)
        opt = snoo.SNOO(torch.optim.AdamW(model.parameters(), lr=LR), **OUTER)
    elif scenario == "hsdp":  # DiLoCo over 2 replica groups, FSDP2 inside each: mesh (replicate 2, shard 2)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
        data_rank = mesh.get_local_rank("replicate")  # the two ranks of a group read the same batches
        for module in (model.body[0], model.body[2], model):
            fully_shard(module, mesh=mesh["shard"])
        inner = torch.optim.AdamW(model.parameters(), lr=LR)
        # the pseudo-gradients of each rank's shard are averaged with the same shard of the other group
        opt = snoo.SNOO(inner, **OUTER, process_group=mesh["replicate"].get_group())
    elif scenario == "rank-dies":
        opt = snoo.SNOO(torch.optim.AdamW(model.parameters(), lr=LR), **OUTER, process_group=dist.group.WORLD)
    else:
        raise ValueError(scenario)

    start, stop = 0, STEPS
    if scenario in ("fsdp-resume", "hsdp-reshard"):  # a fresh launch loads the sharded checkpoint
        msd, osd = get_state_dict(model, opt)
        saved = {"model": msd, "optim": osd}
        dcp.load(saved, checkpoint_id=directory / "checkpoint")
        set_state_dict(model, opt, model_state_dict=saved["model"], optim_state_dict=saved["optim"])
        # fsdp-resume finishes the run from step CUT; hsdp-reshard only reads the checkpoint into its layout
        start, stop = (CUT, STEPS) if scenario == "fsdp-resume" else (0, 0)
    for t in range(start, stop):
        if scenario == "rank-dies" and rank == 1 and t == K - 1:
            os._exit(3)  # killed before the first outer step: rank 0 waits in its all-reduce
        loss_of(model, t, data_rank, (0, 1) if scenario.startswith(("ddp", "fsdp")) else (0,)).backward()
        opt.step()
        opt.zero_grad()
        if scenario == "hsdp" and t + 1 == 2 * K:  # at an outer step: every group holds the same weights
            msd, osd = get_state_dict(model, opt)
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=directory / "checkpoint")
        if scenario == "fsdp" and t + 1 == CUT:
            msd, osd = get_state_dict(model, opt)
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=directory / "checkpoint")

    def full(t: torch.Tensor) -> torch.Tensor:
        return t.full_tensor() if snoo.distributed.is_dtensor(t) else t

    params = list(model.parameters())
    torch.save(
        {
            "params": [full(p.detach()) for p in params],
            "slow": [full(opt.state[p]["slow"]) for p in params],
            "state_is_sharded": [snoo.distributed.is_dtensor(opt.state[p]["slow"]) for p in params],
            "local_numel": [snoo.distributed.local(opt.state[p]["slow"]).numel() for p in params],
            "communicated_bytes": opt.communicated_bytes,
        },
        directory / f"{scenario}-{rank}.pt",
    )
    # every rank past its last collective (the full_tensor gathers above) before any tears its connections down: a
    # rank that left first once aborted the other inside gloo ("terminate called without an active exception")
    dist.barrier()
    # DDP's reducer must go before its process group: freed after it (when this frame is torn down), it sometimes
    # blocked the rank's exit for good
    del model, opt
    dist.destroy_process_group()


CUT = 6  # mid-cycle: the second cycle has started, the rare parameter was touched at step 5


def launch(
    scenario: str, world: int, directory: Path, timeout: float = 120, script: str = __file__
) -> list[subprocess.CompletedProcess]:
    """Run ``script SCENARIO RANK WORLD DIRECTORY`` once per rank, with one thread each, and wait for them all."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, script, scenario, str(rank), str(world), str(directory)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for rank in range(world)
    ]
    done = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    finally:
        for proc in procs:
            proc.kill()
    return done


def run_ranks(scenario: str, world: int, directory: Path) -> list[dict]:
    for rank, proc in enumerate(launch(scenario, world, directory)):
        assert proc.returncode == 0, f"rank {rank} of {scenario} failed:\n{proc.stderr[-3000:]}"
    return [torch.load(directory / f"{scenario}-{rank}.pt", weights_only=True) for rank in range(world)]


# -- single-process references --------------------------------------------------------------------------------------


def single_process_snoo(batches_of_step, steps: int = STEPS) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Plain SNOO in this process for `steps` steps; ``batches_of_step(model, t)`` returns the loss of step t.
    Returns the fast and the slow weights."""
    model = Net()
    opt = snoo.SNOO(torch.optim.AdamW(model.parameters(), lr=LR), **OUTER)
    for t in range(steps):
        batches_of_step(model, t).backward()
        opt.step()
        opt.zero_grad()
    params = list(model.parameters())
    return [p.detach() for p in params], [opt.state[p]["slow"] for p in params]


def simulated_diloco(world: int, steps: int = STEPS) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """DiLoCo from its equations: `world` copies take K AdamW steps each on their own data from the same w; the outer
    step is torch's SGD(nesterov) on the mean pseudo-gradient s = mean_r (w - p_r); then every copy restarts at w.
    A parameter that no copy gave a gradient during the cycle is left alone (SNOO's rule)."""
    copies = [Net() for _ in range(world)]
    inners = [torch.optim.AdamW(m.parameters(), lr=LR) for m in copies]
    slow = [torch.nn.Parameter(p.detach().clone()) for p in copies[0].parameters()]
    outer = torch.optim.SGD(slow, lr=OUTER["lr"], momentum=OUTER["momentum"], nesterov=True)
    touched = set()
    for t in range(steps):
        for rank, (m, inner) in enumerate(zip(copies, inners)):
            loss_of(m, t, rank).backward()
            touched.update(i for i, p in enumerate(m.parameters()) if p.grad is not None)
            inner.step()
            inner.zero_grad()
        if (t + 1) % K == 0:
            with torch.no_grad():
                for i, w in enumerate(slow):
                    fast = [list(m.parameters())[i] for m in copies]
                    pseudo = (w - fast[0]) + (w - fast[1]) if world == 2 else sum(w - f for f in fast)
                    w.grad = pseudo / world if i in touched else None
                outer.step()
                outer.zero_grad()
                for m in copies:
                    for i, p in enumerate(m.parameters()):
                        if i in touched:
                            p.copy_(slow[i])
            touched.clear()
    return [p.detach() for p in copies[0].parameters()], [w.detach() for w in slow]


# -- tests ------------------------------------------------------------------------------------------------------------


def test_bad_distributed_arguments_are_refused_clearly():
    params = list(Net().parameters())
    with pytest.raises(RuntimeError, match="not initialised"):
        snoo.SNOO(torch.optim.AdamW(params), process_group=object())
    with pytest.raises(ValueError, match="needs process_group"):
        snoo.SNOO(torch.optim.AdamW(params), reduce_dtype=torch.bfloat16)


def test_an_eval_mode_state_without_its_training_point_is_refused():
    # what torch.distributed.checkpoint would hand back for a checkpoint saved in eval mode: it loads only the
    # entries that a fresh optimizer (in train mode) has, so the training point is missing
    model = Net()
    opt = snoo.SNOO(torch.optim.AdamW(model.parameters(), lr=LR), **OUTER)
    loss_of(model, 0, 0).backward()
    opt.step()
    opt.eval()
    saved = opt.state_dict()
    saved["state"] = {i: {k: v for k, v in st.items() if k != "snoo.fast"} for i, st in saved["state"].items()}
    with pytest.raises(ValueError, match="saved in eval mode but holds no training point"):
        snoo.SNOO(torch.optim.AdamW(Net().parameters(), lr=LR), **OUTER).load_state_dict(saved)


def test_two_workers_on_identical_data_are_single_process_snoo(tmp_path):
    results = run_ranks("diloco-same-data", 2, tmp_path)
    params, slow = single_process_snoo(lambda m, t: loss_of(m, t, 0))
    for r in results:
        assert all(map(torch.equal, r["params"], params)) and all(map(torch.equal, r["slow"], slow))


def test_two_workers_on_their_own_data_average_their_pseudo_gradients(tmp_path):
    results = run_ranks("diloco", 2, tmp_path)
    params, slow = simulated_diloco(2)
    for r in results:
        assert all(map(torch.equal, r["params"], params)) and all(map(torch.equal, r["slow"], slow))
    # the rare parameter, used by rank 0 only, took its outer steps on both ranks
    assert not torch.equal(results[1]["params"][0], Net().rare)  # a module's own parameters come first
    # one float32 value per parameter element and a flag per tensor, in one all-reduce per outer step
    numel = sum(p.numel() for p in Net().parameters())
    assert results[0]["communicated_bytes"] == (STEPS // K) * 4 * (numel + len(params))


def test_four_workers_match_the_simulation(tmp_path):
    results = run_ranks("diloco", 4, tmp_path)
    params, slow = simulated_diloco(4)
    for r in results:  # gloo may add four terms in another order than the simulation
        for got, want in zip(r["params"] + r["slow"], params + slow):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert all(all(map(torch.equal, r["params"], results[0]["params"])) for r in results)


def test_bf16_pseudo_gradients_halve_the_bytes_and_stay_close(tmp_path):
    results = run_ranks("diloco-bf16", 2, tmp_path)
    params, _ = simulated_diloco(2)
    numel = sum(p.numel() for p in Net().parameters())
    assert results[0]["communicated_bytes"] == (STEPS // K) * 2 * (numel + len(params))
    for got, want in zip(results[0]["params"], params):
        torch.testing.assert_close(got, want, rtol=0, atol=2e-3)  # bf16 keeps ~3 digits of each pseudo-gradient
    assert all(map(torch.equal, results[0]["params"], results[1]["params"]))


def test_fsdp2_inside_each_diloco_group_matches_the_simulation(tmp_path):
    """HSDP-style DiLoCo: 4 ranks, 2 replica groups of 2; FSDP2 shards the parameters and SNOO's state within a
    group, and SNOO averages each rank's shard of the pseudo-gradients with the same shard of the other group. That
    is DiLoCo over 2 workers (test_distributed's simulation), and its sharded checkpoint at an outer step loads into
    one process as the slow weights, and into FSDP2 over 2 ranks."""
    results = run_ranks("hsdp", 4, tmp_path)
    params, slow = simulated_diloco(2)
    numel = sum(p.numel() for p in Net().parameters())
    for r in results:
        assert all(r["state_is_sharded"])
        assert sum(r["local_numel"]) < numel  # each rank holds about half of the state
        for got, want in zip(r["params"] + r["slow"], params + slow):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # each rank sends its shard only: the two ranks of a group together send what one DiLoCo worker sends
    assert results[0]["communicated_bytes"] + results[1]["communicated_bytes"] < (STEPS // K) * 4 * 2 * numel
    model = Net()
    model.load_state_dict(snoo.distributed.load_evaluation_weights(tmp_path / "checkpoint", model))
    at_checkpoint = simulated_diloco(2, steps=2 * K)[1]
    for got, want in zip(model.parameters(), at_checkpoint):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # and into another layout: FSDP2 over 2 ranks (one group), the slow weights and parameters sharded anew
    for r in run_ranks("hsdp-reshard", 2, tmp_path):
        assert all(r["state_is_sharded"])
        for got, want in zip(r["params"] + r["slow"], at_checkpoint + at_checkpoint):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def full_batch_loss(model: torch.nn.Module, t: int) -> torch.Tensor:
    """What DDP and FSDP with two ranks compute: the mean over both ranks' batches."""
    return (loss_of(model, t, 0, (0, 1)) + loss_of(model, t, 1, (0, 1))) / 2


def test_ddp_snoo_is_snoo_on_the_global_batch(tmp_path):
    results = run_ranks("ddp", 2, tmp_path)
    params, slow = single_process_snoo(full_batch_loss)
    for r in results:
        assert r["communicated_bytes"] == 0  # no communication of SNOO's own: DDP averaged the gradients
        for got, want in zip(r["params"] + r["slow"], params + slow):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_fsdp2_snoo_keeps_sharded_state_and_is_snoo_on_the_global_batch(tmp_path):
    results = run_ranks("fsdp", 2, tmp_path)
    params, slow = single_process_snoo(full_batch_loss)
    for r in results:
        assert all(r["state_is_sharded"]) and r["communicated_bytes"] == 0
        # each rank holds half of the 16-row weight's slow weights
        assert r["local_numel"][1] == 16 * 6 // 2  # [0] is `rare`
        for got, want in zip(r["params"] + r["slow"], params + slow):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    # a fresh launch resumes from the sharded checkpoint written at step CUT and ends bit for bit the same
    resumed = run_ranks("fsdp-resume", 2, tmp_path)
    for r, straight in zip(resumed, results):
        assert all(map(torch.equal, r["params"], straight["params"]))
        assert all(map(torch.equal, r["slow"], straight["slow"]))


def test_a_sharded_checkpoint_loads_into_one_process_for_evaluation(tmp_path):
    run_ranks("fsdp", 2, tmp_path)
    model = Net()
    model.load_state_dict(snoo.distributed.load_evaluation_weights(tmp_path / "checkpoint", model))
    _, slow = single_process_snoo(full_batch_loss, steps=CUT)  # SNOO on the global batch up to the checkpoint
    for got, want in zip(model.parameters(), slow):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_evaluation_weights_of_a_tied_model_are_the_slow_weights(tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    def tied() -> torch.nn.Module:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
        model[1].weight = model[0].weight  # the head shares the embedding
        return model

    model = tied()
    opt = snoo.SNOO(torch.optim.AdamW(model.parameters(), lr=LR), k=2)
    for t in range(3):  # an outer step at 2, then a step that moves the fast weights away from the slow ones
        model(torch.arange(10) % (t + 3)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    msd, osd = get_state_dict(model, opt)
    with warnings.catch_warnings():  # saving in one process is the point here
        warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process")
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=tmp_path / "checkpoint")
    fresh = tied()
    fresh.load_state_dict(snoo.distributed.load_evaluation_weights(tmp_path / "checkpoint", fresh))
    slow = opt.state[model[0].weight]["slow"]
    assert not torch.equal(model[0].weight, slow)
    assert torch.equal(fresh[0].weight, slow) and fresh[1].weight is fresh[0].weight


def test_a_rank_that_dies_stops_the_others_with_a_clear_message(tmp_path):
    began = time.monotonic()
    survivor, dead = launch("rank-dies", 2, tmp_path, timeout=90)
    assert dead.returncode == 3
    assert survivor.returncode != 0
    assert "a rank probably died" in survivor.stderr and "resume from the last checkpoint" in survivor.stderr
    assert time.monotonic() - began < 90


if __name__ == "__main__":
    worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
