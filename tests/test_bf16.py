"""bf16 through the public API: tdc.conv2d, DirectConv2d and convert() on bf16 tensors and under
CPU autocast, on the AMX kernels (the main sweep at the avx512_bf16 level too, where the CPU has
it); their gradients, the fallback reasons, the level in the cached plans, bad input and guard
pages.

Results are checked against a float64 convolution of the same bf16 values, with a bound derived
from the fan-in and bf16's rounding (bf16_bound); test_bound_catches_one_missing_tap shows it is
tight enough that one missing tap fails it.
"""

from __future__ import annotations

import contextlib
import io
import math
import random
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_directconv as tdc
from helpers import EXPECTED_ISA, OpLog, cpu_has, run_python
from test_conv2d import INPUT_LAYOUTS, Case, random_case
from torch_directconv import _C
from torch_directconv.functional import fallback_reason

requires_amx = pytest.mark.skipif(tdc.isa() != "amx", reason=f"the active level is {tdc.isa()}, not amx")

ORDER = ["none", "avx2", "avx512", "avx512_bf16", "amx"]
BF16_LEVELS = ["amx", "avx512_bf16"]


@contextlib.contextmanager
def bf16_level(level: str):
    """The active level capped at `level` for the block (skipped where this process cannot run
    it, or where TORCH_DIRECTCONV_ISA caps below it), then the process's own again."""
    if not cpu_has(level):
        pytest.skip(f"this process cannot run {level} (it runs {tdc.runnable_isa_levels()})")
    if EXPECTED_ISA in ORDER and ORDER.index(level) > ORDER.index(EXPECTED_ISA):
        pytest.skip(f"TORCH_DIRECTCONV_ISA caps the level at {EXPECTED_ISA}")
    _C.set_isa_cap(level)
    try:
        assert tdc.isa() == level
        yield
    finally:
        _C.set_isa_cap(EXPECTED_ISA if EXPECTED_ISA in ORDER else "amx")

SWEEP_SEED = 20261202
SWEEP_COUNT = 120


def bf16_input(case: Case, g: torch.Generator) -> torch.Tensor:
    """The sweep's input layouts (test_conv2d.make_input), of bf16 values."""
    n, c, h, w = case.n, case.c, case.h, case.w

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=g).bfloat16()

    if case.layout == "contiguous":
        return randn(n, c, h, w)
    if case.layout == "channels_last":
        return randn(n, c, h, w).contiguous(memory_format=torch.channels_last)
    if case.layout == "sliced":
        return randn(n, c + 2, h + 3, w + 5)[:, 1 : c + 1, 2 : h + 2, 3 : w + 3]
    if case.layout == "strided":
        return randn(n, c, 2 * h, 2 * w)[:, :, ::2, 1::2]
    if case.layout == "transposed":
        return randn(n, c, w, h).transpose(2, 3)
    if case.layout == "expanded":
        return randn(1, c, h, w).expand(n, c, h, w)
    if case.layout == "unbatched":
        return randn(c, h, w)
    raise AssertionError(case.layout)


def bf16_weight(case: Case, g: torch.Generator) -> torch.Tensor:
    cg = case.c // case.groups
    if case.weight_layout == "transposed":
        w = torch.randn(case.k, cg, case.s, case.r, generator=g).transpose(2, 3)
    else:
        w = torch.randn(case.k, cg, case.r, case.s, generator=g)
    return (w / math.sqrt(case.fan_in)).bfloat16()


def ref64(x, w, b, relu: bool = False, **args) -> tuple[torch.Tensor, torch.Tensor]:
    """(the convolution in float64 of the same values, the same of their magnitudes): the exact
    result, and the sum of |x| |w| (+ |b|) that bounds its rounding."""
    y = F.conv2d(x.double(), w.double(), None if b is None else b.double(), **args)
    mag = F.conv2d(x.double().abs(), w.double().abs(), None if b is None else b.double().abs(), **args)
    return (torch.relu(y) if relu else y), mag


