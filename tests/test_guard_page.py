"""Out-of-bounds reads: tensors placed right against an inaccessible (PROT_NONE) page.

Each tensor the kernels or the reorders read is copied into an mmap so that it either ends
exactly where a guard page begins, or starts exactly where one ends (border tiles start
left of their row, so reads before the start matter too). A stray read then segfaults; the
sweep runs in a child process so that shows up as a failed test with the last case named,
and the child also checks every result against F.conv2d.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import random
import sys

import pytest
import torch

from helpers import ISA_WIDTH, assert_conv_close, cpu_has, ref_conv2d, run_python

PAGE = mmap.PAGESIZE
PROT_NONE = 0
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.mprotect.restype = ctypes.c_int


def guarded_copy(src: torch.Tensor, side: str) -> torch.Tensor:
    """A copy of `src`, of its dtype (same strides as a contiguous tensor of its layout), in fresh
    memory whose last element is followed by a PROT_NONE page (side='after') or whose first
    element is preceded by one (side='before')."""
    src = src.detach()
    # Keep channels_last tensors channels_last: copy the memory in its own order.
    cl = src.dim() == 4 and src.is_contiguous(memory_format=torch.channels_last) and not src.is_contiguous()
    flat = (src.permute(0, 2, 3, 1) if cl else src).contiguous().view(-1)
    nbytes = flat.numel() * flat.element_size()
    data_pages = max(1, math.ceil(nbytes / PAGE))
    total = (data_pages + 2) * PAGE
    buf = mmap.mmap(-1, total, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    whole = torch.frombuffer(buf, dtype=torch.uint8)
    base = whole.data_ptr()
    del whole
    for page in (base, base + total - PAGE):
        if _libc.mprotect(page, PAGE, PROT_NONE) != 0:
            raise OSError(ctypes.get_errno(), "mprotect failed")
    offset = PAGE if side == "before" else total - PAGE - nbytes
    out = torch.frombuffer(buf, dtype=flat.dtype, count=flat.numel(), offset=offset)
    out.copy_(flat)
    if cl:
        n, c, h, w = src.shape
        out = out.view(n, h, w, c).permute(0, 3, 1, 2)
    else:
        out = out.view(src.shape)
    assert torch.equal(out, src)
    return out


def guard_cases(count: int, seed: int) -> list[dict]:
    """Problems that stress the edges: padding, strides, dilation, channel and width tails."""
    rng = random.Random(seed)
    pinned = [
        {"c": 3, "k": 16, "h": 9, "w": 9, "r": 3, "s": 3, "stride": (1, 1), "pad": (1, 1), "dil": (1, 1)},
        {"c": 17, "k": 17, "h": 7, "w": 30, "r": 3, "s": 3, "stride": (1, 1), "pad": (1, 1), "dil": (1, 1)},
        {"c": 16, "k": 32, "h": 8, "w": 8, "r": 7, "s": 7, "stride": (2, 2), "pad": (3, 3), "dil": (1, 1)},
        {"c": 8, "k": 8, "h": 5, "w": 29, "r": 1, "s": 7, "stride": (1, 1), "pad": (0, 3), "dil": (1, 1)},
        {"c": 5, "k": 40, "h": 11, "w": 13, "r": 3, "s": 3, "stride": (1, 1), "pad": (2, 2), "dil": (2, 2)},
        {"c": 33, "k": 8, "h": 6, "w": 6, "r": 5, "s": 5, "stride": (1, 1), "pad": (4, 4), "dil": (1, 1)},
        {"c": 1, "k": 1, "h": 1, "w": 1, "r": 1, "s": 1, "stride": (1, 1), "pad": (0, 0), "dil": (1, 1)},
        {"c": 16, "k": 16, "h": 3, "w": 3, "r": 3, "s": 3, "stride": (1, 1), "pad": (0, 0), "dil": (1, 1)},
        {"c": 24, "k": 20, "h": 10, "w": 17, "r": 2, "s": 4, "stride": (3, 2), "pad": (0, 1), "dil": (1, 2)},
        # The NCHW 1x1 GEMM path: whole vectors of pixels, and a last partial one under a mask.
        {"c": 32, "k": 20, "h": 4, "w": 4, "r": 1, "s": 1, "stride": (1, 1), "pad": (0, 0), "dil": (1, 1)},
        {"c": 32, "k": 13, "h": 7, "w": 7, "r": 1, "s": 1, "stride": (1, 1), "pad": (0, 0), "dil": (1, 1)},
        {"c": 16, "k": 7, "h": 3, "w": 5, "r": 1, "s": 1, "stride": (1, 1), "pad": (0, 0), "dil": (1, 1)},
    ]
    cases = []
    for p in pinned:
        cases.append({**p, "n": 1})
    for _ in range(count):
        r, s = rng.choice([(1, 1), (3, 3), (5, 5), (7, 7), (1, 7), (7, 1), (3, 2), (2, 5)])
        stride = (rng.randint(1, 3), rng.randint(1, 3))
        dil = (1, 1) if rng.random() < 0.6 else (rng.randint(1, 3), rng.randint(1, 3))
        pad = (rng.randint(0, r), rng.randint(0, s))
        ext_h, ext_w = dil[0] * (r - 1) + 1, dil[1] * (s - 1) + 1
        h = rng.randint(max(1, ext_h - 2 * pad[0]), max(1, ext_h - 2 * pad[0]) + 6)
        w = rng.randint(max(1, ext_w - 2 * pad[1]), max(1, ext_w - 2 * pad[1]) + 31)
        cases.append(
            {
                "n": rng.choice([1, 2]),
                "c": rng.choice([1, 3, 7, 8, 16, 17, 31, 32, 40]),
                "k": rng.choice([1, 8, 9, 16, 17, 32, 48]),
                "h": h,
                "w": w,
                "r": r,
                "s": s,
                "stride": stride,
                "pad": pad,
                "dil": dil,
            }
        )
    return cases


def case_name(p: dict) -> str:
    return (
        f"mb{p['n']}ic{p['c']}ih{p['h']}iw{p['w']}oc{p['k']}kh{p['r']}kw{p['s']}"
        f"sh{p['stride'][0]}sw{p['stride'][1]}ph{p['pad'][0]}pw{p['pad'][1]}dh{p['dil'][0]}dw{p['dil'][1]}"
    )


def check_case(p: dict, seed: int) -> int:
    """Runs one problem with every read tensor against a guard page, on both sides. Returns calls made."""
    import torch_directconv as tdc

    v = tdc.vector_width()
    g = torch.Generator().manual_seed(seed)
    fan = p["c"] * p["r"] * p["s"]
    x = torch.randn(p["n"], p["c"], p["h"], p["w"], generator=g)
    w = torch.randn(p["k"], p["c"], p["r"], p["s"], generator=g) / math.sqrt(fan)
    # A bias of whole blocks is used in place by conv2d_blocked; a shorter one is copied.
    b_full = torch.randn(-(-p["k"] // v) * v, generator=g)
    b = b_full[: p["k"]].clone()
    args = {"stride": p["stride"], "padding": p["pad"], "dilation": p["dil"]}
    ref = ref_conv2d(x, w, b, **args)
    name = case_name(p)
    xb, wb = tdc.to_blocked(x), tdc.to_blocked_weight(w)
    ref_full = ref_conv2d(x, w, b_full[: p["k"]], **args)
    calls = 0
    for side in ("before", "after"):
        for fmt in (torch.contiguous_format, torch.channels_last):
            label = f"{name} drop-in {side} {fmt}"
            print(label, file=sys.stderr, flush=True)
            gx = guarded_copy(x.contiguous(memory_format=fmt), side)
            gw = guarded_copy(w.contiguous(memory_format=fmt), side)
            gb = guarded_copy(b, side)
            assert_conv_close(tdc.conv2d(gx, gw, gb, **args), ref, fan, label)
            calls += 1
        label = f"{name} to_blocked {side}"
        print(label, file=sys.stderr, flush=True)
        assert torch.equal(tdc.to_blocked(guarded_copy(x, side)), xb), label
        assert torch.equal(tdc.to_blocked_weight(guarded_copy(w, side)), wb), label
        assert torch.equal(tdc.from_blocked_weight(guarded_copy(wb, side), p["k"], p["c"]), w), label
        assert torch.equal(tdc.from_blocked(guarded_copy(xb, side), p["c"]), x), label
        for in_channels in (None, p["c"]):
            label = f"{name} blocked {side} in_channels={in_channels}"
            print(label, file=sys.stderr, flush=True)
            gxb, gwb, gbb = guarded_copy(xb, side), guarded_copy(wb, side), guarded_copy(b_full, side)
            yb = tdc.conv2d_blocked(gxb, gwb, gbb, **args, in_channels=in_channels)
            assert_conv_close(tdc.from_blocked(yb, p["k"]), ref_full, fan, label)
            calls += 1
        # The fused epilogue reads the residual at the output's offsets, tails and all.
        label = f"{name} blocked residual {side}"
        print(label, file=sys.stderr, flush=True)
        res = torch.randn(ref_full.shape, generator=g)
        gxb, gwb, gbb = guarded_copy(xb, side), guarded_copy(wb, side), guarded_copy(b_full, side)
        grb = guarded_copy(tdc.to_blocked(res), side)
        yb = tdc.conv2d_blocked(gxb, gwb, gbb, **args, relu=True, in_channels=p["c"], residual=grb)
        assert_conv_close(tdc.from_blocked(yb, p["k"]), torch.relu(ref_full + res), fan, label)
        calls += 1
        # The statistics epilogue reads a shift per output channel.
        label = f"{name} blocked stats {side}"
        print(label, file=sys.stderr, flush=True)
        gshift = guarded_copy(ref_full.mean((0, 2, 3)), side)
        yb, mean, var = tdc.conv2d_blocked_stats(gxb, gwb, gbb, **args, channels=p["k"], shift=gshift)
        assert_conv_close(tdc.from_blocked(yb, p["k"]), ref_full, fan, label)
        want_var, want_mean = torch.var_mean(ref_full.double(), (0, 2, 3), correction=0)
        torch.testing.assert_close(mean.double(), want_mean, rtol=1e-4, atol=1e-4, msg=label)
        torch.testing.assert_close(var.double(), want_var, rtol=1e-4, atol=1e-4, msg=label)
        calls += 1
    return calls


def child_sweep(isa: str, count: int, seed: int) -> None:
    """Entry point of the child process."""
    import torch_directconv as tdc

    assert tdc.isa() == isa and tdc.vector_width() == ISA_WIDTH[isa], (tdc.isa(), isa)
    calls = 0
    for i, p in enumerate(guard_cases(count, seed)):
        calls += check_case(p, seed + i)
    print(f"guard-page sweep: {calls} guarded calls on {isa}", flush=True)


def test_guarded_copy_really_guards() -> None:
    """The harness itself: touching one float past either end kills the process."""
    for side in ("after", "before"):
        proc = run_python(
            f"""
            import sys
            sys.path.insert(0, "tests")
            import torch, ctypes
            from test_guard_page import guarded_copy
            t = guarded_copy(torch.arange(10.0), "{side}")
            i = t.numel() if "{side}" == "after" else -1
            print(ctypes.c_float.from_address(t.data_ptr() + 4 * i).value)
            """,
            check=False,
        )
        assert proc.returncode == -11, f"{side}: expected SIGSEGV, got {proc.returncode}: {proc.stderr[-2000:]}"


def run_child_sweep(module: str, isa: str, count: int, seed: int, timeout: float = 300):
    """`module`.child_sweep in a fresh process under the ISA cap (a crash fails the test);
    skips when the CPU lacks the ISA."""
    if not cpu_has(isa):
        pytest.skip(f"this CPU lacks {isa}")
    return run_python(
        f"""
        import sys
        sys.path.insert(0, "tests")
        from {module} import child_sweep
        child_sweep("{isa}", count={count}, seed={seed})
        """,
        timeout=timeout,
        TORCH_DIRECTCONV_ISA=isa,
    )


@pytest.mark.parametrize("isa", ["avx512", "avx2"])
def test_no_reads_outside_the_tensors(isa: str) -> None:
    proc = run_child_sweep("test_guard_page", isa, count=40, seed=4242)
    assert "guard-page sweep:" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("isa", ["avx512", "avx2"])
def test_no_reads_outside_the_tensors_large(isa: str) -> None:
    run_child_sweep("test_guard_page", isa, count=600, seed=777, timeout=1200)


def child_bf16_eltwise_sweep(seed: int) -> None:
    """The bf16 batch-norm, pooling and layout passes on tensors that end at (or start just
    after) a PROT_NONE page; results against the same ops on ordinary tensors."""
    import torch_directconv as tdc
    from torch_directconv import blocked_ops as bo

    ops = torch.ops.directconv
    g = torch.Generator().manual_seed(seed)
    calls = 0
    shapes = [(1, 3, 1, 1), (2, 17, 5, 7), (1, 40, 1, 9), (3, 64, 6, 1), (2, 33, 4, 3), (1, 3, 2, 19), (2, 4, 3, 16)]
    for n, c, h, w in shapes:
        x = torch.randn(n, c, h, w, generator=g).bfloat16()
        xb, rb = tdc.to_blocked(x), tdc.to_blocked(torch.randn(x.shape, generator=g).bfloat16())
        vec = [torch.rand(c, generator=g) + 0.5 for _ in range(4)]
        k = (min(3, h), min(3, w))
        pads = (k[0] // 2, k[1] // 2)
        pooled = bo.max_pool2d(xb, c, k, 1, pads)
        avg = bo.avg_pool2d(xb, c, k, [2, 1], pads, True, False)
        runs = [
            (ops.to_blocked, (x, 32)),
            (ops.to_blocked, (x.contiguous(memory_format=torch.channels_last), 32)),
            # fp32 entries (rounded to bf16 in the pass), NCHW rows and channels_last pixels.
            (ops.to_blocked, (x.float() * 3, 32)),
            (ops.to_blocked, ((x.float() * 3).contiguous(memory_format=torch.channels_last), 32)),
            (ops.from_blocked, (xb, c)),
            (ops.bn_stats_blocked, (xb, c)),
            (ops.bn_apply_blocked, (xb, vec[0], vec[1], rb, True, c)),
            (ops.batch_norm_blocked, (xb, vec[0], vec[1], vec[2], vec[3], rb, 1e-5, True, True, c)),
            (
                ops.batch_norm_blocked,
                (xb, vec[0].bfloat16(), vec[1], vec[2].bfloat16(), None, None, 1e-5, False, False, c),
            ),
            (ops.bn_backward_blocked, (rb, xb, xb, vec[0], vec[1], vec[2], 1e-5, True, c, [True] * 4)),
            (ops.bn_backward_blocked, (rb, None, xb, vec[0], vec[1], None, 1e-5, False, c, [True] * 4)),
            (ops.bn_backward_blocked, (rb, None, xb, vec[0], vec[1], vec[2], 1e-5, True, c, [True] + [False] * 3)),
            (ops.max_pool2d_blocked, (xb, list(k), [1, 1], list(pads), [1, 1], True, c)),
            (ops.max_pool2d_blocked_backward, (pooled, xb, pooled, list(k), [1, 1], list(pads), [1, 1], True, c)),
            (ops.avg_pool2d_blocked, (xb, list(k), [2, 1], list(pads), True, False, None, c)),
            (ops.avg_pool2d_blocked_backward, (avg, list(xb.shape), list(k), [2, 1], list(pads), True, False, None, c)),
            (ops.global_avg_pool_blocked, (xb, c)),
            (ops.global_avg_pool_blocked_backward, (torch.randn(n, c, generator=g).bfloat16(), list(xb.shape), c)),
            (ops.global_avg_pool_blocked_backward, (torch.randn(n, c, generator=g), list(xb.shape), c)),
        ]
        for op, args in runs:
            want = op(*args)
            for side in ("before", "after"):
                label = f"bf16 {op} {side} n{n}c{c}h{h}w{w}"
                print(label, file=sys.stderr, flush=True)
                guarded = [guarded_copy(a, side) if isinstance(a, torch.Tensor) else a for a in args]
                got = op(*guarded)
                got_all = got if isinstance(got, tuple) else (got,)
                want_all = want if isinstance(want, tuple) else (want,)
                for a, e in zip(got_all, want_all, strict=True):
                    assert a.dtype == e.dtype and torch.equal(a, e), label
                calls += 1
    # The running statistics' update of bf16 buffers, in place within its tensors.
    for c in (3, 17, 40):
        stats = [torch.randn(c, generator=g).bfloat16(), (torch.rand(c, generator=g) + 0.5).bfloat16()]
        batch = [torch.randn(c, generator=g), torch.rand(c, generator=g)]
        want = [t.clone() for t in stats]
        ops.bn_update_running_stats(*want, None, *batch, 9, 0.1)
        for side in ("before", "after"):
            running = [guarded_copy(t, side) for t in stats]
            ops.bn_update_running_stats(*running, None, *(guarded_copy(t, side) for t in batch), 9, 0.1)
            for a, e in zip(running, want, strict=True):
                assert torch.equal(a, e), f"bf16 bn_update_running_stats {side} c{c}"
            calls += 1
    print(f"bf16 guard-page sweep: {calls} guarded calls", flush=True)


def test_bf16_blocked_ops_read_nothing_outside_the_tensors() -> None:
    """The bf16 batch-norm, pooling and layout ops, at the lowest level that runs them (their
    loops are the same on AMX)."""
    if not cpu_has("avx512_bf16"):
        pytest.skip("this CPU lacks avx512_bf16")
    proc = run_python(
        """
        import sys
        sys.path.insert(0, "tests")
        from test_guard_page import child_bf16_eltwise_sweep
        child_bf16_eltwise_sweep(13)
        """,
        TORCH_DIRECTCONV_ISA="avx512_bf16",
    )
    assert "bf16 guard-page sweep:" in proc.stdout
