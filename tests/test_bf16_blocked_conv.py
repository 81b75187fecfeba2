"""The blocked convolution ops on bf16 tensors: conv2d_blocked and conv2d_blocked_stats on
activations (N, ceil(C/32), H, W, 32) bf16, with (K, C, R, S) fp32 or bf16 weights or the bf16
blocked weight (to_blocked_weight), and both gradients through autograd, on the AMX kernels.

Results are checked against float64 convolutions of the same bf16 values with test_bf16's
fan-in-derived bound (test_bf16.test_bound_catches_one_missing_tap shows it is tight enough that
one missing tap fails it).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import torch_directconv as tdc
from helpers import run_python
from test_bf16 import bf16_bound, requires_amx

V = 32
SEED = 20261202

pytestmark = requires_amx


def block32(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, ceil(C/32), H, W, 32), zero-padded (in torch, independent of the ops)."""
    n, c, h, w = x.shape
    cb = -(-c // V)
    return F.pad(x, (0, 0, 0, 0, 0, cb * V - c)).view(n, cb, V, h, w).permute(0, 1, 3, 4, 2).contiguous()


def unblock32(xb: torch.Tensor, c: int) -> torch.Tensor:
    n, cb, h, w, _ = xb.shape
    return xb.permute(0, 1, 4, 2, 3).reshape(n, cb * V, h, w)[:, :c]


def lanes_past(xb: torch.Tensor, c: int) -> torch.Tensor:
    """The padded lanes of a blocked tensor: channels c and up."""
    return unblock32(xb, xb.shape[1] * V)[:, c:]


def check(got: torch.Tensor, ref: torch.Tensor, mag: torch.Tensor, fan_in: int, msg: str, twice: bool = False) -> None:
    """test_bf16's bound; with `twice`, one more rounding of a partial result (at most the sum
    of magnitudes, before a bias cancels part of it)."""
    assert got.shape == ref.shape, f"{msg}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    err = (got.double() - ref).abs()
    bound = bf16_bound(ref, mag, fan_in) + (bf16_bound(mag, mag, fan_in) if twice else 0)
    bad = err > bound
    assert not bad.any(), (
        f"{msg}: {int(bad.sum())} of {got.numel()} outside the bf16 bound; worst error {err.max().item():.3g}"
    )


# (n, c, h, w, k, (r, s), stride, padding (t, b, l, r), dilation, in_channels given)
CASES = {
    "3x3_c40_k40": (2, 40, 9, 11, 40, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), False),
    "conv1_folded": (1, 3, 20, 22, 64, (7, 7), (2, 2), (3, 3, 3, 3), (1, 1), True),
    "proj_1x1_s2": (2, 64, 14, 14, 96, (1, 1), (2, 2), (0, 0, 0, 0), (1, 1), False),
    "k3_s2_d2": (1, 40, 13, 12, 3, (3, 3), (2, 2), (1, 2, 0, 1), (2, 2), False),
    "5x3_s12_d21": (2, 32, 10, 17, 33, (5, 3), (1, 2), (2, 2, 1, 1), (2, 1), False),
}
WEIGHTS = ("f32", "bf16", "blocked")


def make_case(name: str, weight: str, g: torch.Generator):
    n, c, h, w, k, (r, s), stride, pad, dil, give_c = CASES[name]
    x = torch.randn(n, c, h, w, generator=g).bfloat16()
    w32 = torch.randn(k, c, r, s, generator=g) / math.sqrt(c * r * s)
    wr = w32.bfloat16()  # what every kind of weight computes with
    wb = {"f32": w32, "bf16": wr, "blocked": tdc.to_blocked_weight(wr)}[weight]
    b = torch.randn(k, generator=g)
    args = dict(stride=stride, padding=pad, dilation=dil)
    return x, wr, wb, b, args, (c if give_c else None)


def ref_forward(x, wr, b, res, relu, stride, padding, dilation):
    pt, pb, pl, pr = padding
    xp = F.pad(x.double(), (pl, pr, pt, pb))
    y = F.conv2d(xp, wr.double(), b.double() if b is not None else None, stride=stride, dilation=dilation)
    mag = F.conv2d(xp.abs(), wr.double().abs(), b.double().abs() if b is not None else None, stride=stride,
                   dilation=dilation)  # fmt: skip
    if res is not None:
        y, mag = y + res.double(), mag + res.double().abs()
    return (torch.relu(y) if relu else y), mag


