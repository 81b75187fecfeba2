"""Many Python threads asking for new kernels at the same moment, forward and backward.

Each generated kernel must be generated once: threads that want a kernel another thread is
generating wait for it instead of generating a duplicate, and every result stays right.
"""

from __future__ import annotations

import math
import threading

import pytest
import torch
import torch.nn.functional as F

import torch_directconv as tdc
from helpers import assert_conv_close, assert_grad_close, check_expected_isa, torch_native
from torch_directconv import _C

THREADS = 8
ROUNDS = 3


@pytest.fixture(autouse=True)
def isa() -> str:
    return check_expected_isa()


def round_problems(rnd: int) -> list[dict]:
    """Eight problems per round, none seen in another round. Threads 0-3 share a width (so they
    ask for many of the same kernels at once); threads 4-7 each have their own width and kernel."""
    problems = []
    for i in range(THREADS):
        shared = i < 4
        problems.append(
            {
                "n": 1 + i % 2,
                "c": 5 + 3 * rnd,
                "k": 20 + 4 * i,
                "h": 6 + i + 10 * rnd,
                "w": 37 + 11 * rnd if shared else 40 + 11 * rnd + i,
                "r": 3,
                "s": 3 if shared else 1 + 2 * (i % 3),
                "padding": (1, 1) if shared else (i % 2, i % 3),
                "stride": (1, 1 + i % 2) if not shared else (1, 1),
            }
        )
    return problems


