"""The blocked layouts and conv2d_blocked, against pure-torch references."""

from __future__ import annotations

import math
import random
import re
import zlib

import pytest
import torch
import torch.nn.functional as F

import torch_directconv as tdc
from helpers import assert_conv_close, check_expected_isa, cpu_has, ref_conv2d, run_pytest_under_isa
from torch_directconv import _C


@pytest.fixture(autouse=True)
def isa() -> str:
    return check_expected_isa()


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def ref_to_blocked(x: torch.Tensor, v: int) -> torch.Tensor:
    n, c, h, w = x.shape
    cb = ceil_div(c, v)
    padded = torch.zeros(n, cb * v, h, w)
    padded[:, :c] = x
    return padded.view(n, cb, v, h, w).permute(0, 1, 3, 4, 2).contiguous()


def ref_to_blocked_weight(w: torch.Tensor, v: int) -> torch.Tensor:
    """out[kb, cb, r, s, jc, jk] = w[kb*V + jk, cb*V + jc, r, s], zero outside w."""
    k, c, r, s = w.shape
    kb, cb = ceil_div(k, v), ceil_div(c, v)
    padded = torch.zeros(kb * v, cb * v, r, s)
    padded[:k, :c] = w
    return padded.view(kb, v, cb, v, r, s).permute(0, 2, 4, 5, 3, 1).contiguous()


def layouts(x: torch.Tensor) -> dict[str, torch.Tensor]:
    n, c, h, w = x.shape
    big = torch.zeros(n, c + 1, h, 2 * w)
    big[:, 1:, :, ::2] = x
    return {
        "contiguous": x,
        "channels_last": x.to(memory_format=torch.channels_last),
        "strided_view": big[:, 1:, :, ::2],
    }


@pytest.mark.parametrize("c", [1, 3, 8, 15, 16, 17, 33])
@pytest.mark.parametrize("n", [0, 1, 2])
def test_round_trip(c: int, n: int, isa: str) -> None:
    v = tdc.vector_width()
    x = torch.randn(n, c, 5, 7, generator=torch.Generator().manual_seed(c))
    for name, view in layouts(x).items():
        xb = tdc.to_blocked(view)
        assert xb.shape == (n, ceil_div(c, v), 5, 7, v), name
        assert xb.is_contiguous()
        assert torch.equal(xb, ref_to_blocked(x, v)), name
        if c % v:
            assert not xb[:, -1, :, :, c % v :].any(), f"{name}: padded channels are not zero"
        back = tdc.from_blocked(xb, c)
        assert back.shape == x.shape and back.is_contiguous()
        assert torch.equal(back, x), name


def test_padding_is_zero_even_in_reused_memory(isa: str) -> None:
    """The padded lanes are written, not left as whatever the allocator returned."""
    v = tdc.vector_width()
    for i in range(5):
        junk = torch.full((2, ceil_div(5, v), 9, 9, v), float("nan"))
        del junk
        xb = tdc.to_blocked(torch.randn(2, 5, 9, 9))
        assert not xb[..., 5:].isnan().any() and not xb[..., 5:].any(), f"round {i}"


def test_from_blocked_of_a_non_contiguous_tensor(isa: str) -> None:
    v = tdc.vector_width()
    x = torch.randn(2, 2 * v + 3, 4, 6, generator=torch.Generator().manual_seed(2))
    xb = tdc.to_blocked(x)
    wide = torch.zeros(2, xb.shape[1], 4, 12, v)
    wide[:, :, :, 1::2] = xb
    assert torch.equal(tdc.from_blocked(wide[:, :, :, 1::2], x.shape[1]), x)
    # Fewer channels than the blocks hold: the last block's extra lanes are dropped.
    assert torch.equal(tdc.from_blocked(xb, 2 * v + 1), x[:, : 2 * v + 1])


