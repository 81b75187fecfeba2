"""Threads: one OpenMP runtime (torch's), and the same results at any thread count."""

import threading

import pytest
import torch
import torch.nn.functional as F

import torch_directconv as tdc
from helpers import run_python

pytestmark = pytest.mark.skipif(tdc.isa() == "none", reason="no JIT ISA on this machine")


def test_one_openmp_runtime() -> None:
    """torch_directconv adds no OpenMP runtime of its own beside torch's.

    Checked in a fresh process: other packages of the test run (scikit-learn vendors its
    own libgomp) would otherwise be counted too.
    """
    run_python(
        r"""
        import os, re, torch, torch_directconv as tdc
        torch.set_num_threads(2)
        tdc.conv2d(torch.randn(2, 16, 8, 8), torch.randn(16, 16, 3, 3), padding=1)
        runtimes = set()
        for line in open(f"/proc/{os.getpid()}/maps"):
            if re.search(r"/lib(gomp|iomp5|omp)[^/\s]*\.so[^/\s]*$", line.strip()):
                runtimes.add(os.path.realpath(line.split()[-1]))
        assert len(runtimes) == 1, f"expected torch's OpenMP runtime alone, got {sorted(runtimes)}"
        """
    )


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_same_result_at_any_thread_count(threads):
    torch.manual_seed(threads)
    old = torch.get_num_threads()
    try:
        x, w, b = torch.randn(3, 24, 13, 11), torch.randn(40, 24, 3, 3), torch.randn(40)
        torch.set_num_threads(1)
        ref = tdc.conv2d(x, w, b, padding=1)
        torch.set_num_threads(threads)
        out = tdc.conv2d(x, w, b, padding=1)
    finally:
        torch.set_num_threads(old)
    # Each output element is reduced in the same order whatever thread computes it.
    assert torch.equal(out, ref)
    torch.testing.assert_close(out, F.conv2d(x, w, b, padding=1), rtol=1e-4, atol=1e-4)


def _after_count_changed_elsewhere(fn):
    """fn() on a fresh thread, once another thread has changed torch's thread count (2 -> 1)
    after that thread's own pool was set up: its first call must still be exact."""
    old = torch.get_num_threads()
    ready, go, out = threading.Event(), threading.Event(), {}

    def worker() -> None:
        try:
            torch.randn(1 << 20).sum()  # sets up this thread's pool at 2 threads
            ready.set()
            go.wait()
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001  (reported by the caller)
            out["error"] = e
            ready.set()

    try:
        torch.set_num_threads(2)
        t = threading.Thread(target=worker)
        t.start()
        ready.wait()
        torch.set_num_threads(1)
        go.set()
        t.join()
    finally:
        torch.set_num_threads(old)
    if "error" in out:
        raise out["error"]
    return out["value"]


def _grads(conv, x, w, b, **kw):
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    y = conv(x, w, b, **kw)
    y.backward(torch.ones_like(y) / y.numel() ** 0.5)
    return y.detach(), x.grad, w.grad, b.grad


# Each exercises one driver: the blocked forward with per-unit weight packing, the NCHW 1x1
# GEMM, the depthwise kernels, and the phases of a strided input gradient with the weight update.
_THREAD_CASES = {
    "3x3": ((4, 16, 25, 18), (33, 16, 3, 3), {"padding": 1}),
    "nchw_1x1": ((2, 16, 28, 28), (24, 16, 1, 1), {}),
    "depthwise": ((3, 20, 17, 15), (20, 1, 3, 3), {"padding": 1, "groups": 20}),
    "strided": ((4, 16, 23, 19), (20, 16, 3, 3), {"padding": 1, "stride": 2}),
}


@pytest.mark.parametrize("case", _THREAD_CASES)
def test_first_call_after_thread_count_changed_elsewhere(case):
    """The plan's thread count, not a fresh look at torch's, decides how many streams run:
    the first call after another thread lowered the count used to leave streams unrun."""
    torch.manual_seed(0)
    xs, ws, kw = _THREAD_CASES[case]
    x, w, b = torch.randn(xs), torch.randn(ws), torch.randn(ws[0])
    for trial in range(3):
        tdc._C.clear_cache()  # plan afresh, as at a first call
        got = _after_count_changed_elsewhere(lambda: _grads(tdc.conv2d, x, w, b, **kw))
        ref = _grads(lambda *a, **k: F.conv2d(*(t.double() for t in a), **k), x, w, b, **kw)
        for name, g, r in zip(("output", "input grad", "weight grad", "bias grad"), got, ref):
            torch.testing.assert_close(g, r.float(), rtol=1e-4, atol=1e-3, msg=lambda m: f"{case} {name}: {m}")


def test_cached_module_after_thread_count_changed_elsewhere():
    torch.manual_seed(0)
    conv = tdc.DirectConv2d(16, 33, 3, padding=1, cache_weights=True)
    ref_conv = torch.nn.Conv2d(16, 33, 3, padding=1)
    ref_conv.load_state_dict(conv.state_dict())
    x = torch.randn(4, 16, 25, 18)
    with torch.no_grad():
        ref = ref_conv(x)
        for _ in range(3):
            tdc._C.clear_cache()
            out = _after_count_changed_elsewhere(lambda: conv(x))
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
