"""torch_directconv.distributed.ShmAllReduce between processes of this host (one process per
rank, torchrun's environment, gloo on 127.0.0.1): the mean, the same bits on every rank, as DDP's
own all-reduce computes it; the fallback to the process group; a rank that exits; bad arguments."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import torch_directconv as tdc

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="shared memory between processes the Linux way")

WORKER = textwrap.dedent(
    """
    import copy, os, sys, time
    import torch, torch.distributed as dist
    import torch_directconv as tdc
    from torch_directconv import distributed as tdd

    torch.set_num_threads(1)
    case, out = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if case == "hosts":  # each rank believes it is on a host of its own
        tdd._host_id = lambda: f"host{rank}"
    ar = tdd.ShmAllReduce(chunk_mb=1 / 16, timeout=float(os.environ.get("AR_TIMEOUT", "60")))
    result = {"transport": ar.transport, "reason": ar.reason, "repr": repr(ar)}
    if case in ("mean", "hosts"):
        g = torch.Generator().manual_seed(100 + rank)
        outs = []
        for n in (1, 17, 16383, 16384, 16385, 100_003):  # the chunk is 16384 floats
            x = torch.randn(n, generator=g) * (rank + 1)
            mine = x.clone()
            ar.all_reduce_mean_(x)
            outs.append((mine, x))
        # Not float32: the process group's all_reduce.
        y = torch.full((5,), float(rank + 1), dtype=torch.float64)
        ar.all_reduce_mean_(y)
        result["outs"], result["f64"] = outs, y
    elif case == "ddp":
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(300, 200), torch.nn.ReLU(), torch.nn.Linear(200, 7))
        grads = {}
        for how in ("default", "shm"):
            model = torch.nn.parallel.DistributedDataParallel(
                copy.deepcopy(net), gradient_as_bucket_view=True, bucket_cap_mb=0.1
            )
            if how == "shm":
                model.register_comm_hook(None, ar.hook)
            g = torch.Generator().manual_seed(rank)
            model(torch.randn(32, 300, generator=g)).square().sum().backward()
            grads[how] = [p.grad.clone() for p in model.parameters()]
        result["grads"] = grads
    elif case == "exit":
        if rank == 1:
            os._exit(0)
        t0 = time.monotonic()
        try:
            ar.all_reduce_mean_(torch.ones(1000))
            result["error"] = None
        except RuntimeError as e:
            result["error"] = str(e)
            result["is_ours"] = tdd.is_shm_allreduce_error(e)
        result["waited"] = time.monotonic() - t0
        torch.save(result, out)
        os._exit(0)
    torch.save(result, out)
    dist.destroy_process_group()
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(tmp_path: Path, case: str, world: int = 2, timeout: float = 120) -> list[dict]:
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    port = _free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ)
        env.update(
            RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            GLOO_SOCKET_IFNAME="lo",
            PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
        )
        out = tmp_path / f"out{rank}.pt"
        procs.append(
            subprocess.Popen([sys.executable, str(worker), case, str(out)], env=env, stderr=subprocess.PIPE, text=True)
        )
    try:
        for rank, p in enumerate(procs):
            _, err = p.communicate(timeout=timeout)
            assert p.returncode == 0, f"rank {rank} failed:\n{err}"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [torch.load(tmp_path / f"out{r}.pt") if (tmp_path / f"out{r}.pt").exists() else None for r in range(world)]


@pytest.mark.parametrize("world", [2, 3])
def test_the_mean_has_the_same_bits_on_every_rank(tmp_path, world):
    res = _run(tmp_path, "mean", world)
    assert all(r["transport"] == "shm" and r["reason"] is None for r in res), [r["repr"] for r in res]
    for i in range(len(res[0]["outs"])):
        inputs = [r["outs"][i][0] for r in res]
        expected = sum(inputs[1:], inputs[0].clone()) / world  # the sum in rank order, then divided
        for rank, r in enumerate(res):
            assert torch.equal(r["outs"][i][1], expected), f"rank {rank}, tensor {i} ({inputs[0].numel()} elements)"
    for r in res:  # float64 goes through gloo
        torch.testing.assert_close(r["f64"], torch.full((5,), (world + 1) / 2, dtype=torch.float64))


def test_ranks_on_different_hosts_use_the_process_group(tmp_path):
    res = _run(tmp_path, "hosts")
    for r in res:
        assert r["transport"] == "gloo" and r["reason"] == "the 2 ranks run on 2 hosts", r["repr"]
    for i in range(len(res[0]["outs"])):
        expected = (res[0]["outs"][i][0] + res[1]["outs"][i][0]) / 2
        for r in res:
            torch.testing.assert_close(r["outs"][i][1], expected, rtol=1e-6, atol=1e-6)


def test_ddp_hook_gives_ddps_gradients(tmp_path):
    """Several buckets (bucket_cap_mb 0.1), against DDP's own all-reduce: the same gradients, on
    both ranks, and different from the rank's local gradients."""
    res = _run(tmp_path, "ddp")
    for r in res:
        for d, s in zip(r["grads"]["default"], r["grads"]["shm"]):
            torch.testing.assert_close(s, d, rtol=1e-6, atol=1e-7)
    for a, b in zip(res[0]["grads"]["shm"], res[1]["grads"]["shm"]):
        assert torch.equal(a, b)


def test_a_rank_that_exits_is_an_error_at_once(tmp_path):
    """Rank 1 exits without calling: rank 0 raises, naming it, well within the 60 s timeout."""
    res = _run(tmp_path, "exit")
    r = res[0]
    assert r["error"] is not None and "rank 1" in r["error"] and "exited" in r["error"], r["error"]
    assert r["is_ours"]
    assert r["waited"] < 10, f"rank 0 waited {r['waited']:.1f} s"


def test_bad_arguments():
    if dist.is_initialized():
        pytest.skip("a process group is already up")
    with pytest.raises(RuntimeError, match="not initialised"):
        tdc.distributed.ShmAllReduce()
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="chunk_mb must be positive"):
            tdc.distributed.ShmAllReduce(chunk_mb=0)
        with pytest.raises(ValueError, match="timeout must be positive"):
            tdc.distributed.ShmAllReduce(timeout=-1)
        ar = tdc.distributed.ShmAllReduce()
        assert ar.reason == "a single process: nothing to reduce"
        x = torch.arange(4.0)
        assert torch.equal(ar.all_reduce_mean_(x), torch.arange(4.0))
    finally:
        dist.destroy_process_group()
