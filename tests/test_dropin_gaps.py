"""Places where DirectConv2d, convert() and tdc.conv2d were not yet drop-ins for torch's: each
test runs the same thing under torch and under torch_directconv and wants the same answer, or
the same kind of error.

- the cached packed weight follows a new tensor even at the address of the old one;
- convert() of parametrized (weight_norm, spectral_norm, the old hook-based weight_norm) and of
  unmaterialised lazy convolutions;
- torch.func transforms (grad, vjp, functional_call, vmap of grad);
- arguments of the wrong type;
- torch.jit.trace of a model with cached weights;
- inputs with no channels.
"""

from __future__ import annotations

import copy
import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm, weight_norm

import torch_directconv as tdc
from helpers import assert_conv_close, assert_grad_close, requires_jit
from torch_directconv import DirectConv2d

pytestmark = requires_jit


# --- the cached packed weight and the address of a new weight ---------------------------------


def test_cached_weight_follows_a_new_storage_at_the_old_address() -> None:
    """weight.data = a tensor whose storage starts where the old one did is still a new weight.

    Two numpy-backed tensors on one buffer are two storages at one address: the exact case of
    the allocator handing a freed weight's block to the next tensor, made deterministic.
    """
    torch.manual_seed(20)
    m = DirectConv2d(8, 8, 3, cache_weights=True).eval()
    x = torch.randn(2, 8, 7, 7)
    buf = np.empty(tuple(m.weight.shape), np.float32)
    with torch.no_grad():
        for i in range(3):
            buf[...] = np.random.default_rng(i).standard_normal(buf.shape)
            m.weight.data = torch.from_numpy(buf)
            assert_conv_close(m(x), F.conv2d(x, m.weight, m.bias), 72, f"round {i}")


def test_cached_weight_holds_no_copy_of_an_old_weight() -> None:
    """Once the cache follows a new weight, nothing keeps the old weight's storage alive."""
    torch.manual_seed(21)
    m = DirectConv2d(8, 8, 3, cache_weights=True).eval()
    x = torch.randn(1, 8, 6, 6)
    with torch.no_grad():
        m(x)
        old = StorageWeakRef(m.weight.untyped_storage())
        m.weight.data = torch.randn(m.weight.shape)
        m(x)
        assert old.expired(), "the cache still holds the old weight's storage after packing the new one"
        old = StorageWeakRef(m.weight.untyped_storage())
        m.weight = nn.Parameter(torch.randn(m.weight.shape))
        m(x)
        assert old.expired(), "the cache still holds the replaced Parameter's storage"
        old = StorageWeakRef(m.weight.untyped_storage())
        m.weight.data = torch.randn(m.weight.shape)
        m.refresh_packed_weight()
        assert old.expired(), "refresh_packed_weight() kept the old storage"
        m(x)
        old = StorageWeakRef(m.weight.untyped_storage())
        m.double()  # torch computes float64: no cached call would drop the old packing
        assert old.expired(), "the cache kept the float32 weight after .double()"


# --- convert() of parametrized and lazy convolutions -------------------------------------------