def bf16_bound(ref: torch.Tensor, mag: torch.Tensor, fan_in: int) -> torch.Tensor:
    """Per element: one bf16 ulp at the exact result's magnitude (the final rounding, with a
    binade to spare), plus the fp32 accumulation's worst case, (fan_in + 1) u32 sum|x w|."""
    ulp = torch.exp2(torch.floor(torch.log2(ref.abs().clamp_min(2.0**-126))) - 7)
    return ulp + (fan_in + 1) * 2.0**-24 * mag


def assert_bf16_close(y: torch.Tensor, ref: torch.Tensor, mag: torch.Tensor, fan_in: int, msg: str = "") -> None:
    assert y.dtype == torch.bfloat16, f"{msg}: dtype {y.dtype}"
    assert y.shape == ref.shape, f"{msg}: shape {tuple(y.shape)} != {tuple(ref.shape)}"
    err = (y.double() - ref).abs()
    bound = bf16_bound(ref, mag, fan_in)
    bad = err > bound
    assert not bad.any(), (
        f"{msg}: {int(bad.sum())} of {y.numel()} outside the bf16 bound; worst error {err.max().item():.3g} "
        f"where the bound is {bound[err == err.max()].min().item():.3g}"
    )


def sweep_cases() -> list[Case]:
    rng = random.Random(SWEEP_SEED)
    pinned = [
        dict(c=3, k=64, rs=(7, 7), groups=1, stride=(2, 2), padding=3, h=30, w=30),  # conv1: folded columns
        dict(c=64, k=256, rs=(1, 1), groups=1, stride=(2, 2), padding=0, h=14, w=14),  # subsampled 1x1
        dict(c=64, k=64, rs=(3, 3), groups=1, padding=1, h=14, w=14, layout="channels_last"),
        dict(c=33, k=17, rs=(3, 3), groups=1, stride=(1, 1), padding="same", layout="sliced"),
        dict(c=17, k=40, rs=(2, 4), groups=1, stride=(1, 1), padding="same", dilation=(2, 1)),
        dict(c=40, k=33, rs=(3, 3), groups=1, stride=(2, 1), dilation=(1, 2), padding=(2, 1), relu=True),
        dict(n=0, c=8, k=16, rs=(3, 3), groups=1, padding=1),
        dict(layout="unbatched", groups=1, bias=True, relu=True),
        dict(layout="expanded", groups=1),
        dict(c=12, k=8, groups=4, rs=(3, 3), padding=1),  # grouped: torch's convolution
        dict(c=8, k=8, groups=8, rs=(3, 3), padding=1),  # depthwise: torch's convolution
    ]
    cases = [random_case(rng, seed=i, **fx) for i, fx in enumerate(pinned)]
    cases += [random_case(rng, seed=len(pinned) + i) for i in range(SWEEP_COUNT)]
    return cases


CASES = sweep_cases()


def run_case(case: Case) -> None:
    g = torch.Generator().manual_seed(SWEEP_SEED + case.seed)
    x = bf16_input(case, g)
    w = bf16_weight(case, g)
    b = torch.randn(case.k, generator=g).bfloat16() if case.bias else None
    args = dict(stride=case.stride, padding=case.padding, dilation=case.dilation, groups=case.groups)
    before = tdc.jit_stats()["fallbacks"]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch_directconv: bf16 grouped", RuntimeWarning)
        y = tdc.conv2d(x, w, b, **args, relu=case.relu)
    if case.groups == 1:
        assert tdc.jit_stats()["fallbacks"] == before, f"{case}: fell back to torch instead of the bf16 kernels"
    ref, mag = ref64(x, w, b, case.relu, **args)
    assert_bf16_close(y, ref, mag, case.fan_in, str(case))
    if case.n > 0:
        want = F.conv2d(x[:1] if x.dim() == 4 else x, w, b, **args)
        assert y.is_contiguous(memory_format=torch.channels_last) == want.is_contiguous(
            memory_format=torch.channels_last
        ), f"{case}: strides {y.stride()} but torch gives {want.stride()}"


