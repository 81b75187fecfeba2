"""Bad arguments raise what F.conv2d raises, with a message that names the argument.

Every case is run against torch first, so the expected exception type is torch's own, and
the tensors passed in must come back unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_directconv as tdc
from helpers import requires_jit


def t(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape) + 1)).to(dtype)


# name: (input, weight, kwargs, regex the message must match: the argument's name)
CASES: dict[str, tuple] = {
    "input_2d": (t(8, 6), t(8, 8, 3, 3), {}, r"'input'"),
    "input_5d": (t(1, 1, 8, 6, 6), t(8, 8, 3, 3), {}, r"'input'"),
    "weight_3d": (t(1, 8, 6, 6), t(8, 8, 3), {}, r"'weight'"),
    "weight_5d": (t(1, 8, 6, 6), t(8, 8, 3, 3, 1), {}, r"'weight'"),
    "channels_mismatch": (t(1, 4, 6, 6), t(8, 3, 3, 3), {}, r"'input'.*channels|channels.*'input'"),
    "channels_mismatch_unbatched": (t(4, 6, 6), t(8, 3, 3, 3), {}, r"'input'.*channels|channels.*'input'"),
    "channels_mismatch_groups": (t(1, 8, 6, 6), t(8, 8, 3, 3), {"groups": 2}, r"'input'|'weight'"),
    "groups_not_dividing_input": (t(1, 6, 6, 6), t(8, 2, 3, 3), {"groups": 4}, r"'groups'"),
    "groups_not_dividing_output": (t(1, 8, 6, 6), t(6, 2, 3, 3), {"groups": 4}, r"'groups'"),
    "groups_zero": (t(1, 8, 6, 6), t(8, 8, 3, 3), {"groups": 0}, r"'groups'"),
    "groups_negative": (t(1, 8, 6, 6), t(8, 8, 3, 3), {"groups": -2}, r"'groups'"),
    "groups_float": (t(1, 8, 6, 6), t(8, 8, 3, 3), {"groups": 1.0}, r"groups"),
    "padding_negative": (t(1, 8, 6, 6), t(8, 8, 3, 3), {"padding": -1}, r"'padding'"),
    "padding_negative_tuple": (t(1, 8, 6, 6), t(8, 8, 3, 3), {"padding": (1, -2)}, r"'padding'"),
    "padding_bad_string": (t(1, 8, 6, 6), t(8, 8, 3, 3), {"padding": "full"}, r"padding"),
    "padding_upper_case": (t(1, 8, 6, 6), t(8, 8, 3, 3), {"padding": "SAME"}, r"padding"),
    "padding_four_values": (t(1, 8, 6, 6), t(8, 8, 3, 3), {"padding": (1, 1, 1, 1)}, r"padding"),
    "padding_same_strided": (t(1, 8, 6, 6), t(8, 8, 3, 3), {"padding": "same", "stride": 2}, r"padding"),
    "stride_zero": (t(1, 8, 6, 6), t(8, 8, 3, 3), {"stride": 0}, r"'stride'"),
    "stride_negative": (t(1, 8, 6, 6), t(8, 8, 3, 3), {"stride": (1, -1)}, r"'stride'"),
    "stride_three_values": (t(1, 8, 6, 6), t(8, 8, 3, 3), {"stride": (1, 1, 1)}, r"stride"),
    "stride_float": (t(1, 8, 6, 6), t(8, 8, 3, 3), {"stride": 1.5}, r"stride"),
    # Past int64: a bare int is torch's ValueError, an item of a list its TypeError, and the
    # list's is reported first whatever the order of the arguments.
    "stride_past_int64": (t(1, 8, 6, 6), t(8, 8, 3, 3), {"stride": 2**63}, r"'stride'"),
    "padding_item_past_int64": (t(1, 8, 6, 6), t(8, 8, 3, 3), {"padding": (2**63, 0)}, r"'padding'"),
    "stride_and_padding_item_past_int64": (
        t(1, 8, 6, 6),
        t(8, 8, 3, 3),
        {"stride": 2**63, "padding": (2**63, 0)},
        r"'padding'",
    ),
    "stride_and_dilation_item_past_int64": (
        t(1, 8, 6, 6),
        t(8, 8, 3, 3),
        {"stride": 2**63, "dilation": (1, 2**63)},
        r"'dilation'",
    ),
    "dilation_zero": (t(1, 8, 6, 6), t(8, 8, 3, 3), {"dilation": 0}, r"'dilation'"),
    "kernel_larger_than_input": (t(1, 8, 2, 6), t(8, 8, 3, 3), {}, r"kernel|'weight'"),
    "kernel_larger_than_padded_input": (t(1, 8, 6, 1), t(8, 8, 3, 4), {"padding": 1}, r"kernel|'weight'"),
    "kernel_larger_when_dilated": (t(1, 8, 6, 6), t(8, 8, 3, 3), {"dilation": 3}, r"kernel|'weight'"),
    # With stride 2 a kernel one pixel larger than the input must still be refused.
    "kernel_larger_strided": (t(1, 16, 2, 2), t(16, 16, 3, 3), {"stride": 2}, r"kernel|'weight'"),
    "kernel_larger_strided_width": (t(1, 16, 8, 4), t(16, 16, 3, 5), {"stride": (1, 3)}, r"kernel|'weight'"),
    "kernel_larger_empty_batch": (t(0, 8, 2, 2), t(8, 8, 3, 3), {}, r"kernel|'weight'"),
    "kernel_size_zero": (t(1, 8, 6, 6), t(8, 8, 0, 3), {}, r"kernel|'weight'"),
    "no_output_channels": (t(1, 8, 6, 6), t(0, 8, 3, 3), {}, r"'weight'|channels"),
    "dtype_input_float64": (t(1, 8, 6, 6, dtype=torch.float64), t(8, 8, 3, 3), {}, r"'input'.*'weight'"),
    "dtype_weight_float64": (t(1, 8, 6, 6), t(8, 8, 3, 3, dtype=torch.float64), {}, r"'input'.*'weight'"),
    "dtype_weight_float16": (t(1, 8, 6, 6), t(8, 8, 3, 3, dtype=torch.float16), {}, r"'input'.*'weight'"),
    "dtype_bias_float64": (t(1, 8, 6, 6), t(8, 8, 3, 3), {"bias": t(8, dtype=torch.float64)}, r"'bias'"),
    "bias_wrong_length": (t(1, 8, 6, 6), t(8, 8, 3, 3), {"bias": t(7)}, r"'bias'"),
    "bias_2d": (t(1, 8, 6, 6), t(8, 8, 3, 3), {"bias": t(1, 8)}, r"'bias'"),
    "input_not_a_tensor": ([[1.0]], t(8, 8, 3, 3), {}, r"'input'"),
    "weight_not_a_tensor": (t(1, 8, 6, 6), 3.0, {}, r"'weight'"),
}


def snapshot(*objs) -> list:
    return [o.clone() if isinstance(o, torch.Tensor) else o for o in objs]


def assert_unchanged(before: list, after: list, label: str) -> None:
    for a, b in zip(before, after, strict=True):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b) and a.shape == b.shape and a.dtype == b.dtype, f"{label}: an argument changed"


def torch_error(fn: Callable[[], object]) -> BaseException:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - whatever torch raises is the reference
        return e
    raise AssertionError("torch accepts this call; the case is not an error")


@pytest.mark.parametrize("name", list(CASES))
def test_conv2d_raises_like_torch(name: str) -> None:
    x, w, kwargs, names = CASES[name]
    bias = kwargs.get("bias")
    before = snapshot(x, w, bias)
    expected = torch_error(lambda: F.conv2d(x, w, **kwargs))
    with pytest.raises(Exception) as info:  # noqa: PT011 - the type is checked against torch's below
        tdc.conv2d(x, w, **kwargs)
    got = info.value
    assert isinstance(got, type(expected)), (
        f"torch raises {type(expected).__name__} ({expected}); torch_directconv raises {type(got).__name__} ({got})"
    )
    assert re.search(names, str(got)), f"the message does not name the argument ({names}): {got}"
    assert_unchanged(before, [x, w, bias], name)


@requires_jit
@pytest.mark.parametrize(
    "name", ["channels_mismatch", "channels_mismatch_unbatched", "input_2d", "input_5d", "kernel_larger_strided"]
)
def test_module_raises_like_conv2d(name: str) -> None:
    x, w, kwargs, _ = CASES[name]
    conv = nn.Conv2d(w.shape[1], w.shape[0], tuple(w.shape[2:]), **kwargs)
    m = tdc.DirectConv2d.from_conv2d(conv)
    before = snapshot(x, conv.weight)
    with torch.no_grad():
        expected = torch_error(lambda: conv(x))
        with pytest.raises(type(expected)):
            m(x)
    assert_unchanged(before, [x, conv.weight], name)


@requires_jit
@pytest.mark.parametrize(
    "case",
    [
        ("xb_4d", lambda xb, wb, v: (xb[0], wb, {}), r"'input'|'xb'"),
        ("xb_wrong_v", lambda xb, wb, v: (xb[..., : v // 2], wb, {}), r"'input'|'xb'"),
        ("wb_5d", lambda xb, wb, v: (xb, wb[0], {}), r"'weight'|'wb'"),
        ("wb_channel_blocks", lambda xb, wb, v: (xb, wb.repeat(1, 2, 1, 1, 1, 1), {}), r"channel blocks"),
        ("bias_too_long", lambda xb, wb, v: (xb, wb, {"bias": torch.zeros(2 * v)}), r"'bias'"),
        ("negative_padding", lambda xb, wb, v: (xb, wb, {"padding": -1}), r"'padding'"),
        ("kernel_larger_strided", lambda xb, wb, v: (xb[:, :, :2, :2], wb, {"stride": 2}), r"kernel|'weight'"),
    ],
    ids=lambda c: c[0],
)
def test_conv2d_blocked_raises(case: tuple) -> None:
    _, make, names = case
    v = tdc.vector_width()
    xb = tdc.to_blocked(t(1, v, 6, 6))
    wb = tdc.to_blocked_weight(t(v, v, 3, 3))
    x, w, kwargs = make(xb, wb, v)
    before = snapshot(xb, wb, x, w)
    with pytest.raises(RuntimeError, match=names):
        tdc.conv2d_blocked(x, w, **kwargs)
    assert_unchanged(before, [xb, wb, x, w], case[0])
