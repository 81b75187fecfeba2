"""The ISA levels: what is listed (what the CPU offers, and what this process may run), the cap (TORCH_DIRECTCONV_ISA and set_isa_cap), the fp32
kernels and plans that stay the same at every level from avx512 up, the permission for AMX
tile data refused for real (a seccomp filter in a child), and the bf16 peak loops."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

import torch_directconv as tdc
from helpers import EXPECTED_ISA, ISA_WIDTH, run_python
from torch_directconv import _C

ORDER = ["none", "avx2", "avx512", "avx512_bf16", "amx"]
VERBOSE_LINE = re.compile(r"^torch_directconv: jit (\S+): \d+ bytes in [0-9.]+ ms; plan: (.+)$", re.M)


def restore_cap() -> None:
    _C.set_isa_cap(EXPECTED_ISA if EXPECTED_ISA in ORDER else "amx")


def test_levels_are_listed_lowest_first() -> None:
    levels = tdc.runnable_isa_levels()
    assert levels == ORDER[: len(levels)], levels
    assert levels[-1] == _C.detected_isa()
    # What the CPU offers: the runnable levels, and amx above them where the OS refuses tile
    # data (test_tile_permission_refused_falls_back_to_avx512_bf16).
    offered = tdc.isa_levels()
    assert offered == ORDER[: len(offered)] and offered[: len(levels)] == levels, (offered, levels)
    assert offered == levels or (offered[-1] == "amx" and levels[-1] == "avx512_bf16"), (offered, levels)
    if EXPECTED_ISA in ORDER:
        assert tdc.isa() == ORDER[min(ORDER.index(EXPECTED_ISA), len(levels) - 1)], (tdc.isa(), EXPECTED_ISA)


def test_the_cap_lowers_the_level_and_never_raises_it() -> None:
    levels = tdc.runnable_isa_levels()
    try:
        for cap in ORDER:
            _C.set_isa_cap(cap)
            want = cap if cap in levels else levels[-1]
            assert tdc.isa() == want, (cap, tdc.isa())
            assert tdc.vector_width() == ISA_WIDTH.get(want, 0), (cap, tdc.vector_width())
            assert _C.fp32_isa() == {"avx512_bf16": "avx512", "amx": "avx512"}.get(want, want)
    finally:
        restore_cap()


def test_a_bad_cap_is_refused_naming_what_is_accepted() -> None:
    with pytest.raises(ValueError, match=r"'avx512bf16'.*amx, avx512_bf16, avx512, avx2, none|amx, avx512_bf16.*'avx512bf16'"):
        _C.set_isa_cap("avx512bf16")
    assert tdc.isa() == (EXPECTED_ISA if EXPECTED_ISA in tdc.runnable_isa_levels() else tdc.isa())


@pytest.mark.parametrize("level", ORDER[1:])
def test_the_env_var_caps_the_level(level: str) -> None:
    levels, offered = tdc.runnable_isa_levels(), tdc.isa_levels()
    want = level if level in levels else levels[-1]
    run_python(
        f"""
        import torch_directconv as tdc
        assert tdc.isa() == {want!r}, tdc.isa()
        assert tdc.runnable_isa_levels() == {levels!r}, tdc.runnable_isa_levels()
        assert tdc.isa_levels() == {offered!r}, tdc.isa_levels()
        """,
        TORCH_DIRECTCONV_ISA=level,
    )


def test_a_bad_env_value_is_reported_and_ignored() -> None:
    proc = run_python(
        f"""
        import torch_directconv as tdc
        assert tdc.isa() == {tdc.runnable_isa_levels()[-1]!r}, tdc.isa()
        """,
        TORCH_DIRECTCONV_ISA="amx_bf16",
    )
    assert "'amx_bf16'" in proc.stderr and "avx512_bf16" in proc.stderr, proc.stderr


# Forward and both backward passes over kernels of every kind: border tiles, channel tails,
# strides, dilation, depthwise, the NCHW 1x1 GEMM, the blocked model with its fused epilogue.
FP32_WORKLOAD = """
import torch, torch.nn as nn, torch_directconv as tdc
from torch_directconv import _C
torch.manual_seed(0)
model = nn.Sequential(
    nn.Conv2d(3, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU(),
    nn.Conv2d(24, 24, 3, stride=2, padding=1, groups=24),
    nn.Conv2d(24, 40, (1, 5), padding=(0, 2), dilation=(1, 2)),
    nn.Conv2d(40, 32, 1),
)
x = torch.randn(2, 3, 30, 30)
conv = tdc.convert(model)
conv(x).sum().backward()
opt = tdc.optimize(model)
opt(x).sum().backward()
one = tdc.DirectConv2d(32, 48, 1)
with torch.no_grad():
    one(torch.randn(1, 32, 28, 28))
for p in ("mb1ic64ih56oc64kh3ph1", "mb4ic256ih14oc1024kh1", "mb2ic17ih9iw11oc33kh3kw5sh2sw1ph2pw1"):
    for t in (1, 2):
        print("PLAN", t, _C.fwd_plan(p, t))
print("ISA", tdc.isa(), tdc.vector_width(), tdc.jit_stats()["fallbacks"])
"""


def fp32_run(level: str) -> tuple[set, list, str]:
    proc = run_python(FP32_WORKLOAD, TORCH_DIRECTCONV_ISA=level, TORCH_DIRECTCONV_VERBOSE="1")
    kernels = set(VERBOSE_LINE.findall(proc.stderr))
    plans = [line for line in proc.stdout.splitlines() if line.startswith("PLAN")]
    isa_line = next(line for line in proc.stdout.splitlines() if line.startswith("ISA"))
    return kernels, plans, isa_line


def test_fp32_kernels_and_plans_are_the_same_at_every_level_from_avx512() -> None:
    """No fp32 kernel name or plan changes with the level: the bf16 levels run the avx512 code."""
    levels = [lv for lv in ORDER[2:] if lv in tdc.runnable_isa_levels()]
    if len(levels) < 2:
        pytest.skip(f"this process runs only {tdc.runnable_isa_levels()}: no level above avx512 to compare")
    base_kernels, base_plans, _ = fp32_run("avx512")
    assert len(base_kernels) > 8 and len(base_plans) == 6, (base_kernels, base_plans)
    kinds = {name.split("_")[1] for name, _ in base_kernels}
    assert {"conv", "dwconv"} <= kinds, kinds
    assert any("_conv_upd_" in name for name, _ in base_kernels), base_kernels
    for name, _ in base_kernels:
        assert name.endswith("__avx512"), name
    for level in levels[1:]:
        kernels, plans, isa_line = fp32_run(level)
        assert isa_line == f"ISA {level} 16 0", isa_line
        assert kernels == base_kernels, (level, kernels ^ base_kernels)
        assert plans == base_plans, (level, plans, base_plans)


# A seccomp filter that fails arch_prctl(ARCH_REQ_XCOMP_PERM, ...) with EPERM and lets every
# other system call through; installed before torch (and oneDNN) can ask for tile data.
SECCOMP_PROLOGUE = """
import ctypes, errno, struct
libc = ctypes.CDLL(None, use_errno=True)
SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA = 158, 0x1023, 18
LD_ABS, JEQ, RET = 0x20, 0x15, 0x06
prog = [
    (LD_ABS, 0, 0, 4),                      # seccomp_data.arch
    (JEQ, 0, 5, 0xC000003E),                # AUDIT_ARCH_X86_64, else allow
    (LD_ABS, 0, 0, 0),                      # seccomp_data.nr
    (JEQ, 0, 3, SYS_arch_prctl),
    (LD_ABS, 0, 0, 16),                     # the low half of args[0]
    (JEQ, 0, 1, ARCH_REQ_XCOMP_PERM),
    (RET, 0, 0, 0x00050000 | errno.EPERM),  # SECCOMP_RET_ERRNO
    (RET, 0, 0, 0x7FFF0000),                # SECCOMP_RET_ALLOW
]
buf = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *i) for i in prog))
class Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
fprog = Fprog(len(prog), ctypes.cast(buf, ctypes.c_void_p))
assert libc.prctl(38, 1, 0, 0, 0) == 0, "PR_SET_NO_NEW_PRIVS"
assert libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) == 0, f"PR_SET_SECCOMP: errno {ctypes.get_errno()}"
assert libc.syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == -1
assert ctypes.get_errno() == errno.EPERM, ctypes.get_errno()
"""


@pytest.mark.skipif("amx" not in tdc.isa_levels(), reason=f"no AMX here (levels: {tdc.isa_levels()})")
def test_tile_permission_refused_falls_back_to_avx512_bf16() -> None:
    proc = run_python(
        SECCOMP_PROLOGUE
        + """