@pytest.mark.parametrize("level", BF16_LEVELS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_float64(case: Case, level: str) -> None:
    with bf16_level(level):
        run_case(case)


def test_cached_plans_follow_the_level() -> None:
    """Caps amx -> avx512_bf16 -> amx in one process: each step runs (and explain() shows) that
    level's kernels, right, and never the other level's plan."""
    for level in BF16_LEVELS:
        if not cpu_has(level):
            pytest.skip(f"this process cannot run {level} (it runs {tdc.runnable_isa_levels()})")
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 24, 10, 10, generator=g).bfloat16()
    w = (torch.randn(40, 24, 3, 3, generator=g) / math.sqrt(24 * 9)).bfloat16()
    ref, mag = ref64(x, w, None, padding=1)
    model = nn.Sequential(nn.Conv2d(24, 40, 3, padding=1, bias=False)).bfloat16()
    with torch.no_grad():
        model[0].weight.copy_(w)
    for level in ("amx", "avx512_bf16", "amx"):
        other = ({"amx", "avx512_bf16"} - {level}).pop()
        with bf16_level(level):
            before = tdc.jit_stats()["fallbacks"]
            assert_bf16_close(tdc.conv2d(x, w, padding=1), ref, mag, 24 * 9, level)
            assert tdc.jit_stats()["fallbacks"] == before, f"{level}: fell back to torch"
            plan = _C.bf16_fwd_plan("mb1ic24ih10oc40oh10kh3ph1", torch.get_num_threads())
            assert plan.startswith(f"bf16 {level} fwd") and f"__{level}" in plan and f"__{other}" not in plan, plan
            text = tdc.explain(model, x, file=io.StringIO())
            assert f"kernels: bf16 {level} fwd mb1ic24ih10" in text and f"__{other}" not in text, text


def test_sweep_covers_the_options() -> None:
    assert {c.layout for c in CASES} == set(INPUT_LAYOUTS)
    kinds = {type(c.padding).__name__ if not isinstance(c.padding, str) else c.padding for c in CASES}
    assert kinds == {"int", "tuple", "same", "valid"}
    assert any(c.dilation != (1, 1) for c in CASES) and any(c.stride[0] != c.stride[1] for c in CASES)
    assert any(c.bias and c.relu for c in CASES) and any(c.n == 0 for c in CASES) and any(c.n >= 2 for c in CASES)
    assert any(c.c % 32 and c.c > 32 for c in CASES) and any(c.k % 32 and c.k > 32 for c in CASES)
    assert any(c.weight_layout == "transposed" for c in CASES)


def test_bound_catches_one_missing_tap() -> None:
    """The bound is tight enough that one missing tap (one weight of one output channel) fails
    it, at the sweep's largest fan-in."""
    case = max((c for c in CASES if c.n > 0 and c.groups == 1), key=lambda c: c.fan_in)
    g = torch.Generator().manual_seed(1)
    x, w = bf16_input(case, g), bf16_weight(case, g)
    args = dict(stride=case.stride, padding=case.padding, dilation=case.dilation)
    ref, mag = ref64(x, w, None, **args)
    w_missing = w.clone()
    w_missing[0, 0, case.r // 2, case.s // 2] = 0
    wrong = F.conv2d(x.double(), w_missing.double(), None, **args).bfloat16()
    with pytest.raises(AssertionError, match="outside the bf16 bound"):
        assert_bf16_close(wrong, ref, mag, case.fan_in, str(case))
    # While the correctly rounded result passes.
    assert_bf16_close(ref.bfloat16(), ref, mag, case.fan_in, str(case))


def resnet_block() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 7, stride=2, padding=3), nn.ReLU(), nn.Conv2d(32, 48, 3, padding=1, bias=False),
        nn.ReLU(), nn.Conv2d(48, 64, 1, stride=2), nn.Conv2d(64, 16, 3, padding="same", padding_mode="reflect"),
    )  # fmt: skip


