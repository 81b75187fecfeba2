"""The forward kernels' fused epilogue: relu(conv(xb, wb) + bias + residual) in one pass, against
float64 torch, with its autograd, its errors, torch.compile and the ATen fallback."""

from __future__ import annotations

import math
import random
import zlib

import pytest
import torch
import torch.nn.functional as F

import torch_directconv as tdc
from helpers import assert_conv_close, assert_grad_close, check_expected_isa, cpu_has, run_pytest_under_isa
from torch_directconv import _C

ops = torch.ops.directconv


@pytest.fixture(autouse=True)
def isa() -> str:
    return check_expected_isa()


def epilogue_case(rng: random.Random) -> dict:
    """Odd channel counts (tails in both blocks), padding, strides, and every post-op combination."""
    r = rng.choice([1, 1, 3, 5])
    stride = rng.choice([1, 1, 2])
    return {
        "n": rng.randint(1, 2),
        "c": rng.choice([3, 16, 17, 20, 33]),
        "k": rng.choice([5, 16, 17, 24, 40]),
        "h": rng.randint(r, 11),
        "w": rng.randint(r, 19),
        "r": r,
        "stride": stride,
        "padding": rng.randint(0, r // 2),
        "bias": rng.random() < 0.5,
        "relu": rng.random() < 0.5,
        "in_channels": rng.random() < 0.5,
    }


def case_id(p: dict) -> str:
    return (
        f"mb{p['n']}ic{p['c']}ih{p['h']}iw{p['w']}oc{p['k']}k{p['r']}s{p['stride']}p{p['padding']}"
        + ("_bias" if p["bias"] else "")
        + "_add"
        + ("_relu" if p["relu"] else "")
        + ("_inch" if p["in_channels"] else "")
    )


CASES = [epilogue_case(random.Random(8000 + i)) for i in range(24)]


def make_inputs(p: dict) -> tuple:
    g = torch.Generator().manual_seed(zlib.crc32(case_id(p).encode()))
    fan = p["c"] * p["r"] * p["r"]
    x = torch.randn(p["n"], p["c"], p["h"], p["w"], generator=g)
    w = torch.randn(p["k"], p["c"], p["r"], p["r"], generator=g) / math.sqrt(fan)
    b = torch.randn(p["k"], generator=g) if p["bias"] else None
    oh = (p["h"] + 2 * p["padding"] - p["r"]) // p["stride"] + 1
    ow = (p["w"] + 2 * p["padding"] - p["r"]) // p["stride"] + 1
    res = torch.randn(p["n"], p["k"], oh, ow, generator=g)
    return x, w, b, res, fan


def reference(x, w, b, res, p: dict) -> torch.Tensor:
    """float64 torch: F.conv2d, + residual, relu."""
    y = F.conv2d(
        x.double(), w.double(), None if b is None else b.double(), stride=p["stride"], padding=p["padding"]
    )
    y = y + res.double()
    return (torch.relu(y) if p["relu"] else y).float()


@pytest.mark.parametrize("p", CASES, ids=case_id)
def test_residual_epilogue_matches_torch(p: dict) -> None:
    v = tdc.vector_width()
    x, w, b, res, fan = make_inputs(p)
    xb, wb, rb = tdc.to_blocked(x), tdc.to_blocked_weight(w), tdc.to_blocked(res)
    in_channels = p["c"] if p["in_channels"] else None
    yb = tdc.conv2d_blocked(
        xb, wb, b, p["stride"], p["padding"], relu=p["relu"], in_channels=in_channels, residual=rb
    )
    assert_conv_close(tdc.from_blocked(yb, p["k"]), reference(x, w, b, res, p), fan, case_id(p))
    if p["k"] % v:
        assert not yb[:, -1, :, :, p["k"] % v :].any(), "padded output channels must stay zero for the next layer"


def test_residual_changes_nothing_else() -> None:
    """With a zero residual the result is bit for bit the one without; the residual is read,
    never written."""
    x, w = torch.randn(2, 20, 9, 9), torch.randn(24, 20, 3, 3) / 13
    b = torch.randn(24)
    xb, wb = tdc.to_blocked(x), tdc.to_blocked_weight(w)
    plain = tdc.conv2d_blocked(xb, wb, b, 1, 1, relu=True)
    zero = torch.zeros_like(plain)
    assert torch.equal(tdc.conv2d_blocked(xb, wb, b, 1, 1, relu=True, residual=zero), plain)
    assert not zero.any()
    rb = torch.randn_like(plain)
    before = rb.clone()
    tdc.conv2d_blocked(xb, wb, b, 1, 1, relu=True, residual=rb)
    assert torch.equal(rb, before)


def test_padded_lanes_stay_zero_with_bias_residual_and_relu() -> None:
    """A bias of K values is padded with zeros, so the output's padded lanes stay zero, with a
    residual and without a ReLU (a negative bias would show through a missing pad)."""
    v = tdc.vector_width()
    k = v + 3
    x, w = torch.randn(1, 7, 6, 6), torch.randn(k, 7, 1, 1)
    b = -torch.rand(k) - 1
    res = torch.randn(1, k, 6, 6)
    yb = tdc.conv2d_blocked(tdc.to_blocked(x), tdc.to_blocked_weight(w), b, residual=tdc.to_blocked(res))
    assert not yb[:, -1, :, :, 3:].any()


def test_residual_non_contiguous_is_taken() -> None:
    """A residual view of the right shape is read as its values (made contiguous first)."""
    x, w = torch.randn(1, 16, 5, 7), torch.randn(16, 16, 3, 3) / 12
    xb, wb = tdc.to_blocked(x), tdc.to_blocked_weight(w)
    base = tdc.to_blocked(torch.randn(1, 16, 7, 5))
    view = base.transpose(2, 3)
    assert not view.is_contiguous()
    got = tdc.conv2d_blocked(xb, wb, padding=1, residual=view)
    want = tdc.conv2d_blocked(xb, wb, padding=1, residual=view.contiguous())
    assert torch.equal(got, want)


@pytest.mark.parametrize("relu", [False, True], ids=["add", "add_relu"])
def test_residual_backward(relu: bool) -> None:
    """Gradients of xb, wb, bias and the residual against float64 torch autograd: the residual's is
    the output gradient after the ReLU mask."""
    g = torch.Generator().manual_seed(5)
    c, k = 13, 21
    x = torch.randn(2, c, 8, 7, generator=g)
    w = torch.randn(k, c, 3, 3, generator=g) / math.sqrt(9 * c)
    b = torch.randn(k, generator=g)
    res = torch.randn(2, k, 8, 7, generator=g)
    gy = torch.randn(2, k, 8, 7, generator=g)

    xb = tdc.to_blocked(x).requires_grad_()
    wb = tdc.to_blocked_weight(w).requires_grad_()
    bl = b.clone().requires_grad_()
    rb = tdc.to_blocked(res).requires_grad_()
    y = tdc.from_blocked(tdc.conv2d_blocked(xb, wb, bl, 1, 1, relu=relu, in_channels=c, residual=rb), k)
    (y * gy).sum().backward()

    xd, wd, bd, rd = (t.double().requires_grad_() for t in (x, w, b, res))
    yd = F.conv2d(xd, wd, bd, padding=1) + rd
    if relu:
        yd = torch.relu(yd)
    (yd * gy.double()).sum().backward()

    assert_grad_close(tdc.from_blocked(rb.grad, k), rd.grad.float(), "residual")
    assert_grad_close(tdc.from_blocked(xb.grad, c), xd.grad.float(), "input")
    v = tdc.vector_width()
    wgrad = wb.grad.permute(0, 5, 1, 4, 2, 3).reshape(wb.shape[0] * v, wb.shape[1] * v, 3, 3)[:k, :c]
    assert_grad_close(wgrad, wd.grad.float(), "weight")
    assert_grad_close(bl.grad, bd.grad.float(), "bias")
    if relu:
        assert (rb.grad == 0).any(), "the ReLU mask must reach the residual's gradient"


def test_residual_only_gradient() -> None:
    """Asking for the residual's gradient alone works (no other input requires one)."""
    xb = tdc.to_blocked(torch.randn(1, 8, 4, 4))
    wb = tdc.to_blocked_weight(torch.randn(8, 8, 1, 1))
    rb = tdc.to_blocked(torch.randn(1, 8, 4, 4)).requires_grad_()
    y = tdc.conv2d_blocked(xb, wb, relu=True, residual=rb)
    (gr,) = torch.autograd.grad(y.sum(), [rb])
    assert torch.equal(gr, (y > 0).float())


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda y: y[:, :, :-1], r"'residual' of the output's shape"),
        (lambda y: y.double(), r"'residual' of dtype float32"),
        (lambda y: y.reshape(-1), r"'residual' of the output's shape"),
    ],
    ids=["shape", "dtype", "dims"],
)
def test_residual_errors_name_it(make, match: str) -> None:
    xb = tdc.to_blocked(torch.randn(1, 8, 5, 5))
    wb = tdc.to_blocked_weight(torch.randn(8, 8, 3, 3))
    y = tdc.conv2d_blocked(xb, wb, padding=1)
    with pytest.raises(RuntimeError, match=match):
        tdc.conv2d_blocked(xb, wb, padding=1, residual=make(y))


