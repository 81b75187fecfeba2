"""The JIT's observable machinery: verbose log, dumps, cache cap, W^X, ISA selection, stats."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F

import torch_directconv as tdc
from helpers import EXPECTED_ISA, FP32_ISAS, assert_conv_close, check_expected_isa, cpu_has, requires_jit, run_python
from torch_directconv import _C

VERBOSE_LINE = re.compile(r"^torch_directconv: jit (\S+): (\d+) bytes in ([0-9.]+) ms; plan: (.+)$", re.M)

# Problems that need several kinds of kernel: border tiles, channel tails, 1xN, depthwise, strides.
CHILD_PROBLEMS = """
import math, torch, torch.nn.functional as F, torch_directconv as tdc

def problems():
    g = torch.Generator().manual_seed(1)
    for (n, c, h, w, k, r, s, stride, pad, groups) in [
        (1, 17, 9, 13, 32, 3, 3, 1, 1, 1),
        (2, 8, 7, 20, 16, 1, 7, 1, (0, 3), 1),
        (1, 16, 10, 10, 8, 3, 3, 2, 1, 1),
        (1, 32, 9, 9, 32, 3, 3, 1, 1, 32),
    ]:
        x = torch.randn(n, c, h, w, generator=g)
        wt = torch.randn(k, c // groups, r, s, generator=g) / math.sqrt(c // groups * r * s)
        yield x, wt, dict(stride=stride, padding=pad, groups=groups), c // groups * r * s

def references():
    return [F.conv2d(x, wt, **kw) for x, wt, kw, fan in problems()]

def run_all(refs=None):
    # torch's own convolution may map writable+executable code: references come first.
    refs = refs if refs is not None else references()
    for (x, wt, kw, fan), ref in zip(problems(), refs):
        torch.testing.assert_close(tdc.conv2d(x, wt, **kw), ref, rtol=1e-4, atol=1e-4)
"""


def jit_isas() -> list:
    return [pytest.param(i, marks=pytest.mark.skipif(not cpu_has(i), reason=f"this CPU lacks {i}")) for i in FP32_ISAS]


@pytest.fixture(scope="module", params=jit_isas())
def verbose_dump_run(request, tmp_path_factory) -> dict:
    """One child per ISA with both the verbose log and the dump on."""
    isa = request.param
    dump = tmp_path_factory.mktemp(f"dump_{isa}") / "not" / "yet" / "there"
    proc = run_python(
        CHILD_PROBLEMS
        + """
import json
run_all()
print(json.dumps(tdc.jit_stats()))
""",
        TORCH_DIRECTCONV_ISA=isa,
        TORCH_DIRECTCONV_VERBOSE="1",
        TORCH_DIRECTCONV_JIT_DUMP=str(dump),
    )
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"isa": isa, "stats": stats, "stderr": proc.stderr, "dump": dump}


def test_verbose_logs_every_generated_kernel(verbose_dump_run: dict) -> None:
    isa, stats = verbose_dump_run["isa"], verbose_dump_run["stats"]
    lines = VERBOSE_LINE.findall(verbose_dump_run["stderr"])
    assert stats["isa"] == isa
    assert stats["kernels"] > 4 and len(lines) == stats["kernels"], verbose_dump_run["stderr"][-3000:]
    names = [name for name, *_ in lines]
    assert len(set(names)) == len(names), "a kernel was generated twice"
    for name, nbytes, ms, plan in lines:
        assert re.fullmatch(rf"f32_(dw)?conv_fwd_\w+__{isa}", name), name
        assert int(nbytes) > 0 and float(ms) >= 0, (name, nbytes, ms)
        assert isa in plan and re.search(r"mb\d+ic\d+", plan), plan
    assert any("_dwconv_" in n for n in names) and any("_conv_fwd_kw7" in n for n in names), names


def test_dump_writes_one_file_per_kernel(verbose_dump_run: dict) -> None:
    dump = verbose_dump_run["dump"]
    logged = {name: int(nbytes) for name, nbytes, _, _ in VERBOSE_LINE.findall(verbose_dump_run["stderr"])}
    assert dump.is_dir(), "the dump folder was not created"
    files = {p.name: p.stat().st_size for p in dump.iterdir()}
    assert set(files) == {f"{name}.bin" for name in logged}
    for name, nbytes in logged.items():
        assert files[f"{name}.bin"] == nbytes > 0, name


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump is not installed")
def test_dumps_disassemble_to_fma_code(verbose_dump_run: dict) -> None:
    isa = verbose_dump_run["isa"]
    for path in sorted(verbose_dump_run["dump"].iterdir()):
        asm = subprocess.run(
            ["objdump", "-D", "-b", "binary", "-mi386:x86-64", str(path)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "(bad)" not in asm, f"{path.name} does not disassemble cleanly"
        assert "vfmadd231ps" in asm, path.name
        assert re.search(r"\bret\b", asm), path.name
        if isa == "avx512":
            assert "zmm" in asm, path.name
        else:
            assert "ymm" in asm and "zmm" not in asm, f"{path.name}: AVX-512 code under the AVX2 cap"


def test_quiet_by_default() -> None:
    proc = run_python(CHILD_PROBLEMS + "\nrun_all()\nassert tdc.jit_stats()['kernels'] > 0\n")
    assert "torch_directconv: jit" not in proc.stderr


CACHE_CHILD = """
import json, math, torch, torch.nn.functional as F, torch_directconv as tdc
from torch_directconv import _C

def exec_bytes():
    # Anonymous executable mappings: where the generated code lives.
    total = 0
    for line in open("/proc/self/maps"):
        parts = line.split()
        if "x" in parts[1] and len(parts) < 6:
            lo, hi = (int(v, 16) for v in parts[0].split("-"))
            total += hi - lo
    return total

def problem(i):
    g = torch.Generator().manual_seed(i)
    x = torch.randn(1, 4, 5, 10 + i, generator=g)
    w = torch.randn(8, 4, 3, 3, generator=g) / 6
    return x, w

out = {"cap": tdc.jit_stats()["cache_cap_bytes"], "over": 0, "entries_max": 0}
results = {}
exec0 = exec_bytes()
marks = []
for i in range(120):
    x, w = problem(i)
    results[i] = tdc.conv2d(x, w, padding=1)
    s = tdc.jit_stats()
    out["over"] = max(out["over"], s["cache_bytes"] - s["cache_cap_bytes"])
    out["entries_max"] = max(out["entries_max"], s["cache_entries"])
    if i in (59, 119):
        marks.append(exec_bytes() - exec0)
out["exec_growth"] = marks
s = tdc.jit_stats()
out["evicted"] = s["evicted"]
out["kernels"] = s["kernels"]
# Problem 0's kernels were evicted long ago: running it again must regenerate them.
x, w = problem(0)
again = tdc.conv2d(x, w, padding=1)
out["regenerated"] = tdc.jit_stats()["kernels"] - s["kernels"]
torch.testing.assert_close(again, F.conv2d(x, w, padding=1), rtol=1e-5, atol=1e-5)
for i, y in results.items():
    x, w = problem(i)
    torch.testing.assert_close(y, F.conv2d(x, w, padding=1), rtol=1e-5, atol=1e-5)
# Lowering the cap at run time evicts at once.
_C.set_cache_mb(0.01)
s = tdc.jit_stats()
out["after_set_cap"] = [s["cache_bytes"], s["cache_cap_bytes"]]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def cache_run() -> dict:
    if not cpu_has("avx2"):
        pytest.skip("no JIT on this CPU")
    proc = run_python(CACHE_CHILD, TORCH_DIRECTCONV_CACHE_MB="0.05", TORCH_DIRECTCONV_VERBOSE="0")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["stderr"] = proc.stderr
    return out


def test_cache_cap_bounds_the_cache(cache_run: dict) -> None:
    assert cache_run["cap"] == int(0.05 * 1024 * 1024)
    assert cache_run["over"] <= 0, f"the cache held {cache_run['over']} bytes more than its cap"
    assert cache_run["evicted"] > 0
    assert 0 < cache_run["entries_max"] < cache_run["kernels"] / 2
    assert cache_run["after_set_cap"][0] <= cache_run["after_set_cap"][1] == int(0.01 * 1024 * 1024)
    assert "torch_directconv: jit" not in cache_run["stderr"], "TORCH_DIRECTCONV_VERBOSE=0 still logs"


def test_evicted_kernels_are_regenerated(cache_run: dict) -> None:
    assert cache_run["regenerated"] > 0, "an evicted kernel was still used: eviction did not drop it"


def test_cache_cap_bounds_executable_memory(cache_run: dict) -> None:
    """Once the cache is full, new kernels replace old ones: the code memory stops growing."""
    first_60, all_120 = cache_run["exec_growth"]
    assert first_60 > 0
    assert all_120 - first_60 < first_60 / 2, f"code memory grew from {first_60} to {all_120} bytes past the cap"


WX_CHILD = """
import math, torch, torch.nn.functional as F, torch_directconv as tdc
from torch_directconv import _C

def maps():
    out = []
    for line in open("/proc/self/maps"):
        parts = line.split()
        out.append((parts[0], parts[1], parts[5] if len(parts) > 5 else ""))
    return out

# torch's oneDNN convolutions map rwx code of their own, so every torch call that could
# generate code happens before the baseline.
refs = references()
x, w = torch.randn(1, 5, 8, 8), torch.randn(8, 5, 3, 3)
ref_blocked = F.conv2d(x, w, padding=1)
before = maps()
run_all(refs)
xb, wb = tdc.to_blocked(x), tdc.to_blocked_weight(w)
yb = tdc.conv2d_blocked(xb, wb, padding=1, in_channels=5)
_C.fma_peak_gflops(1, 0.01)
after = maps()
torch.testing.assert_close(tdc.from_blocked(yb, 8), ref_blocked, rtol=1e-4, atol=1e-4)
new = [m for m in after if m not in before]
rwx = [m for m in new if "w" in m[1] and "x" in m[1]]
assert not rwx, f"writable and executable mappings: {rwx}"
new_exec = [m for m in new if "x" in m[1] and not m[2]]
assert new_exec, "no new executable mapping: the check looked at the wrong thing"
print("new anonymous executable mappings:", len(new_exec))
"""


@pytest.mark.parametrize("isa", jit_isas())
def test_generated_code_is_never_writable_and_executable(isa: str) -> None:
    run_python(CHILD_PROBLEMS + WX_CHILD, TORCH_DIRECTCONV_ISA=isa)


@requires_jit
def test_generation_time_is_recorded() -> None:
    _C.clear_cache()
    s0 = tdc.jit_stats()
    x, w = torch.randn(1, 13, 9, 27), torch.randn(24, 13, 5, 3) / math.sqrt(195)
    y = tdc.conv2d(x, w, padding=(2, 1))
    s1 = tdc.jit_stats()
    made = s1["kernels"] - s0["kernels"]
    assert made > 0
    assert s1["generate_ms"] > s0["generate_ms"]
    assert s1["generate_ms"] / s1["kernels"] > 0
    assert_conv_close(y, F.conv2d(x, w, padding=(2, 1)), 195)
    tdc.conv2d(x, w, padding=(2, 1))
    s2 = tdc.jit_stats()
    assert (s2["kernels"], s2["generate_ms"]) == (s1["kernels"], s1["generate_ms"]), "a cached problem was regenerated"


def test_isa_none_falls_back_to_torch() -> None:
    run_python(
        """
        import warnings, torch, torch.nn.functional as F, torch_directconv as tdc
        from torch_directconv import _C
        from torch import nn
        assert tdc.isa() == "none" and _C.isa() == "none", tdc.isa()
        assert tdc.vector_width() == 0
        assert _C.detected_isa() != "none"
        x, w, b = torch.randn(2, 5, 9, 9), torch.randn(7, 5, 3, 3), torch.randn(7)
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            y = tdc.conv2d(x, w, b, padding=1, relu=True)
            y2 = tdc.conv2d(x, w, b, padding=1)
        msgs = [str(r.message) for r in rec if issubclass(r.category, RuntimeWarning)]
        assert len(msgs) == 1 and "TORCH_DIRECTCONV_ISA=none" in msgs[0], msgs
        assert torch.equal(y, torch.relu(F.conv2d(x, w, b, padding=1)))
        assert torch.equal(y2, F.conv2d(x, w, b, padding=1))
        s = tdc.jit_stats()
        assert s["fallbacks"] == 2 and s["kernels"] == 0 and s["isa"] == "none", s
        conv = nn.Conv2d(5, 7, 3)
        with torch.no_grad():
            assert torch.equal(tdc.DirectConv2d.from_conv2d(conv)(x), conv(x))
        try:
            tdc.to_blocked(x)
        except RuntimeError as e:
            assert "to_blocked" in str(e) and "JIT" in str(e), e
        else:
            raise AssertionError("to_blocked worked without a JIT")
        """,
        TORCH_DIRECTCONV_ISA="none",
        TORCH_DIRECTCONV_VERBOSE="1",
    )


def test_unknown_isa_name_is_reported_and_ignored() -> None:
    if not cpu_has("avx2"):
        pytest.skip("no JIT on this CPU")
    proc = run_python(
        """
        import torch, torch.nn.functional as F, torch_directconv as tdc
        from torch_directconv import _C
        x, w = torch.randn(1, 4, 6, 6), torch.randn(4, 4, 3, 3)
        torch.testing.assert_close(tdc.conv2d(x, w), F.conv2d(x, w), rtol=1e-5, atol=1e-5)
        assert tdc.isa() == _C.detected_isa(), (tdc.isa(), _C.detected_isa())
        assert tdc.jit_stats()["kernels"] > 0
        """,
        TORCH_DIRECTCONV_ISA="sse4",
    )
    assert "TORCH_DIRECTCONV_ISA" in proc.stderr and "sse4" in proc.stderr, proc.stderr


@pytest.mark.skipif(not cpu_has("avx512"), reason="needs AVX-512 to switch down to AVX2")
def test_set_isa_cap_at_run_time() -> None:
    check_expected_isa()
    torch.manual_seed(4)
    m = tdc.DirectConv2d(12, 20, 3, padding=1).eval()
    x = torch.randn(2, 12, 8, 8)
    try:
        with torch.no_grad():
            y512 = m(x)
            _C.set_isa_cap("avx2")
            assert tdc.isa() == "avx2" and tdc.vector_width() == 8
            k0 = tdc.jit_stats()["kernels"]
            y2 = m(x)  # the packed weights were 16-wide: they must be re-packed 8-wide
            assert tdc.jit_stats()["kernels"] > k0, "no AVX2 kernel was generated"
            assert "avx2" in _C.fwd_plan("mb2ic12ih8oc20kh3ph1", 1)
            assert tdc.to_blocked(x).shape[-1] == 8
            with pytest.raises(ValueError, match="TORCH_DIRECTCONV_ISA|avx512"):
                _C.set_isa_cap("sse2")
    finally:
        _C.set_isa_cap(EXPECTED_ISA)
    assert tdc.isa() == EXPECTED_ISA
    ref = F.conv2d(x, m.weight, m.bias, padding=1)
    assert_conv_close(y512, ref, 108)
    assert_conv_close(y2, ref, 108)
    with torch.no_grad():
        assert_conv_close(m(x), ref, 108)


@requires_jit
def test_fwd_plan_describes_the_problem() -> None:
    plan = _C.fwd_plan("mb2ic17ih9iw11oc33kh3kw5sh2sw1ph2pw1", 3)
    assert plan.startswith("mb2ic17ih9iw11oc33"), plan
    assert "threads=3" in plan and f" {_C.fp32_isa()} " in plan and re.search(r"kernels=[1-9]", plan), plan
    assert _C.fwd_plan("mb2ic17ih9iw11oc33kh3kw5sh2sw1ph2pw1", 3) == plan, "a plan must be a pure function"
    with pytest.raises(ValueError, match="ihx"):
        _C.fwd_plan("mb1ic3ihx", 1)
