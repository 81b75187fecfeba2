"""The forward handles (conv/fwd_driver.h): made once per problem, ISA, thread count and calling
thread, found by comparing integers. A call must follow every change of the input's shape, of
torch's thread count and of the ISA cap, and evicting kernels from the cache, or clearing it,
while handles hold them must leave every call correct."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

import torch_directconv as tdc
from helpers import EXPECTED_ISA, assert_conv_close, check_expected_isa, cpu_has, requires_jit
from torch_directconv import _C

pytestmark = requires_jit


def test_a_call_follows_shape_and_thread_count() -> None:
    check_expected_isa()
    torch.manual_seed(5)
    m = tdc.DirectConv2d(16, 24, 3, padding=1)
    threads = torch.get_num_threads()
    try:
        with torch.no_grad():
            for i, (n, h, w) in enumerate([(1, 4, 4), (1, 4, 5), (2, 4, 4), (1, 5, 4), (1, 4, 4), (3, 7, 9)]):
                for nt in (1, 2, 1):
                    torch.set_num_threads(nt)
                    x = torch.randn(n, 16, h, w, generator=torch.Generator().manual_seed(i))
                    assert_conv_close(m(x), F.conv2d(x, m.weight, m.bias, padding=1), 144, f"{(n, h, w)} at {nt}")
    finally:
        torch.set_num_threads(threads)


@pytest.mark.skipif(not cpu_has("avx512"), reason="needs AVX-512 to switch down to AVX2")
def test_a_call_follows_the_isa_cap() -> None:
    check_expected_isa()
    torch.manual_seed(6)
    m = tdc.DirectConv2d(16, 16, 1)
    x = torch.randn(1, 16, 4, 4)
    ref = F.conv2d(x, m.weight, m.bias)
    try:
        with torch.no_grad():
            assert_conv_close(m(x), ref, 16)
            _C.set_isa_cap("avx2")
            k0 = tdc.jit_stats()["kernels"]
            assert_conv_close(m(x), ref, 16)
            assert tdc.jit_stats()["kernels"] > k0, "the AVX-512 handle was used under the AVX2 cap"
    finally:
        _C.set_isa_cap(EXPECTED_ISA)
    with torch.no_grad():
        assert_conv_close(m(x), ref, 16)


def test_eviction_while_handles_are_in_use() -> None:
    """One thread calls the same convolution over and over (its handle in use) while another
    runs many new problems under a tiny cache cap (evicting everything) and the cache is
    cleared now and then: every result stays right."""
    check_expected_isa()
    torch.manual_seed(7)
    m = tdc.DirectConv2d(16, 16, 3, padding=1)
    x = torch.randn(1, 16, 6, 6)
    ref = F.conv2d(x, m.weight, m.bias, padding=1)
    cap_mb = tdc.jit_stats()["cache_cap_bytes"] / 2**20
    stop = threading.Event()
    errors: list = []

    def same() -> None:
        try:
            with torch.no_grad():
                while not stop.is_set():
                    assert_conv_close(m(x), ref, 144, "the convolution in use")
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            errors.append(e)

    def others() -> None:
        try:
            with torch.no_grad():
                for i in range(60):
                    xi = torch.randn(1, 4 + i % 5, 5, 7 + i)
                    wi = torch.randn(8, 4 + i % 5, 3, 3)
                    assert_conv_close(tdc.conv2d(xi, wi, padding=1), F.conv2d(xi, wi, padding=1), 108, f"problem {i}")
                    if i % 20 == 19:
                        _C.clear_cache()
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            errors.append(e)

    _C.set_cache_mb(0.01)
    try:
        a, b = threading.Thread(target=same), threading.Thread(target=others)
        a.start()
        b.start()
        b.join(timeout=300)
        stop.set()
        a.join(timeout=60)
    finally:
        stop.set()
        _C.set_cache_mb(cap_mb)
    if errors:
        raise errors[0]
    assert tdc.jit_stats()["evicted"] > 0
