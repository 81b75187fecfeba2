"""The blocked batch-norm, pooling and layout ops on bf16 activations, (N, ceil(C/32), H, W, 32)
bf16 with fp32 per-channel tensors: forward and gradients against torch's own ops computed in
float64 from the same bf16 values, padded lanes, running statistics, dtype errors, the level
check, torch.compile and torch.func.

The bound (bf16_close): each bf16 output is an fp32 result y32 rounded once to nearest even, so
|got - ref| <= ulp / 2 + e, ulp being one bf16 step at ref (2**(exponent - 8) in ref's binade:
bf16 keeps 8 significant bits; where y32 crosses a power of two that power is the nearest
value), and e the fp32 arithmetic's error, a few fp32 roundoffs (2**-24) of the magnitude of
the terms that make the value (`mag`). e = 2**-15 * mag leaves room for a few hundred of them
and is still far below one bf16 step: an output one step off fails
(test_bound_catches_one_bf16_step).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_directconv as tdc
from helpers import EXPECTED_ISA
from torch_directconv import _C
from torch_directconv import blocked_ops as bo
from torch_directconv._autograd import call_op

ops = torch.ops.directconv
V = 32

pytestmark = pytest.mark.skipif(
    tdc.isa() not in ("amx", "avx512_bf16"), reason=f"bf16 activations need avx512_bf16; the level is {tdc.isa()}"
)

SHAPES = [(2, 3, 5, 7), (1, 40, 6, 4), (2, 64, 3, 3), (3, 40, 1, 9), (1, 3, 1, 1)]


def shape_id(s) -> str:
    return "n{}c{}h{}w{}".format(*s)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def bf16_randn(g: torch.Generator, *shape: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=g) * scale + shift).bfloat16()


def ref_blocked(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, ceil(C/32), H, W, 32), zero-padded, in plain torch."""
    n, c, h, w = x.shape
    cb = -(-c // V)
    padded = F.pad(x, (0, 0, 0, 0, 0, cb * V - c))
    return padded.reshape(n, cb, V, h, w).permute(0, 1, 3, 4, 2).contiguous()


def ref_unblocked(tb: torch.Tensor, c: int) -> torch.Tensor:
    """The first c channels of a blocked tensor as (N, C, H, W), in plain torch."""
    n, cb, h, w, v = tb.shape
    return tb.permute(0, 1, 4, 2, 3).reshape(n, cb * v, h, w)[:, :c]


def padding_of(tb: torch.Tensor, c: int) -> torch.Tensor:
    n, cb, h, w, v = tb.shape
    return tb.permute(0, 1, 4, 2, 3).reshape(n, cb * v, h, w)[:, c:]


def with_garbage(tb: torch.Tensor, c: int) -> torch.Tensor:
    """tb with NaN, infinity and large values in its padded lanes."""
    out = tb.detach().clone()
    c0 = c % V
    if c0:
        out[:, -1, :, :, c0:] = float("nan")
        out[:, -1, :, :, -1] = 1e30
        out[:, -1, :, :, -2] = float("-inf")
    return out


def assert_padding_zero(tb: torch.Tensor, c: int, what: str) -> None:
    pad = padding_of(tb, c)
    assert torch.equal(pad, torch.zeros_like(pad)), f"{what}: padded lanes are not zero"


def bf16_close(got: torch.Tensor, ref: torch.Tensor, mag: torch.Tensor | float, what: str) -> None:
    """got (bf16) against ref (float64) within the bound of the module's doc."""
    assert got.dtype == torch.bfloat16, f"{what}: dtype {got.dtype}"
    err = (got.double() - ref).abs()
    half_step = torch.ldexp((ref != 0).double(), torch.frexp(ref).exponent - 9)
    bound = half_step + 2.0**-15 * torch.as_tensor(mag, dtype=torch.float64)
    bad = ~(err <= bound)
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} of {err.numel()} values beyond the bound; worst "
        f"{(err - bound).max().item():.3g} over, got {got.double()[bad][:4].tolist()} want {ref[bad][:4].tolist()}"
    )


def leaf(tb: torch.Tensor) -> torch.Tensor:
    return tb.detach().clone().requires_grad_()


def test_bound_catches_one_bf16_step() -> None:
    """bf16_close passes correctly rounded values and fails every value one bf16 step away,
    except where ref lies within e of a rounding midpoint (an fp32 result there may round either
    way): about 2**-7 of them for mag = |ref|."""
    ref = torch.randn(1000, generator=gen(1), dtype=torch.float64) * 3
    good = ref.bfloat16()
    bf16_close(good, ref, ref.abs(), "rounded")
    one_step = (good.view(torch.int16) + 1).view(torch.bfloat16)  # one step away from zero
    half_step = torch.ldexp(torch.ones_like(ref), torch.frexp(ref).exponent - 9)
    near_midpoint = half_step - (good.double() - ref).abs() <= 2.0**-15 * ref.abs()
    for i in range(ref.numel()):
        one = slice(i, i + 1)
        if near_midpoint[i]:
            continue
        with pytest.raises(AssertionError, match="beyond the bound"):
            bf16_close(one_step[one], ref[one], ref[one].abs(), f"one step at {ref[i].item()}")
    assert int(near_midpoint.sum()) < 0.02 * ref.numel()


