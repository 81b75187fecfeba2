"""Batch norm and pooling on blocked tensors (torch_directconv.blocked_ops) against torch's own
F.batch_norm, F.max_pool2d, F.avg_pool2d and mean, forward and gradients (references in float64
where rounding matters), on odd shapes: channel counts that leave a partial last block, H or W
of 1, odd sizes, N = 1 and N = 0. Padded lanes must stay zero in outputs and gradients, even
when the inputs carry garbage there.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import torch_directconv as tdc
from helpers import assert_grad_close, check_expected_isa, run_pytest_under_isa, run_python
from torch_directconv import blocked_ops as bo

ops = torch.ops.directconv


@pytest.fixture(autouse=True)
def isa() -> str:
    return check_expected_isa()


SHAPES = [(2, 20, 7, 5), (1, 3, 1, 1), (3, 17, 1, 9), (1, 40, 6, 1), (2, 33, 3, 3), (4, 8, 5, 4)]


def shape_id(s) -> str:
    return "n{}c{}h{}w{}".format(*s)


def leaf(x: torch.Tensor) -> torch.Tensor:
    """A blocked copy of x as a leaf that collects its own (blocked) gradient."""
    return tdc.to_blocked(x).detach().requires_grad_()


def padding_of(tb: torch.Tensor, channels: int) -> torch.Tensor:
    """The padded lanes (channels C and up) of a blocked tensor, flattened."""
    v = tb.shape[-1]
    flat = tb.movedim(-1, 2).reshape(tb.shape[0], tb.shape[1] * v, *tb.shape[2:4])
    return flat[:, channels:]


def with_garbage(xb: torch.Tensor, channels: int) -> torch.Tensor:
    """xb with NaN and large values in its padded lanes, which no op may let through."""
    out = xb.detach().clone()
    c0 = channels % xb.shape[-1]
    if c0:
        out[:, -1, :, :, c0:] = float("nan")
        out[:, -1, :, :, -1] = 1e30
    return out


def assert_padding_zero(tb: torch.Tensor, channels: int, what: str) -> None:
    pad = padding_of(tb, channels)
    assert torch.equal(pad, torch.zeros_like(pad)), f"{what}: padded lanes are not zero"


def close(actual: torch.Tensor, expected: torch.Tensor, msg: str, rtol: float = 1e-5) -> None:
    expected = expected.to(actual.dtype)
    scale = expected.abs().max().item() + 1 if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale, msg=lambda m: f"{msg}: {m}")


# ---- statistics ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_bn_stats_matches_var_mean(shape) -> None:
    x = torch.randn(shape) * 2 + 0.5
    mean, var = bo.bn_stats(tdc.to_blocked(x), shape[1])
    ref_var, ref_mean = torch.var_mean(x.double(), (0, 2, 3), unbiased=False)
    close(mean, ref_mean, "mean", 1e-6)
    close(var, ref_var, "var", 1e-6)
    assert mean.shape == var.shape == (shape[1],) and mean.dtype == torch.float32


@pytest.mark.parametrize("first", ["sample", "zero"])
def test_bn_stats_large_mean(first: str) -> None:
    """Mean 1000, std 1, 56x56x32 images: fp32 E[x^2] - E[x]^2 loses the variance; ours keeps it,
    also when the first pixel (each channel's shift) is far from the mean."""
    x = torch.randn(4, 32, 56, 56) + 1000
    if first == "zero":
        x[0, :, 0, 0] = 0
    mean, var = bo.bn_stats(tdc.to_blocked(x), 32)
    ref_var, ref_mean = torch.var_mean(x.double(), (0, 2, 3), unbiased=False)
    torch.testing.assert_close(var.double(), ref_var, rtol=1e-6, atol=0)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-7, atol=0)
    naive = x.square().mean((0, 2, 3)) - x.mean((0, 2, 3)).square()
    assert (naive.double() - ref_var).abs().max() > 1e-2, "the test would not catch the naive formula"