def op_forward(xb, wb, b, args, relu, in_channels, res):
    return torch.ops.directconv.conv2d_blocked(xb, wb, b, list(args["stride"]), list(args["padding"]),
                                               list(args["dilation"]), relu, in_channels, res)  # fmt: skip


@pytest.mark.parametrize("weight", WEIGHTS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_with_bias_relu_residual(name: str, weight: str) -> None:
    g = torch.Generator().manual_seed(SEED)
    x, wr, wb, b, args, in_c = make_case(name, weight, g)
    k, c, r, s = wr.shape
    xb = block32(x)
    for use_bias, relu, use_res in ((False, False, False), (True, True, True), (True, False, False)):
        y_ref0, _ = ref_forward(x, wr, None, None, False, **args)
        res = torch.randn(y_ref0.shape, generator=g).bfloat16() if use_res else None
        bias = (b.bfloat16() if weight == "bf16" else b) if use_bias else None
        yb = op_forward(xb, wb, bias, args, relu, in_c, block32(res) if use_res else None)
        label = f"{name} {weight} bias={use_bias} relu={relu} residual={use_res}"
        assert yb.dtype == torch.bfloat16 and yb.shape[1] == -(-k // V) and yb.shape[4] == V, label
        ref, mag = ref_forward(x, wr, bias, res, relu, **args)
        check(unblock32(yb, k), ref, mag, c * r * s + 1, label)
        assert not lanes_past(yb, k).any(), f"{label}: padded output lanes not zero"


def test_stats_of_the_stored_output() -> None:
    g = torch.Generator().manual_seed(SEED + 1)
    x, wr, wb, b, args, _ = make_case("3x3_c40_k40", "f32", g)
    xb = block32(x)
    shift = torch.randn(40, generator=g)
    yb, mean, var = torch.ops.directconv.conv2d_blocked_stats(xb, wb, b, list(args["stride"]), list(args["padding"]),
                                                               list(args["dilation"]), None, shift, 40)  # fmt: skip
    assert mean.dtype == var.dtype == torch.float32 and mean.shape == var.shape == (40,)
    assert torch.equal(yb, op_forward(xb, wb, b, args, False, None, None))
    y = unblock32(yb, 40).double()  # the rounded values, as stored
    torch.testing.assert_close(mean.double(), y.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var.double(), y.var((0, 2, 3), correction=0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["proj_1x1_s2", "3x3_c40_k40", "conv1_folded"])
def test_stats_from_the_epilogue_or_recomputed(name: str) -> None:
    """At the amx level the statistics come from the kernels' epilogue, relative to the shift;
    where a mean lies far from its shift they are recomputed exactly (counted), so both agree
    with the stored output's to fp32 accuracy."""
    g = torch.Generator().manual_seed(SEED + 2)
    x, wr, wb, b, args, _ = make_case(name, "f32", g)
    k = wr.shape[0]
    xb = block32(x)
    for far in (False, True):
        bias = torch.full((k,), 1000.0) if far else b
        shift = torch.zeros(k) if far else 0.1 * torch.randn(k, generator=g)
        before = tdc.jit_stats()["conv_stats_recomputed"]
        yb, mean, var = torch.ops.directconv.conv2d_blocked_stats(
            xb, wb, bias, list(args["stride"]), list(args["padding"]), list(args["dilation"]), None, shift, k
        )
        recomputed = tdc.jit_stats()["conv_stats_recomputed"] - before
        assert recomputed == (1 if far and tdc.isa() == "amx" else 0), (far, recomputed)
        y = unblock32(yb, k).double()
        torch.testing.assert_close(mean.double(), y.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(var.double(), y.var((0, 2, 3), correction=0), rtol=1e-4, atol=1e-6)


def ref_grads(x, wr, gy, stride, padding, dilation):
    """(dx, dW) in float64 of the same bf16 values, and their magnitudes' sums."""
    pt, pb, pl, pr = padding

    def grads(xv, wv, gv):
        xv = xv.double().requires_grad_()
        wv = wv.double().requires_grad_()
        y = F.conv2d(F.pad(xv, (pl, pr, pt, pb)), wv, stride=stride, dilation=dilation)
        return torch.autograd.grad(y, [xv, wv], gv.double())

    dx, dw = grads(x, wr, gy)
    mdx, mdw = grads(x.abs(), wr.abs(), gy.abs())
    return dx, dw, mdx, mdw


@pytest.mark.parametrize("weight", WEIGHTS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_gradients_through_autograd(name: str, weight: str) -> None:
    g = torch.Generator().manual_seed(SEED + 2)
    x, wr, wb, b, args, in_c = make_case(name, weight, g)
    k, c, r, s = wr.shape
    xb = block32(x).requires_grad_()
    wb = wb.detach().requires_grad_()
    bias = b.clone().requires_grad_()
    yb = op_forward(xb, wb, bias, args, True, in_c, None)
    gy = torch.randn(yb.shape, generator=g).bfloat16()
    gx, gw, gbias = torch.autograd.grad(yb, [xb, wb, bias], gy)
    # Through the ReLU: the mask of the output as computed.
    gy_eff = unblock32(gy * (yb > 0), k)
    dx, dw, mdx, mdw = ref_grads(x, wr, gy_eff, **args)
    n, _, p, q = gy_eff.shape
    label = f"{name} {weight}"
    assert gx.dtype == torch.bfloat16 and gx.shape == xb.shape, label
    check(unblock32(gx, c), dx, mdx, k * r * s, f"{label} dx")
    assert not lanes_past(gx, c).any(), f"{label}: dx past the channels not zero"
    if weight == "blocked":
        assert gw.dtype == torch.bfloat16 and gw.shape == wb.shape, label
        gw4 = tdc.from_blocked_weight(gw, k, c)
        assert torch.equal(tdc.to_blocked_weight(gw4), gw), f"{label}: padded entries of the blocked dW not zero"
    else:
        assert gw.dtype == wb.dtype and gw.shape == wb.shape, label
        gw4 = gw
    check(gw4, dw, mdw, n * p * q, f"{label} dW")
    assert gbias.dtype == torch.float32
    check(gbias, gy_eff.double().sum((0, 2, 3)), gy_eff.double().abs().sum((0, 2, 3)), n * p * q, f"{label} bias")


def test_input_gradient_through_a_frozen_blocked_weight() -> None:
    g = torch.Generator().manual_seed(SEED + 3)
    x, wr, wb, _, args, _ = make_case("3x3_c40_k40", "blocked", g)
    xb = block32(x).requires_grad_()
    yb = op_forward(xb, wb, None, args, False, None, None)
    gy = torch.randn(yb.shape, generator=g).bfloat16()
    (gx,) = torch.autograd.grad(yb, [xb], gy)
    dx, _, mdx, _ = ref_grads(x, wr, unblock32(gy, 40), **args)
    check(unblock32(gx, 40), dx, mdx, 40 * 9, "frozen blocked weight dx")


def test_bias_gradient_is_summed_in_fp32() -> None:
    # 3072 terms of 1 + 2^-7: 3096 exactly in fp32; a bf16 sum would round it (to 3088 or 3104).
    xb = torch.zeros(3, 1, 32, 32, V, dtype=torch.bfloat16, requires_grad=True)
    w = torch.zeros(32, 32, 1, 1, requires_grad=True)
    geo = dict(stride=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1))
    for dtype in (torch.float32, torch.bfloat16):
        bias = torch.zeros(32, dtype=dtype, requires_grad=True)
        yb = op_forward(xb, w, bias, geo, False, None, None)
        gy = torch.full(yb.shape, 1 + 2.0**-7, dtype=torch.bfloat16)
        (gb,) = torch.autograd.grad(yb, [bias], gy)
        assert gb.dtype == dtype
        assert torch.equal(gb, torch.full((32,), 3096.0).to(dtype)), (dtype, gb[:4])


def test_gradient_ops_types() -> None:
    """The weight gradient is fp32 for a (K, C, R, S) weight (fp32 master weights; autograd casts
    it to a bf16 weight's type) and bf16 for a blocked one; the input gradient is bf16."""
    ops = torch.ops.directconv
    xb = torch.randn(1, 2, 6, 7, V).bfloat16()
    gy = torch.randn(1, 1, 6, 7, V).bfloat16()
    geo = ([1, 1], [1, 1, 1, 1], [1, 1])
    assert ops.conv2d_blocked_backward_weight(gy, xb, [20, 64, 3, 3], *geo, None).dtype == torch.float32
    assert ops.conv2d_blocked_backward_weight(gy, xb, [1, 2, 3, 3, V, V], *geo, None).dtype == torch.bfloat16
    w = torch.randn(20, 64, 3, 3)
    assert ops.conv2d_blocked_backward_data(gy, w, [1, 2, 6, 7, V], *geo, None).dtype == torch.bfloat16


def test_opcheck_bf16_blocked_ops() -> None:
    g = torch.Generator().manual_seed(SEED + 8)
    ops = torch.ops.directconv
    xb = block32(torch.randn(2, 40, 7, 9, generator=g).bfloat16())
    w = torch.randn(33, 40, 3, 3, generator=g) / 20
    wb = tdc.to_blocked_weight(w.bfloat16())
    b = torch.randn(33, generator=g)
    geo = ([1, 2], [1, 1, 0, 2], [1, 1])
    for weight in (w, w.bfloat16(), wb):
        torch.library.opcheck(ops.conv2d_blocked.default, (xb, weight, b, *geo, True, None, None))
        y = ops.conv2d_blocked(xb, weight, b, *geo, False, None, None)
        torch.library.opcheck(ops.conv2d_blocked_backward_data.default, (y, weight, list(xb.shape), *geo, None))
        torch.library.opcheck(ops.conv2d_blocked_backward_weight.default, (y, xb, list(weight.shape), *geo, None))
    torch.library.opcheck(ops.conv2d_blocked_stats.default, (xb, w, b, *geo, None, torch.zeros(33), 33))
    torch.library.opcheck(ops.to_blocked_weight.default, (w, V))
    torch.library.opcheck(ops.from_blocked_weight.default, (wb, 33, 40))


def test_blocked_weight_layout_and_inverse() -> None:
    g = torch.Generator().manual_seed(SEED + 4)
    for k, c, r, s in ((40, 33, 3, 3), (64, 64, 1, 1), (3, 40, 2, 5)):
        w = torch.randn(k, c, r, s, generator=g)
        wb = tdc.to_blocked_weight(w.bfloat16())
        assert wb.dtype == torch.bfloat16 and wb.shape == (-(-k // V), -(-c // V), r, s, V, V)
        # Of the layer's own geometry: the drop-in packing of an unfolded weight, block by block.
        assert torch.equal(wb.flatten(), tdc.functional.pack_weight_bf16(w)), (k, c, r, s)
        assert torch.equal(tdc.from_blocked_weight(wb, k, c), w.bfloat16())
        # From fp32 directly (the op with vlen 32), rounded to nearest even as .bfloat16().
        assert torch.equal(torch.ops.directconv.to_blocked_weight(w, V), wb)
        # Any strides.
        assert torch.equal(tdc.to_blocked_weight(w.bfloat16().permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)), wb)
    # conv1's geometry folds in the forward, but the blocked weight is the layer's own.
    w = torch.randn(64, 3, 7, 7, generator=g).bfloat16()
    wb = tdc.to_blocked_weight(w)
    assert wb.shape == (2, 1, 7, 7, V, V)
    assert torch.equal(tdc.from_blocked_weight(wb, 64, 3), w)


def test_blocked_weight_autograd_round_trip() -> None:
    g = torch.Generator().manual_seed(SEED + 5)
    x, wr, _, _, args, _ = make_case("3x3_c40_k40", "bf16", g)
    w = wr.float().requires_grad_()
    xb = block32(x)
    wb = tdc.to_blocked_weight(w.bfloat16())
    yb = op_forward(xb, wb, None, args, False, None, None)
    gy = torch.randn(yb.shape, generator=g).bfloat16()
    (gw,) = torch.autograd.grad(yb, [w], gy)
    _, dw, _, mdw = ref_grads(x, wr, unblock32(gy, 40), **args)
    assert gw.dtype == torch.float32
    check(gw, dw, mdw, 2 * 9 * 11, "dW through to_blocked_weight")


def test_fallback_geometry_runs_on_torch_with_its_reason(capfd) -> None:
    # A 1 x 1 kernel dilated past the kernels' limit (2^20): the same convolution, on torch's.
    g = torch.Generator().manual_seed(SEED + 6)
    x = torch.randn(2, 40, 5, 6, generator=g).bfloat16()
    w = (torch.randn(33, 40, 1, 1, generator=g) / math.sqrt(40)).bfloat16()
    b = torch.randn(33, generator=g)
    args = dict(stride=(1, 2), padding=(0, 0, 1, 0), dilation=(1, 2**21))
    xb = block32(x).requires_grad_()
    wt = w.float().requires_grad_()
    before = tdc.jit_stats()["fallbacks"]
    yb = op_forward(xb, wt, b, args, True, None, None)
    assert tdc.jit_stats()["fallbacks"] == before + 1
    # The C++ warning, once per process (the first fallback of this reason in the run).
    assert "beyond what the bf16 kernels address; using PyTorch's convolution" in capfd.readouterr().err
    ref, mag = ref_forward(x, w, b, None, True, **args)
    # Torch's bf16 convolution rounds, then the fp32 bias and the ReLU round again: two ulps.
    check(unblock32(yb, 33), ref, mag, 41, "fallback forward", twice=True)
    assert not lanes_past(yb, 33).any()
    gy = torch.randn(yb.shape, generator=g).bfloat16()
    gx, gw = torch.autograd.grad(yb, [xb, wt], gy)
    dx, dw, mdx, mdw = ref_grads(x, w, unblock32(gy * (yb > 0), 33), **args)
    assert gx.dtype == torch.bfloat16 and gw.dtype == torch.float32
    check(unblock32(gx, 40), dx, mdx, 33, "fallback dx")
    check(gw, dw, mdw, 2 * 5 * 4, "fallback dW")


def test_below_amx_the_ops_fall_back() -> None:
    run_python(
        """
        import sys, math, torch, torch.nn.functional as F
        sys.path.insert(0, "tests")
        from test_bf16_blocked_conv import block32, unblock32
        x = torch.randn(1, 8, 6, 6).bfloat16()
        w = (torch.randn(16, 8, 3, 3) / 8).bfloat16()
        xb = block32(x).requires_grad_()
        y = torch.ops.directconv.conv2d_blocked(xb, w, None, [1, 1], [1, 1, 1, 1], [1, 1], False, None, None)
        assert torch.equal(unblock32(y, 16), F.conv2d(x, w, padding=1))
        (gx,) = torch.autograd.grad(y, [xb], torch.ones_like(y))
        assert gx.dtype == torch.bfloat16 and gx.shape == xb.shape
        print("ok")
        """,
        TORCH_DIRECTCONV_ISA="avx512",
    )


def test_dtype_mixes_raise_naming_the_argument() -> None:
    ops = torch.ops.directconv
    xb = torch.zeros(1, 1, 4, 4, V, dtype=torch.bfloat16)
    w = torch.zeros(8, 20, 3, 3)
    geo = ([1, 1], [1, 1, 1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="conv2d_blocked: expected 'wb' of dtype float32, got BFloat16"):
        ops.conv2d_blocked(torch.zeros(1, 2, 4, 4, 16), w.bfloat16(), None, *geo, False, None, None)
    with pytest.raises(RuntimeError, match="'wb' of dtype float32 or bfloat16"):
        ops.conv2d_blocked(xb, w.half(), None, *geo, False, None, None)
    with pytest.raises(RuntimeError, match="a blocked 'wb' for bfloat16 activations must be bfloat16"):
        ops.conv2d_blocked(xb, torch.zeros(1, 1, 3, 3, V, V), None, *geo, False, None, None)
    with pytest.raises(RuntimeError, match="expected a bfloat16 'residual'"):
        ops.conv2d_blocked(xb, w, None, *geo, False, None, torch.zeros(1, 1, 4, 4, V))
    with pytest.raises(RuntimeError, match="'bias' of dtype float32 or bfloat16"):
        ops.conv2d_blocked(xb, w, torch.zeros(8, dtype=torch.half), *geo, False, None, None)
    with pytest.raises(RuntimeError, match="expected a bfloat16 'xb'"):
        ops.conv2d_blocked_backward_weight(xb, torch.zeros(1, 1, 4, 4, V), [8, 20, 3, 3], *geo, None)
    with pytest.raises(RuntimeError, match="a blocked 'wb' for bfloat16 activations must be bfloat16"):
        ops.conv2d_blocked_backward_data(xb, torch.zeros(1, 1, 3, 3, V, V), [1, 1, 4, 4, V], *geo, None)
    with pytest.raises(RuntimeError, match="'xb' has 1 channel blocks, but 'wb' has 2"):
        ops.conv2d_blocked(xb, torch.zeros(1, 2, 3, 3, V, V, dtype=torch.bfloat16), None, *geo, False, None, None)


def test_compile_fullgraph_forward_and_backward_equal_eager() -> None:
    g = torch.Generator().manual_seed(SEED + 7)
    x, wr, _, b, _, _ = make_case("3x3_c40_k40", "f32", g)

    def forward(xb, w, b):
        return torch.ops.directconv.conv2d_blocked(xb, w, b, [1, 1], [1, 1, 1, 1], [1, 1], True, None, None)

    gy = torch.randn(2, 2, 9, 11, V, generator=g).bfloat16()
    results = []
    for fn in (forward, torch.compile(forward, fullgraph=True, backend="aot_eager")):
        leaves = [block32(x).requires_grad_(), wr.float().requires_grad_(), b.clone().requires_grad_()]
        yb = fn(*leaves)
        results.append((yb,) + torch.autograd.grad(yb, leaves, gy))
    for e, c in zip(*results):
        assert e.dtype == c.dtype and torch.equal(e, c)


def test_guard_pages() -> None:
    proc = run_python(
        """
        import sys
        sys.path.insert(0, "tests")
        from test_bf16_blocked_conv import guard_child
        guard_child()
        """
    )
    assert "bf16 blocked guard-page sweep: 5 problems" in proc.stdout


def guard_child() -> None:
    """Every tensor the bf16 blocked passes read, against an inaccessible page on either side."""
    import sys

    from test_guard_page import guarded_copy

    ops = torch.ops.directconv
    for i, name in enumerate(sorted(CASES)):
        g = torch.Generator().manual_seed(SEED + 100 + i)
        for weight in WEIGHTS:
            x, wr, wb, b, args, in_c = make_case(name, weight, g)
            k, c = wr.shape[:2]
            geo = (list(args["stride"]), list(args["padding"]), list(args["dilation"]))
            xb = block32(x)
            want = ops.conv2d_blocked(xb, wb, b, *geo, True, in_c, None)
            res = torch.randn(want.shape, generator=g).bfloat16()
            want_res = ops.conv2d_blocked(xb, wb, b, *geo, True, in_c, res)
            gy = torch.randn(want.shape, generator=g).bfloat16()
            want_dx = ops.conv2d_blocked_backward_data(gy, wb, list(xb.shape), *geo, in_c)
            want_dw = ops.conv2d_blocked_backward_weight(gy, xb, list(wb.shape), *geo, in_c)
            for side in ("before", "after"):
                label = f"{name} {weight} {side}"
                print(label, file=sys.stderr, flush=True)
                gxb, gwb, gb, gres, ggy = (guarded_copy(t, side) for t in (xb, wb, b, res, gy))
                assert torch.equal(ops.conv2d_blocked(gxb, gwb, gb, *geo, True, in_c, None), want), label
                assert torch.equal(ops.conv2d_blocked(gxb, gwb, gb, *geo, True, in_c, gres), want_res), label
                assert torch.equal(ops.conv2d_blocked_backward_data(ggy, gwb, list(xb.shape), *geo, in_c), want_dx)
                assert torch.equal(ops.conv2d_blocked_backward_weight(ggy, gxb, list(wb.shape), *geo, in_c), want_dw)
    print(f"bf16 blocked guard-page sweep: {len(CASES)} problems", flush=True)
