"""Threads: one OpenMP runtime (torch's), and the same results at any thread count."""

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