class TwoConvs(nn.Module):
    def __init__(self, wrap) -> None:
        super().__init__()
        self.a = wrap(nn.Conv2d(4, 8, 3, padding=1))
        self.b = wrap(nn.Conv2d(8, 6, 3, stride=2, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def _old_weight_norm(conv: nn.Conv2d) -> nn.Conv2d:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated, and still in use
        return torch.nn.utils.weight_norm(conv)


PARAMETRIZATIONS = {
    "weight_norm": weight_norm,
    "spectral_norm": spectral_norm,
    "old_weight_norm": _old_weight_norm,
}


@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
@pytest.mark.parametrize("name", list(PARAMETRIZATIONS))
def test_convert_parametrized_convs_train_and_eval_like_the_originals(name: str, inplace: bool) -> None:
    torch.manual_seed(22)
    model = TwoConvs(PARAMETRIZATIONS[name])
    ref = TwoConvs(PARAMETRIZATIONS[name])  # torch cannot deepcopy the old weight_norm's module
    ref.load_state_dict(model.state_dict())
    converted = tdc.convert(model, inplace=inplace)
    for conv in (converted.a, converted.b):
        assert isinstance(conv, DirectConv2d), type(conv)
        if name != "old_weight_norm":
            assert parametrize.is_parametrized(conv, "weight")
    assert list(converted.state_dict()) == list(ref.state_dict())
    x = torch.randn(2, 4, 9, 9)
    for step in range(2):  # spectral_norm's power iteration moves its buffers in every training step
        converted.zero_grad()
        ref.zero_grad()
        before = tdc.jit_stats()["fallbacks"]
        out = converted(x)
        assert tdc.jit_stats()["fallbacks"] == before, "a parametrized conv fell back to torch"
        expected = ref(x)
        assert_conv_close(out, expected, 8 * 9, f"train step {step}")
        g = torch.randn_like(out)
        out.backward(g)
        expected.backward(g)
        grads = dict(ref.named_parameters())
        for pname, p in converted.named_parameters():
            assert_grad_close(p.grad, grads[pname].grad, f"{pname}, step {step}")
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(converted.state_dict()[k], v, msg=k)
    converted.eval()
    ref.eval()
    with torch.no_grad():
        assert_conv_close(converted(x), ref(x), 8 * 9, "eval")


@pytest.mark.parametrize("name", ["weight_norm", "spectral_norm"])
def test_convert_parametrized_convs_with_cached_weights(name: str) -> None:
    torch.manual_seed(23)
    model = TwoConvs(PARAMETRIZATIONS[name]).eval()
    converted = tdc.convert(model, cache_weights=True)
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        assert_conv_close(converted(x), model(x), 8 * 9)
        for p in (*converted.a.parametrizations.weight.parameters(), *model.a.parametrizations.weight.parameters()):
            p.mul_(1.5).add_(0.1)
        assert_conv_close(converted(x), model(x), 8 * 9, "after an update of the original")


def test_convert_lazy_conv_materialises_onto_the_jit() -> None:
    def make() -> nn.Module:
        return nn.Sequential(nn.LazyConv2d(8, 3, padding=1), nn.ReLU(), nn.LazyConv2d(5, 1))

    x = torch.randn(2, 6, 7, 7)
    torch.manual_seed(24)
    ref = make()
    torch.manual_seed(24)
    converted = tdc.convert(make(), cache_weights=True)
    torch.manual_seed(25)
    expected = ref(x)
    torch.manual_seed(25)
    before = tdc.jit_stats()["fallbacks"]
    out = converted(x)
    assert tdc.jit_stats()["fallbacks"] == before, "the materialised conv fell back to torch"
    assert type(converted[0]) is DirectConv2d and type(converted[2]) is DirectConv2d
    assert converted[0].cache_weights
    for (name, p), q in zip(converted.named_parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, q), f"{name}: materialised differently from nn.LazyConv2d"
    assert_conv_close(out, expected, 8 * 9)
    with torch.no_grad():
        assert_conv_close(converted.eval()(x), ref(x), 8 * 9, "cached")


def test_convert_lazy_conv_loads_a_state_dict_before_its_first_forward() -> None:
    torch.manual_seed(26)
    trained = nn.Conv2d(6, 8, 3)
    converted = tdc.convert(nn.LazyConv2d(8, 3))
    converted.load_state_dict(trained.state_dict())
    x = torch.randn(1, 6, 5, 5)
    with torch.no_grad():
        assert_conv_close(converted(x), trained(x), 54)
    assert type(converted) is DirectConv2d


# --- torch.func ----------------------------------------------------------------------------------


def _loss(conv, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, **kwargs) -> torch.Tensor:
    return (conv(x, w, b, **kwargs) * torch.linspace(-1, 1, 7 * 7 * 8).reshape(1, 8, 7, 7)).sum()


@pytest.mark.parametrize("relu", [False, True])
def test_torch_func_grad_of_conv2d(relu: bool) -> None:
    torch.manual_seed(27)
    x, w, b = torch.randn(2, 5, 7, 7), torch.randn(8, 5, 3, 3), torch.randn(8)

    def ours(x, w, b):
        return _loss(tdc.conv2d, x, w, b, padding=1, relu=relu)

    def theirs(x, w, b):
        return _loss(lambda *a, **k: F.relu(F.conv2d(*a, **k)) if relu else F.conv2d(*a, **k), x, w, b, padding=1)

    got = torch.func.grad(ours, argnums=(0, 1, 2))(x, w, b)
    want = torch.func.grad(theirs, argnums=(0, 1, 2))(x, w, b)
    for name, g, e in zip(("input", "weight", "bias"), got, want, strict=True):
        assert_grad_close(g, e, name)


def test_torch_func_vjp_of_conv2d() -> None:
    torch.manual_seed(28)
    x, w, b = torch.randn(2, 4, 9, 9), torch.randn(6, 4, 3, 3), torch.randn(6)
    out, vjp = torch.func.vjp(lambda x, w, b: tdc.conv2d(x, w, b, stride=2, padding=1), x, w, b)
    ref_out, ref_vjp = torch.func.vjp(lambda x, w, b: F.conv2d(x, w, b, stride=2, padding=1), x, w, b)
    assert_conv_close(out, ref_out, 36)
    ct = torch.randn_like(ref_out)
    for name, g, e in zip(("input", "weight", "bias"), vjp(ct), ref_vjp(ct), strict=True):
        assert_grad_close(g, e, name)


def test_torch_func_jacrev_of_conv2d() -> None:
    torch.manual_seed(33)
    x, w = torch.randn(1, 3, 4, 4), torch.randn(2, 3, 3, 3)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "There is a performance drop", UserWarning)  # the ops' batched fallback
        got = torch.func.jacrev(lambda w: tdc.conv2d(x, w, padding=1), argnums=0)(w)
    want = torch.func.jacrev(lambda w: F.conv2d(x, w, padding=1), argnums=0)(w)
    assert_grad_close(got, want, "jacobian")


@pytest.mark.parametrize("cache_weights", [False, True], ids=["packed_per_call", "cached"])
def test_torch_func_grad_through_functional_call(cache_weights: bool) -> None:
    torch.manual_seed(29)
    conv = nn.Conv2d(4, 8, 3, padding=1)
    m = DirectConv2d.from_conv2d(conv, cache_weights=cache_weights)
    x = torch.randn(2, 4, 6, 6)

    def loss(module: nn.Module):
        return lambda params, x: torch.func.functional_call(module, params, (x,)).square().sum()

    params = {k: v.detach() for k, v in conv.named_parameters()}
    got = torch.func.grad(loss(m))(params, x)
    want = torch.func.grad(loss(conv))(params, x)
    for k in want:
        assert_grad_close(got[k], want[k], k)


def test_torch_func_per_sample_gradients() -> None:
    """vmap of grad, the per-sample gradients recipe."""
    torch.manual_seed(30)
    conv = nn.Conv2d(3, 4, 3)
    m = DirectConv2d.from_conv2d(conv)
    params = {k: v.detach() for k, v in conv.named_parameters()}
    x = torch.randn(3, 3, 5, 5)

    def per_sample(module: nn.Module) -> dict:
        def loss(params, xi):
            return torch.func.functional_call(module, params, (xi.unsqueeze(0),)).square().sum()

        return torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "There is a performance drop", UserWarning)  # the ops' batched fallback
        got = per_sample(m)
    want = per_sample(conv)
    for k in want:
        assert_grad_close(got[k], want[k], k)


