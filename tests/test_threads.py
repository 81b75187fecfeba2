"""Threads: one OpenMP runtime (torch's), and the same results at any thread count."""

import os
import re

import pytest
import torch
import torch.nn.functional as F

import torch_directconv as tdc

pytestmark = pytest.mark.skipif(tdc.isa() == "none", reason="no JIT ISA on this machine")


def _openmp_runtimes() -> set[str]:
    names = set()
    with open(f"/proc/{os.getpid()}/maps") as maps:
        for line in maps:
            m = re.search(r"/(lib(?:gomp|iomp5|omp)[^/\s]*\.so[^/\s]*)$", line.strip())
            if m:
                names.add(os.path.realpath(line.split()[-1]))
    return names


def test_one_openmp_runtime():
    torch.set_num_threads(2)
    tdc.conv2d(torch.randn(2, 16, 8, 8), torch.randn(16, 16, 3, 3), padding=1)
    runtimes = _openmp_runtimes()
    assert len(runtimes) <= 1, f"more than one OpenMP runtime is loaded: {sorted(runtimes)}"


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
