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
        short = tdc.to_blocked(res)[:, :, :2]
        tdc.conv2d_blocked(tdc.to_blocked(x), tdc.to_blocked_weight(w), b, stride, residual=short)


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


# ---- the statistics epilogue (conv2d_blocked_stats) ----------------------------------------


def stats_ref(x, w, b, p: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y = F.conv2d(
        x.double(), w.double(), None if b is None else b.double(), stride=p["stride"], padding=p["padding"]
    )
    var, mean = torch.var_mean(y, (0, 2, 3), correction=0)
    return y, mean, var


def assert_stats_close(mean, var, want_mean, want_var, msg: str = "") -> None:
    """fp32 statistics against float64: the mean to 1e-6 of the spread, the variance to 1e-5 of itself."""
    std = want_var.sqrt()
    atol = 1e-6 * float(std.max() + want_mean.abs().max())
    torch.testing.assert_close(mean.double(), want_mean, rtol=0, atol=atol, msg=lambda m: f"{msg}: mean: {m}")
    torch.testing.assert_close(var.double(), want_var, rtol=2e-5, atol=1e-7, msg=lambda m: f"{msg}: var: {m}")


@pytest.mark.parametrize("p", CASES[:12], ids=case_id)
def test_conv_stats_match_var_mean(p: dict) -> None:
    x, w, b, _, fan = make_inputs(p)
    y, mean, var = stats_ref(x, w, b, p)
    # A shift near the mean, as a batch norm's running mean would be.
    shift = (mean + 0.5 * var.sqrt() * torch.randn(p["k"], dtype=torch.float64)).float()
    before = tdc.jit_stats()["conv_stats_recomputed"]
    in_channels = p["c"] if p["in_channels"] else None
    xb, wb = tdc.to_blocked(x), tdc.to_blocked_weight(w)
    yb, m, v = tdc.conv2d_blocked_stats(
        xb, wb, b, p["stride"], p["padding"], channels=p["k"], shift=shift, in_channels=in_channels
    )
    assert tdc.jit_stats()["conv_stats_recomputed"] == before, "a shift within a std must not need the exact pass"
    assert_conv_close(tdc.from_blocked(yb, p["k"]), y.float(), fan, case_id(p))
    assert m.shape == v.shape == (p["k"],)
    assert_stats_close(m, v, mean, var, case_id(p))


@pytest.mark.parametrize("n,hw", [(2, 56), (1, 7)])
def test_conv_stats_mean_1e3_std_1(n: int, hw: int) -> None:
    """A map of mean 1e3 and standard deviation about 1: with the shift at 0 the fp32 sums would
    lose the variance, so the exact pass runs; with the shift at the running mean it is not needed."""
    g = torch.Generator().manual_seed(3)
    c, k = 16, 24
    x = torch.randn(n, c, hw, hw, generator=g)
    w = torch.randn(k, c, 1, 1, generator=g) / math.sqrt(c)
    b = torch.full((k,), 1e3)
    xb, wb = tdc.to_blocked(x), tdc.to_blocked_weight(w)
    y = F.conv2d(x.double(), w.double(), b.double())
    var, mean = torch.var_mean(y, (0, 2, 3), correction=0)
    assert 0.3 < var.min() and var.max() < 3 and (mean - 1e3).abs().max() < 1
    for shift, exact_pass in ((torch.zeros(k), True), (torch.full((k,), 1e3), False), (None, True)):
        before = tdc.jit_stats()["conv_stats_recomputed"]
        yb, m, v = tdc.conv2d_blocked_stats(xb, wb, b, channels=k, shift=shift)
        assert tdc.jit_stats()["conv_stats_recomputed"] == before + int(exact_pass)
        assert_stats_close(m, v, mean, var, f"shift={None if shift is None else float(shift[0])}")
        assert torch.equal(yb, tdc.conv2d_blocked(xb, wb, b))


def test_conv_stats_output_is_conv2d_blocked() -> None:
    """The output is bit for bit conv2d_blocked's; its padded lanes stay zero."""
    x, w = torch.randn(2, 20, 9, 9), torch.randn(21, 20, 3, 3) / 13
    b = torch.randn(21)
    xb, wb = tdc.to_blocked(x), tdc.to_blocked_weight(w)
    yb, _, _ = tdc.conv2d_blocked_stats(xb, wb, b, 2, 1, channels=21)
    assert torch.equal(yb, tdc.conv2d_blocked(xb, wb, b, 2, 1))
    assert not yb[:, -1, :, :, 21 % tdc.vector_width() :].any()


def test_conv_stats_errors_name_the_argument() -> None:
    xb = tdc.to_blocked(torch.randn(1, 8, 5, 5))
    wb = tdc.to_blocked_weight(torch.randn(20, 8, 3, 3))
    v = tdc.vector_width()
    with pytest.raises(RuntimeError, match="'shift' of shape"):
        ops.conv2d_blocked_stats(xb, wb, None, [1, 1], [0] * 4, [1, 1], None, torch.zeros(3), 20)
    with pytest.raises(RuntimeError, match="'shift' of dtype float32"):
        ops.conv2d_blocked_stats(xb, wb, None, [1, 1], [0] * 4, [1, 1], None, torch.zeros(20).double(), 20)
    with pytest.raises(RuntimeError, match="'channels'"):
        wide = -(-20 // v) * v + 1
        ops.conv2d_blocked_stats(xb, wb, None, [1, 1], [0] * 4, [1, 1], None, torch.zeros(wide), wide)


def test_conv_stats_aten_fallback() -> None:
    x, w = torch.randn(2, 5, 6, 3), torch.randn(9, 5, 3, 1)
    stride = (1, 1 << 22)
    yb, m, v = tdc.conv2d_blocked_stats(tdc.to_blocked(x), tdc.to_blocked_weight(w), None, stride, channels=9)
    y = F.conv2d(x.double(), w.double(), stride=stride)
    var, mean = torch.var_mean(y, (0, 2, 3), correction=0)
    assert_conv_close(tdc.from_blocked(yb, 9), y.float(), 15)
    assert_stats_close(m, v, mean, var)


def test_conv_stats_backward_and_no_gradient_through_the_stats() -> None:
    x, w = torch.randn(2, 12, 6, 6), torch.randn(20, 12, 3, 3) / 10
    b = torch.randn(20)
    gy = tdc.to_blocked(torch.randn(2, 20, 6, 6))
    grads = []
    for stats in (True, False):
        xb = tdc.to_blocked(x).requires_grad_()
        wb = tdc.to_blocked_weight(w).requires_grad_()
        bl = b.clone().requires_grad_()
        if stats:
            yb, m, v = tdc.conv2d_blocked_stats(xb, wb, bl, 1, 1, channels=20, in_channels=12)
            assert not m.requires_grad and not v.requires_grad
        else:
            yb = tdc.conv2d_blocked(xb, wb, bl, 1, 1, in_channels=12)
        grads.append(torch.autograd.grad(yb, [xb, wb, bl], gy))
    for a, e in zip(*grads):
        assert torch.equal(a, e)


def test_opcheck_conv_stats() -> None:
    xb = tdc.to_blocked(torch.randn(2, 20, 6, 6)).requires_grad_()
    wb = tdc.to_blocked_weight(torch.randn(24, 20, 3, 3) / 13).requires_grad_()
    b = torch.randn(24, requires_grad=True)
    torch.library.opcheck(
        ops.conv2d_blocked_stats, (xb, wb, b, [1, 1], [1, 1, 1, 1], [1, 1], 20, torch.zeros(24), 24)
    )


def test_compile_fullgraph_conv_stats(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    torch._dynamo.reset()
    xb = tdc.to_blocked(torch.randn(1, 16, 6, 6))
    wb = tdc.to_blocked_weight(torch.randn(16, 16, 3, 3) / 12).requires_grad_()
    shift = torch.zeros(16)

    def f(xb, wb):
        yb, m, v = tdc.conv2d_blocked_stats(xb, wb, None, 1, 1, channels=16, shift=shift)
        return ((yb - 1) ** 2).sum(), m, v

    loss, m, v = torch.compile(f, fullgraph=True)(xb, wb)
    (g,) = torch.autograd.grad(loss, [wb])
    loss_e, m_e, v_e = f(xb, wb)
    (g_e,) = torch.autograd.grad(loss_e, [wb])
    torch._dynamo.reset()
    torch.testing.assert_close(g, g_e, rtol=1e-5, atol=1e-5)
    assert torch.equal(m, m_e) and torch.equal(v, v_e)
