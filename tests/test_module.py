"""DirectConv2d as a drop-in nn.Conv2d, convert() on whole models, and the fallbacks."""

from __future__ import annotations

import copy
import io
import math
import pickle
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_directconv as tdc
from helpers import assert_conv_close, requires_jit, run_python
from torch_directconv import DirectConv2d

CTOR_ARGS = [
    ((3, 8, 3), {}),
    ((4, 6, (1, 7)), dict(stride=2, padding=(0, 3), bias=False)),
    ((6, 9, 5), dict(stride=(1, 2), padding=2, dilation=(2, 1), groups=3)),
    ((8, 8, 3), dict(padding="same", groups=8, padding_mode="reflect")),
    ((5, 7, (2, 4)), dict(padding="valid", dilation=2, padding_mode="circular")),
    ((17, 33, 3), dict(padding=1, padding_mode="replicate", bias=True)),
]
CTOR_IDS = ["plain", "1x7_nobias", "grouped_dilated", "depthwise_same_reflect", "valid_circular", "replicate"]


def fan_in(conv: nn.Conv2d) -> int:
    return conv.weight[0].numel()


def pair(cls: type, args: tuple, kwargs: dict, seed: int = 0) -> nn.Conv2d:
    torch.manual_seed(seed)
    return cls(*args, **kwargs)


@pytest.mark.parametrize("args,kwargs", CTOR_ARGS, ids=CTOR_IDS)
def test_constructor_parameters_and_repr_match_conv2d(args: tuple, kwargs: dict) -> None:
    ref = pair(nn.Conv2d, args, kwargs)
    m = pair(DirectConv2d, args, kwargs)
    assert isinstance(m, nn.Conv2d)
    for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                 "padding_mode", "transposed", "output_padding"):  # fmt: skip
        assert getattr(m, attr) == getattr(ref, attr), attr
    assert [(n, p.shape, p.requires_grad) for n, p in m.named_parameters()] == [
        (n, p.shape, p.requires_grad) for n, p in ref.named_parameters()
    ]
    assert list(m.state_dict()) == list(ref.state_dict())
    assert list(m.named_buffers()) == list(ref.named_buffers())
    # Same seed, same draws: the initialisation is nn.Conv2d's, not merely similar to it.
    for (name, p), q in zip(m.named_parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert repr(m) == repr(ref).replace("Conv2d(", "DirectConv2d(", 1)


def test_init_distribution_is_kaiming_uniform_like_conv2d() -> None:
    """Independent of the seed: the bounds are nn.Conv2d's 1/sqrt(fan_in) for weight and bias."""
    torch.manual_seed(123)
    m = DirectConv2d(16, 64, 3)
    bound = 1 / math.sqrt(16 * 9)
    assert m.weight.abs().max() <= bound and m.weight.abs().max() > 0.95 * bound
    assert m.bias.abs().max() <= bound and m.bias.abs().max() > 0.9 * bound
    assert abs(m.weight.std().item() - bound / math.sqrt(3)) < 0.05 * bound


@requires_jit
@pytest.mark.parametrize("args,kwargs", CTOR_ARGS, ids=CTOR_IDS)
def test_state_dict_loads_both_ways(args: tuple, kwargs: dict) -> None:
    conv = pair(nn.Conv2d, args, kwargs, seed=1)
    m = pair(DirectConv2d, args, kwargs, seed=2)
    m.load_state_dict(conv.state_dict())
    x = torch.randn(2, args[0], 11, 12, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert_conv_close(m(x), conv(x), fan_in(conv))
    back = pair(nn.Conv2d, args, kwargs, seed=4)
    with torch.no_grad():
        m.weight.mul_(-1)
    back.load_state_dict(m.state_dict())
    for k, v in m.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    with torch.no_grad():
        assert_conv_close(m(x), back(x), fan_in(conv))


@requires_jit
@pytest.mark.parametrize("args,kwargs", CTOR_ARGS, ids=CTOR_IDS)
def test_from_conv2d_matches_the_conv(args: tuple, kwargs: dict) -> None:
    conv = pair(nn.Conv2d, args, kwargs, seed=5)
    m = DirectConv2d.from_conv2d(conv)
    assert type(m) is DirectConv2d
    assert m.weight is conv.weight and m.bias is conv.bias
    assert repr(m) == repr(conv).replace("Conv2d(", "DirectConv2d(", 1)
    g = torch.Generator().manual_seed(6)
    for shape in [(2, args[0], 13, 10), (args[0], 9, 9), (0, args[0], 9, 9)]:
        x = torch.randn(*shape, generator=g)
        before = tdc.jit_stats()["fallbacks"]
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "torch_directconv: grouped convolutions", RuntimeWarning)
            assert_conv_close(m(x), conv(x), fan_in(conv), str(shape))
        if conv.groups == 1 or conv.groups == conv.out_channels == conv.in_channels:
            assert tdc.jit_stats()["fallbacks"] == before, "the module fell back to torch"


@requires_jit
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("padding", [1, (2, 1), "same", "valid", (0, 3)])
def test_padding_modes_match_conv2d(padding_mode: str, padding) -> None:
    torch.manual_seed(7)
    conv = nn.Conv2d(
        5, 18, (3, 4), padding=padding, padding_mode=padding_mode, dilation=(1, 2) if padding == "same" else 1
    )
    m = DirectConv2d.from_conv2d(conv)
    x = torch.randn(2, 5, 9, 11)
    before = tdc.jit_stats()["fallbacks"]
    with torch.no_grad():
        assert_conv_close(m(x), conv(x), fan_in(conv))
        assert_conv_close(m(x[0]), conv(x[0]), fan_in(conv), "unbatched")
    assert tdc.jit_stats()["fallbacks"] == before


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 1, bias=False))
        self.side = nn.ModuleDict({"proj": nn.Conv2d(c, c, (1, 3), padding=(0, 1), padding_mode="reflect")})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.side["proj"](x)