def test_torch_func_jvp_raises_rather_than_giving_a_zero_tangent() -> None:
    """Forward mode has no rule here yet: an error, not the zero tangent a call below autograd gave."""
    x, w = torch.randn(1, 4, 6, 6), torch.randn(8, 4, 3, 3)
    with pytest.raises(NotImplementedError, match="jvp"), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.func's jvp scripts its decompositions
        torch.func.jvp(lambda w: tdc.conv2d(x, w), (w,), (torch.ones_like(w),))


# --- arguments of the wrong type -----------------------------------------------------------------

_X, _W, _B = torch.randn(2, 4, 6, 6), torch.randn(8, 4, 3, 3), torch.randn(8)
WRONG = {
    "float": 3.0,
    "str": "abc",
    "tensors": [_X, _X],
    "none": None,
    "bool": True,
    "int": 3,
    "ndarray": np.zeros(8, np.float32),
}
ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


def _raised(fn) -> BaseException | None:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - whatever torch raises is the reference
        return e
    return None


@pytest.mark.parametrize("kind", list(WRONG))
@pytest.mark.parametrize("arg", ARGS)
def test_conv2d_arguments_of_the_wrong_type_raise_like_torch(arg: str, kind: str) -> None:
    kwargs = dict(input=_X, weight=_W, bias=_B, stride=1, padding=0, dilation=1, groups=1)
    kwargs[arg] = WRONG[kind]
    expected = _raised(lambda: F.conv2d(**kwargs))
    if expected is None:
        out = tdc.conv2d(**kwargs)
        assert_conv_close(out, F.conv2d(**kwargs), 36)
        return
    got = _raised(lambda: tdc.conv2d(**kwargs))
    assert got is not None, f"torch raises {type(expected).__name__} ({expected}); torch_directconv accepts"
    assert isinstance(got, type(expected)), (
        f"torch raises {type(expected).__name__} ({expected}); torch_directconv raises {type(got).__name__} ({got})"
    )
    if isinstance(expected, TypeError):
        assert re.search(f"'{arg}'", str(got)), f"the message does not name '{arg}': {got}"
        assert len(str(got)) < 200, f"the message is too long: {got}"