def test_aten_fallback_honours_the_residual() -> None:
    """A stride beyond the kernels' 32-bit offsets runs on torch's convolution, with the same
    epilogue."""
    x, w = torch.randn(1, 5, 6, 3), torch.randn(9, 5, 3, 1)
    b = torch.randn(9)
    stride = (1, 1 << 22)
    res = torch.randn(1, 9, 4, 1)
    before = tdc.jit_stats()["aten_fallbacks"]
    yb = tdc.conv2d_blocked(
        tdc.to_blocked(x), tdc.to_blocked_weight(w), b, stride, relu=True, residual=tdc.to_blocked(res)
    )
    assert tdc.jit_stats()["aten_fallbacks"] > before
    want = torch.relu(F.conv2d(x.double(), w.double(), b.double(), stride=stride) + res.double()).float()
    assert_conv_close(tdc.from_blocked(yb, 9), want, 15)
    with pytest.raises(RuntimeError, match="'residual' of the output's shape"):
        tdc.conv2d_blocked(tdc.to_blocked(x), tdc.to_blocked_weight(w), b, stride, residual=tdc.to_blocked(res)[:, :, :2])


def test_opcheck_with_residual() -> None:
    xb = tdc.to_blocked(torch.randn(2, 20, 6, 6)).requires_grad_()
    wb = tdc.to_blocked_weight(torch.randn(24, 20, 3, 3) / 13).requires_grad_()
    rb = tdc.to_blocked(torch.randn(2, 24, 6, 6)).requires_grad_()
    b = torch.randn(24, requires_grad=True)
    for relu in (False, True):
        torch.library.opcheck(ops.conv2d_blocked, (xb, wb, b, [1, 1], [1, 1, 1, 1], [1, 1], relu, 20, rb))


