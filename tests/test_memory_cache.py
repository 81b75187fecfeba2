"""The kernel cache's cap bounds the memory its kernels keep, not only their code bytes.

A small kernel is a few hundred bytes of code, but it keeps at least a page mapped, and
it kept its whole generator too (a buffer sized for the largest code, label bookkeeping on
the heap) until the cache held only the finished code. A fresh interpreter with a small
cap generates a few thousand small kernels, far more than fit, through conv2d: its resident
memory may grow by the cap plus a margin for the plans of the primitive caches.
"""

from __future__ import annotations

import json
import os

import pytest

from helpers import check_expected_isa, run_python

CAP_MB = 4
# For the plans the primitive caches keep (up to 256 each) and the allocator's slack. The
# growth measured was the cap itself; with each kernel's generator kept it was 12.7 MB.
MARGIN_MB = 2

CHILD = f"""
import itertools, json, os, torch, torch_directconv as tdc
from torch_directconv import _C

def resident_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

def problems():
    # Channel tails, kernel widths, strides, dilations and borders: each mix is new code.
    grid = itertools.product(range(1, 17), (1, 2, 3, 5), (1, 2), (1, 2), (0, 1), (9, 14, 23))
    for c, s, stride, dil, pad, w in grid:
        if (s - 1) * dil + 1 <= w + 2 * pad:
            yield c, s, stride, dil, pad, w

def run(c, s, stride, dil, pad, w):
    x, wt = torch.randn(1, c, 5, w), torch.randn(8, c, 1, s)
    tdc.conv2d(x, wt, stride=(1, stride), padding=(0, pad), dilation=(1, dil))

torch.set_num_threads(1)
for p in itertools.islice(problems(), 20):
    run(*p)  # torch's own first-call costs come before the baseline
_C.clear_cache()
_C.set_cache_mb({CAP_MB})
before = resident_bytes()
count = 0
for p in problems():
    run(*p)
    count += 1
stats = tdc.jit_stats()
stats["problems"] = count
stats["growth"] = resident_bytes() - before
print(json.dumps(stats))
"""


@pytest.fixture(autouse=True)
def isa() -> str:
    return check_expected_isa()


def test_resident_memory_stays_within_the_cache_cap() -> None:
    stats = json.loads(run_python(CHILD).stdout.strip().splitlines()[-1])
    cap = CAP_MB << 20
    assert stats["cache_cap_bytes"] == cap
    assert stats["evicted"] > 0 and stats["kernels"] > 2 * stats["cache_entries"], f"the cap was never reached: {stats}"
    mb = stats["growth"] / 2**20
    assert mb <= CAP_MB + MARGIN_MB, (
        f"{stats['kernels']} kernels from {stats['problems']} problems grew resident memory by {mb:.1f} MB "
        f"under a {CAP_MB} MB cap; the cache counted {stats['cache_bytes'] / 2**20:.1f} MB"
    )
    assert 0 < stats["cache_bytes"] <= cap and stats["cache_bytes"] % os.sysconf("SC_PAGE_SIZE") == 0, stats