def test_bn_stats_empty_batch_is_nan() -> None:
    mean, var = bo.bn_stats(tdc.to_blocked(torch.randn(0, 5, 4, 4)), 5)
    assert mean.shape == (5,) and torch.isnan(mean).all() and torch.isnan(var).all()


def test_bn_stats_gradient() -> None:
    """bn_stats is differentiable on its own (d mean / dx, d var / dx), padded lanes zero."""
    x = torch.randn(2, 20, 3, 5, dtype=torch.float64)
    xb = leaf(x.float())
    mean, var = bo.bn_stats(xb, 20)
    gm, gv = torch.randn(20), torch.randn(20)
    (gxb,) = torch.autograd.grad((mean * gm).sum() + (var * gv).sum(), xb)
    xr = x.clone().requires_grad_()
    rv, rm = torch.var_mean(xr, (0, 2, 3), unbiased=False)
    (gx,) = torch.autograd.grad((rm * gm).sum() + (rv * gv).sum(), xr)
    assert_grad_close(tdc.from_blocked(gxb, 20), gx.float(), "grad of x")
    assert_padding_zero(gxb, 20, "grad_xb")


# ---- batch norm: F.batch_norm (+ residual, ReLU) ------------------------------------------

VARIANTS = [
    dict(affine=True, residual=True, relu=True),
    dict(affine=True, residual=False, relu=True),
    dict(affine=True, residual=True, relu=False),
    dict(affine=False, residual=False, relu=False),
]


def variant_id(v: dict) -> str:
    return "-".join(k for k, on in v.items() if on) or "plain"