import torch, torch.nn.functional as F, torch_directconv as tdc
from torch_directconv import _C
assert tdc.isa() == "avx512_bf16", tdc.isa()
assert tdc.runnable_isa_levels()[-1] == "avx512_bf16", tdc.runnable_isa_levels()
assert tdc.isa_levels()[-1] == "amx", tdc.isa_levels()  # what the CPU offers
_C.set_isa_cap("amx")
assert tdc.isa() == "avx512_bf16", tdc.isa()
x, w = torch.randn(2, 16, 10, 10), torch.randn(32, 16, 3, 3)
torch.testing.assert_close(tdc.conv2d(x, w, padding=1), F.conv2d(x, w, padding=1), rtol=1e-4, atol=1e-4)
assert tdc.jit_stats()["kernels"] > 0 and tdc.jit_stats()["fallbacks"] == 0, tdc.jit_stats()
assert _C.bf16_dot_peak_gflops(1, 0.01) > 0
try:
    _C.amx_peak_gflops(1, 0.01)
except ValueError as e:
    assert "amx" in str(e) and "avx512_bf16" in str(e), e
else:
    raise AssertionError("the AMX peak ran without the permission for tile data")
print("ok")
"""
    )
    warnings = re.findall(r"torch_directconv: the OS refused this process AMX tile data.*", proc.stderr)
    assert len(warnings) == 1, proc.stderr
    assert "Operation not permitted" in warnings[0] and "avx512_bf16 instead of amx" in warnings[0], warnings[0]
    assert proc.stdout.strip().endswith("ok")


def test_no_warning_when_the_permission_is_granted() -> None:
    proc = run_python("import torch_directconv as tdc\nprint(tdc.isa())\n")
    assert "refused" not in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    ("fn", "needs"), [("fma_peak_gflops", "avx2"), ("bf16_dot_peak_gflops", "avx512_bf16"), ("amx_peak_gflops", "amx")]
)
def test_peak_loops_run_only_where_the_level_allows(fn: str, needs: str) -> None:
    peak = getattr(_C, fn)
    try:
        for level in tdc.runnable_isa_levels()[1:]:
            _C.set_isa_cap(level)
            if ORDER.index(level) >= ORDER.index(needs):
                assert peak(1, 0.01) > 0, level
            else:
                with pytest.raises(ValueError, match=needs):
                    peak(1, 0.01)
    finally:
        restore_cap()


def test_fp32_convolution_at_each_level_matches_torch() -> None:
    x, w = torch.randn(1, 20, 9, 9), torch.randn(24, 20, 3, 3)
    ref = F.conv2d(x, w, padding=1)
    try:
        for level in tdc.runnable_isa_levels()[1:]:
            _C.set_isa_cap(level)
            torch.testing.assert_close(tdc.conv2d(x, w, padding=1), ref, rtol=1e-4, atol=1e-4)
    finally:
        restore_cap()