def per_layer_check(model: nn.Module, converted: nn.Module, x: torch.Tensor) -> None:
    """Each converted convolution, fed the input its original receives, against float64."""
    seen = []

    def hook(conv, args, out):
        seen.append((conv, args[0], out))

    handles = [m.register_forward_hook(hook) for m in converted.modules() if isinstance(m, tdc.DirectConv2d)]
    try:
        converted(x)
    finally:
        for h in handles:
            h.remove()
    assert len(seen) == sum(isinstance(m, nn.Conv2d) for m in model.modules())
    for conv, inp, out in seen:
        if conv.padding_mode != "zeros":
            inp = F.pad(inp, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
            padding = 0
        else:
            padding = conv.padding
        ref, mag = ref64(inp, conv.weight, conv.bias, stride=conv.stride, padding=padding, dilation=conv.dilation)
        fan = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        assert_bf16_close(out, ref, mag, fan, repr(conv))


@requires_amx
@pytest.mark.parametrize("cache_weights", [False, True])
def test_convert_a_bf16_model(cache_weights: bool) -> None:
    torch.manual_seed(5)
    model = resnet_block().to(torch.bfloat16).eval()
    converted = tdc.convert(model, cache_weights=cache_weights)
    x = torch.randn(2, 3, 28, 28).bfloat16()
    with torch.no_grad(), OpLog() as log:
        y = converted(x)
    op = "conv2d_packed_bf16" if cache_weights else "conv2d"
    assert log.names.count(op) == 4, log.names
    assert y.dtype == torch.bfloat16
    with torch.no_grad():
        per_layer_check(model, converted, x)
        # The whole model against torch's bf16 model: the same to a few bf16 ulps after 4 layers.
        torch.testing.assert_close(y.float(), model(x).float(), rtol=0.05, atol=0.05)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert converted(x_cl).is_contiguous(memory_format=torch.channels_last)


@requires_amx
def test_cached_bf16_packing_follows_the_weight() -> None:
    """cache_weights keeps the bf16 packing, packs again after an in-place update, and gives the
    bits the per-call packing gives."""
    torch.manual_seed(6)
    conv = tdc.DirectConv2d(16, 24, 3, padding=1, cache_weights=True).bfloat16()
    plain = tdc.DirectConv2d.from_conv2d(conv)
    x = torch.randn(1, 16, 10, 10).bfloat16()
    with torch.no_grad():
        assert torch.equal(conv(x), plain(x))
        first = conv._packed
        conv(x)
        assert conv._packed is first
        conv.weight.mul_(-1)
        y = conv(x)
        assert conv._packed is not first
        assert torch.equal(y, plain(x))


@requires_amx
def test_gradients_match_torch_bf16() -> None:
    """The backward of the bf16 op, on the bf16 input-gradient and weight-gradient kernels (no call
    falls back to torch): the gradients of torch's bf16 convolution, to bf16's rounding."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 20, 9, 11, generator=g).bfloat16().requires_grad_()
    w = (torch.randn(24, 20, 3, 3, generator=g) / 13).bfloat16().requires_grad_()
    b = torch.randn(24, generator=g).bfloat16().requires_grad_()
    grad = torch.randn(2, 24, 5, 11, generator=g).bfloat16()
    args = dict(stride=(2, 1), padding=1)
    before = tdc.jit_stats()["fallbacks"]
    with torch.profiler.profile() as prof:  # records the ATen calls made inside our ops too
        tdc.conv2d(x, w, b, **args, relu=True).backward(grad)
    assert tdc.jit_stats()["fallbacks"] == before, "the bf16 backward fell back to torch"
    names = {e.name for e in prof.events()}
    assert not {"aten::convolution_backward", "aten::convolution"} & names, sorted(names)
    ours = [t.grad for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None
    torch.relu(F.conv2d(x, w, b, **args)).backward(grad)
    for name, mine, theirs in zip("xwb", ours, (x.grad, w.grad, b.grad)):
        assert mine.dtype == torch.bfloat16, name
        torch.testing.assert_close(mine.float(), theirs.float(), rtol=2e-2, atol=2e-2 * theirs.abs().max().item())


def autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


@requires_amx
def test_autocast_casts_as_torch_and_runs_the_bf16_kernels() -> None:
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 16, 12, 12, generator=g)
    w = (torch.randn(32, 16, 3, 3, generator=g) / 12).requires_grad_()
    b = torch.randn(32, generator=g).requires_grad_()
    before = tdc.jit_stats()["fallbacks"]
    with autocast(), OpLog() as log:
        y = tdc.conv2d(x, w, b, padding=1)
    assert "conv2d" in log.names and tdc.jit_stats()["fallbacks"] == before
    assert y.dtype == torch.bfloat16
    # The same bits as the bf16 call on autocast's casts.
    with torch.no_grad():
        assert torch.equal(y, tdc.conv2d(x.bfloat16(), w.bfloat16(), b.bfloat16(), padding=1))
    # fp32 master weights get fp32 gradients, close to those of torch's convolution under autocast.
    grad = torch.randn(y.shape, generator=g).bfloat16()
    y.backward(grad)
    ours = (w.grad, b.grad)
    w.grad = b.grad = None
    with autocast():
        want = F.conv2d(x, w, b, padding=1)
    want.backward(grad)
    for mine, theirs in zip(ours, (w.grad, b.grad)):
        assert mine.dtype == torch.float32
        torch.testing.assert_close(mine, theirs, rtol=2e-2, atol=2e-2 * theirs.abs().max().item())


@requires_amx
@pytest.mark.parametrize("cache_weights", [False, True])
def test_autocast_on_a_converted_model(cache_weights: bool) -> None:
    torch.manual_seed(10)
    model = resnet_block().eval()
    converted = tdc.convert(model, cache_weights=cache_weights)
    x = torch.randn(1, 3, 20, 20)
    with torch.no_grad(), autocast(), OpLog() as log:
        y = converted(x)
        want = model(x)
    assert y.dtype == torch.bfloat16
    assert log.names.count("conv2d_packed_bf16" if cache_weights else "conv2d") == 4, log.names
    torch.testing.assert_close(y.float(), want.float(), rtol=0.05, atol=0.05)
    # Outside autocast the same model is fp32 again.
    with torch.no_grad():
        assert converted(x).dtype == torch.float32


def recording_aot_eager(graphs: list[str]):
    """torch.compile's aot_eager backend, keeping the text of each graph Dynamo gives it."""

    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    return backend


@requires_amx
@pytest.mark.parametrize("cache_weights", [False, True])
def test_autocast_under_compile_fullgraph(cache_weights: bool) -> None:
    torch.manual_seed(11)
    converted = tdc.convert(resnet_block().eval(), cache_weights=cache_weights)
    x = torch.randn(1, 3, 20, 20)
    with torch.no_grad(), autocast():
        eager = converted(x)
        graphs = []
        compiled = torch.compile(converted, fullgraph=True, backend=recording_aot_eager(graphs))
        got = compiled(x)
    assert got.dtype == torch.bfloat16
    # A graph being recorded reads the weight (no cached packing): the op that packs per call.
    assert len(graphs) == 1 and graphs[0].count("directconv.conv2d.default") == 4, graphs
    assert torch.equal(got, eager)


@requires_amx
def test_autocast_training_step_under_compile() -> None:
    torch.manual_seed(12)
    model = nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3))
    converted = tdc.convert(model)
    compiled = torch.compile(converted, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 4, 10, 10)
    with autocast():
        compiled(x).float().sum().backward()
    grads = [p.grad.clone() for p in converted.parameters()]
    for p in converted.parameters():
        p.grad = None
    with autocast():
        model(x).float().sum().backward()
    for mine, theirs in zip(grads, (p.grad for p in model.parameters())):
        assert mine.dtype == torch.float32
        torch.testing.assert_close(mine, theirs, rtol=3e-2, atol=3e-2 * theirs.abs().max().item())


