"""Training in the blocked layout: conv2d_blocked's autograd, its backward ops, and the
differentiable layout conversions; plus the strided input-gradient phases, which the blocked
and the NCHW backward share.

The references are torch's own gradients of F.conv2d on the unblocked tensors.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

import torch_directconv as tdc
from helpers import cpu_has, requires_jit, run_pytest_under_isa
from torch_directconv import _C

pytestmark = requires_jit

ops = torch.ops.directconv


def _random_case(rng: random.Random) -> dict:
    r, s = rng.choice([(1, 1), (3, 3), (5, 5), (1, 3), (3, 1), (7, 7), (2, 4)])
    stride = (rng.randint(1, 3), rng.randint(1, 3))
    dilation = (rng.randint(1, 2), rng.randint(1, 2))
    # Mostly paddings within the dilated kernel; sometimes wider, which the phases cannot express.
    wide = rng.random() < 0.1
    padding = tuple(rng.randint(0, d * (k - 1) + (2 if wide else 0)) for d, k in zip(dilation, (r, s), strict=True))
    return dict(
        n=rng.randint(1, 3),
        c=rng.choice([1, 3, 8, 16, 17, 33]),
        k=rng.choice([5, 16, 20, 32]),
        h=rng.randint(dilation[0] * (r - 1) + 1, 13),
        w=rng.randint(dilation[1] * (s - 1) + 1, 13),
        r=r,
        s=s,
        stride=stride,
        padding=padding,
        dilation=dilation,
        bias=rng.random() < 0.6,
        relu=rng.random() < 0.3,
    )


CASES = [_random_case(random.Random(7000 + i)) for i in range(150)]


def _check_blocked_training(case: dict, seed: int, kcrs: bool = False) -> None:
    """With kcrs, the weight goes into conv2d_blocked as (K, C, R, S), packed within the ops."""
    g = torch.Generator().manual_seed(seed)
    n, c, k = case["n"], case["c"], case["k"]
    x = torch.randn(n, c, case["h"], case["w"], generator=g)
    w = torch.randn(k, c, case["r"], case["s"], generator=g) / math.sqrt(c * case["r"] * case["s"])
    b = torch.randn(k, generator=g) if case["bias"] else None
    geometry = (case["stride"], case["padding"], case["dilation"])
    leaves = [t.clone().requires_grad_() for t in (x, w) + ((b,) if b is not None else ())]
    refs = [t.clone().requires_grad_() for t in (x, w) + ((b,) if b is not None else ())]
    v = tdc.vector_width()
    bias = None
    if b is not None:  # the blocked bias covers whole blocks
        bias = torch.cat([leaves[2], leaves[2].new_zeros(-(-k // v) * v - k)])
    yb = tdc.conv2d_blocked(
        tdc.to_blocked(leaves[0]),
        leaves[1] if kcrs else tdc.to_blocked_weight(leaves[1]),
        bias,
        *geometry,
        relu=case["relu"],
        in_channels=c,
    )
    out = tdc.from_blocked(yb, k)
    ref = F.conv2d(refs[0], refs[1], refs[2] if b is not None else None, *geometry)
    if case["relu"]:
        ref = torch.relu(ref)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * (ref.abs().max().item() + 1), msg=str(case))
    grad = torch.randn(ref.shape, generator=g)
    got = torch.autograd.grad(out, leaves, grad)
    want = torch.autograd.grad(ref, refs, grad)
    for name, a, e in zip(("input", "weight", "bias"), got, want, strict=False):
        scale = e.abs().max().item() + 1
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4 * scale, msg=f"grad of {name} in {case}")


@pytest.mark.parametrize("kcrs", [False, True], ids=["blocked_weight", "kcrs_weight"])
@pytest.mark.parametrize("i", range(len(CASES)))
def test_blocked_training_matches_torch(i: int, kcrs: bool) -> None:
    _check_blocked_training(CASES[i], seed=i, kcrs=kcrs)


@pytest.mark.skipif(not cpu_has("avx2"), reason=f"this CPU lacks AVX2 (detected {_C.detected_isa()})")
def test_blocked_training_under_avx2_cap() -> None:
    """The same cases in a child capped to AVX2 (8-wide blocks)."""
    run_pytest_under_isa(
        "avx2", "tests/test_blocked_autograd.py", "test_blocked_training_matches_torch", expect_passed=2 * len(CASES)
    )


def _blocked_problem(seed: int, c: int = 20, k: int = 24, r: int = 3, hw: int = 9, n: int = 2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, hw, hw, generator=g)
    w = torch.randn(k, c, r, r, generator=g)
    return x, w, g


@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 1), (2, 0), (3, 2)])
def test_padded_channels_get_zero_gradients(stride: int, padding: int) -> None:
    """Input channels past in_channels are not read by the forward, so their gradients are zero,
    whatever the padding of the blocked tensors holds."""
    x, w, g = _blocked_problem(1)
    c = x.shape[1]
    xb, wb = tdc.to_blocked(x), tdc.to_blocked_weight(w)
    v = tdc.vector_width()
    tail = slice(c % v, None)
    xb[:, -1, ..., tail] = torch.randn(xb[:, -1, ..., tail].shape, generator=g)  # garbage in the padding
    wb[:, -1, :, :, tail, :] = torch.randn(wb[:, -1, :, :, tail, :].shape, generator=g)
    args = ([stride] * 2, [padding] * 4, [1, 1])
    yb = ops.conv2d_blocked(xb, wb, None, *args, False, c)
    gy = torch.randn(yb.shape, generator=g)
    k = w.shape[0]
    if k % v:  # output channels past k are real outputs of the blocked op; the reference has none
        gy[:, -1, ..., k % v :] = 0
    gx = ops.conv2d_blocked_backward_data(gy, wb, list(xb.shape), *args, c)
    gw = ops.conv2d_blocked_backward_weight(gy, xb, list(wb.shape), *args, c)
    assert (gx[:, -1, ..., tail] == 0).all()
    assert (gw[:, -1, :, :, tail, :] == 0).all()
    y = F.conv2d(x, w, None, stride, padding)
    gy_nchw = tdc.from_blocked(gy, y.shape[1])
    ref_x = torch.nn.grad.conv2d_input(x.shape, w, gy_nchw, stride, padding)
    ref_w = torch.nn.grad.conv2d_weight(x, w.shape, gy_nchw, stride, padding)
    torch.testing.assert_close(tdc.from_blocked(gx, c), ref_x, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(gw, tdc.to_blocked_weight(ref_w), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("k,c,r", [(20, 12, 3), (17, 3, 7), (33, 40, 1)])
def test_weight_layout_round_trip_gradients(k: int, c: int, r: int) -> None:
    """to_blocked_weight and from_blocked_weight are each other's backward: the gradient of a
    KCRS weight through the blocked layout is the upstream gradient unblocked, and that of a
    blocked weight through KCRS is zero in the padded lanes."""
    v = tdc.vector_width()
    g = torch.Generator().manual_seed(k + c + r)
    w = torch.randn(k, c, r, r, generator=g, requires_grad=True)
    wb = tdc.to_blocked_weight(w)
    gb = torch.randn(wb.shape, generator=g)
    (gw,) = torch.autograd.grad(wb, w, gb)
    ref = gb.permute(0, 5, 1, 4, 2, 3).reshape(wb.shape[0] * v, wb.shape[1] * v, r, r)[:k, :c]
    assert torch.equal(gw, ref)
    leaf = wb.detach().requires_grad_()
    back = tdc.from_blocked_weight(leaf, k, c)
    assert torch.equal(back, w.detach())
    gk = torch.randn(back.shape, generator=g)
    (gl,) = torch.autograd.grad(back, leaf, gk)
    assert torch.equal(gl, tdc.to_blocked_weight(gk))
    # Both ways at once, as a training step of a blocked model runs them.
    (g2,) = torch.autograd.grad(tdc.from_blocked_weight(tdc.to_blocked_weight(w), k, c), w, gk)
    assert torch.equal(g2, gk)


def test_blocked_backward_ops_reject_bad_shapes() -> None:
    x, w, g = _blocked_problem(2)
    xb, wb = tdc.to_blocked(x), tdc.to_blocked_weight(w)
    args = ([1, 1], [1, 1, 1, 1], [1, 1])
    yb = ops.conv2d_blocked(xb, wb, None, *args, False, None)
    with pytest.raises(RuntimeError, match="grad_output"):
        ops.conv2d_blocked_backward_data(yb[:, :, 1:], wb, list(xb.shape), *args, None)
    with pytest.raises(RuntimeError, match="input_size"):
        ops.conv2d_blocked_backward_data(yb, wb, list(xb.shape[:4]), *args, None)
    with pytest.raises(RuntimeError, match="weight_size"):
        ops.conv2d_blocked_backward_weight(yb, xb, list(wb.shape[:5]), *args, None)
    with pytest.raises(RuntimeError, match="in_channels"):
        ops.conv2d_blocked_backward_weight(yb, xb, list(wb.shape), *args, 1000)
    # A (K, C, R, S) weight whose channels do not fit the input's blocks, or differ from in_channels.
    v = tdc.vector_width()
    with pytest.raises(RuntimeError, match="'wb'.*does not fit"):
        ops.conv2d_blocked(xb, torch.randn(24, xb.shape[1] * v + 1, 3, 3), None, *args, False, None)
    with pytest.raises(RuntimeError, match="'in_channels'.*differs"):
        ops.conv2d_blocked_backward_data(yb, w, list(xb.shape), *args, w.shape[1] - 1)
    with pytest.raises(RuntimeError, match="'weight_size'.*does not fit"):
        ops.conv2d_blocked_backward_weight(yb, xb, [24, xb.shape[1] * v + 1, 3, 3], *args, None)
    with pytest.raises(RuntimeError, match="weight_size"):
        ops.conv2d_blocked_backward_weight(yb, xb, [24, 20, 3], *args, None)


@pytest.mark.parametrize(
    "shape",
    [
        dict(c=64, k=64, r=1, stride=2, padding=0, hw=14),  # the projection shortcut
        dict(c=32, k=48, r=3, stride=2, padding=1, hw=15),  # ResNet v1.5's strided 3x3, odd size
        dict(c=16, k=32, r=7, stride=2, padding=3, hw=20),  # conv1
        dict(c=24, k=16, r=3, stride=3, padding=1, hw=11),  # phases without taps
    ],
)
def test_strided_input_gradient_runs_on_the_jit(shape: dict) -> None:
    """Strided layers get their own scheme (one forward convolution per phase), not ATen."""
    x, w, g = _blocked_problem(3, shape["c"], shape["k"], shape["r"], shape["hw"])
    s, p = shape["stride"], shape["padding"]
    y = F.conv2d(x, w, None, s, p)
    gy = torch.randn(y.shape, generator=g)
    before = tdc.jit_stats()
    got = ops.conv2d_backward_data(gy, w, list(x.shape), [s, s], [p] * 4, [1, 1], 1)
    after = tdc.jit_stats()
    assert after["kernels"] + after["cache_hits"] > before["kernels"] + before["cache_hits"]
    torch.testing.assert_close(got, torch.nn.grad.conv2d_input(x.shape, w, gy, s, p), rtol=1e-4, atol=1e-3)


def test_opcheck_blocked_ops() -> None:
    for stride, padding, relu in [(1, 1, False), (2, 1, True), (2, 0, False)]:
        x, w, g = _blocked_problem(4)
        xb, wb = tdc.to_blocked(x).requires_grad_(), tdc.to_blocked_weight(w).requires_grad_()
        args = ([stride] * 2, [padding] * 4, [1, 1])
        yb = ops.conv2d_blocked(xb, wb, None, *args, relu, 20)
        gy = torch.randn(yb.shape, generator=g)
        torch.library.opcheck(ops.conv2d_blocked, (xb, wb, None, *args, relu, 20))
        torch.library.opcheck(ops.conv2d_blocked_backward_data, (gy, wb.detach(), list(xb.shape), *args, 20))
        torch.library.opcheck(ops.conv2d_blocked_backward_weight, (gy, xb.detach(), list(wb.shape), *args, 20))
    xr = torch.randn(2, 20, 5, 5, requires_grad=True)
    torch.library.opcheck(ops.to_blocked, (xr, tdc.vector_width()))
    torch.library.opcheck(ops.to_blocked_weight, (torch.randn(24, 20, 3, 3, requires_grad=True), tdc.vector_width()))
    torch.library.opcheck(ops.from_blocked, (tdc.to_blocked(xr.detach()).requires_grad_(), 20))
    wbr = tdc.to_blocked_weight(torch.randn(24, 20, 3, 3)).requires_grad_()
    torch.library.opcheck(ops.from_blocked_weight, (wbr, 24, 20))
    # The weight as (K, C, R, S): packed within the ops, its gradient (K, C, R, S).
    x, w, g = _blocked_problem(5, c=20, k=24)
    xb, wr = tdc.to_blocked(x).requires_grad_(), w.clone().requires_grad_()
    args = ([2, 2], [1, 1, 1, 1], [1, 1])
    gy = torch.randn(ops.conv2d_blocked(xb, wr, None, *args, True, 20).shape, generator=g)
    torch.library.opcheck(ops.conv2d_blocked, (xb, wr, None, *args, True, 20))
    torch.library.opcheck(ops.conv2d_blocked_backward_data, (gy, w, list(xb.shape), *args, 20))
    torch.library.opcheck(ops.conv2d_blocked_backward_weight, (gy, xb.detach(), list(w.shape), *args, 20))


class BlockedNet(torch.nn.Module):
    """Two convolutions whose activations stay blocked in between; weights stored as KCRS."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = torch.nn.Conv2d(16, 24, 3, stride=2, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = tdc.vector_width()
        b1 = torch.cat([self.c1.bias, self.c1.bias.new_zeros(-(-16 // v) * v - 16)])
        w1 = tdc.to_blocked_weight(self.c1.weight)
        h = tdc.conv2d_blocked(tdc.to_blocked(x), w1, b1, 1, 1, relu=True, in_channels=3)
        h = tdc.conv2d_blocked(h, tdc.to_blocked_weight(self.c2.weight), None, 2, 1)
        return tdc.from_blocked(h, 24).mean((2, 3))

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(torch.relu(self.c1(x))).mean((2, 3))


def test_compiled_blocked_training_step_matches_eager() -> None:
    """torch.compile(fullgraph=True) of a blocked model's forward and backward: no graph break,
    the gradients of eager, and of the nn.Conv2d reference."""
    torch.manual_seed(0)
    net = BlockedNet()
    x = torch.randn(2, 3, 12, 12)

    def step(fn):
        net.zero_grad()
        fn(x).square().sum().backward()
        return [p.grad.clone() for p in net.parameters()]

    eager = step(net)
    compiled = step(torch.compile(net, fullgraph=True))
    reference = step(net.reference)
    for a, b, r in zip(eager, compiled, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)