@pytest.mark.parametrize("kind", ["float", "str", "tensors", "none", "ndarray"])
def test_module_input_of_the_wrong_type_raises_like_conv2d(kind: str) -> None:
    conv = nn.Conv2d(4, 8, 3)
    expected = _raised(lambda: conv(WRONG[kind]))
    got = _raised(lambda: DirectConv2d.from_conv2d(conv)(WRONG[kind]))
    assert isinstance(got, type(expected)), f"torch raises {expected!r}; torch_directconv raises {got!r}"


# --- torch.jit.trace -----------------------------------------------------------------------------


@pytest.mark.parametrize("cache_weights", [False, True], ids=["packed_per_call", "cached"])
def test_jit_trace_of_a_converted_model_under_no_grad(cache_weights: bool) -> None:
    torch.manual_seed(31)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, stride=2)).eval()
    converted = tdc.convert(model, cache_weights=cache_weights)
    x = torch.randn(2, 3, 10, 10)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(converted, x)
        for inp in (x, torch.randn(2, 3, 10, 10)):
            torch.testing.assert_close(traced(inp), converted(inp))
            assert_conv_close(traced(inp), model(inp), 16 * 9)
        # The trace reads the weights, not a packing of them made while tracing.
        converted[0].weight.mul_(-1)
        model[0].weight.mul_(-1)
        assert_conv_close(traced(x), model(x), 16 * 9, "after a weight update")


# --- inputs with no channels ---------------------------------------------------------------------


def _no_input_channel_conv(stride: int) -> nn.Conv2d:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # initialising a zero-element weight
        conv = nn.Conv2d(0, 3, 3, stride=stride, padding=1)
    with torch.no_grad():
        conv.bias.copy_(torch.arange(1.0, 4.0))  # nn.Conv2d leaves it uninitialised with fan_in 0
    return conv


NO_CHANNEL_SHAPES = {"batched": (2, 0, 5, 5), "unbatched": (0, 5, 5), "empty_batch": (0, 0, 5, 5)}


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("shape", list(NO_CHANNEL_SHAPES))
def test_no_input_channels_give_what_torch_gives(shape: str, stride: int) -> None:
    conv = _no_input_channel_conv(stride)
    x = torch.randn(NO_CHANNEL_SHAPES[shape])
    w, b = conv.weight.detach(), conv.bias.detach()
    expected = F.conv2d(x, w, b, stride=stride, padding=1)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the note that torch computes it
        for how, out in (
            ("conv2d", tdc.conv2d(x, w, b, stride=stride, padding=1)),
            ("module", DirectConv2d.from_conv2d(conv)(x)),
            ("cached", DirectConv2d.from_conv2d(conv, cache_weights=True).eval()(x)),
        ):
            assert (out.shape, out.stride()) == (expected.shape, expected.stride()), how
            assert torch.equal(out, expected), how


def test_no_input_channels_backward_gives_what_torch_gives() -> None:
    conv = _no_input_channel_conv(1)
    x = torch.randn(2, 0, 5, 5)

    def grads(fn, params: list[torch.Tensor]) -> list[torch.Tensor]:
        xs = x.clone().requires_grad_()
        (fn(xs) * 2).sum().backward()
        return [xs.grad, *(p.grad for p in params)]

    ref = copy.deepcopy(conv)
    m = DirectConv2d.from_conv2d(copy.deepcopy(conv))
    w, b = (p.detach().clone().requires_grad_() for p in (conv.weight, conv.bias))
    want = grads(ref, [ref.weight, ref.bias])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the note that torch computes it
        got = {
            "conv2d": grads(lambda xs: tdc.conv2d(xs, w, b, padding=1), [w, b]),
            "module": grads(m, [m.weight, m.bias]),
        }
    for how, gs in got.items():
        for name, g, e in zip(("input", "weight", "bias"), gs, want, strict=True):
            assert g is not None and g.shape == e.shape and torch.equal(g, e), f"{how}: {name}"


def test_no_output_channels_raise_like_torch() -> None:
    x = torch.randn(2, 4, 5, 5)
    for w in (torch.randn(0, 4, 3, 3), torch.randn(0, 0, 3, 3)):
        expected = _raised(lambda w=w: F.conv2d(x if w.shape[1] else x[:, :0], w))
        got = _raised(lambda w=w: tdc.conv2d(x if w.shape[1] else x[:, :0], w))
        assert isinstance(got, type(expected)), f"torch raises {expected!r}; torch_directconv raises {got!r}"
        assert "'weight'" in str(got), got
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # initialising a zero-element weight
        conv = nn.Conv2d(4, 0, 3)
    expected = _raised(lambda: conv(x))
    with torch.no_grad():
        got = _raised(lambda: DirectConv2d.from_conv2d(conv)(x))
    assert isinstance(got, type(expected)), f"torch raises {expected!r}; torch_directconv raises {got!r}"
