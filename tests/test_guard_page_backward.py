"""Out-of-bounds reads of the training path: the backward ops' tensors right against a PROT_NONE page.

As test_guard_page does for the forward: grad_output, weight and input are each copied into
an mmap so that they end exactly where a guard page begins, or start exactly where one ends,
and directconv::conv2d_backward_data / conv2d_backward_weight (and a full autograd pass
through tdc.conv2d) run on them. A stray read segfaults the child process running the sweep,
which names the last case on stderr; every gradient is also checked against torch's.
"""

from __future__ import annotations

import math
import random
import sys

import pytest
import torch
import torch.nn.functional as F
from test_guard_page import guarded_copy, run_child_sweep

from helpers import ISA_WIDTH, assert_grad_close, torch_native


def _case(n, c, k, h, w, r, s, stride=(1, 1), pad=(0, 0, 0, 0), dil=(1, 1), groups=1) -> dict:
    return {"n": n, "c": c, "k": k, "h": h, "w": w, "r": r, "s": s, "stride": stride, "pad": pad, "dil": dil,
            "groups": groups}  # fmt: skip


def out_size(p: dict) -> tuple[int, int]:
    t, b, left, right = p["pad"]
    ph = (p["h"] + t + b - p["dil"][0] * (p["r"] - 1) - 1) // p["stride"][0] + 1
    pw = (p["w"] + left + right - p["dil"][1] * (p["s"] - 1) - 1) // p["stride"][1] + 1
    return ph, pw


def guard_cases(count: int, seed: int) -> list[dict]:
    """Problems that stress the edges: (asymmetric) padding, strides 1 and 2, dilation, channel tails."""
    rng = random.Random(seed)
    cases = [
        _case(1, 16, 32, 9, 9, 3, 3, pad=(1, 1, 1, 1)),
        _case(2, 17, 24, 9, 11, 3, 3, stride=(2, 2), pad=(1, 1, 1, 1)),
        _case(2, 17, 24, 8, 10, 3, 3, stride=(2, 2), pad=(1, 1, 1, 1)),
        _case(1, 32, 16, 8, 8, 1, 1, stride=(2, 2)),
        _case(2, 33, 9, 7, 9, 1, 1, stride=(2, 2)),
        _case(2, 17, 33, 6, 7, 1, 1),  # 1x1, stride 1, unpadded
        _case(2, 3, 16, 17, 16, 7, 7, stride=(2, 2), pad=(3, 3, 3, 3)),
        _case(2, 24, 24, 9, 10, 3, 3, pad=(1, 1, 1, 1), groups=24),
        _case(2, 17, 34, 9, 9, 3, 3, stride=(2, 2), pad=(1, 1, 1, 1), groups=17),
        _case(2, 32, 64, 8, 9, 3, 3, stride=(2, 2), pad=(1, 1, 1, 1), groups=2),
        _case(1, 5, 40, 11, 13, 3, 3, pad=(2, 1, 3, 0), dil=(2, 3)),
        _case(2, 8, 8, 5, 29, 1, 7, pad=(0, 0, 3, 3)),
        _case(1, 33, 8, 6, 6, 3, 3, stride=(2, 2), pad=(4, 4, 4, 4)),  # padding wider than the kernel
        _case(2, 16, 16, 10, 11, 1, 1, stride=(3, 3)),  # stride wider than the kernel
        _case(2, 9, 20, 10, 17, 2, 2, stride=(3, 2), pad=(0, 1, 1, 0)),
        _case(1, 1, 1, 1, 1, 1, 1),
        _case(32, 16, 16, 10, 10, 3, 3, pad=(1, 1, 1, 1)),  # N * P * Q >= 3136: the JIT input gradient
        _case(32, 8, 24, 20, 21, 3, 3, stride=(2, 2), pad=(1, 1, 1, 1)),
        _case(32, 16, 32, 20, 20, 1, 1, stride=(2, 2)),
    ]
    for _ in range(count):
        kind = rng.choices(["dense", "depthwise", "grouped"], [7, 2, 1])[0]
        if kind == "depthwise":
            c = rng.choice([3, 8, 16, 17, 24])
            groups, k = c, c * rng.choice([1, 2])
        elif kind == "grouped":
            groups = 2
            c, k = 2 * rng.choice([8, 16, 17]), 2 * rng.choice([16, 17])
        else:
            groups = 1
            c, k = rng.choice([1, 3, 7, 8, 9, 16, 17, 31, 32, 40]), rng.choice([1, 8, 9, 16, 17, 24, 32, 48])
        r, s = rng.choice([(1, 1), (3, 3), (5, 5), (7, 7), (1, 7), (7, 1), (3, 2), (2, 5)])
        stride = (rng.choice([1, 1, 2, 2, 3]), rng.choice([1, 1, 2, 2, 3]))
        dil = (1, 1) if rng.random() < 0.6 else (rng.randint(1, 3), rng.randint(1, 3))
        pad = (rng.randint(0, r), rng.randint(0, r), rng.randint(0, s), rng.randint(0, s))
        ext_h, ext_w = dil[0] * (r - 1) + 1, dil[1] * (s - 1) + 1
        n = rng.choice([1, 1, 2, 2, 3, 32])
        big = 9 * stride[0] if n == 32 else 0
        h = max(1, ext_h - pad[0] - pad[1]) + big + rng.randint(0, 2 if n == 32 else 6)
        w = max(1, ext_w - pad[2] - pad[3]) + (9 * stride[1] if n == 32 else 0) + rng.randint(0, 2 if n == 32 else 25)
        cases.append(_case(n, c, k, h, w, r, s, stride, pad, dil, groups))
    return cases