def make_tensors(p: dict, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(p["n"], p["c"], p["h"], p["w"], generator=g)
    w = torch.randn(p["k"], p["c"], p["r"], p["s"], generator=g) / math.sqrt(p["c"] * p["r"] * p["s"])
    b = torch.randn(p["k"], generator=g)
    return x, w, b


def run_at_once(count: int, job, concurrent: bool) -> list:
    """job(i) for i in range(count): on `count` threads released together by a barrier, or one
    after the other; returns the results in order and re-raises the first error."""
    results: list = [None] * count
    errors: list = []
    barrier = threading.Barrier(count)

    def work(i: int) -> None:
        try:
            if concurrent:
                barrier.wait(timeout=60)
            results[i] = job(i)
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            errors.append(e)
            barrier.abort()

    if concurrent:
        threads = [threading.Thread(target=work, args=(i,)) for i in range(count)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=120)
        assert not any(th.is_alive() for th in threads), "a thread hung"
    else:
        for i in range(count):
            work(i)
    if errors:
        raise errors[0]
    return results


def run_round(problems: list[dict], seed: int, concurrent: bool) -> list[torch.Tensor]:
    inputs = [make_tensors(p, seed + i) for i, p in enumerate(problems)]

    def job(i: int) -> torch.Tensor:
        p = problems[i]
        return tdc.conv2d(*inputs[i], stride=p["stride"], padding=p["padding"])

    results = run_at_once(len(problems), job, concurrent)
    for i, (p, (x, w, b)) in enumerate(zip(problems, inputs, strict=True)):
        ref = F.conv2d(x, w, b, stride=p["stride"], padding=p["padding"])
        assert_conv_close(results[i], ref, p["c"] * p["r"] * p["s"], f"thread {i}: {p}")
    return results


def kernels() -> int:
    return tdc.jit_stats()["kernels"]


def test_concurrent_first_calls_generate_each_kernel_once() -> None:
    _C.clear_cache()
    k0 = kernels()
    concurrent = []
    for rnd in range(ROUNDS):
        run_round(round_problems(rnd), seed=100 * rnd, concurrent=True)
        concurrent.append(kernels() - k0)
        k0 = kernels()
    assert all(n > 0 for n in concurrent), concurrent
    entries = tdc.jit_stats()["cache_entries"]
    assert entries == sum(concurrent), f"{entries} cache entries for {sum(concurrent)} generated kernels"

    # The same calls again, still concurrently: everything is cached.
    for rnd in range(ROUNDS):
        run_round(round_problems(rnd), seed=100 * rnd + 1, concurrent=True)
    assert kernels() == k0, "kernels were generated again for problems already seen"

    # One thread at a time from an empty cache gives the number of distinct kernels.
    _C.clear_cache()
    serial = []
    for rnd in range(ROUNDS):
        k0 = kernels()
        run_round(round_problems(rnd), seed=100 * rnd + 2, concurrent=False)
        serial.append(kernels() - k0)
    assert concurrent == serial, f"concurrent rounds generated {concurrent} kernels, one at a time {serial}"
    # Threads 0-3 share their kernels, so a round needs fewer kernels than its problems do alone.
    _C.clear_cache()
    alone = 0
    for p in round_problems(0):
        _C.clear_cache()
        k0 = kernels()
        run_round([p], seed=7, concurrent=False)
        alone += kernels() - k0
    assert alone > serial[0], "the round shares no kernel between threads: the test checks less than it should"


def test_one_module_from_many_threads() -> None:
    """One DirectConv2d called from 8 threads at once; its packed-weight cache is shared."""
    torch.manual_seed(3)
    m = tdc.DirectConv2d(12, 24, 3, padding=1).eval()
    xs = [torch.randn(2, 12, 9 + i, 10, generator=torch.Generator().manual_seed(i)) for i in range(THREADS)]
    barrier = threading.Barrier(THREADS)
    out: list = [None] * THREADS
    errors: list = []

    def work(i: int) -> None:
        try:
            barrier.wait(timeout=60)
            with torch.no_grad():
                for _ in range(5):
                    out[i] = m(xs[i])
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    if errors:
        raise errors[0]
    with torch.no_grad():
        for i, x in enumerate(xs):
            assert_conv_close(out[i], F.conv2d(x, m.weight, m.bias, padding=1), 108, f"thread {i}")


def backward_problems(rnd: int) -> list[dict]:
    """Eight training problems per round, none seen in another round. Threads 0-3 share a shape (so
    they ask for the same backward kernels at once); threads 4-7 each have their own: depthwise, a
    strided 1x1, a large batch (the JIT input gradient) and a dilated, strided one."""
    shared = {"n": 2, "c": 9 + 2 * rnd, "k": 24, "h": 9 + rnd, "w": 31 + 7 * rnd, "r": 3, "s": 3,
              "stride": (2, 2), "padding": (1, 1), "dilation": (1, 1), "groups": 1}  # fmt: skip
    own = [
        {"n": 2, "c": 24, "k": 24, "h": 8 + rnd, "w": 23 + 5 * rnd, "r": 3, "s": 3, "stride": (1, 1),
         "padding": (1, 1), "dilation": (1, 1), "groups": 24},
        {"n": 3, "c": 19 + rnd, "k": 40, "h": 10 + 2 * rnd, "w": 17 + 3 * rnd, "r": 1, "s": 1, "stride": (2, 2),
         "padding": (0, 0), "dilation": (1, 1), "groups": 1},
        {"n": 32, "c": 16, "k": 16 + 8 * rnd, "h": 10 + rnd, "w": 10 + rnd, "r": 3, "s": 3, "stride": (1, 1),
         "padding": (1, 1), "dilation": (1, 1), "groups": 1},
        {"n": 1, "c": 12, "k": 33, "h": 13 + rnd, "w": 19 + 2 * rnd, "r": 5, "s": 3, "stride": (1, 2),
         "padding": (2, 1), "dilation": (2, 1), "groups": 1},
    ]  # fmt: skip
    return [dict(shared) for _ in range(4)] + own


def make_training_tensors(p: dict, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    fan = p["c"] // p["groups"] * p["r"] * p["s"]
    x = torch.randn(p["n"], p["c"], p["h"], p["w"], generator=g)
    w = torch.randn(p["k"], p["c"] // p["groups"], p["r"], p["s"], generator=g) / math.sqrt(fan)
    b = torch.randn(p["k"], generator=g)
    out_shape = F.conv2d(x, w, None, p["stride"], p["padding"], p["dilation"], p["groups"]).shape
    return x, w, b, torch.randn(out_shape, generator=g)


def geometry(p: dict) -> tuple:
    ph, pw = p["padding"]
    return list(p["stride"]), [ph, ph, pw, pw], list(p["dilation"]), p["groups"]


def run_backward_round(problems: list[dict], seed: int, mode: str, concurrent: bool) -> None:
    """mode 'ops': both backward ops per thread; 'autograd': forward and loss.backward() through tdc.conv2d."""
    inputs = [make_training_tensors(p, seed + i) for i, p in enumerate(problems)]

    def job(i: int) -> tuple:
        p = problems[i]
        x, w, b, gy = inputs[i]
        if mode == "ops":
            ops = torch.ops.directconv
            return (
                ops.conv2d_backward_data(gy, w, list(x.shape), *geometry(p)),
                ops.conv2d_backward_weight(gy, x, list(w.shape), *geometry(p)),
            )
        xl, wl, bl = (t.clone().requires_grad_() for t in (x, w, b))
        out = tdc.conv2d(xl, wl, bl, p["stride"], p["padding"], p["dilation"], p["groups"])
        (out * gy).sum().backward()
        return (xl.grad, wl.grad, bl.grad)

    results = run_at_once(len(problems), job, concurrent)
    for i, (p, (x, w, b, gy)) in enumerate(zip(problems, inputs, strict=True)):
        with torch_native():
            xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
            ref = F.conv2d(xr, wr, br, p["stride"], p["padding"], p["dilation"], p["groups"])
            want = torch.autograd.grad(ref, (xr, wr, br), gy)
        for name, got, expected in zip(("input", "weight", "bias"), results[i], want, strict=False):
            assert_grad_close(got, expected, f"thread {i} ({mode}): grad of {name} in {p}")


@pytest.mark.parametrize("mode", ["ops", "autograd"])
def test_concurrent_first_backward_calls(mode: str) -> None:
    """Eight threads run eight new backward problems at the same moment; every gradient is right,
    and together they generate the kernels one thread at a time would, no more."""
    concurrent = []
    for rnd in range(ROUNDS):
        _C.clear_cache()
        k0 = kernels()
        run_backward_round(backward_problems(rnd), seed=200 * rnd, mode=mode, concurrent=True)
        concurrent.append(kernels() - k0)
        # Everything is cached now: the same round again generates nothing.
        run_backward_round(backward_problems(rnd), seed=200 * rnd + 1, mode=mode, concurrent=True)
        assert kernels() == k0 + concurrent[-1], f"round {rnd}: kernels generated again for problems already seen"
    assert all(n > 0 for n in concurrent), f"no JIT kernel ran in some round: {concurrent}"
    serial = []
    for rnd in range(ROUNDS):
        _C.clear_cache()
        k0 = kernels()
        run_backward_round(backward_problems(rnd), seed=200 * rnd + 2, mode=mode, concurrent=False)
        serial.append(kernels() - k0)
    assert concurrent == serial, f"concurrent rounds generated {concurrent} kernels, one at a time {serial}"