@pytest.mark.parametrize("k,c,r,s", [(1, 1, 1, 1), (16, 16, 3, 3), (17, 3, 3, 3), (33, 20, 1, 7), (8, 40, 5, 2)])
def test_to_blocked_weight(k: int, c: int, r: int, s: int, isa: str) -> None:
    v = tdc.vector_width()
    w = torch.randn(k, c, r, s, generator=torch.Generator().manual_seed(k * c))
    for name, view in {
        "contiguous": w,
        "channels_last": w.to(memory_format=torch.channels_last),
        "transposed": w.transpose(2, 3).contiguous().transpose(2, 3),
    }.items():
        wb = tdc.to_blocked_weight(view)
        assert wb.shape == (ceil_div(k, v), ceil_div(c, v), r, s, v, v), name
        assert torch.equal(wb, ref_to_blocked_weight(w, v)), name


def ref_from_blocked_weight(wb: torch.Tensor, k: int, c: int) -> torch.Tensor:
    """The inverse of ref_to_blocked_weight: a 6-D permute, then the padding dropped."""
    kb, cb, r, s, v, _ = wb.shape
    return wb.permute(0, 5, 1, 4, 2, 3).reshape(kb * v, cb * v, r, s)[:k, :c]


@pytest.mark.parametrize(
    "k,c,r,s",
    [(1, 1, 1, 1), (16, 16, 3, 3), (17, 3, 7, 7), (33, 20, 1, 1), (8, 40, 5, 2), (64, 48, 3, 3), (40, 24, 1, 7)],
)
def test_from_blocked_weight(k: int, c: int, r: int, s: int, isa: str) -> None:
    v = tdc.vector_width()
    w = torch.randn(k, c, r, s, generator=torch.Generator().manual_seed(k * c + r))
    # Junk in the padded lanes must not reach the result.
    wb = ref_to_blocked_weight(w, v) + torch.where(ref_to_blocked_weight(torch.ones_like(w), v) == 0, 7.0, 0.0)
    for name, view in {"contiguous": wb, "strided": torch.stack([wb, wb], dim=-1)[..., 1]}.items():
        got = tdc.from_blocked_weight(view, k, c)
        assert got.shape == (k, c, r, s) and got.is_contiguous(), name
        assert torch.equal(got, ref_from_blocked_weight(wb, k, c)), name
        assert torch.equal(got, w), name
    assert torch.equal(tdc.from_blocked_weight(tdc.to_blocked_weight(w), k, c), w)