class ScaledConv(nn.Conv2d):
    """A subclass whose forward computes something else: convert() must leave it alone."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 5, stride=2, padding=2)
        self.blocks = nn.ModuleList([Block(8), nn.Sequential(Block(8), nn.BatchNorm2d(8))])
        self.scaled = ScaledConv(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 10, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for b in self.blocks:
            x = b(x)
        return self.head(self.scaled(x))


def conv_types(model: nn.Module) -> dict[str, type]:
    return {name: type(m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}


@requires_jit
def test_convert_replaces_every_conv_and_keeps_the_original() -> None:
    torch.manual_seed(8)
    model = Net().eval()
    snapshot = copy.deepcopy(model.state_dict())
    types_before = conv_types(model)
    converted = tdc.convert(model)
    assert converted is not model
    types_after = conv_types(converted)
    assert types_after.keys() == types_before.keys()
    for name, t in types_after.items():
        want = ScaledConv if name == "scaled" else DirectConv2d
        assert t is want, name
    assert len([t for t in types_after.values() if t is DirectConv2d]) == 8
    assert conv_types(model) == types_before, "convert(inplace=False) changed the original model"
    orig_ptrs = {p.data_ptr() for p in model.parameters()}
    assert not orig_ptrs & {p.data_ptr() for p in converted.parameters()}, "the copy shares storage"
    x = torch.randn(2, 3, 20, 18)
    with torch.no_grad():
        out = converted(x)
        torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-4)
        for p in converted.parameters():
            p.add_(1)
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshot[k]), f"the original's {k} changed"


@requires_jit
def test_convert_a_bare_conv_and_a_shared_conv() -> None:
    torch.manual_seed(9)
    conv = nn.Conv2d(4, 4, 3, padding=1)
    assert type(tdc.convert(conv)) is DirectConv2d
    shared = nn.Sequential(conv, nn.ReLU(), conv)
    converted = tdc.convert(shared)
    assert type(converted[0]) is DirectConv2d and type(converted[2]) is DirectConv2d
    assert converted[0].weight is converted[2].weight, "a conv used twice must keep one set of weights"
    x = torch.randn(1, 4, 7, 7)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), shared(x), rtol=1e-4, atol=1e-4)


@requires_jit
def test_convert_keeps_hooks_and_mode() -> None:
    seen = []
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 1)).train()
    model[0].register_forward_hook(lambda mod, inp, out: seen.append((type(mod).__name__, out.shape)))
    model[1].eval()
    converted = tdc.convert(model)
    assert converted.training and converted[0].training and not converted[1].training
    with torch.no_grad():
        converted(torch.randn(1, 3, 6, 6))
    assert seen == [("DirectConv2d", torch.Size([1, 4, 4, 4]))]


@requires_jit
def test_convert_inplace_shares_parameters() -> None:
    torch.manual_seed(10)
    model = Net().eval()
    plain = copy.deepcopy(model)
    params = dict(model.named_parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    converted = tdc.convert(model, inplace=True)
    assert converted is model
    for name, p in converted.named_parameters():
        assert p is params[name], name
    x = torch.randn(2, 3, 16, 16)
    # The optimizer built on the old parameters must move the converted model.
    model.zero_grad()
    for p in params.values():
        p.grad = torch.ones_like(p)
    with torch.no_grad():
        before = converted(x)
    opt.step()
    plain.load_state_dict(converted.state_dict())
    with torch.no_grad():
        after = converted(x)
        ref = plain(x)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, ref, rtol=1e-4, atol=1e-4)


def _set_weight_param(m: nn.Conv2d) -> None:
    m.weight = nn.Parameter(m.weight.detach() * 3 - 1)


WEIGHT_UPDATES = {
    "add_under_no_grad": lambda m: m.weight.add_(1),
    "copy_": lambda m: m.weight.copy_(torch.randn_like(m.weight)),
    "init_normal_": lambda m: nn.init.normal_(m.weight),
    "load_state_dict": lambda m: m.load_state_dict({"weight": -m.weight.detach(), "bias": m.bias.detach()}),
    "new_parameter": _set_weight_param,
    "data_add_": lambda m: m.weight.data.add_(1),
    "data_assign": lambda m: setattr(m.weight, "data", m.weight.detach() + 2),
    "to_channels_last": lambda m: m.to(memory_format=torch.channels_last),
}


@requires_jit
@pytest.mark.parametrize("cache_weights", [False, True], ids=["packed_per_call", "cached"])
@pytest.mark.parametrize("update", list(WEIGHT_UPDATES))
def test_packed_weights_follow_weight_updates(update: str, cache_weights: bool) -> None:
    torch.manual_seed(11)
    m = DirectConv2d(6, 20, 3, padding=1, cache_weights=cache_weights).eval()
    x = torch.randn(2, 6, 8, 8)
    with torch.no_grad():
        for _ in range(2):
            first = m(x)
            assert_conv_close(first, F.conv2d(x, m.weight, m.bias, padding=1), 54)
            WEIGHT_UPDATES[update](m)
            if cache_weights and update == "data_add_":
                # Writes through .data bypass the version counter; the documented remedy.
                m.refresh_packed_weight()
            after = m(x)
            if update != "to_channels_last":
                assert not torch.allclose(first, after), "the update did not change the output"
            assert_conv_close(after, F.conv2d(x, m.weight, m.bias, padding=1), 54, update)


@requires_jit
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_cached_1x1_module_takes_the_gemm_on_nchw(layout: str) -> None:
    """With cache_weights, a 1x1 layer on an NCHW image of 28x28 or more reads the weight as
    it is (nothing is packed or cached), and follows an in-place weight update;
    channels_last input still takes the cached packing."""
    torch.manual_seed(12)
    m = DirectConv2d(32, 48, 1, cache_weights=True).eval()
    x = torch.randn(2, 32, 28, 28)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert_conv_close(m(x), F.conv2d(x, m.weight, m.bias), 32, layout)
        assert (m._packed is None) == (layout == "nchw"), "packed cache use"
        m.weight.mul_(-2)
        assert_conv_close(m(x), F.conv2d(x, m.weight, m.bias), 32, f"{layout}, after an update")


def _new_parameter_at(m: nn.Conv2d, values: np.ndarray) -> None:
    del m.weight  # frees the old storage before the new one is allocated
    m.weight = nn.Parameter(torch.from_numpy(values).clone())


def _new_data_at(m: nn.Conv2d, values: np.ndarray) -> None:
    # The same Parameter and version counter, a new storage: the old one is freed first.
    m.weight.data = torch.empty(0)
    m.weight.data = torch.from_numpy(values).clone()


@requires_jit
@pytest.mark.parametrize("replace", [_new_parameter_at, _new_data_at], ids=["new_parameter", "data_assign"])
@pytest.mark.parametrize("cache_weights", [False, True], ids=["packed_per_call", "cached"])
def test_packed_weights_survive_address_reuse(cache_weights: bool, replace) -> None:
    """A new weight at the address of a freed one, with the same version, is still new.

    The allocator often hands the freed block straight back, so within a few rounds the new
    weight has the old one's data_ptr, shape, strides and version (the Parameter too, after
    weight.data = ...). Detection depends on the allocator; a correct cache passes every round,
    and test_dropin_gaps reproduces the case deterministically.
    """
    torch.manual_seed(16)
    m = DirectConv2d(12, 12, 3, cache_weights=cache_weights).eval()
    x = torch.randn(2, 12, 8, 8)
    with torch.no_grad():
        for i in range(40):
            m(x)
            replace(m, (1 - m.weight.detach()).numpy().copy())
            assert_conv_close(m(x), F.conv2d(x, m.weight, m.bias), 108, f"round {i}")


@requires_jit
@pytest.mark.parametrize("cache_weights", [False, True], ids=["packed_per_call", "cached"])
def test_pickle_and_deepcopy_keep_the_module_working(cache_weights: bool) -> None:
    torch.manual_seed(12)
    m = DirectConv2d(4, 8, 3, padding=1, cache_weights=cache_weights).eval()
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        y = m(x)  # fills the packed-weight cache
        for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
            assert type(clone) is DirectConv2d
            torch.testing.assert_close(clone(x), y)
            clone.weight.mul_(2)
            torch.testing.assert_close(m(x), y)
            assert_conv_close(clone(x), F.conv2d(x, clone.weight, clone.bias, padding=1), 36)
        buf = io.BytesIO()
        torch.save(m.state_dict(), buf)
        buf.seek(0)
        fresh = DirectConv2d(4, 8, 3, padding=1)
        fresh.load_state_dict(torch.load(buf))
        torch.testing.assert_close(fresh(x), y)


@requires_jit
@pytest.mark.parametrize("cache_weights", [False, True], ids=["packed_per_call", "cached"])
def test_module_built_under_inference_mode(cache_weights: bool) -> None:
    """Parameters made inside inference_mode are inference tensors (no version counter)."""
    torch.manual_seed(13)
    with torch.inference_mode():
        m = tdc.convert(nn.Sequential(nn.Conv2d(4, 8, 3, padding=1)), cache_weights=cache_weights)
        x = torch.randn(1, 4, 6, 6)
        y = m(x)
        assert_conv_close(y, F.conv2d(x, m[0].weight, m[0].bias, padding=1), 36)


# bf16 runs on the bf16 kernels at the amx and avx512_bf16 levels (test_bf16.py), on torch's
# convolution below them (the rule is C++'s: bf16_fallback_reason).
BF16_FALLS_BACK = tdc._backend.bf16_fallback_reason(1) is not None
FALLBACK_DTYPES = [torch.float64, torch.float16] + ([torch.bfloat16] if BF16_FALLS_BACK else [])


@pytest.mark.parametrize("dtype", FALLBACK_DTYPES, ids=str)
def test_fallback_dtypes_give_torch_results(dtype: torch.dtype) -> None:
    torch.manual_seed(14)
    conv = nn.Conv2d(5, 7, 3, padding=1).to(dtype)
    m = DirectConv2d.from_conv2d(conv)
    x = torch.randn(2, 5, 6, 6, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with torch.no_grad():
            before = tdc.jit_stats()["fallbacks"]
            y = m(x)
            assert tdc.jit_stats()["fallbacks"] == before + 1
            y_fn = tdc.conv2d(x, conv.weight, conv.bias, padding=1, relu=True)
            assert tdc.jit_stats()["fallbacks"] == before + 2
            ref = conv(x)
    assert y.dtype == dtype and torch.equal(y, ref)
    assert y_fn.dtype == dtype and torch.equal(y_fn, torch.relu(ref))


def test_fallbacks_warn_once_per_reason() -> None:
    """Each reason warns once per process (a fresh one, so nothing warned before)."""
    run_python(
        """
        import warnings, torch, torch_directconv as tdc

        def call(dtype, grad=False):
            x = torch.randn(1, 3, 5, 5, dtype=dtype, requires_grad=grad)
            w = torch.randn(4, 3, 3, 3, dtype=dtype)
            with warnings.catch_warnings(record=True) as rec:
                warnings.simplefilter("always")
                tdc.conv2d(x, w)
            return [str(r.message) for r in rec if issubclass(r.category, RuntimeWarning)]

        first = call(torch.float64)
        assert len(first) == 1 and "float64" in first[0], first
        assert call(torch.float64) == [], "the same reason warned twice"
        # bf16 runs on the bf16 kernels from the avx512_bf16 level up; below, it falls back with
        # its reason.
        bf16_falls_back = tdc._backend.bf16_fallback_reason(1) is not None
        fallback_dtypes = (torch.float16,) + ((torch.bfloat16,) if bf16_falls_back else ())
        for dt in fallback_dtypes:
            got = call(dt)
            assert len(got) == 1 and (str(dt).split(".")[1] in got[0] or "bf16" in got[0]), got
            assert call(dt) == []
        if not bf16_falls_back:
            assert call(torch.bfloat16) == [], "a bf16 call on the bf16 kernels warned"
        assert call(torch.float32, grad=True) == [], "autograd runs on the JIT and must not warn"
        assert call(torch.float32) == [], "a JIT call warned"
        assert tdc.jit_stats()["fallbacks"] == 2 + 2 * len(fallback_dtypes), tdc.jit_stats()
        """
    )


@requires_jit
def test_requires_grad_forward_matches_and_backward_works() -> None:
    torch.manual_seed(15)
    conv = nn.Conv2d(6, 10, 3, stride=2, padding=1)
    m = DirectConv2d.from_conv2d(copy.deepcopy(conv))
    x = torch.randn(2, 6, 9, 9)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        before = tdc.jit_stats()["fallbacks"]
        y = m(x1)
        assert tdc.jit_stats()["fallbacks"] == before, "the forward of a training step must run on the JIT"
    ref = conv(x2)
    assert y.requires_grad and y.grad_fn is not None
    assert_conv_close(y, ref, 54)
    g = torch.randn_like(ref)
    y.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(m.weight.grad, conv.weight.grad)
    torch.testing.assert_close(m.bias.grad, conv.bias.grad)


@requires_jit
def test_cached_weights_are_packed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """cache_weights=True packs once while the weight does not change, and again after it does."""
    import torch_directconv.modules as modules

    calls = []
    real = modules.pack_weight
    monkeypatch.setattr(modules, "pack_weight", lambda w, g: calls.append(1) or real(w, g))
    m = DirectConv2d(8, 8, 3, padding=1, cache_weights=True).eval()
    x = torch.randn(1, 8, 5, 5)
    with torch.no_grad():
        for _ in range(3):
            m(x)
        assert len(calls) == 1
        m.weight.mul_(2)
        assert_conv_close(m(x), F.conv2d(x, m.weight, m.bias, padding=1), 72)
        assert len(calls) == 2


@requires_jit
def test_a_repeated_call_skips_no_check_that_matters() -> None:
    """The checks of a call are skipped when its signature (shapes, dtypes, devices, settings,
    ISA) is that of the last call that passed them; any change runs them again."""
    torch.manual_seed(16)
    conv = nn.Conv2d(8, 12, 3, padding=1)
    m = DirectConv2d.from_conv2d(copy.deepcopy(conv))
    x = torch.randn(2, 8, 7, 7)
    with torch.no_grad():
        assert_conv_close(m(x), conv(x), 72)
        assert m._call_cache is not None
        for bad, words in [(torch.randn(2, 9, 7, 7), "channels"), (torch.randn(7, 7), "3D|4D|3-D|4-D")]:
            with pytest.raises(RuntimeError, match=words):
                m(bad)
        with pytest.raises(RuntimeError, match="type"):  # as nn.Conv2d: input and weight dtypes differ
            m(x.double())
        for shape in [(1, 8, 5, 9), (8, 4, 4), (3, 8, 7, 7)]:
            xs = torch.randn(shape)
            assert_conv_close(m(xs), conv(xs), 72)
        xs = torch.randn(3, 8, 7, 7)
        m.stride = (2, 2)  # a setting changed after a call
        conv.stride = (2, 2)
        assert_conv_close(m(xs), conv(xs), 72)
        m.weight = nn.Parameter(torch.randn(12, 8, 1, 1))  # a weight of another shape
        with pytest.raises(RuntimeError, match="channels|weight|kernel|size"):
            m(torch.randn(3, 4, 7, 7))


@requires_jit
def test_eager_calls_record_cpp_nodes() -> None:
    """call_op in eager mode records the op's C++ autograd node (no Python autograd.Function),
    with the same gradients as a direct call of the op, for every input or for the input alone."""
    torch.manual_seed(17)
    v = tdc.vector_width()
    xb = tdc.to_blocked(torch.randn(2, 6, 9, 9)).requires_grad_()
    w = torch.randn(10, 6, 3, 3, requires_grad=True)
    b = torch.randn(10, requires_grad=True)
    args = ([2, 1], [1, 1, 0, 2], [1, 1], 6, torch.zeros(10), 10)
    op = torch.ops.directconv.conv2d_blocked_stats.default
    y_eager = tdc._autograd.call_op(op, xb, w, b, *args)[0]
    assert type(y_eager.grad_fn).__name__ == "CppFunction"
    y_direct = op(xb, w, b, *args)[0]
    assert torch.equal(y_eager, y_direct)
    g = torch.randn_like(y_eager)
    got = torch.autograd.grad(y_eager, (xb, w, b), g)
    want = torch.autograd.grad(y_direct, (xb, w, b), g)
    for a, e in zip(got, want, strict=True):
        assert torch.equal(a, e)
    (gx,) = torch.autograd.grad(tdc._autograd.call_op(op, xb, w.detach(), b.detach(), *args)[0], xb, g)
    assert torch.equal(gx, want[0])
    x = torch.randn(1, v, 4, 4, requires_grad=True)
    conv = tdc._autograd.call_op(torch.ops.directconv.conv2d.default, x, w[:, :1].expand(10, v, 3, 3).contiguous(),
                                 None, [1, 1], [0, 0, 0, 0], [1, 1], 1, False)
    assert type(conv.grad_fn).__name__ == "CppFunction"