def case_name(p: dict) -> str:
    return (
        f"mb{p['n']}ic{p['c']}ih{p['h']}iw{p['w']}oc{p['k']}kh{p['r']}kw{p['s']}"
        f"sh{p['stride'][0]}sw{p['stride'][1]}pt{p['pad'][0]}pb{p['pad'][1]}pl{p['pad'][2]}pr{p['pad'][3]}"
        f"dh{p['dil'][0]}dw{p['dil'][1]}g{p['groups']}"
    )


def check_case(p: dict, seed: int) -> int:
    """Both backward ops, and autograd through tdc.conv2d, on guarded tensors, both sides. Returns calls made."""
    import torch_directconv as tdc

    g = torch.Generator().manual_seed(seed)
    fan = p["c"] // p["groups"] * p["r"] * p["s"]
    x = torch.randn(p["n"], p["c"], p["h"], p["w"], generator=g)
    w = torch.randn(p["k"], p["c"] // p["groups"], p["r"], p["s"], generator=g) / math.sqrt(fan)
    gy = torch.randn(p["n"], p["k"], *out_size(p), generator=g)
    t, b, left, right = p["pad"]
    geometry = (list(p["stride"]), list(p["pad"]), list(p["dil"]), p["groups"])
    with torch_native():
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        ref = F.conv2d(F.pad(xr, (left, right, t, b)), wr, None, p["stride"], 0, p["dil"], p["groups"])
        want_x, want_w = torch.autograd.grad(ref, (xr, wr), gy)
    name = case_name(p)
    ops = torch.ops.directconv
    calls = 0
    for side in ("before", "after"):
        for fmt in (torch.contiguous_format, torch.channels_last):
            label = f"{name} {side} {fmt}"
            print(label, file=sys.stderr, flush=True)
            g_gy = guarded_copy(gy.contiguous(memory_format=fmt), side)
            g_w = guarded_copy(w.contiguous(memory_format=fmt), side)
            g_x = guarded_copy(x.contiguous(memory_format=fmt), side)
            got_x = ops.conv2d_backward_data(g_gy, g_w, list(x.shape), *geometry)
            assert_grad_close(got_x, want_x, f"{label}: backward_data")
            got_w = ops.conv2d_backward_weight(g_gy, g_x, list(w.shape), *geometry)
            assert_grad_close(got_w, want_w, f"{label}: backward_weight")
            calls += 2
        if p["groups"] == 1:
            calls += check_blocked_kcrs(p, x, w, gy, want_x, want_w, side)
        if t == b and left == right:
            # Autograd hands the guarded grad_output and the saved guarded input and weight to the ops.
            label = f"{name} {side} autograd"
            print(label, file=sys.stderr, flush=True)
            g_x = guarded_copy(x, side).requires_grad_()
            g_w = guarded_copy(w, side).requires_grad_()
            out = tdc.conv2d(g_x, g_w, None, p["stride"], (t, left), p["dil"], p["groups"])
            got_x, got_w = torch.autograd.grad(out, (g_x, g_w), guarded_copy(gy, side))
            assert_grad_close(got_x, want_x, f"{label}: grad of input")
            assert_grad_close(got_w, want_w, f"{label}: grad of weight")
            calls += 1
    return calls


def check_blocked_kcrs(p: dict, x, w, gy, want_x, want_w, side: str) -> int:
    """The blocked ops with the weight (K, C, R, S), guarded in both formats: the forward packs
    it within the call, the input gradient reads it, the weight gradient writes one."""
    import torch_directconv as tdc

    ops = torch.ops.directconv
    xb, gyb = tdc.to_blocked(x), tdc.to_blocked(gy)
    args = (list(p["stride"]), list(p["pad"]), list(p["dil"]))
    want_y = ops.conv2d_blocked(xb, tdc.to_blocked_weight(w), None, *args, False, p["c"])
    for fmt in (torch.contiguous_format, torch.channels_last):
        label = f"{case_name(p)} {side} {fmt} blocked, (K, C, R, S) weight"
        print(label, file=sys.stderr, flush=True)
        g_w = guarded_copy(w.contiguous(memory_format=fmt), side)
        g_xb, g_gyb = guarded_copy(xb, side), guarded_copy(gyb, side)
        assert torch.equal(ops.conv2d_blocked(g_xb, g_w, None, *args, False, p["c"]), want_y), label
        got_x = ops.conv2d_blocked_backward_data(g_gyb, g_w, list(xb.shape), *args, p["c"])
        assert_grad_close(tdc.from_blocked(got_x, p["c"]), want_x, f"{label}: backward_data")
        got_w = ops.conv2d_blocked_backward_weight(g_gyb, g_xb, list(w.shape), *args, p["c"])
        assert_grad_close(got_w, want_w, f"{label}: backward_weight")
    return 6


def child_sweep(isa: str, count: int, seed: int) -> None:
    """Entry point of the child process."""
    import warnings

    import torch_directconv as tdc

    # Grouped convolutions that waste most of each channel block run forward on torch, by design.
    warnings.filterwarnings("ignore", "torch_directconv: grouped convolutions", RuntimeWarning)
    assert tdc.isa() == isa and tdc.vector_width() == ISA_WIDTH[isa], (tdc.isa(), isa)
    calls = 0
    for i, p in enumerate(guard_cases(count, seed)):
        calls += check_case(p, seed + i)
    print(f"backward guard-page sweep: {calls} guarded calls on {isa}", flush=True)


def test_sweep_covers_the_edges() -> None:
    cases = guard_cases(80, 4243)
    assert any(p["stride"] == (1, 1) for p in cases) and any(p["stride"] == (2, 2) for p in cases)
    assert any(p["dil"] != (1, 1) for p in cases)
    assert any(p["pad"][0] != p["pad"][1] or p["pad"][2] != p["pad"][3] for p in cases), "asymmetric padding"
    assert any(p["pad"] == (0, 0, 0, 0) for p in cases) and any(min(p["pad"]) > 0 for p in cases)
    assert any(p["c"] % 8 and p["c"] > 8 for p in cases) and any(p["k"] % 8 and p["k"] > 8 for p in cases)
    assert any(p["groups"] == p["c"] > 1 for p in cases) and any(1 < p["groups"] < p["c"] for p in cases)
    assert any(p["n"] * out_size(p)[0] * out_size(p)[1] >= 3136 for p in cases)


@pytest.mark.parametrize("isa", ["avx512", "avx2"])
def test_backward_reads_nothing_outside_the_tensors(isa: str) -> None:
    proc = run_child_sweep("test_guard_page_backward", isa, count=80, seed=4243)
    assert "backward guard-page sweep:" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("isa", ["avx512", "avx2"])
def test_backward_reads_nothing_outside_the_tensors_large(isa: str) -> None:
    run_child_sweep("test_guard_page_backward", isa, count=400, seed=778, timeout=1200)