def blocked_case(rng: random.Random) -> dict:
    r, s = rng.choice([(1, 1), (3, 3), (5, 5), (1, 7), (7, 1), (3, 2), (11, 11)])
    stride = (rng.randint(1, 3), rng.randint(1, 3))
    dilation = (1, 1) if rng.random() < 0.6 else (rng.randint(1, 3), rng.randint(1, 3))
    padding = rng.choice([0, 1, (r // 2, s // 2), (rng.randint(0, r), rng.randint(0, s))])
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    ext_h, ext_w = dilation[0] * (r - 1) + 1, dilation[1] * (s - 1) + 1
    h = rng.randint(max(1, ext_h - 2 * ph), max(1, ext_h - 2 * ph) + 8)
    w = rng.randint(max(1, ext_w - 2 * pw), max(1, ext_w - 2 * pw) + 15)
    return {
        "n": rng.choice([0, 1, 2, 3]),
        "c": rng.choice([1, 3, 8, 16, 17, 24, 32, 40]),
        "k": rng.choice([1, 5, 8, 16, 17, 32, 33, 64]),
        "h": h,
        "w": w,
        "r": r,
        "s": s,
        "stride": stride,
        "padding": padding,
        "dilation": dilation,
        "bias": rng.random() < 0.6,
        "relu": rng.random() < 0.4,
        "in_channels": rng.random() < 0.5,
    }


BLOCKED_CASES = [blocked_case(random.Random(1000 + i)) for i in range(60)]


def case_id(p: dict) -> str:
    return (
        f"mb{p['n']}ic{p['c']}ih{p['h']}iw{p['w']}oc{p['k']}k{p['r']}x{p['s']}s{p['stride'][0]}x{p['stride'][1]}"
        f"p{p['padding']}d{p['dilation'][0]}x{p['dilation'][1]}".replace(" ", "").replace(",", "x")
        + ("_bias" if p["bias"] else "")
        + ("_relu" if p["relu"] else "")
        + ("_inch" if p["in_channels"] else "")
    )


@pytest.mark.parametrize("p", BLOCKED_CASES, ids=case_id)
def test_conv2d_blocked_matches_torch(p: dict, isa: str) -> None:
    v = tdc.vector_width()
    g = torch.Generator().manual_seed(zlib.crc32(case_id(p).encode()))
    x = torch.randn(p["n"], p["c"], p["h"], p["w"], generator=g)
    fan = p["c"] * p["r"] * p["s"]
    w = torch.randn(p["k"], p["c"], p["r"], p["s"], generator=g) / math.sqrt(fan)
    b = torch.randn(p["k"], generator=g) if p["bias"] else None
    xb, wb = tdc.to_blocked(x), tdc.to_blocked_weight(w)
    in_channels = p["c"] if p["in_channels"] else None
    if in_channels is not None and p["c"] % v:
        # With in_channels the kernels must not read the last block's padding: make it poison.
        xb[:, -1, :, :, p["c"] % v :] = float("nan")
    args = {"stride": p["stride"], "padding": p["padding"], "dilation": p["dilation"]}
    yb = tdc.conv2d_blocked(xb, wb, b, **args, relu=p["relu"], in_channels=in_channels)
    ref = ref_conv2d(x, w, b, **args)
    if p["relu"]:
        ref = torch.relu(ref)
    assert yb.shape == (p["n"], ceil_div(p["k"], v), ref.shape[2], ref.shape[3], v)
    assert_conv_close(tdc.from_blocked(yb, p["k"]), ref, fan, case_id(p))
    if p["k"] % v:
        assert not yb[:, -1, :, :, p["k"] % v :].any(), "padded output channels must stay zero for the next layer"


def test_blocked_layers_chain(isa: str) -> None:
    """A blocked output feeds the next conv2d_blocked directly, padding and all."""
    g = torch.Generator().manual_seed(21)
    x = torch.randn(2, 3, 16, 16, generator=g)
    w1 = torch.randn(20, 3, 3, 3, generator=g) / math.sqrt(27)
    b1 = torch.randn(20, generator=g)
    w2 = torch.randn(10, 20, 3, 3, generator=g) / math.sqrt(180)
    b2 = torch.randn(10, generator=g)
    h = tdc.conv2d_blocked(
        tdc.to_blocked(x), tdc.to_blocked_weight(w1), b1, stride=2, padding=1, relu=True, in_channels=3
    )
    yb = tdc.conv2d_blocked(h, tdc.to_blocked_weight(w2), b2, padding="same")
    ref = F.conv2d(torch.relu(F.conv2d(x, w1, b1, stride=2, padding=1)), w2, b2, padding="same")
    assert_conv_close(tdc.from_blocked(yb, 10), ref, 180)


def test_conv2d_blocked_padding_strings(isa: str) -> None:
    g = torch.Generator().manual_seed(22)
    x = torch.randn(1, 8, 9, 10, generator=g)
    w = torch.randn(8, 8, 4, 3, generator=g) / math.sqrt(96)
    xb, wb = tdc.to_blocked(x), tdc.to_blocked_weight(w)
    for padding in ("same", "valid"):
        ref = F.conv2d(x, w, padding=padding, dilation=(2, 1))
        assert_conv_close(tdc.from_blocked(tdc.conv2d_blocked(xb, wb, padding=padding, dilation=(2, 1)), 8), ref, 96)


def test_conv2d_blocked_non_contiguous_inputs(isa: str) -> None:
    g = torch.Generator().manual_seed(23)
    x = torch.randn(2, 12, 7, 7, generator=g)
    w = torch.randn(9, 12, 3, 3, generator=g) / math.sqrt(108)
    xb, wb = tdc.to_blocked(x), tdc.to_blocked_weight(w)
    xb_view = torch.cat([xb, xb], dim=3)[:, :, :, :7]
    wb_view = torch.stack([wb, wb], dim=-1)[..., 0]
    assert not xb_view.is_contiguous() and not wb_view.is_contiguous()
    y = tdc.conv2d_blocked(xb_view, wb_view, padding=1)
    assert_conv_close(tdc.from_blocked(y, 9), F.conv2d(x, w, padding=1), 108)


def bad_blocked_calls(v: int) -> list[tuple[str, object, str]]:
    """(case, thunk, words that the message must contain: the argument's name)."""
    x = torch.randn(1, 8, 6, 6)
    xb = tdc.to_blocked(x)
    wb = tdc.to_blocked_weight(torch.randn(8, 8, 3, 3))
    other = 8 if v == 16 else 16
    return [
        ("xb_4d", lambda: tdc.conv2d_blocked(x, wb), "input|xb"),
        ("xb_wrong_v", lambda: tdc.conv2d_blocked(torch.randn(1, 1, 6, 6, other), wb), "input|xb"),
        ("wb_5d", lambda: tdc.conv2d_blocked(xb, wb[0]), "weight|wb"),
        ("wb_wrong_v", lambda: tdc.conv2d_blocked(xb, torch.randn(1, 1, 3, 3, other, other)), "weight|wb"),
        ("wb_v_mixed", lambda: tdc.conv2d_blocked(xb, torch.randn(1, 1, 3, 3, v, other)), "weight|wb"),
        ("channel_blocks", lambda: tdc.conv2d_blocked(xb, torch.randn(1, 2, 3, 3, v, v)), "channel blocks"),
        ("bias_too_long", lambda: tdc.conv2d_blocked(xb, wb, torch.randn(v + 1)), "bias"),
        ("bias_2d", lambda: tdc.conv2d_blocked(xb, wb, torch.randn(1, 8)), "bias"),
        ("in_channels_too_big", lambda: tdc.conv2d_blocked(xb, wb, in_channels=v + 1), "in_channels"),
        ("in_channels_zero", lambda: tdc.conv2d_blocked(xb, wb, in_channels=0), "in_channels"),
        ("from_blocked_4d", lambda: tdc.from_blocked(x, 8), "xb"),
        ("from_blocked_channels", lambda: tdc.from_blocked(xb, v + 1), "channels"),
        ("from_blocked_channels_0", lambda: tdc.from_blocked(xb, 0), "channels"),
        ("to_blocked_3d", lambda: tdc.to_blocked(x[0]), "'x'"),
        ("to_blocked_weight_3d", lambda: tdc.to_blocked_weight(torch.randn(8, 8, 3)), "'w'"),
        ("to_blocked_float64", lambda: tdc.to_blocked(x.double()), "'x'"),
        ("from_blocked_weight_5d", lambda: tdc.from_blocked_weight(wb[0], 8, 8), "'wb'"),
        ("from_blocked_weight_v_mixed", lambda: tdc.from_blocked_weight(torch.randn(1, 1, 3, 3, v, 4), 8, 8), "'wb'"),
        ("from_blocked_weight_k", lambda: tdc.from_blocked_weight(wb, v + 1, 8), "'k'"),
        ("from_blocked_weight_c_0", lambda: tdc.from_blocked_weight(wb, 8, 0), "'c'"),
        ("from_blocked_weight_float64", lambda: tdc.from_blocked_weight(wb.double(), 8, 8), "'wb'"),
    ]


@pytest.mark.parametrize("name", [c[0] for c in bad_blocked_calls(16)])
def test_wrong_blocked_shapes_raise(name: str, isa: str) -> None:
    calls = {c[0]: c for c in bad_blocked_calls(tdc.vector_width())}
    _, thunk, words = calls[name]
    with pytest.raises(RuntimeError, match=words) as info:
        thunk()
    assert re.search(r"to_blocked|from_blocked|conv2d_blocked", str(info.value)), "the message names the op"


@pytest.mark.skipif(not cpu_has("avx2"), reason=f"this CPU lacks AVX2 (detected {_C.detected_isa()})")
def test_blocked_under_avx2_cap() -> None:
    """Everything above again with 8-wide blocks."""
    run_pytest_under_isa("avx2", "tests/test_blocked.py", "not under_avx2_cap")