@requires_amx
def test_export_under_autocast() -> None:
    torch.manual_seed(13)
    converted = tdc.convert(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()).eval())
    x = torch.randn(1, 3, 9, 9)
    with torch.no_grad(), autocast():
        ep = torch.export.export(converted, (x,))
        assert "directconv.conv2d" in str(ep.graph)
        assert torch.equal(ep.module()(x), converted(x))


@requires_amx
def test_opcheck_bf16_ops() -> None:
    g = torch.Generator().manual_seed(14)
    x = torch.randn(2, 12, 9, 10, generator=g).bfloat16()
    w = (torch.randn(20, 12, 3, 3, generator=g) / 10).bfloat16()
    b = torch.randn(20, generator=g).bfloat16()
    ops = torch.ops.directconv
    torch.library.opcheck(ops.conv2d.default, (x, w, b, [2, 1], [1, 1, 0, 2], [1, 1], 1, True))
    torch.library.opcheck(ops.pack_weight_bf16.default, (w,))
    packed = ops.pack_weight_bf16(w)
    torch.library.opcheck(
        ops.conv2d_packed_bf16.default, (x, packed, b, [20, 12, 3, 3], [1, 1], [1, 1, 1, 1], [1, 1], False, False)
    )


def test_fallback_reasons_name_the_cause() -> None:
    x = torch.randn(1, 8, 5, 5).bfloat16()
    w = torch.randn(8, 4, 3, 3).bfloat16()
    if tdc.isa() in BF16_LEVELS:
        assert fallback_reason(x, torch.randn(8, 8, 3, 3).bfloat16(), None, 1) is None
        assert fallback_reason(x, w, None, 2) == "bf16 grouped convolutions (groups=2) are not covered by the JIT"
    x16 = torch.randn(1, 8, 5, 5).half()
    assert fallback_reason(x16, x16.new_zeros(4, 8, 3, 3), None, 1) == (
        "dtype torch.float16 is not supported (float32 and bfloat16 only)"
    )
    # Under autocast, the reason is about the type the op computes in.
    with autocast():
        assert fallback_reason(x.float(), w.float(), None, 2) == _C.bf16_fallback_reason(2)