def bn_reference(x, rm, rv, w, b, r, training, relu, momentum=0.1, eps=1e-5):
    y = F.batch_norm(x, rm, rv, w, b, training, momentum, eps)
    if r is not None:
        y = y + r
    return torch.relu(y) if relu else y


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_batch_norm_matches_torch(shape, training: bool, variant: dict) -> None:
    n, c, h, w = shape
    x = torch.randn(shape, dtype=torch.float64) * 1.5 + 0.3
    weight = torch.rand(c, dtype=torch.float64) + 0.5 if variant["affine"] else None
    bias = torch.randn(c, dtype=torch.float64) if variant["affine"] else None
    res = torch.randn(shape, dtype=torch.float64) if variant["residual"] else None
    rm0, rv0 = torch.randn(c) * 0.1, torch.rand(c) + 0.5
    grad = torch.randn(shape, dtype=torch.float64)
    if training and n * h * w == 1:  # torch refuses it too
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            bo.batch_norm(tdc.to_blocked(x.float()), c, None, None, training=True)
        return

    # Ours, in float32, on blocked leaves (residual with garbage in its padded lanes).
    xb = leaf(x.float())
    wl = weight.float().requires_grad_() if weight is not None else None
    bl = bias.float().requires_grad_() if bias is not None else None
    rb = with_garbage(tdc.to_blocked(res.float()), c).requires_grad_() if res is not None else None
    rm, rv = rm0.clone(), rv0.clone()
    yb = bo.batch_norm(xb, c, rm, rv, wl, bl, training, 0.1, 1e-5, residual=rb, relu=variant["relu"])
    assert_padding_zero(yb, c, "yb")
    leaves = [t for t in (xb, wl, bl, rb) if t is not None]
    got = torch.autograd.grad(yb, leaves, tdc.to_blocked(grad.float()))

    # Torch, in float64, and its running statistics from the same float32 input.
    refs = [t.clone().requires_grad_() for t in (x, weight, bias, res) if t is not None]
    it = iter(refs)
    xr, wr, br, rr = (next(it) if t is not None else None for t in (x, weight, bias, res))
    ref = bn_reference(xr, rm0.double(), rv0.double(), wr, br, rr, training, variant["relu"])
    close(tdc.from_blocked(yb, c), ref, "forward")
    want = torch.autograd.grad(ref, refs, grad)
    for name, a, e in zip(("x", "weight", "bias", "residual"), got, want, strict=False):
        if a.dim() == 5:
            assert_padding_zero(a, c, f"grad of {name}")
            a = tdc.from_blocked(a, c)
        assert_grad_close(a, e.float(), f"grad of {name}")
    trm, trv = rm0.clone(), rv0.clone()
    F.batch_norm(x.float(), trm, trv, None, None, training, 0.1, 1e-5)
    torch.testing.assert_close(rm, trm, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(rv, trv, rtol=1e-6, atol=1e-7)


def test_batch_norm_running_stats_large_mean() -> None:
    """The caller's running-statistics update (unbiased variance) follows torch's, large mean too."""
    x = torch.randn(4, 32, 56, 56) + 1000
    rm, rv, trm, trv = torch.zeros(32), torch.ones(32), torch.zeros(32), torch.ones(32)
    for _ in range(3):
        bo.batch_norm(tdc.to_blocked(x), 32, rm, rv, None, None, True, 0.1, 1e-5)
        F.batch_norm(x, trm, trv, None, None, True, 0.1, 1e-5)
    torch.testing.assert_close(rm, trm, rtol=1e-6, atol=0)
    torch.testing.assert_close(rv, trv, rtol=1e-5, atol=0)


def test_batch_norm_large_mean_forward() -> None:
    x = torch.randn(2, 20, 16, 16, dtype=torch.float64) + 1000
    yb = bo.batch_norm(tdc.to_blocked(x.float()), 20, None, None, None, None, True)
    ref = F.batch_norm(x, None, None, None, None, True)
    close(tdc.from_blocked(yb, 20), ref, "normalised", 1e-3)


def test_batch_norm_one_value_per_channel_is_refused() -> None:
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bo.batch_norm(tdc.to_blocked(torch.randn(1, 4, 1, 1)), 4, None, None, training=True)


def test_batch_norm_empty_batch() -> None:
    xb = leaf(torch.randn(0, 5, 4, 4))
    yb = bo.batch_norm(xb, 5, torch.zeros(5), torch.ones(5), training=False, relu=True)
    assert yb.shape == xb.shape
    (g,) = torch.autograd.grad(yb.sum(), xb)
    assert g.shape == xb.shape


# ---- bn_apply and the raw backward --------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS[:3], ids=variant_id)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_bn_apply_matches_torch(shape, variant: dict) -> None:
    n, c, h, w = shape
    x, r = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    scale, shift = torch.randn(c, dtype=torch.float64), torch.randn(c, dtype=torch.float64)
    grad = torch.randn(shape, dtype=torch.float64)
    xb = with_garbage(tdc.to_blocked(x.float()), c).requires_grad_()
    sl, hl = scale.float().requires_grad_(), shift.float().requires_grad_()
    rb = leaf(r.float()) if variant["residual"] else None
    yb = bo.bn_apply(xb, c, sl, hl, rb, variant["relu"])
    assert_padding_zero(yb, c, "yb")
    xr, sr, hr, rr = (t.clone().requires_grad_() for t in (x, scale, shift, r))
    ref = xr * sr.view(1, c, 1, 1) + hr.view(1, c, 1, 1)
    if variant["residual"]:
        ref = ref + rr
    if variant["relu"]:
        ref = torch.relu(ref)
    close(tdc.from_blocked(yb, c), ref, "forward")
    leaves = [xb, sl, hl] + ([rb] if rb is not None else [])
    got = torch.autograd.grad(yb, leaves, tdc.to_blocked(grad.float()))
    want = torch.autograd.grad(ref, [xr, sr, hr] + ([rr] if rb is not None else []), grad)
    for name, a, e in zip(("x", "scale", "shift", "residual"), got, want, strict=False):
        if a.dim() == 5:
            assert_padding_zero(a, c, f"grad of {name}")
            a = tdc.from_blocked(a, c)
        assert_grad_close(a, e.float(), f"grad of {name}")


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_bn_backward_output_mask(train: bool) -> None:
    """Each gradient alone equals its value in the full call; those not asked for are empty."""
    c = 20
    x = torch.randn(2, c, 5, 3)
    gy, y = tdc.to_blocked(torch.randn(x.shape)), tdc.to_blocked(torch.randn(x.shape))
    xb, mean, var, w = tdc.to_blocked(x), torch.randn(c), torch.rand(c) + 0.5, torch.randn(c)
    full = ops.bn_backward_blocked(gy, y, xb, mean, var, w, 1e-5, train, c, [True] * 4)
    for i in range(4):
        mask = [j == i for j in range(4)]
        part = ops.bn_backward_blocked(gy, y, xb, mean, var, w, 1e-5, train, c, mask)
        for j in range(4):
            if j == i:
                torch.testing.assert_close(part[j], full[j], rtol=1e-6, atol=1e-6)
            else:
                assert part[j].shape == (0,)


# ---- pooling ------------------------------------------------------------------------------

# (N, C, H, W), kernel, stride, padding, dilation, ceil_mode
MAX_CASES = [
    ((2, 20, 12, 12), 3, 2, 1, 1, False),  # ResNet's stem pool
    ((1, 17, 7, 9), 3, 2, 1, 1, True),
    ((3, 5, 1, 1), 1, 1, 0, 1, False),
    ((1, 33, 1, 8), (1, 3), (1, 2), (0, 1), 1, True),
    ((2, 8, 9, 6), 2, 2, 0, 1, True),
    ((1, 24, 11, 10), 3, (2, 3), 1, 2, False),
    ((2, 3, 5, 5), (2, 3), 1, (1, 1), (2, 1), True),
    ((0, 7, 6, 6), 3, 2, 1, 1, False),
]


def pool_id(case) -> str:
    return "n{}c{}h{}w{}".format(*case[0]) + "-" + "-".join(str(v) for v in case[1:])


@pytest.mark.parametrize("case", MAX_CASES, ids=pool_id)
def test_max_pool2d_matches_torch(case) -> None:
    shape, k, s, p, d, ceil = case
    c = shape[1]
    # After a ReLU, as in ResNet: many ties, where the first maximum must get the gradient.
    x = torch.relu(torch.randn(shape))
    ref_in = x.clone().requires_grad_()
    ref = F.max_pool2d(ref_in, k, s, p, d, ceil)
    xb = with_garbage(tdc.to_blocked(x), c).requires_grad_()
    yb = bo.max_pool2d(xb, c, k, s, p, d, ceil)
    assert yb.shape[2:4] == ref.shape[2:4]
    assert torch.equal(tdc.from_blocked(yb, c), ref)
    assert_padding_zero(yb, c, "yb")
    grad = torch.randn(ref.shape)
    (gxb,) = torch.autograd.grad(yb, xb, tdc.to_blocked(grad))
    (gx,) = torch.autograd.grad(ref, ref_in, grad)
    torch.testing.assert_close(tdc.from_blocked(gxb, c), gx, rtol=1e-6, atol=1e-6)
    assert_padding_zero(gxb, c, "grad_xb")


def test_max_pool2d_nan_propagates_as_torch() -> None:
    """A NaN is the maximum of its windows, and the last NaN of a window gets its gradient."""
    x = torch.randn(2, 20, 9, 9)
    x[0, 3, 2, 2] = x[1, 19, 8, 8] = x[1, 0, 0, 1] = x[1, 0, 1, 1] = float("nan")
    ref_in = x.clone().requires_grad_()
    ref = F.max_pool2d(ref_in, 3, 2, 1)
    xb = tdc.to_blocked(x).requires_grad_()
    yb = bo.max_pool2d(xb, 20, 3, 2, 1)
    torch.testing.assert_close(tdc.from_blocked(yb, 20), ref, rtol=0, atol=0, equal_nan=True)
    grad = torch.randn(ref.shape)
    (gxb,) = torch.autograd.grad(yb, xb, tdc.to_blocked(grad))
    (gx,) = torch.autograd.grad(ref, ref_in, grad)
    torch.testing.assert_close(tdc.from_blocked(gxb, 20), gx, rtol=1e-6, atol=1e-6)


# (N, C, H, W), kernel, stride, padding, ceil_mode, count_include_pad, divisor_override
AVG_CASES = [
    ((2, 20, 8, 8), 2, 2, 0, False, True, None),
    ((1, 17, 7, 9), 3, 2, 1, True, True, None),
    ((1, 17, 7, 9), 3, 2, 1, True, False, None),
    ((3, 5, 1, 1), 1, 1, 0, False, True, None),
    ((1, 33, 1, 8), (1, 3), (1, 2), (0, 1), True, False, None),
    ((2, 8, 9, 6), 3, 1, 1, False, True, 5),
    ((2, 3, 5, 4), (2, 3), (2, 1), (1, 1), True, False, 2),
    ((0, 7, 6, 6), 2, 2, 0, False, True, None),
]


@pytest.mark.parametrize("case", AVG_CASES, ids=pool_id)
def test_avg_pool2d_matches_torch(case) -> None:
    shape, k, s, p, ceil, include_pad, divisor = case
    c = shape[1]
    x = torch.randn(shape)
    ref_in = x.clone().requires_grad_()
    ref = F.avg_pool2d(ref_in, k, s, p, ceil, include_pad, divisor)
    xb = with_garbage(tdc.to_blocked(x), c).requires_grad_()
    yb = bo.avg_pool2d(xb, c, k, s, p, ceil, include_pad, divisor)
    assert yb.shape[2:4] == ref.shape[2:4]
    torch.testing.assert_close(tdc.from_blocked(yb, c), ref, rtol=1e-6, atol=1e-6)
    assert_padding_zero(yb, c, "yb")
    grad = torch.randn(ref.shape)
    (gxb,) = torch.autograd.grad(yb, xb, tdc.to_blocked(grad))
    (gx,) = torch.autograd.grad(ref, ref_in, grad)
    torch.testing.assert_close(tdc.from_blocked(gxb, c), gx, rtol=1e-6, atol=1e-6)
    assert_padding_zero(gxb, c, "grad_xb")


@pytest.mark.parametrize("shape", SHAPES + [(0, 9, 3, 3), (2, 2048, 7, 7)], ids=shape_id)
def test_global_avg_pool_matches_mean(shape) -> None:
    c = shape[1]
    x = torch.randn(shape, dtype=torch.float64) + 3
    xb = with_garbage(tdc.to_blocked(x.float()), c).requires_grad_()
    y = bo.global_avg_pool(xb, c)
    assert y.shape == (shape[0], c) and y.is_contiguous()
    close(y, x.mean((2, 3)), "forward", 1e-6)
    grad = torch.randn(y.shape)
    (gxb,) = torch.autograd.grad(y, xb, grad)
    assert_padding_zero(gxb, c, "grad_xb")
    expect = (grad / (shape[2] * shape[3]))[:, :, None, None].expand(shape)
    torch.testing.assert_close(tdc.from_blocked(gxb, c), expect, rtol=1e-6, atol=0)


# ---- argument checks ----------------------------------------------------------------------


def test_errors_name_the_argument() -> None:
    v = tdc.vector_width()
    xb = tdc.to_blocked(torch.randn(2, 20, 4, 4))
    with pytest.raises(RuntimeError, match=r"'channels' \(40\) does not fit"):
        bo.bn_stats(xb, 40)
    with pytest.raises(RuntimeError, match=r"'channels' \(3\) does not fit"):
        bo.global_avg_pool(xb, 3)
    with pytest.raises(RuntimeError, match=rf"expected a blocked 'xb' \(N, C/{v}, H, W, {v}\)"):
        bo.bn_stats(torch.randn(2, 20, 4, 4), 20)
    with pytest.raises(RuntimeError, match="expected a blocked 'xb'"):
        bo.max_pool2d(torch.randn(2, 3, 4, 4, v // 2), 20, 2)
    with pytest.raises(RuntimeError, match="dtype float32"):
        bo.bn_stats(xb.double(), 20)
    with pytest.raises(RuntimeError, match=r"expected 'scale' of shape \(20\)"):
        bo.bn_apply(xb, 20, torch.ones(19), torch.zeros(20))
    with pytest.raises(RuntimeError, match="expected 'residual' of the shape of 'xb'"):
        bo.bn_apply(xb, 20, torch.ones(20), torch.zeros(20), residual=xb[:1])
    with pytest.raises(RuntimeError, match="expected 'weight' of shape"):
        bo.batch_norm(xb, 20, torch.zeros(20), torch.ones(20), torch.ones(3))
    with pytest.raises(RuntimeError, match="'padding' at most half"):
        bo.max_pool2d(xb, 20, 2, padding=2)
    with pytest.raises(RuntimeError, match="too small"):
        bo.avg_pool2d(xb, 20, 5)
    with pytest.raises(RuntimeError, match="'divisor_override' must not be zero"):
        bo.avg_pool2d(xb, 20, 2, divisor_override=0)
    with pytest.raises(RuntimeError, match="expected 'kernel_size' to be an int or a pair"):
        bo.max_pool2d(xb, 20, (2, 2, 2))


# ---- PyTorch integration ------------------------------------------------------------------


def op_samples() -> list:
    g = torch.Generator().manual_seed(5)
    c = 20
    x = torch.randn(2, c, 7, 5, generator=g)
    xb = tdc.to_blocked(x)
    rb = tdc.to_blocked(torch.randn(x.shape, generator=g))
    w, b = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)
    mean, var = torch.randn(c, generator=g), torch.rand(c, generator=g) + 0.5

    def rg(t: torch.Tensor) -> torch.Tensor:
        return t.clone().requires_grad_()

    pool = ([3, 3], [2, 2], [1, 1])
    return [
        ("bn_stats_blocked", ops.bn_stats_blocked.default, (rg(xb), c)),
        ("bn_apply_blocked", ops.bn_apply_blocked.default, (rg(xb), rg(w), rg(b), rg(rb), True, c)),
        (
            "batch_norm_blocked",
            ops.batch_norm_blocked.default,
            (rg(xb), mean, var, rg(w), rg(b), rg(rb), 1e-5, True, True, c),
        ),
        (
            "bn_backward_blocked",
            ops.bn_backward_blocked.default,
            (rb, xb, xb, mean, var, w, 1e-5, True, c, [True, True, False, True]),
        ),
        ("max_pool2d_blocked", ops.max_pool2d_blocked.default, (rg(xb), *pool, [1, 1], True, c)),
        (
            "max_pool2d_blocked_backward",
            ops.max_pool2d_blocked_backward.default,
            (rb[:, :, :4, :3], xb, bo.max_pool2d(xb, c, 3, 2, 1, 1, True), *pool, [1, 1], True, c),
        ),
        ("avg_pool2d_blocked", ops.avg_pool2d_blocked.default, (rg(xb), *pool, True, False, None, c)),
        (
            "avg_pool2d_blocked_backward",
            ops.avg_pool2d_blocked_backward.default,
            (bo.avg_pool2d(xb, c, 3, 2, 1, True), list(xb.shape), *pool, True, False, 3, c),
        ),
        ("global_avg_pool_blocked", ops.global_avg_pool_blocked.default, (rg(xb), c)),
        (
            "global_avg_pool_blocked_backward",
            ops.global_avg_pool_blocked_backward.default,
            (torch.randn(2, c, generator=g), list(xb.shape), c),
        ),
    ]


@pytest.mark.parametrize("name", [s[0] for s in op_samples()])
def test_opcheck(name: str) -> None:
    """Schema, fake kernel, autograd registration and AOT dispatch, as PyTorch tests them."""
    _, op, args = {s[0]: s for s in op_samples()}[name]
    torch.library.opcheck(op, args)


def blocked_head(xb, c, rm, rv, w, b, rb, training: bool):
    """ResNet's stem and exit on blocked tensors: bn + add + ReLU, max pool, avg pool, global pool."""
    y = bo.batch_norm(xb, c, rm, rv, w, b, training, 0.1, 1e-5, residual=rb, relu=True)
    y = bo.max_pool2d(y, c, 3, 2, 1)
    y = bo.avg_pool2d(y, c, 2, ceil_mode=True)
    return bo.global_avg_pool(y, c)


def test_compile_fullgraph_training_step_matches_eager() -> None:
    c = 20
    x, r = torch.randn(2, c, 12, 12), torch.randn(2, c, 12, 12)
    w, b = torch.rand(c) + 0.5, torch.randn(c)

    def step(fn):
        xb, rb = leaf(x), leaf(r)
        wl, bl = w.clone().requires_grad_(), b.clone().requires_grad_()
        rm, rv = torch.zeros(c), torch.ones(c)
        out = fn(xb, c, rm, rv, wl, bl, rb, True)
        grads = torch.autograd.grad(out.square().sum(), [xb, wl, bl, rb])
        return [out, rm, rv, *grads]

    eager = step(blocked_head)
    # No cached graphs: their keys do not cover a custom op's schema, so a graph cached before
    # the extension was rebuilt with a changed op would be replayed against the new one.
    with (
        torch._inductor.config.patch(fx_graph_cache=False),
        torch._functorch.config.patch(enable_autograd_cache=False),
    ):
        compiled = step(torch.compile(blocked_head, fullgraph=True))
    for a, e in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def test_torch_func_grad_matches_autograd() -> None:
    c = 20
    x, r = torch.randn(2, c, 9, 9), torch.randn(2, c, 9, 9)
    w, b, rm, rv = torch.rand(c) + 0.5, torch.randn(c), torch.randn(c), torch.rand(c) + 0.5

    def loss(xb, wl, bl):
        return blocked_head(xb, c, rm, rv, wl, bl, tdc.to_blocked(r), False).square().sum()

    xb = tdc.to_blocked(x)
    got = torch.func.grad(loss, argnums=(0, 1, 2))(xb, w, b)
    leaves = [xb.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()]
    want = torch.autograd.grad(loss(*leaves), leaves)
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)


def test_double_backward_is_refused() -> None:
    xb = leaf(torch.randn(2, 20, 6, 6))
    y = bo.max_pool2d(xb, 20, 2)
    (g,) = torch.autograd.grad(y.square().sum(), xb, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()


def test_threads_agree() -> None:
    """1 and 2 threads: the same pooling results, statistics to rounding."""
    x = tdc.to_blocked(torch.randn(4, 64, 28, 28))
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            results.append((bo.bn_stats(x, 64), bo.max_pool2d(x, 64, 3, 2, 1), bo.global_avg_pool(x, 64)))
    finally:
        torch.set_num_threads(threads)
    (m1, v1), p1, g1 = results[0]
    (m2, v2), p2, g2 = results[1]
    torch.testing.assert_close(m1, m2, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(v1, v2, rtol=1e-6, atol=0)
    assert torch.equal(p1, p2) and torch.equal(g1, g2)


# ---- memory safety and the AVX2 path ------------------------------------------------------


def child_guard_sweep(seed: int) -> None:
    """Every op on inputs that end at (or start just after) a PROT_NONE page; results against
    the same ops on ordinary tensors."""
    from test_guard_page import guarded_copy

    g = torch.Generator().manual_seed(seed)
    calls = 0
    for n, c, h, w in [(1, 3, 1, 1), (2, 17, 5, 7), (1, 40, 1, 9), (3, 8, 6, 1)]:
        x = torch.randn(n, c, h, w, generator=g)
        xb, rb = tdc.to_blocked(x), tdc.to_blocked(torch.randn(x.shape, generator=g))
        vec = [torch.rand(c, generator=g) + 0.5 for _ in range(4)]
        k = (min(3, h), min(3, w))
        pads = (k[0] // 2, k[1] // 2)
        pooled = bo.max_pool2d(xb, c, k, 1, pads)
        runs = [
            (ops.bn_stats_blocked, (xb, c)),
            (ops.bn_apply_blocked, (xb, vec[0], vec[1], rb, True, c)),
            (ops.batch_norm_blocked, (xb, vec[0], vec[1], vec[2], vec[3], rb, 1e-5, True, True, c)),
            (ops.bn_backward_blocked, (rb, xb, xb, vec[0], vec[1], vec[2], 1e-5, True, c, [True] * 4)),
            (ops.bn_backward_blocked, (rb, None, xb, vec[0], vec[1], None, 1e-5, False, c, [True] * 4)),
            (ops.max_pool2d_blocked, (xb, list(k), [1, 1], list(pads), [1, 1], True, c)),
            (ops.max_pool2d_blocked_backward, (pooled, xb, pooled, list(k), [1, 1], list(pads), [1, 1], True, c)),
            (ops.avg_pool2d_blocked, (xb, list(k), [2, 1], list(pads), True, False, None, c)),
            (ops.global_avg_pool_blocked, (xb, c)),
            (ops.global_avg_pool_blocked_backward, (torch.randn(n, c, generator=g), list(xb.shape), c)),
        ]
        for op, args in runs:
            want = op(*args)
            for side in ("before", "after"):
                guarded = [guarded_copy(a, side) if isinstance(a, torch.Tensor) else a for a in args]
                got = op(*guarded)
                got_all = got if isinstance(got, tuple) else (got,)
                want_all = want if isinstance(want, tuple) else (want,)
                for a, e in zip(got_all, want_all, strict=True):
                    assert torch.equal(a, e), f"{op} {side} n{n}c{c}h{h}w{w}"
                calls += 1
    # The running statistics' update, in place: read and written only within its tensors.
    for c in (3, 17, 40):
        stats = [torch.randn(c, generator=g), torch.rand(c, generator=g) + 0.5]
        batch = [torch.randn(c, generator=g), torch.rand(c, generator=g)]
        want = [t.clone() for t in stats]
        ops.bn_update_running_stats(*want, None, *batch, 9, 0.1)
        for side in ("before", "after"):
            running = [guarded_copy(t, side) for t in stats]
            ops.bn_update_running_stats(*running, None, *(guarded_copy(t, side) for t in batch), 9, 0.1)
            for a, e in zip(running, want, strict=True):
                assert torch.equal(a, e), f"bn_update_running_stats {side} c{c}"
            calls += 1
    print(f"guard-page sweep: {calls} guarded calls", flush=True)


@pytest.mark.parametrize("isa_cap", ["avx512", "avx2"])
def test_no_reads_outside_the_tensors(isa_cap: str) -> None:
    from helpers import cpu_has

    if not cpu_has(isa_cap):
        pytest.skip(f"this CPU lacks {isa_cap}")
    proc = run_python(
        """
        import sys
        sys.path.insert(0, "tests")
        from test_blocked_eltwise import child_guard_sweep
        child_guard_sweep(11)
        """,
        TORCH_DIRECTCONV_ISA=isa_cap,
    )
    assert "guard-page sweep:" in proc.stdout


def test_under_avx2_cap() -> None:
    """This file's comparisons again with the AVX2 kernels (V = 8)."""
    run_pytest_under_isa("avx2", "tests/test_blocked_eltwise.py", "not under_avx2_cap and not no_reads and not compile")
