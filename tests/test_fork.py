"""fork() while another thread is inside the extension: every child must run convolutions.

A background thread keeps the caches busy, with new problems (so kernels are being planned
and generated) between repeated ones, while the main thread forks. A fork that copies a
cache's lock held by that thread, or a kernel that thread was still generating, leaves the
child waiting for a thread it does not have. Each child runs the problem the thread was on
at the fork and a fresh one, checks both against torch, and exits; the parent kills a child
that takes too long and fails the test.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator

import pytest
import torch

import torch_directconv as tdc
from helpers import check_expected_isa, conv_tol, ref_conv2d
from torch_directconv import _backend

# Before the caches' locks were held across fork(), the first child hung within 11 forks
# (12 runs).
FORKS = 200
CHILD_TIMEOUT_S = 5.0
WIDTHS = (5, 9, 14, 23, 31)
# A child's exit code: right results, forked while the thread was inside a call or not.
RIGHT_INSIDE, RIGHT_OUTSIDE, WRONG = 0, 10, 1


@pytest.fixture(autouse=True)
def isa() -> str:
    return check_expected_isa()


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """No OpenMP team in parent or child: in a child, libgomp waits for the team threads the
    forking thread had in the parent, and hangs (a limit of libgomp, not of this project)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def problem(i: int) -> dict:
    """The i-th problem: every index is a new problem, and most bring new kernels (channel
    tails, kernel widths, strides, dilations and borders all change the generated code)."""
    c = 1 + i % 13
    s = (1, 3, 5)[i // 13 % 3]
    stride = 1 + i // 39 % 2
    dil = 1 + i // 78 % 2
    w = WIDTHS[i // 156 % len(WIDTHS)] + i // 780 % 50
    w = max(w, (s - 1) * dil + 1)
    return {"c": c, "k": 4 + i % 7, "h": 3 + i % 4, "w": w, "s": s, "stride": (1, stride), "dilation": (1, dil)}


def args(p: dict, seed: int) -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, p["c"], p["h"], p["w"], generator=g)
    w = torch.randn(p["k"], p["c"], 1, p["s"], generator=g) / math.sqrt(p["c"] * p["s"])
    b = torch.randn(p["k"], generator=g)
    return (x, w, b), {"stride": p["stride"], "padding": (0, 1), "dilation": p["dilation"]}


def matches(p: dict, seed: int) -> bool:
    a, kw = args(p, seed)
    out, ref = tdc.conv2d(*a, **kw), ref_conv2d(*a, **kw)
    tol = conv_tol(p["c"] * p["s"])
    return out.shape == ref.shape and torch.allclose(out, ref, rtol=tol["rtol"], atol=tol["atol"])


def hammer(stop: threading.Event, state: dict) -> None:
    """Alternates a new problem with an old one until told to stop."""
    i = 0
    while not stop.is_set():
        state["problem"] = i
        state["inside"] = True
        for p in (problem(i), problem(i // 2)):
            a, kw = args(p, i)
            tdc.conv2d(*a, **kw)
        state["inside"] = False
        i += 1


def check_in_child(state: dict, fresh: dict) -> int:
    """Runs the problem the thread was on at the fork, and a fresh one."""
    if not (matches(problem(state["problem"]), 1) and matches(fresh, 2)):
        return WRONG
    return RIGHT_INSIDE if state["inside"] else RIGHT_OUTSIDE


def fork_and_run(check: Callable[[], int]) -> str:
    """check() in a child: 'inside', 'outside', 'wrong', or 'hung' (then killed)."""
    pid = os.fork()
    if pid == 0:
        code = WRONG
        try:
            code = check()
        finally:
            os._exit(code)
    return wait_child(pid, CHILD_TIMEOUT_S)


def wait_child(pid: int, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            return {RIGHT_INSIDE: "inside", RIGHT_OUTSIDE: "outside"}.get(code, "wrong")
        time.sleep(0.002)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return "hung"


def test_fork_while_another_thread_runs_convolutions() -> None:
    # torch sets up some dispatch tables at first use, which a fork could catch half done.
    assert matches(problem(10**6 - 1), 0)
    stop = threading.Event()
    state = {"problem": 0, "inside": False}
    thread = threading.Thread(target=hammer, args=(stop, state), daemon=True)
    thread.start()
    forks: dict[str, list[int]] = {"inside": [], "outside": [], "wrong": [], "hung": []}
    try:
        for f in range(FORKS):
            forks[fork_and_run(lambda f=f: check_in_child(state, problem(10**6 + f)))].append(f)
            if forks["hung"] or forks["wrong"]:
                break
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not forks["hung"], f"the child of fork {forks['hung']} hung (of {FORKS} forks)"
    assert not forks["wrong"], f"the child of fork {forks['wrong']} computed a wrong result"
    # Otherwise the test proved little: most forks must catch the thread inside a call.
    assert len(forks["inside"]) > FORKS // 2, f"only {len(forks['inside'])} of {FORKS} forks caught the thread busy"


def fall_back_in_child() -> int:
    # float64 goes to torch's convolution, past the fallback counter and its lock.
    x, w = torch.randn(1, 2, 5, 5, dtype=torch.float64), torch.randn(3, 2, 3, 3, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = tdc.conv2d(x, w)
    return RIGHT_OUTSIDE if torch.allclose(out, ref_conv2d(x, w)) else WRONG


def test_fork_while_another_thread_holds_the_fallback_lock() -> None:
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with _backend._lock:
            held.set()
            release.wait(timeout=60)

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    try:
        assert held.wait(timeout=60)
        assert fork_and_run(fall_back_in_child) == "outside"
    finally:
        release.set()
        thread.join(timeout=60)