@pytest.mark.skipif(not cpu_has("avx512"), reason="needs the avx512 level to cap to")
def test_below_avx512_bf16_bf16_falls_back_with_its_reason() -> None:
    run_python(
        """
        import warnings, torch, torch.nn.functional as F
        import torch_directconv as tdc
        from torch_directconv.functional import fallback_reason
        x = torch.randn(1, 8, 6, 6).bfloat16()
        w = torch.randn(16, 8, 3, 3).bfloat16()
        reason = fallback_reason(x, w, None, 1)
        levels = tdc.runnable_isa_levels()
        if "avx512_bf16" in levels:
            assert reason == (
                "bf16 convolutions need the avx512_bf16 or amx level; TORCH_DIRECTCONV_ISA caps it at avx512"
            ), reason
        else:
            assert reason.startswith("bf16 convolutions need the avx512_bf16 or amx level; this CPU and OS offer"), (
                reason
            )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y = tdc.conv2d(x, w, padding=1)
        assert any(reason in str(c.message) for c in caught), [str(c.message) for c in caught]
        assert torch.equal(y, F.conv2d(x, w, padding=1))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert fallback_reason(x.float(), w.float(), None, 1) == reason
            y = tdc.DirectConv2d(8, 16, 3)(x.float())
        assert y.dtype == torch.bfloat16
        # The raw op falls back too (counted), with the same answer.
        before = tdc.jit_stats()["fallbacks"]
        y = torch.ops.directconv.conv2d(x, w, None, [1, 1], [1, 1, 1, 1], [1, 1], 1, False)
        assert torch.equal(y, F.conv2d(x, w, padding=1)) and tdc.jit_stats()["fallbacks"] == before + 1
        import io
        text = tdc.explain(torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3)).bfloat16(), x, file=io.StringIO())
        assert f"0: torch's convolution: {reason}" in text, text
        print("ok")
        """,
        TORCH_DIRECTCONV_ISA="avx512",
    )