def test_compile_fullgraph_with_residual(tmp_path, monkeypatch) -> None:
    """torch.compile(fullgraph=True) traces the residual epilogue forward and backward."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    torch._dynamo.reset()
    xb = tdc.to_blocked(torch.randn(1, 16, 6, 6))
    wb = tdc.to_blocked_weight(torch.randn(16, 16, 3, 3) / 12).requires_grad_()
    rb = tdc.to_blocked(torch.randn(1, 16, 6, 6)).requires_grad_()

    def f(xb, wb, rb):
        return tdc.conv2d_blocked(xb, wb, None, 1, 1, relu=True, residual=rb).sum()

    compiled = torch.compile(f, fullgraph=True)
    got = torch.autograd.grad(compiled(xb, wb, rb), [wb, rb])
    want = torch.autograd.grad(f(xb, wb, rb), [wb, rb])
    torch._dynamo.reset()
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def test_torch_func_grad_of_the_residual() -> None:
    xb = tdc.to_blocked(torch.randn(1, 8, 5, 5))
    wb = tdc.to_blocked_weight(torch.randn(8, 8, 3, 3) / 9)
    rb = tdc.to_blocked(torch.randn(1, 8, 5, 5))

    def f(r):
        return tdc.conv2d_blocked(xb, wb, None, 1, 1, relu=True, residual=r).sum()

    gr = torch.func.grad(f)(rb)
    y = tdc.conv2d_blocked(xb, wb, None, 1, 1, relu=True, residual=rb)
    assert torch.equal(gr, (y > 0).float())


@pytest.mark.skipif(not cpu_has("avx2"), reason=f"this CPU lacks AVX2 (detected {_C.detected_isa()})")
def test_fused_epilogue_under_avx2_cap() -> None:
    """The same tests on the AVX2 kernels, in a child capped with TORCH_DIRECTCONV_ISA=avx2."""
    run_pytest_under_isa("avx2", "tests/test_fused_epilogue.py", "not under_avx2_cap and not compile")
