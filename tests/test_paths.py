"""The path choices that Python takes from C++ (csrc/conv/paths.h) rather than keeping a copy:
which groups the JIT covers, the depthwise layout, and the NCHW 1x1 GEMM's threshold."""

from __future__ import annotations

import pytest
import torch

import torch_directconv as tdc
from helpers import requires_jit
from torch_directconv import _C, _backend
from torch_directconv.functional import fallback_reason

pytestmark = requires_jit


@pytest.mark.parametrize(
    ("groups", "out_channels", "cg", "covered"),
    [
        (1, 3, 5, True),  # one group: always
        (8, 8, 1, True),  # depthwise
        (2, 64, 32, True),  # whole blocks
        (4, 16, 4, False),  # 4 of 16 (or 8) lanes used per group: more than 2x waste
        (32, 32, 2, False),  # grouped, not depthwise: 1 output channel of a block per group
    ],
)
def test_groups_rule_comes_from_cpp(groups: int, out_channels: int, cg: int, covered: bool) -> None:
    assert _C.jit_covers_groups(groups, out_channels, cg) is covered
    x = torch.randn(1, cg * groups, 6, 6)
    w = torch.randn(out_channels, cg, 3, 3)
    reason = fallback_reason(x, w, None, groups)
    assert (reason is None) is covered, reason


def test_depthwise_packing_follows_cpp() -> None:
    w = torch.randn(24, 1, 3, 3)
    assert _C.is_depthwise(24, 24, 1) and not _C.is_depthwise(12, 24, 1)
    v = _backend.vector_width()
    assert tdc.functional.pack_weight(w, 24).shape == (-(-24 // v), 3, 3, v)


def test_nchw_gemm_threshold_comes_from_cpp() -> None:
    side = 1
    while side * side < _C.nchw_gemm_min_pixels():
        side += 1
    v = _backend.vector_width()
    assert _C.nchw_gemm_applies(4 * v, side, side, 32) == (side * side % v == 0 or v == 16)
    assert not _C.nchw_gemm_applies(4 * v, side - 1, side - 1, 32)
    assert not _C.nchw_gemm_applies(4 * v + 1, side, side, 32)  # a partial channel block