@requires_amx
def test_explain_says_what_each_bf16_convolution_runs_on() -> None:
    model = nn.Sequential(nn.Conv2d(3, 32, 7, 2, 3), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1, groups=2)).eval()
    x = torch.randn(1, 3, 32, 32)
    buf = io.StringIO()
    with autocast():
        text = tdc.explain(model, x, file=buf)
    # Under bf16 autocast the optimized graph runs in bf16: here two drop-in convolutions (a
    # lone one and a grouped one).
    assert "runs the original model" not in text and "bf16 activations" in text, text
    assert "drop-in conv2d, NCHW, ReLU in its epilogue" in text, text
    # A blocked bf16 unit shows its bf16 plan.
    deep = nn.Sequential(nn.Conv2d(3, 32, 7, 2, 3), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1)).eval()
    with autocast():
        text = tdc.explain(deep, x, file=io.StringIO())
    assert "kernels: bf16 amx fwd mb1ic3ih32" in text and "__amx" in text, text
    # float16 autocast runs the original model: what convert(model) runs each convolution on.
    with torch.autocast("cpu", dtype=torch.float16):
        text = tdc.explain(model, x, file=io.StringIO())
    assert "runs the original model" in text and "CPU autocast to torch.float16" in text, text
    f64 = tdc.explain(model.double(), x.double(), file=io.StringIO())
    assert "  0: torch's convolution: dtype torch.float64 is not supported" in f64, f64


def test_mixed_dtypes_raise_as_torch_naming_the_argument() -> None:
    x = torch.randn(1, 4, 5, 5).bfloat16()
    w = torch.randn(3, 4, 3, 3).bfloat16()
    for args, name in (((x, w.float(), None), "'weight'"), ((x.float(), w, None), "'input'"),
                       ((x, w, torch.randn(3)), "'bias'")):  # fmt: skip
        with pytest.raises(RuntimeError):
            F.conv2d(*args)
        with pytest.raises(RuntimeError, match=name):
            tdc.conv2d(*args)
    with pytest.raises(RuntimeError, match="'input'.*'weight'.*same dtype"):
        torch.ops.directconv.conv2d(x, w.float(), None, [1, 1], [0, 0, 0, 0], [1, 1], 1, False)
    with pytest.raises(RuntimeError, match="'weight' of dtype float32 or bfloat16"):
        torch.ops.directconv.conv2d(x.half(), w.half(), None, [1, 1], [0, 0, 0, 0], [1, 1], 1, False)
    with pytest.raises(RuntimeError, match="conv2d_packed_bf16: expected a packed 'weight'"):
        torch.ops.directconv.conv2d_packed_bf16(x, w.flatten(), None, [3, 4, 3, 3], [1, 1], [0] * 4, [1, 1], False, False)


# --- guard pages: every tensor the bf16 path reads, against an inaccessible page -----------


