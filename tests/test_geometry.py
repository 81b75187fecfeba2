"""Geometry beyond the kernels' 32-bit offsets, and empty channels: torch's answer (or its error).

The kernels encode offsets within a channel block's plane in 32 bits. Strides, paddings and
dilations that go past that (2^31 and more, or 10^8 paddings with 10^8 dilations, where torch's
output is still small) run on torch's convolution; they are never truncated.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F

import torch_directconv as tdc
from helpers import assert_grad_close, requires_jit, run_python

pytestmark = requires_jit

# (input shape, weight shape, F.conv2d keywords): the output stays small in each.
HUGE = {
    "dil_pad_2^32+1": ((1, 16, 4, 4), (16, 16, 3, 3), {"dilation": 2**32 + 1, "padding": 2**32 + 1}),
    "dil_pad_2^31+1": ((1, 16, 4, 4), (16, 16, 3, 3), {"dilation": 2**31 + 1, "padding": 2**31 + 1}),
    "dil_pad_1e8_s2": ((2, 16, 5, 4), (8, 16, 3, 3), {"dilation": 10**8, "padding": 10**8, "stride": 2}),
    "dil_pad_1e9_1x3": ((1, 5, 3, 6), (7, 5, 1, 3), {"dilation": (1, 10**9), "padding": (0, 10**9)}),
    "stride_2^31": ((1, 16, 4, 4), (16, 16, 3, 3), {"stride": 2**31}),
    "stride_2^32+1": ((2, 16, 5, 4), (8, 16, 3, 3), {"stride": 2**32 + 1}),
    "stride_2^63-1": ((1, 16, 4, 4), (16, 16, 3, 3), {"stride": 2**63 - 1}),
    "same_dil_2^31-1": ((1, 3, 1, 2), (4, 3, 2, 3), {"padding": "same", "dilation": (1, 2**31 - 1)}),
    "one_tap_dil_2^31": ((1, 3, 2, 2), (4, 3, 1, 1), {"padding": "same", "dilation": (1, 2**31)}),
    "depthwise": ((1, 16, 4, 4), (16, 1, 3, 3), {"dilation": 2**32 + 1, "padding": 2**32 + 1, "groups": 16}),
    "grouped": ((1, 32, 4, 4), (32, 16, 3, 3), {"dilation": 2**32 + 1, "padding": 2**32 + 1, "groups": 2}),
}


def test_huge_dilation_and_padding_does_not_crash():
    """It used to crash (SIGSEGV), so it runs in a child."""
    run_python(
        """
        import torch, torch.nn.functional as F, torch_directconv as tdc
        x, w = torch.randn(1, 16, 4, 4), torch.randn(16, 16, 3, 3)
        kw = dict(dilation=2**32 + 1, padding=2**32 + 1)
        torch.testing.assert_close(tdc.conv2d(x, w, **kw), F.conv2d(x, w, **kw))
        """,
        timeout=120,
    )


@pytest.mark.parametrize("case", HUGE)
def test_huge_geometry_forward_and_backward(case):
    torch.manual_seed(0)
    xs, ws, kw = HUGE[case]
    x, w, b = torch.randn(xs), torch.randn(ws), torch.randn(ws[0])
    got = [t.clone().requires_grad_() for t in (x, w, b)]
    ref = [t.double().requires_grad_() for t in (x, w, b)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y = tdc.conv2d(*got, **kw)
    y_ref = F.conv2d(*ref, **kw)
    assert y.shape == y_ref.shape
    torch.testing.assert_close(y, y_ref.float(), rtol=1e-4, atol=1e-4)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g.double())
    for name, a, r in zip(("input", "weight", "bias"), got, ref):
        assert_grad_close(a.grad, r.grad.float(), msg=f"{case} {name} gradient")


@pytest.mark.parametrize("case", ["dil_pad_2^32+1", "stride_2^31", "depthwise", "grouped"])
def test_huge_geometry_cached_module(case):
    xs, ws, kw = HUGE[case]
    groups = kw.get("groups", 1)
    conv = torch.nn.Conv2d(xs[1], ws[0], ws[2:], **kw)
    direct = tdc.DirectConv2d.from_conv2d(conv, cache_weights=True)
    x = torch.randn(xs)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(direct(x), conv(x), rtol=1e-4, atol=1e-4, msg=f"groups={groups}")


def test_huge_geometry_blocked_api():
    torch.manual_seed(0)
    kw = {"dilation": 2**32 + 1, "padding": 2**32 + 1}
    x, w, b = torch.randn(2, 20, 4, 4), torch.randn(24, 20, 3, 3), torch.randn(24)
    got = [t.clone().requires_grad_() for t in (x, w, b)]
    ref = [t.double().requires_grad_() for t in (x, w, b)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yb = tdc.conv2d_blocked(tdc.to_blocked(got[0]), tdc.to_blocked_weight(got[1]), got[2], in_channels=20, **kw)
    y = tdc.from_blocked(yb, 24)
    y_ref = F.conv2d(*ref, **kw)
    torch.testing.assert_close(y, y_ref.float(), rtol=1e-4, atol=1e-4)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g.double())
    for name, a, r in zip(("input", "weight", "bias"), got, ref):
        assert_grad_close(a.grad, r.grad.float(), msg=f"blocked {name} gradient")


def test_geometry_that_fits_stays_on_the_jit():
    """A wide padding whose planes fit 32-bit offsets still runs on the kernels."""
    x, w = torch.randn(1, 3, 2, 2), torch.randn(8, 3, 3, 3)
    before = tdc.jit_stats()["aten_fallbacks"]
    torch.testing.assert_close(tdc.conv2d(x, w, padding=300), F.conv2d(x, w, padding=300), rtol=1e-4, atol=1e-4)
    assert tdc.jit_stats()["aten_fallbacks"] == before


def test_padding_beyond_int64_gives_torchs_error():
    x, w = torch.randn(1, 16, 4, 4), torch.randn(16, 16, 3, 3)
    with pytest.raises(RuntimeError) as ref:
        F.conv2d(x, w, padding=2**62)
    with pytest.raises(RuntimeError) as got:
        tdc.conv2d(x, w, padding=2**62)
    assert str(got.value).split("\n")[0] == str(ref.value).split("\n")[0]


# Raw backward ops, each with one argument that does not match the others: (op, args).
def _raw_backward_cases():
    gy, w, x = torch.randn(2, 8, 4, 4), torch.randn(8, 16, 3, 3), torch.randn(2, 16, 6, 6)
    geo = ([1, 1], [0, 0, 0, 0], [1, 1], 1)
    ops = torch.ops.directconv
    return {
        "data_batch": (ops.conv2d_backward_data, (gy, w, [3, 16, 6, 6], *geo)),
        "data_channels": (ops.conv2d_backward_data, (gy, w, [2, 12, 6, 6], *geo)),
        "data_size": (ops.conv2d_backward_data, (gy, w, [2, 16, 7, 6], *geo)),
        "data_1x1_batch": (
            ops.conv2d_backward_data,
            (torch.randn(2, 16, 28, 28), torch.randn(16, 16, 1, 1), [3, 16, 28, 28], *geo),
        ),
        "data_depthwise_batch": (
            ops.conv2d_backward_data,
            (torch.randn(2, 16, 4, 4), torch.randn(16, 1, 3, 3), [3, 16, 6, 6], [1, 1], [0, 0, 0, 0], [1, 1], 16),
        ),
        "weight_batch": (ops.conv2d_backward_weight, (gy, torch.randn(3, 16, 6, 6), [8, 16, 3, 3], *geo)),
        "weight_kernel": (ops.conv2d_backward_weight, (gy, x, [8, 16, 2, 3], *geo)),
        "weight_out_channels": (ops.conv2d_backward_weight, (gy, x, [12, 16, 3, 3], *geo)),
    }


@pytest.mark.parametrize("case", list(_raw_backward_cases()))
def test_raw_backward_ops_check_their_arguments(case):
    """Each op checks its own arguments: a wrong batch size used to give a gradient of the wrong shape."""
    op, args = _raw_backward_cases()[case]
    with pytest.raises(RuntimeError, match="grad_output|channels"):
        op(*args)
