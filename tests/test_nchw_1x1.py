"""The NCHW 1x1 path of the drop-in op: 1x1, stride 1, unpadded convolutions of NCHW images
of 28x28 pixels or more, with C and H*W multiples of the vector width, run as a GEMM on the forward kernels, reading
the weights and the input as they are and writing the output in place (no packing, no layout
conversion). These tests pin that the path is taken where it applies, left where it does not,
and exact either way.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

import torch_directconv as tdc
from helpers import cpu_has, requires_jit, run_pytest_under_isa, run_python
from torch_directconv import _C

pytestmark = requires_jit


def _case(rng: random.Random) -> dict:
    v = tdc.vector_width()
    # Images of 28x28 pixels or more (the op's threshold for the GEMM), rows of one or two
    # pixels too, and pixel counts with a tail.
    h = rng.choice([1, 2, 28, 29, 32])
    w = {1: rng.choice([784, 800, 1024]), 2: rng.choice([392, 400, 512])}.get(h, rng.choice([28, 29, 32]))
    return dict(
        n=rng.randint(1, 3),
        c=v * rng.randint(1, 5),
        k=rng.randint(1, 70),
        h=h,
        w=w,
        bias=rng.random() < 0.5,
        relu=rng.random() < 0.3,
        dilation=rng.choice([1, 2]),
    )


CASES = [_case(random.Random(9000 + i)) for i in range(60)]


@pytest.mark.parametrize("i", range(len(CASES)))
def test_matches_torch(i: int) -> None:
    case = CASES[i]
    g = torch.Generator().manual_seed(i)
    x = torch.randn(case["n"], case["c"], case["h"], case["w"], generator=g)
    w = torch.randn(case["k"], case["c"], 1, 1, generator=g) / case["c"] ** 0.5
    b = torch.randn(case["k"], generator=g) if case["bias"] else None
    got = tdc.conv2d(x, w, b, dilation=case["dilation"], relu=case["relu"])
    want = F.conv2d(x, w, b, dilation=case["dilation"])
    if case["relu"]:
        want = torch.relu(want)
    assert got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=str(case))


@pytest.mark.skipif(not cpu_has("avx2"), reason=f"this CPU lacks AVX2 (detected {_C.detected_isa()})")
def test_matches_torch_under_avx2_cap() -> None:
    run_pytest_under_isa("avx2", "tests/test_nchw_1x1.py", "test_matches_torch and not avx2", expect_passed=len(CASES))


def test_the_path_takes_the_gemm_kernels_and_nothing_else() -> None:
    """In a fresh process with the verbose log: the call generates only the 1x1 GEMM kernels
    (their names carry the image's row stride, _wc), planned as nchw1x1, and no kernel of the
    blocked path; a channels_last input of the same shape, and an image under 28x28 pixels,
    take the blocked path instead."""
    proc = run_python(
        """
import sys, torch, torch_directconv as tdc
v = tdc.vector_width()
w = torch.randn(24, 2 * v, 1, 1)
tdc.conv2d(torch.randn(2, 2 * v, 28, 28), w)
sys.stderr.write("--- channels_last\\n"); sys.stderr.flush()
tdc.conv2d(torch.randn(2, 2 * v, 28, 28).contiguous(memory_format=torch.channels_last), w)
sys.stderr.write("--- small\\n"); sys.stderr.flush()
tdc._C.clear_cache()  # so that its kernels are generated, and logged, again
tdc.conv2d(torch.randn(2, 2 * v, 14, 14), w)
""",
        TORCH_DIRECTCONV_VERBOSE="1",
    )
    nchw, _, rest = proc.stderr.partition("--- channels_last")
    channels_last, _, small = rest.partition("--- small")
    nchw_kernels = [line for line in nchw.splitlines() if "jit f32_conv" in line]
    assert nchw_kernels and all("_wc" in line and "nchw1x1" in line for line in nchw_kernels), proc.stderr
    for part in (channels_last, small):
        blocked_kernels = [line for line in part.splitlines() if "jit f32_conv" in line]
        assert blocked_kernels and not any("_wc" in line for line in blocked_kernels), proc.stderr


@pytest.mark.parametrize(
    "what",
    ["channels_last", "strided", "padded", "channel_tail", "pixel_tail", "view"],
)
def test_where_it_does_not_apply_the_blocked_path_is_exact(what: str) -> None:
    v = tdc.vector_width()
    c, hw, stride, pad = 2 * v, (8, 8), 1, 0
    if what == "channel_tail":
        c = 2 * v + 3
    if what == "pixel_tail":
        hw = (5, 5)
    if what == "strided":
        stride = 2
    if what == "padded":
        pad = 1
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, c, *hw, generator=g)
    if what == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    if what == "view":
        x = torch.randn(2, c, hw[0], 2 * hw[1], generator=g)[..., ::2]
    w = torch.randn(20, c, 1, 1, generator=g)
    got = tdc.conv2d(x, w, None, stride, pad)
    want = F.conv2d(x, w, None, stride, pad)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert got.is_contiguous(memory_format=torch.channels_last if what == "channels_last" else torch.contiguous_format)


def test_two_threads_and_a_large_map() -> None:
    """ResNet-50's res2 shape, on both threads (units are stolen between them)."""
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(2)
        x, w = torch.randn(2, 64, 56, 56, generator=g), torch.randn(256, 64, 1, 1, generator=g) / 8
        b = torch.randn(256, generator=g)
        torch.testing.assert_close(tdc.conv2d(x, w, b, relu=True), torch.relu(F.conv2d(x, w, b)), rtol=1e-4, atol=1e-4)
    finally:
        torch.set_num_threads(1)


@pytest.mark.parametrize("seed", range(12))
def test_input_gradient_of_a_1x1_layer(seed: int) -> None:
    """The input gradient of a 1x1 stride-1 layer is W^T dY per image: the same GEMM path with the
    transposed weight matrix (output channels a multiple of the vector width)."""
    rng = random.Random(seed)
    v = tdc.vector_width()
    k, c, n = v * rng.randint(1, 4), rng.randint(1, 50), rng.randint(1, 3)
    h, w = rng.choice([(4, 4), (8, 8), (2, 8), (7, 7), (16, 16)])
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g, requires_grad=True)
    wt = torch.randn(k, c, 1, 1, generator=g, requires_grad=True)
    dy = torch.randn(n, k, h, w, generator=g)
    got = torch.autograd.grad(tdc.conv2d(x, wt), (x, wt), dy)
    want = torch.autograd.grad(F.conv2d(x, wt), (x, wt), dy)
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4 * (e.abs().max().item() + 1))