def guard_child(count: int, seed: int) -> None:
    """Entry point of the child process."""
    from test_guard_page import guarded_copy

    rng = random.Random(seed)
    cases = [
        (1, 3, 9, 9, 32, 7, 7, (2, 2), (3, 3), (1, 1)),  # folded columns
        (1, 33, 7, 30, 17, 3, 3, (1, 1), (1, 1), (1, 1)),
        (2, 64, 8, 8, 40, 1, 1, (2, 2), (0, 0), (1, 1)),  # subsampled
        (1, 5, 11, 13, 40, 3, 3, (1, 1), (2, 2), (2, 2)),
        (1, 1, 1, 1, 1, 1, 1, (1, 1), (0, 0), (1, 1)),
    ]
    for _ in range(count):
        r, s = rng.choice([(1, 1), (3, 3), (5, 5), (1, 7), (3, 2)])
        stride, dil = (rng.randint(1, 3), rng.randint(1, 2)), (rng.randint(1, 2), 1)
        pad = (rng.randint(0, r), rng.randint(0, s))
        h = rng.randint(max(1, dil[0] * (r - 1) + 1 - 2 * pad[0]), 12)
        w = rng.randint(max(1, dil[1] * (s - 1) + 1 - 2 * pad[1]), 40)
        cases.append((rng.choice([1, 2]), rng.choice([1, 7, 32, 40]), h, w, rng.choice([1, 16, 17, 48]), r, s,
                      stride, pad, dil))  # fmt: skip
    for i, (n, c, h, w, k, r, s, stride, pad, dil) in enumerate(cases):
        g = torch.Generator().manual_seed(seed + i)
        x = torch.randn(n, c, h, w, generator=g).bfloat16()
        wt = (torch.randn(k, c, r, s, generator=g) / math.sqrt(c * r * s)).bfloat16()
        b = torch.randn(k, generator=g).bfloat16()
        args = dict(stride=stride, padding=pad, dilation=dil)
        ref, mag = ref64(x, wt, b, **args)
        packed = tdc.functional.pack_weight_bf16(wt)
        for side in ("before", "after"):
            for fmt in (torch.contiguous_format, torch.channels_last):
                label = f"n{n}c{c}h{h}w{w}k{k}r{r}s{s} {args} {side} {fmt}"
                print(label, file=sys.stderr, flush=True)
                gx = guarded_copy(x.contiguous(memory_format=fmt), side)
                gw = guarded_copy(wt.contiguous(memory_format=fmt), side)
                gb = guarded_copy(b, side)
                assert_bf16_close(tdc.conv2d(gx, gw, gb, **args), ref, mag, c * r * s, label)
                assert torch.equal(tdc.functional.pack_weight_bf16(gw), packed), label
                y = tdc.functional.conv2d_packed_bf16(
                    gx, guarded_copy(packed, side), gb, wt.shape, stride, (pad[0], pad[0], pad[1], pad[1]), dil
                )
                assert_bf16_close(y, ref, mag, c * r * s, label)
    print(f"bf16 guard-page sweep: {len(cases)} problems", flush=True)


@pytest.mark.parametrize("level", BF16_LEVELS)
def test_guard_pages(level: str) -> None:
    if not cpu_has(level):
        pytest.skip(f"this process cannot run {level} (it runs {tdc.runnable_isa_levels()})")
    if EXPECTED_ISA in ORDER and ORDER.index(level) > ORDER.index(EXPECTED_ISA):
        pytest.skip(f"TORCH_DIRECTCONV_ISA caps the level at {EXPECTED_ISA}")
    proc = run_python(
        f"""
        import sys
        import torch_directconv as tdc
        assert tdc.isa() == {level!r}, tdc.isa()
        sys.path.insert(0, "tests")
        from test_bf16 import guard_child
        guard_child(20, 77)
        assert tdc.jit_stats()["fallbacks"] == 0, tdc.jit_stats()
        """,
        TORCH_DIRECTCONV_ISA=level,
    )
    assert "bf16 guard-page sweep: 25 problems" in proc.stdout