# ---- layouts ------------------------------------------------------------------------------


@pytest.mark.parametrize("c", [3, 40, 64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_to_from_blocked_round_trip_is_exact(c: int, layout: str) -> None:
    g = gen(c)
    x = bf16_randn(g, 2, c, 5, 6)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = bf16_randn(g, 2, c + 3, 10, 13)[:, 1 : c + 1, ::2, 1::2]
    xb = tdc.to_blocked(x)
    assert xb.dtype == torch.bfloat16 and xb.shape == (2, -(-c // V), 5, 6, V)
    assert torch.equal(xb, ref_blocked(x))
    back = tdc.from_blocked(with_garbage(xb, c), c)
    assert back.dtype == torch.bfloat16 and torch.equal(back, x)


# Bit patterns the rounding must get right: NaNs (quiet, signalling, negative), the smallest
# and largest denormals (kept, not flushed), the largest finite value (to infinity), infinities,
# ties to even both ways, and a denormal tie.
SPECIAL_BITS = [
    0x7F800001, 0x7FA00000, 0xFFBFFFFF, 0x7FC00000, 0x00000001, 0x807FFFFF, 0x00400000, 0x00018000,
    0x00008000, 0x7F7FFFFF, 0x7F800000, 0xFF800000, 0x3F808000, 0x3F818000, 0xBF808001, 0x80000000,
]  # fmt: skip


def fp32_with_specials(g: torch.Generator, *shape: int) -> torch.Tensor:
    """Normal fp32 values with the SPECIAL_BITS scattered among them."""
    x = torch.randn(*shape, generator=g) * 10
    flat = x.view(-1)
    bits = torch.tensor(SPECIAL_BITS, dtype=torch.int64).to(torch.int32).view(torch.float32)
    where = torch.randperm(flat.numel(), generator=g)[: min(flat.numel(), 3 * len(SPECIAL_BITS))]
    flat[where] = bits[torch.arange(where.numel()) % bits.numel()]
    return x


def entry_layouts(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """x (N, C, H, W) in the layouts an entry may get: each value x's, another memory order."""
    n, c, h, w = x.shape
    wide = torch.cat([x, x], 3)
    return {
        "contiguous": x,
        "channels_last": x.contiguous(memory_format=torch.channels_last),
        "w_strided": wide[..., ::2],
        "channel_slice": torch.cat([x, x], 1)[:, 1 : c + 1],
        "channels_last_w_strided": wide.contiguous(memory_format=torch.channels_last)[..., ::2],
        "h_innermost": x.transpose(2, 3).contiguous().transpose(2, 3),
        "nhwc_permuted": x.permute(2, 3, 0, 1).contiguous().permute(2, 3, 0, 1),
        "broadcast_c": x[:, :1].expand(n, c, h, w),
        "broadcast_w": x[..., :1].expand(n, c, h, w),
    }


ENTRY_SHAPES = [(1, c, 3, 7) for c in (1, 3, 4, 5, 31, 32, 33, 64)] + [(2, 3, 2, 33), (2, 4, 1, 16), (1, 40, 2, 65)]


@pytest.mark.parametrize("shape", ENTRY_SHAPES, ids=shape_id)
def test_fp32_entry_is_the_cast_then_to_blocked_bit_for_bit(shape) -> None:
    """to_blocked(fp32 x, 32): bf16 rows of 32 rounded as x.to(torch.bfloat16) rounds, bit for
    bit: NaN patterns (which torch's own loops write differently by layout), denormals, ties,
    infinities, padded lanes zero; for every layout."""
    g = gen(sum(shape))
    base = fp32_with_specials(g, *shape)
    for name, x in entry_layouts(base).items():
        got = ops.to_blocked(x, V)
        want = ops.to_blocked(x.to(torch.bfloat16), V)
        assert got.dtype == torch.bfloat16 and got.shape == want.shape, name
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), f"{name} strides {x.stride()}"


def test_fp32_entry_keeps_denormals_under_flush_denormal() -> None:
    """The rounding is on the bits: flush-to-zero mode changes nothing (as torch's cast)."""
    x = fp32_with_specials(gen(7), 1, 3, 4, 20)
    try:
        torch.set_flush_denormal(True)
        got, want = ops.to_blocked(x, V), ops.to_blocked(x.to(torch.bfloat16), V)
    finally:
        torch.set_flush_denormal(False)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    assert (got.view(torch.int16) == 0x0040).any()  # 0x00400000, kept


def test_fp32_entry_gradient_is_fp32() -> None:
    """The gradient of to_blocked(fp32 x, 32) is from_blocked's, cast back to fp32 (as the
    cast's gradient), with autograd and under torch.func."""
    g = gen(8)
    x = torch.randn(2, 40, 3, 5, generator=g, requires_grad=True)
    gyb = with_garbage(ref_blocked(bf16_randn(g, 2, 40, 3, 5)), 40)
    (gx,) = torch.autograd.grad(ops.to_blocked(x, V), x, gyb)
    want = ref_unblocked(gyb, 40).float()
    assert gx.dtype == torch.float32 and torch.equal(gx, want)
    # Under torch.func the op runs through its Python autograd function (call_op).
    _, vjp = torch.func.vjp(lambda t: call_op(ops.to_blocked.default, t, V), x.detach())
    (gx_func,) = vjp(gyb)
    assert gx_func.dtype == torch.float32 and torch.equal(gx_func, want)


def test_layout_gradients_are_bf16_and_exact() -> None:
    g = gen(5)
    x = bf16_randn(g, 2, 40, 4, 3).requires_grad_()
    gy = bf16_randn(g, 2, 40, 4, 3)
    y = tdc.from_blocked(tdc.to_blocked(x), 40)
    (gx,) = torch.autograd.grad(y, x, gy)
    assert gx.dtype == torch.bfloat16 and torch.equal(gx, gy)
    # from_blocked's backward goes back to rows of 32 (its saved vlen).
    xb = leaf(with_garbage(ref_blocked(x.detach()), 40))
    (gxb,) = torch.autograd.grad(tdc.from_blocked(xb, 40), xb, gy)
    assert gxb.dtype == torch.bfloat16 and torch.equal(gxb, ref_blocked(gy))


def test_layout_vlen_must_match_the_dtype() -> None:
    x = torch.zeros(1, 3, 2, 2, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="expected 'vlen' 32 for a bfloat16 'x', got 16"):
        ops.to_blocked(x, 16)
    fp32_vlens = r"expected 'vlen' 8 or 16 \(float32 blocks\) or 32 \(bfloat16 rows\) for a float32 'x', got 4"
    with pytest.raises(RuntimeError, match=fp32_vlens):
        ops.to_blocked(x.float(), 4)
    with pytest.raises(RuntimeError, match="expected a blocked bfloat16 'xb'"):
        ops.from_blocked(torch.zeros(1, 1, 2, 2, 16, dtype=torch.bfloat16), 3)
    with pytest.raises(RuntimeError, match="expected a blocked float32 'xb'"):
        ops.from_blocked(torch.zeros(1, 1, 2, 2, 32), 3)


# ---- batch norm ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_bn_stats_are_fp32_of_the_bf16_values(shape) -> None:
    x = bf16_randn(gen(2), *shape, scale=2.0, shift=5.0)
    mean, var = bo.bn_stats(with_garbage(tdc.to_blocked(x), shape[1]), shape[1])
    assert mean.dtype == var.dtype == torch.float32 and mean.shape == (shape[1],)
    ref_var, ref_mean = torch.var_mean(x.double(), (0, 2, 3), unbiased=False)
    torch.testing.assert_close(mean, ref_mean.float(), rtol=2e-7, atol=0)
    torch.testing.assert_close(var, ref_var.float(), rtol=1e-6, atol=1e-7)


def bn_case(shape, seed: int, params_bf16: bool = False):
    g = gen(seed)
    n, c, h, w = shape
    x = bf16_randn(g, *shape, scale=1.5, shift=0.5)
    r = bf16_randn(g, *shape)
    gy = bf16_randn(g, *shape)
    wt, b = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)
    rm, rv = torch.randn(c, generator=g) * 0.2, torch.rand(c, generator=g) + 0.5
    if params_bf16:
        wt, b, rm, rv = (t.bfloat16() for t in (wt, b, rm, rv))
    return x, r, gy, wt, b, rm, rv


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("residual", [True, False], ids=["res", "nores"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_batch_norm_forward_and_backward(shape, residual: bool, train: bool) -> None:
    n, c, h, w = shape
    if train and n * h * w == 1:
        pytest.skip("training needs more than one value per channel")
    x, r, gy, wt, b, rm, rv = bn_case(shape, 3 + c)
    xb, rb = leaf(with_garbage(tdc.to_blocked(x), c)), leaf(with_garbage(tdc.to_blocked(r), c))
    wl, bl = wt.clone().requires_grad_(), b.clone().requires_grad_()
    yb = bo.batch_norm(
        xb, c, rm.clone(), rv.clone(), wl, bl, train, 0.1, 1e-5, residual=rb if residual else None, relu=True
    )
    assert yb.dtype == torch.bfloat16
    assert_padding_zero(yb, c, "y")
    gyb = with_garbage(tdc.to_blocked(gy), c)
    gx, gw, gb, gr = torch.autograd.grad(yb, [xb, wl, bl, rb], gyb, allow_unused=True)

    # float64 reference from the same bf16 values; the ReLU's mask from our own output (a value
    # within rounding of zero may fall either side).
    x64, r64 = x.double().requires_grad_(), r.double().requires_grad_()
    w64, b64 = wt.double().requires_grad_(), b.double().requires_grad_()
    pre = F.batch_norm(x64, rm.double(), rv.double(), w64, b64, train, 0.1, 1e-5)
    if residual:
        pre = pre + r64
    y64 = pre.clamp_min(0)
    y = ref_unblocked(yb.detach(), c)
    if train:
        invstd = (torch.var(x.double(), (0, 2, 3), unbiased=False) + 1e-5).rsqrt()
    else:
        invstd = (rv.double() + 1e-5).rsqrt()
    mean = x.double().mean((0, 2, 3)) if train else rm.double()
    terms = ((x.double() - mean[:, None, None]) * (invstd * w64.detach())[:, None, None]).abs() + b.double().abs()[
        :, None, None
    ]
    if residual:
        terms = terms + r.double().abs()
    bf16_close(y, y64.detach(), terms, "y")

    g_pre = gy.double() * (y > 0)
    ref = torch.autograd.grad(pre, [x64, w64, b64, r64] if residual else [x64, w64, b64], g_pre)
    assert gx.dtype == torch.bfloat16 and gw.dtype == gb.dtype == torch.float32
    assert_padding_zero(gx, c, "grad_x")
    gx_terms = g_pre.abs() * (invstd * wt.double())[:, None, None] * (4 if train else 1)
    bf16_close(ref_unblocked(gx, c), ref[0], gx_terms.amax((0, 2, 3), keepdim=True).expand_as(gx_terms), "grad_x")
    xhat = (x.double() - mean[:, None, None]) * invstd[:, None, None]
    torch.testing.assert_close(gw.double(), ref[1], rtol=1e-5, atol=1e-5 * (g_pre.abs() * xhat.abs()).sum().item())
    torch.testing.assert_close(gb.double(), ref[2], rtol=1e-5, atol=1e-5 * g_pre.abs().sum().item())
    if residual:
        assert gr.dtype == torch.bfloat16
        assert_padding_zero(gr, c, "grad_residual")
        assert torch.equal(ref_unblocked(gr, c).double(), ref[3])  # the masked bf16 grad_y, exact
    else:
        assert gr is None


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
@pytest.mark.parametrize("shape", SHAPES[:3], ids=shape_id)
def test_bn_apply_forward_and_backward(shape, relu: bool) -> None:
    n, c, h, w = shape
    x, r, gy, scale, shift, _, _ = bn_case(shape, 30 + c)
    xb, rb = leaf(with_garbage(tdc.to_blocked(x), c)), leaf(with_garbage(tdc.to_blocked(r), c))
    sl, shl = scale.clone().requires_grad_(), shift.clone().requires_grad_()
    yb = bo.bn_apply(xb, c, sl, shl, residual=rb, relu=relu)
    assert_padding_zero(yb, c, "y")
    pre = x.double() * scale.double()[:, None, None] + shift.double()[:, None, None] + r.double()
    mag = (x.double() * scale.double()[:, None, None]).abs() + shift.double().abs()[:, None, None] + r.double().abs()
    bf16_close(ref_unblocked(yb.detach(), c), pre.clamp_min(0) if relu else pre, mag, "y")
    gyb = with_garbage(tdc.to_blocked(gy), c)
    gx, gs, gsh, gr = torch.autograd.grad(yb, [xb, sl, shl, rb], gyb)
    assert gx.dtype == gr.dtype == torch.bfloat16 and gs.dtype == gsh.dtype == torch.float32
    assert_padding_zero(gx, c, "grad_x")
    # The ReLU's mask from our own output, as in test_batch_norm_forward_and_backward.
    g64 = gy.double() * (ref_unblocked(yb.detach(), c) > 0) if relu else gy.double()
    bf16_close(ref_unblocked(gx, c), g64 * scale.double()[:, None, None], g64.abs(), "grad_x")
    assert torch.equal(ref_unblocked(gr, c).double(), g64)
    if relu:
        assert_padding_zero(gr, c, "grad_residual")
    else:
        # Without a ReLU the residual's gradient is the output's, passed on as it came (the
        # project's ops never give gradients with anything in their padded lanes).
        assert torch.equal(gr.view(torch.int16), gyb.view(torch.int16))
    torch.testing.assert_close(gs.double(), (g64 * x.double()).sum((0, 2, 3)), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gsh.double(), g64.sum((0, 2, 3)), rtol=1e-5, atol=1e-4)


def test_bf16_parameters_are_read_as_fp32() -> None:
    """A model moved to bf16: bf16 weight, bias and running statistics give what their fp32
    values give; the gradients of bf16 parameters come back bf16 (the engine casts the op's fp32)."""
    shape = (2, 40, 4, 5)
    c = shape[1]
    x, r, gy, wt, b, rm, rv = bn_case(shape, 7, params_bf16=True)
    xb = leaf(tdc.to_blocked(x))
    for train in (True, False):
        wl, bl = wt.clone().requires_grad_(), b.clone().requires_grad_()
        w32, b32 = wt.float().requires_grad_(), b.float().requires_grad_()
        y = bo.batch_norm(xb, c, rm.clone(), rv.clone(), wl, bl, train, relu=True)
        y32 = bo.batch_norm(xb, c, rm.float(), rv.float(), w32, b32, train, relu=True)
        assert torch.equal(y, y32), train
        gyb = tdc.to_blocked(gy)
        got = torch.autograd.grad(y, [xb, wl, bl], gyb)
        want = torch.autograd.grad(y32, [xb, w32, b32], gyb)
        assert got[1].dtype == got[2].dtype == torch.bfloat16
        assert torch.equal(got[0], want[0])
        assert torch.equal(got[1], want[1].bfloat16()) and torch.equal(got[2], want[2].bfloat16())


@pytest.mark.parametrize("buffers", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_statistics_as_batchnorm2d(buffers: torch.dtype, momentum) -> None:
    c = 40
    bn = nn.BatchNorm2d(c, momentum=momentum).to(buffers)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=gen(8)))
        bn.running_var.copy_(torch.rand(c, generator=gen(9)) + 0.5)
    rm, rv, nb = bn.running_mean, bn.running_var, bn.num_batches_tracked
    for step in range(3):
        x = bf16_randn(gen(10 + step), 2, c, 5, 3, scale=2.0, shift=1.0)
        # nn.BatchNorm2d in fp32 from our buffers as they are, on the same values.
        bn32 = nn.BatchNorm2d(c, momentum=momentum).train()
        with torch.no_grad():
            bn32.running_mean.copy_(rm)
            bn32.running_var.copy_(rv)
            bn32.num_batches_tracked.copy_(nb)
        bn32(x.float())
        # Our chain exactly: the update in double from the fp32 batch statistics, to fp32, then
        # (bf16 buffers) rounded to bf16.
        mean, var = bo.bn_stats(tdc.to_blocked(x), c)
        factor = momentum if momentum is not None else 1.0 / (int(nb) + 1)
        m = 30
        want_m = (factor * mean.double() + (1 - factor) * rm.double()).float().to(buffers)
        want_v = (factor * var.double() * m / (m - 1) + (1 - factor) * rv.double()).float().to(buffers)
        bo.batch_norm(tdc.to_blocked(x), c, rm, rv, training=True, momentum=momentum, num_batches_tracked=nb)
        assert rm.dtype == rv.dtype == buffers and nb.dtype == torch.int64
        assert torch.equal(rm, want_m) and torch.equal(rv, want_v), step
        # fp32 buffers: torch's update to fp32 rounding; bf16 ones: torch's rounded once, but for
        # a value within fp32 rounding of a midpoint (one bf16 step, 2**-7 relative at most).
        tol = 2.0**-7 if buffers == torch.bfloat16 else 1e-5
        torch.testing.assert_close(rm.double(), bn32.running_mean.double(), rtol=tol, atol=1e-6)
        torch.testing.assert_close(rv.double(), bn32.running_var.double(), rtol=tol, atol=1e-6)
        assert int(nb) == int(bn32.num_batches_tracked) == step + 1
    # (nn.BatchNorm2d moved to bf16 is not the reference: its update rounds to bf16 at several
    # steps, and lands a few bf16 steps from the value rounded once.)


# ---- pooling ------------------------------------------------------------------------------

MAX_POOLS = [
    # kernel, stride, padding, dilation, ceil_mode
    ((3, 3), (2, 2), (1, 1), (1, 1), False),
    ((2, 2), (2, 2), (0, 0), (1, 1), True),
    ((3, 2), (2, 1), (1, 0), (2, 1), True),
    ((1, 1), (1, 1), (0, 0), (1, 1), False),
]
AVG_POOLS = [
    # kernel, stride, padding, ceil_mode, count_include_pad, divisor_override
    ((3, 3), (2, 2), (1, 1), False, True, None),
    ((3, 3), (2, 2), (1, 1), True, False, None),
    ((2, 3), (1, 2), (1, 1), True, True, 5),
    ((2, 2), (2, 2), (0, 0), True, False, None),
]
POOL_SHAPES = [(2, 3, 7, 6), (1, 40, 5, 9), (2, 64, 4, 4)]


@pytest.mark.parametrize("geom", MAX_POOLS, ids=str)
@pytest.mark.parametrize("shape", POOL_SHAPES, ids=shape_id)
def test_max_pool_forward_and_backward(shape, geom) -> None:
    n, c, h, w = shape
    k, s, p, d, ceil = geom
    g = gen(40 + c)
    x = bf16_randn(g, *shape)
    xb = leaf(with_garbage(tdc.to_blocked(x), c))
    yb = bo.max_pool2d(xb, c, k, s, p, d, ceil)
    x64 = x.double().requires_grad_()
    y64 = F.max_pool2d(x64, k, s, p, d, ceil)
    assert yb.dtype == torch.bfloat16 and yb.shape[2:4] == y64.shape[2:]
    assert_padding_zero(yb, c, "y")
    assert torch.equal(ref_unblocked(yb.detach(), c).double(), y64.detach())  # maxima are exact
    gy = bf16_randn(g, *y64.shape)
    (gx,) = torch.autograd.grad(yb, xb, with_garbage(tdc.to_blocked(gy), c))
    (ref,) = torch.autograd.grad(y64, x64, gy.double())
    assert gx.dtype == torch.bfloat16
    assert_padding_zero(gx, c, "grad_x")
    # Each input's gradient is a sum of at most kh * kw windows' bf16 values.
    bf16_close(ref_unblocked(gx, c), ref, gy.double().abs().max() * k[0] * k[1], "grad_x")


@pytest.mark.parametrize("geom", AVG_POOLS, ids=str)
@pytest.mark.parametrize("shape", POOL_SHAPES, ids=shape_id)
def test_avg_pool_forward_and_backward(shape, geom) -> None:
    n, c, h, w = shape
    k, s, p, ceil, include, divisor = geom
    g = gen(50 + c)
    x = bf16_randn(g, *shape)
    xb = leaf(with_garbage(tdc.to_blocked(x), c))
    yb = bo.avg_pool2d(xb, c, k, s, p, ceil, include, divisor)
    x64 = x.double().requires_grad_()
    y64 = F.avg_pool2d(x64, k, s, p, ceil, include, divisor)
    assert yb.dtype == torch.bfloat16 and yb.shape[2:4] == y64.shape[2:]
    assert_padding_zero(yb, c, "y")
    # The terms: at most kh * kw values over a divisor of at least 1.
    bf16_close(ref_unblocked(yb.detach(), c), y64.detach(), x.double().abs().max() * k[0] * k[1], "y")
    gy = bf16_randn(g, *y64.shape)
    (gx,) = torch.autograd.grad(yb, xb, with_garbage(tdc.to_blocked(gy), c))
    (ref,) = torch.autograd.grad(y64, x64, gy.double())
    assert gx.dtype == torch.bfloat16
    assert_padding_zero(gx, c, "grad_x")
    bf16_close(ref_unblocked(gx, c), ref, gy.double().abs().max() * k[0] * k[1], "grad_x")


@pytest.mark.parametrize("shape", POOL_SHAPES + [(1, 40, 1, 1)], ids=shape_id)
def test_global_avg_pool_forward_and_backward(shape) -> None:
    n, c, h, w = shape
    g = gen(60 + c)
    x = bf16_randn(g, *shape, shift=3.0)
    xb = leaf(with_garbage(tdc.to_blocked(x), c))
    y = bo.global_avg_pool(xb, c)
    assert y.dtype == torch.bfloat16 and y.shape == (n, c)
    # Rounded once from the fp32 mean: the correctly rounded float64 mean but for fp32's error.
    ref = x.double().mean((2, 3))
    bf16_close(y.detach(), ref, x.double().abs().amax((2, 3)), "y")
    gy = bf16_randn(g, n, c)
    (gx,) = torch.autograd.grad(y, xb, gy)
    assert gx.dtype == torch.bfloat16
    assert_padding_zero(gx, c, "grad_x")
    g64 = (gy.double() / (h * w))[:, :, None, None].expand(n, c, h, w)
    bf16_close(ref_unblocked(gx, c), g64, g64.abs(), "grad_x")
    # The op also takes an fp32 gradient (a classifier kept in fp32), with the same result.
    gx32 = ops.global_avg_pool_blocked_backward(gy.float(), list(xb.shape), c)
    assert gx32.dtype == torch.bfloat16 and torch.equal(gx32, gx)


# ---- errors and the level -----------------------------------------------------------------


def test_activation_dtype_mix_is_an_error() -> None:
    c = 20
    xb = tdc.to_blocked(bf16_randn(gen(70), 2, c, 4, 4))
    xf = tdc.to_blocked(torch.randn(2, c, 4, 4))
    ones, zeros = torch.ones(c), torch.zeros(c)
    with pytest.raises(RuntimeError, match=r"bn_apply_blocked: expected 'residual' of the dtype of 'xb' \(BFloat16\)"):
        bo.bn_apply(xb, c, ones, zeros, residual=torch.zeros_like(xb, dtype=torch.float32).view(2, 1, 4, 4, 32))
    with pytest.raises(RuntimeError, match=r"bn_backward_blocked: expected 'grad_y' of the dtype of 'xb'"):
        ops.bn_backward_blocked(xb.float(), None, xb, zeros, ones, None, 1e-5, True, c, [True] * 4)
    with pytest.raises(RuntimeError, match=r"bn_backward_blocked: expected 'yb' of the dtype of 'xb'"):
        ops.bn_backward_blocked(xb, xb.float(), xb, zeros, ones, None, 1e-5, True, c, [True] * 4)
    yb = bo.max_pool2d(xb, c, 2)
    with pytest.raises(RuntimeError, match=r"max_pool2d_blocked_backward: expected 'grad_output' of the dtype"):
        ops.max_pool2d_blocked_backward(yb.float(), xb, yb, [2, 2], [2, 2], [0, 0], [1, 1], False, c)
    with pytest.raises(RuntimeError, match=r"max_pool2d_blocked_backward: expected 'yb' of the dtype"):
        ops.max_pool2d_blocked_backward(yb, xb, yb.float(), [2, 2], [2, 2], [0, 0], [1, 1], False, c)
    # An fp32 blocked tensor is (.., 16) here; a bf16 one of that shape is refused, and the reverse.
    with pytest.raises(RuntimeError, match=r"expected a blocked 'xb' \(N, C/32, H, W, 32\) for BFloat16"):
        bo.bn_stats(xf.bfloat16(), c)
    with pytest.raises(RuntimeError, match=r"expected a blocked 'xb' \(N, C/16, H, W, 16\) for Float"):
        bo.bn_stats(xb.float(), c)
    with pytest.raises(RuntimeError, match="expected 'xb' of dtype float32 or bfloat16, got Half"):
        bo.bn_stats(xb.half(), c)
    with pytest.raises(RuntimeError, match=r"expected 'mean' of dtype float32 or bfloat16, got Half"):
        bo.batch_norm(xb, c, zeros.half(), ones, training=False)


@pytest.mark.parametrize("cap", ["avx512", "avx2"])
def test_bf16_below_the_avx512_bf16_level_is_an_error(cap: str) -> None:
    c = 20
    x = bf16_randn(gen(71), 2, c, 4, 4)
    xb = tdc.to_blocked(x)
    _C.set_isa_cap(cap)
    try:
        msg = f"bf16 activations need the avx512_bf16 level \\(AVX512_BF16\\); TORCH_DIRECTCONV_ISA caps it at {cap}"
        for call in (
            lambda: bo.bn_stats(xb, c),
            lambda: bo.batch_norm(xb, c, torch.zeros(c), torch.ones(c)),
            lambda: bo.max_pool2d(xb, c, 2),
            lambda: bo.avg_pool2d(xb, c, 2),
            lambda: bo.global_avg_pool(xb, c),
            lambda: ops.global_avg_pool_blocked_backward(torch.ones(2, c), list(xb.shape), c),
        ):
            with pytest.raises(RuntimeError, match=msg):
                call()
        # The fp32 ops still run.
        assert bo.global_avg_pool(tdc.to_blocked(x.float()), c).dtype == torch.float32
    finally:
        _C.set_isa_cap(EXPECTED_ISA if EXPECTED_ISA in tdc.isa_levels() else "amx")
    assert bo.global_avg_pool(xb, c).dtype == torch.bfloat16


# ---- fake kernels, torch.compile, torch.func ----------------------------------------------


def op_samples():
    c = 40
    g = gen(80)
    xb = tdc.to_blocked(bf16_randn(g, 2, c, 7, 6))
    rb = tdc.to_blocked(bf16_randn(g, 2, c, 7, 6))
    mean, var = torch.randn(c, generator=g), torch.rand(c, generator=g) + 0.5
    w = torch.rand(c, generator=g) + 0.5
    pool = ([3, 3], [2, 2], [1, 1])

    def rg(t):
        return t.clone().requires_grad_()

    yb = bo.max_pool2d(xb, c, 3, 2, 1, 1, True)
    return [
        ("bn_stats_blocked", ops.bn_stats_blocked.default, (rg(xb), c)),
        ("bn_apply_blocked", ops.bn_apply_blocked.default, (rg(xb), rg(w), rg(mean), rg(rb), True, c)),
        (
            "batch_norm_blocked",
            ops.batch_norm_blocked.default,
            (rg(xb), mean, var, rg(w), rg(mean), rg(rb), 1e-5, True, True, c),
        ),
        ("bn_backward_blocked", ops.bn_backward_blocked.default, (rb, xb, xb, mean, var, w, 1e-5, True, c, [True] * 4)),
        (
            "bn_backward_blocked_partial",
            ops.bn_backward_blocked.default,
            (rb, None, xb, mean, var, w, 1e-5, True, c, [True, False, True, False]),
        ),
        ("max_pool2d_blocked", ops.max_pool2d_blocked.default, (rg(xb), *pool, [1, 1], True, c)),
        (
            "max_pool2d_blocked_backward",
            ops.max_pool2d_blocked_backward.default,
            (yb, xb, yb, *pool, [1, 1], True, c),
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
            (bf16_randn(g, 2, c), list(xb.shape), c),
        ),
        (
            "global_avg_pool_blocked_backward_fp32_grad",
            ops.global_avg_pool_blocked_backward.default,
            (torch.randn(2, c, generator=g), list(xb.shape), c),
        ),
        ("to_blocked", ops.to_blocked.default, (rg(bf16_randn(g, 2, c, 3, 5)), V)),
        ("to_blocked_fp32_entry", ops.to_blocked.default, (rg(torch.randn(2, c, 3, 5, generator=g)), V)),
        ("to_blocked_fp32_entry_c3", ops.to_blocked.default, (rg(torch.randn(1, 3, 4, 19, generator=g)), V)),
        ("from_blocked", ops.from_blocked.default, (rg(xb), c)),
    ]


@pytest.mark.parametrize("name", [s[0] for s in op_samples()])
def test_opcheck(name: str) -> None:
    """Schema, fake kernel (its dtypes against the real op's), autograd registration and AOT
    dispatch on bf16 tensors, as PyTorch tests them."""
    _, op, args = {s[0]: s for s in op_samples()}[name]
    torch.library.opcheck(op, args)


def bf16_chain(x, c, rm, rv, w, b):
    xb = tdc.to_blocked(x)
    y = bo.batch_norm(xb, c, rm, rv, w, b, True, 0.1, 1e-5, relu=True)
    y = bo.max_pool2d(y, c, 3, 2, 1)
    return bo.global_avg_pool(y, c)


def test_compile_fullgraph_matches_eager() -> None:
    c = 40
    g = gen(90)
    x = bf16_randn(g, 2, c, 10, 10)
    w, b = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)
    gy = bf16_randn(g, 2, c)

    def step(fn):
        xl, wl, bl = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
        rm, rv = torch.zeros(c), torch.ones(c)
        out = fn(xl, c, rm, rv, wl, bl)
        grads = torch.autograd.grad(out, [xl, wl, bl], gy)
        return [out, rm, rv, *grads]

    eager = step(bf16_chain)
    with (
        torch._inductor.config.patch(fx_graph_cache=False),
        torch._functorch.config.patch(enable_autograd_cache=False),
    ):
        compiled = step(torch.compile(bf16_chain, fullgraph=True))
    assert [t.dtype for t in eager] == [torch.bfloat16, torch.float32, torch.float32, torch.bfloat16] + [
        torch.float32
    ] * 2
    for a, e in zip(compiled, eager, strict=True):
        assert a.dtype == e.dtype
        torch.testing.assert_close(a, e, rtol=0, atol=0)


def test_fp32_entry_compiles() -> None:
    """torch.compile(fullgraph=True) traces the fp32 entry (its fake kernel gives bf16) and
    its fp32 gradient: the same bits as eager."""
    g = gen(93)
    x = fp32_with_specials(g, 2, 3, 6, 9)
    gy = bf16_randn(g, 2, 3)

    def entry(t):
        return bo.global_avg_pool(ops.to_blocked(t, V), 3)

    def step(fn):
        xl = x.clone().requires_grad_()
        out = fn(xl)
        return [out, *torch.autograd.grad(out, [xl], gy)]

    eager = step(entry)
    with (
        torch._inductor.config.patch(fx_graph_cache=False),
        torch._functorch.config.patch(enable_autograd_cache=False),
    ):
        compiled = step(torch.compile(entry, fullgraph=True))
    assert [t.dtype for t in compiled] == [torch.bfloat16, torch.float32]
    for a, e in zip(compiled, eager, strict=True):
        assert a.dtype == e.dtype
        assert torch.equal(a.view(torch.int16), e.view(torch.int16)) if a.dtype == torch.bfloat16 else torch.equal(a, e)


def test_torch_func_matches_autograd() -> None:
    """Under torch.func the Python autograd functions take over: the same values and dtypes."""
    c = 40
    g = gen(91)
    x = bf16_randn(g, 2, c, 6, 6)
    w, b, rm, rv = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g), torch.randn(c), torch.rand(c) + 0.5
    gy = bf16_randn(g, 2, c)

    def head(xb, wl, bl, scale):
        y = bo.batch_norm(xb, c, rm, rv, wl, bl, False, relu=True)
        y = bo.bn_apply(y, c, scale, bl, relu=False)
        y = bo.avg_pool2d(bo.max_pool2d(y, c, 2), c, 2, ceil_mode=True)
        mean, var = bo.bn_stats(y, c)
        return bo.global_avg_pool(y, c), mean, var

    xb = tdc.to_blocked(x)
    args = (xb, w, b, w.bfloat16())
    outs, vjp = torch.func.vjp(head, *args)
    cot = (gy, torch.randn(c, generator=g), torch.randn(c, generator=g))
    got = vjp(cot)
    leaves = [a.clone().requires_grad_() for a in args]
    want_outs = head(*leaves)
    want = torch.autograd.grad(want_outs, leaves, cot)
    assert [o.dtype for o in outs] == [o.dtype for o in want_outs] == [torch.bfloat16, torch.float32, torch.float32]
    for a, e in zip(got, want, strict=True):
        assert a.dtype == e.dtype, (a.dtype, e.dtype)
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)
    assert [t.dtype for t in got] == [torch.bfloat16, torch.float32, torch.float32, torch.bfloat16]


def test_torch_func_layout_gradients() -> None:
    """to_blocked and from_blocked under torch.func (their Python autograd functions, which keep
    the vlen of the forward: 32 for bf16)."""
    g = gen(92)
    x = bf16_randn(g, 2, 40, 3, 5)
    gy = bf16_randn(g, 2, 40, 3, 5)
    xb = tdc.to_blocked(x)
    _, vjp_from = torch.func.vjp(lambda t: tdc.from_blocked(t, 40), xb)
    (gxb,) = vjp_from(gy)
    assert gxb.dtype == torch.bfloat16 and torch.equal(gxb, ref_blocked(gy))
    _, vjp_to = torch.func.vjp(tdc.to_blocked, x)
    (gx,) = vjp_to(ref_blocked(gy))
    assert gx.dtype == torch.bfloat16 and torch.equal(gx, gy)
