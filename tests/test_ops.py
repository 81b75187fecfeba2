"""The torch.ops.directconv ops as PyTorch sees them: opcheck and torch.compile(fullgraph=True)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_directconv as tdc
from helpers import assert_conv_close, check_expected_isa
from torch_directconv.functional import pack_weight


@pytest.fixture(autouse=True)
def isa() -> str:
    return check_expected_isa()


def op_samples() -> list:
    v = tdc.vector_width()
    g = torch.Generator().manual_seed(31)
    x = torch.randn(2, 12, 9, 10, generator=g)
    w = torch.randn(20, 12, 3, 3, generator=g) / math.sqrt(108)
    wg = torch.randn(24, 6, 3, 3, generator=g) / math.sqrt(54)
    b = torch.randn(20, generator=g)
    xb, wb = tdc.to_blocked(x), tdc.to_blocked_weight(w)
    ops = torch.ops.directconv
    return [
        ("conv2d", ops.conv2d.default, (x, w, b, [2, 1], [1, 1, 0, 2], [1, 1], 1, True)),
        ("conv2d_grouped", ops.conv2d.default, (x, wg, None, [1, 1], [1, 1, 1, 1], [1, 1], 2, False)),
        (
            "conv2d_packed",
            ops.conv2d_packed.default,
            (x, pack_weight(w, 1), b, 20, [1, 1], [1, 1, 1, 1], [1, 1], 1, False, False),
        ),
        (
            "conv2d_packed_depthwise",
            ops.conv2d_packed.default,
            (
                x,
                pack_weight(torch.randn(12, 1, 3, 3, generator=g), 12),
                None,
                12,
                [1, 1],
                [1, 1, 1, 1],
                [1, 1],
                12,
                True,
                True,
            ),
        ),
        ("pack_weight", ops.pack_weight.default, (wg, 2)),
        ("conv2d_blocked", ops.conv2d_blocked.default, (xb, wb, b, [1, 1], [1, 1, 1, 1], [1, 1], False, 12)),
        ("to_blocked", ops.to_blocked.default, (x, v)),
        ("from_blocked", ops.from_blocked.default, (xb, 12)),
        ("to_blocked_weight", ops.to_blocked_weight.default, (w, v)),
        ("from_blocked_weight", ops.from_blocked_weight.default, (wb, 20, 12)),
    ]


@pytest.mark.parametrize("name", [s[0] for s in op_samples()])
def test_opcheck(name: str) -> None:
    """Schema, fake (meta) kernel, autograd registration and AOT dispatch, as PyTorch tests them."""
    _, op, args = {s[0]: s for s in op_samples()}[name]
    torch.library.opcheck(op, args)


def test_compile_fullgraph_functional() -> None:
    g = torch.Generator().manual_seed(32)
    x = torch.randn(2, 8, 11, 11, generator=g)
    w = torch.randn(16, 8, 3, 3, generator=g) / math.sqrt(72)
    b = torch.randn(16, generator=g)

    def f(x, w, b):
        return tdc.conv2d(x, w, b, stride=2, padding=1, relu=True)

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    assert_conv_close(compiled(x, w, b), torch.relu(F.conv2d(x, w, b, stride=2, padding=1)), 72)


def test_compile_fullgraph_converted_model() -> None:
    torch.manual_seed(33)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    converted = tdc.convert(model)
    x = torch.randn(1, 3, 12, 12)
    with torch.no_grad():
        ref = model(x)
        compiled = torch.compile(converted, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(x), ref, rtol=1e-4, atol=1e-4)
