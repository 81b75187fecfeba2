"""Training through the JIT forward: gradients against torch, autograd semantics, compile.

The backward ops (directconv::conv2d_backward_data / _weight) run on ATen for now; these tests
fix the autograd contract that the JIT backward kernels of issue 3 will have to keep.
"""

from __future__ import annotations

import math
import random
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_directconv as tdc
from helpers import requires_jit

pytestmark = requires_jit


def _random_case(rng: random.Random) -> dict:
    groups = rng.choice([1, 1, 1, 2, 4])
    cg = rng.choice([1, 3, 8, 16, 17])
    kg = rng.choice([1, 5, 16, 20])
    r, s = rng.choice([(1, 1), (3, 3), (5, 5), (1, 3), (3, 1), (7, 7), (2, 4)])
    stride = (rng.randint(1, 3), rng.randint(1, 2))
    dilation = (rng.randint(1, 2), rng.randint(1, 2))
    padding = rng.choice([0, 1, 2, (1, 0), "valid", "same"])
    if padding == "same":
        stride = (1, 1)
    h = rng.randint(dilation[0] * (r - 1) + 1, 14)
    w = rng.randint(dilation[1] * (s - 1) + 1, 14)
    return dict(
        # A large batch sometimes, so that stride-1 input gradients take the JIT (duality) path.
        n=32 if rng.random() < 0.3 else rng.randint(1, 3),
        c=cg * groups,
        k=kg * groups,
        h=h,
        w=w,
        r=r,
        s=s,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=rng.random() < 0.7,
        relu=rng.random() < 0.3,
        channels_last=rng.random() < 0.25,
    )


def _check_gradients(case: dict, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(case["n"], case["c"], case["h"], case["w"], generator=g)
    if case["channels_last"]:
        x = x.contiguous(memory_format=torch.channels_last)
    fan_in = case["c"] // case["groups"] * case["r"] * case["s"]
    w = torch.randn(case["k"], case["c"] // case["groups"], case["r"], case["s"], generator=g) / math.sqrt(fan_in)
    b = torch.randn(case["k"], generator=g) if case["bias"] else None
    args = (case["stride"], case["padding"], case["dilation"], case["groups"])
    leaves = [t.clone().requires_grad_() for t in (x, w) + ((b,) if b is not None else ())]
    ref_leaves = [t.clone().requires_grad_() for t in (x, w) + ((b,) if b is not None else ())]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = tdc.conv2d(leaves[0], leaves[1], leaves[2] if b is not None else None, *args, relu=case["relu"])
        ref = F.conv2d(ref_leaves[0], ref_leaves[1], ref_leaves[2] if b is not None else None, *args)
    if case["relu"]:
        ref = torch.relu(ref)
    grad = torch.randn(ref.shape, generator=g)
    got = torch.autograd.grad(out, leaves, grad)
    want = torch.autograd.grad(ref, ref_leaves, grad)
    for name, a, e in zip(("input", "weight", "bias"), got, want, strict=False):
        scale = e.abs().max().item() + 1
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4 * scale, msg=f"grad of {name} in {case}")


CASES = [_random_case(random.Random(i)) for i in range(120)]


@pytest.mark.parametrize("i", range(len(CASES)))
def test_gradients_match_torch(i: int) -> None:
    _check_gradients(CASES[i], seed=i)


@pytest.mark.slow
@pytest.mark.parametrize("i", range(600))
def test_gradients_match_torch_more(i: int) -> None:
    _check_gradients(_random_case(random.Random(10_000 + i)), seed=10_000 + i)


@pytest.mark.parametrize(
    "wants", [(True, False, False), (False, True, False), (False, False, True), (True, True, True)]
)
def test_requires_grad_independently(wants: tuple[bool, bool, bool]) -> None:
    torch.manual_seed(1)
    x, w, b = torch.randn(2, 6, 7, 7), torch.randn(8, 6, 3, 3), torch.randn(8)
    x.requires_grad_(wants[0])
    w.requires_grad_(wants[1])
    b.requires_grad_(wants[2])
    before = tdc.jit_stats()["fallbacks"]
    y = tdc.conv2d(x, w, b, padding=1)
    assert tdc.jit_stats()["fallbacks"] == before
    y.square().sum().backward()
    ref = [t.detach().clone().requires_grad_(r) for t, r in zip((x, w, b), wants, strict=False)]
    F.conv2d(*ref, padding=1).square().sum().backward()
    for t, r, want in zip((x, w, b), ref, wants, strict=False):
        assert (t.grad is not None) == want
        if want:
            torch.testing.assert_close(t.grad, r.grad, rtol=1e-4, atol=1e-3)


def test_no_grad_and_inference_mode_build_no_graph() -> None:
    x = torch.randn(1, 4, 6, 6, requires_grad=True)
    w = torch.randn(4, 4, 3, 3, requires_grad=True)
    with torch.no_grad():
        assert tdc.conv2d(x, w).grad_fn is None
    with torch.inference_mode():
        assert not tdc.conv2d(x, w).requires_grad


def test_double_backward_raises_a_clear_error() -> None:
    x = torch.randn(1, 4, 6, 6, requires_grad=True)
    w = torch.randn(4, 4, 3, 3, requires_grad=True)
    (gx,) = torch.autograd.grad(tdc.conv2d(x, w, padding=1).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gx.sum().backward()


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=2),
            nn.ReLU(),
            nn.Conv2d(16, 24, 1, padding_mode="zeros"),
            nn.ReLU(),
            nn.Conv2d(24, 24, 3, padding=1, padding_mode="reflect", groups=24),
        )
        self.head = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


@pytest.mark.parametrize("cache_weights", [False, True])
def test_converted_model_trains_like_the_original(cache_weights: bool) -> None:
    torch.manual_seed(3)
    model = SmallCNN()
    converted = tdc.convert(model, cache_weights=cache_weights)
    opt_a = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    opt_b = torch.optim.SGD(converted.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(4, 3, 12, 12), torch.randint(0, 5, (4,))
    for step in range(4):
        for m, opt in ((model, opt_a), (converted, opt_b)):
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()
        for (name, p), q in zip(model.named_parameters(), converted.parameters(), strict=False):
            torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=f"step {step}: {name}")


def test_compiled_training_step_matches_eager() -> None:
    torch.manual_seed(4)
    model = tdc.convert(SmallCNN())
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    x, y = torch.randn(2, 3, 10, 10), torch.randint(0, 5, (2,))
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    loss_c = F.cross_entropy(compiled(x), y)
    grads_c = torch.autograd.grad(loss_c, list(model.parameters()))
    torch.testing.assert_close(loss_c, loss)
    for a, b in zip(grads_c, grads, strict=False):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_export_of_a_converted_model() -> None:
    torch.manual_seed(5)
    model = tdc.convert(SmallCNN()).eval()
    x = torch.randn(1, 3, 10, 10)
    exported = torch.export.export(model, (x,))
    assert any("directconv" in str(n.target) for n in exported.graph.nodes)
    torch.testing.assert_close(exported.module()(x), model(x))


def test_opcheck_backward_ops() -> None:
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 6, 9, 8, generator=g)
    w = torch.randn(8, 3, 3, 2, generator=g)
    grad = torch.randn(2, 8, 5, 8, generator=g)
    ops = torch.ops.directconv
    args = ([2, 1], [1, 2, 0, 1], [1, 1], 2)
    torch.library.opcheck(ops.conv2d_backward_data.default, (grad, w, list(x.shape), *args))
    torch.library.opcheck(ops.conv2d_backward_weight.default, (grad, x, list(w.shape), *args))
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    torch.library.opcheck(ops.conv2d.default, (xr, wr, None, [2, 1], [1, 2, 0, 1], [1, 1], 2, True))


@pytest.mark.parametrize(
    "shape",
    [
        dict(c=16, k=32, r=3, s=3, padding=[1, 1, 1, 1], dilation=[1, 1], groups=1),
        dict(c=17, k=5, r=1, s=1, padding=[0, 0, 0, 0], dilation=[1, 1], groups=1),
        dict(c=24, k=24, r=3, s=5, padding=[0, 2, 3, 1], dilation=[2, 1], groups=24),
        dict(c=32, k=64, r=3, s=3, padding=[1, 0, 2, 2], dilation=[1, 1], groups=2),
    ],
)
def test_stride_one_backward_data_runs_on_the_jit(shape: dict) -> None:
    """Stride 1: the input gradient is a JIT forward convolution (duality), checked against torch."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(32, shape["c"], 11, 12, generator=g)  # N * P * Q large enough for the JIT path
    w = torch.randn(shape["k"], shape["c"] // shape["groups"], shape["r"], shape["s"], generator=g)
    pad = shape["padding"]
    out = F.conv2d(F.pad(x, (pad[2], pad[3], pad[0], pad[1])), w, None, 1, 0, shape["dilation"], shape["groups"])
    grad = torch.randn(out.shape, generator=g)
    tdc._C.clear_cache()
    before = tdc.jit_stats()["kernels"]
    got = torch.ops.directconv.conv2d_backward_data(
        grad, w, list(x.shape), [1, 1], pad, shape["dilation"], shape["groups"]
    )
    assert tdc.jit_stats()["kernels"] > before, "the input gradient did not run on JIT kernels"
    xr = x.clone().requires_grad_()
    ref_out = F.conv2d(F.pad(xr, (pad[2], pad[3], pad[0], pad[1])), w, None, 1, 0, shape["dilation"], shape["groups"])
    (want,) = torch.autograd.grad(ref_out, xr, grad)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize(
    "shape",
    [
        dict(n=2, c=16, k=32, h=9, w=10, r=3, s=3, stride=[1, 1], padding=[1, 1, 1, 1], dilation=[1, 1], groups=1),
        dict(n=3, c=17, k=5, h=8, w=7, r=1, s=1, stride=[2, 1], padding=[0, 0, 0, 0], dilation=[1, 1], groups=1),
        dict(n=1, c=32, k=64, h=11, w=9, r=3, s=5, stride=[1, 2], padding=[1, 0, 2, 3], dilation=[2, 1], groups=2),
        dict(n=4, c=3, k=20, h=15, w=15, r=7, s=7, stride=[2, 2], padding=[3, 3, 3, 3], dilation=[1, 1], groups=1),
    ],
)
def test_weight_gradient_runs_on_the_jit(shape: dict) -> None:
    """The weight gradient is computed by the JIT weight-update kernels, checked against torch."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(shape["n"], shape["c"], shape["h"], shape["w"], generator=g)
    w = torch.randn(shape["k"], shape["c"] // shape["groups"], shape["r"], shape["s"], generator=g)
    pad = shape["padding"]
    geometry = (shape["stride"], 0, shape["dilation"], shape["groups"])
    out = F.conv2d(F.pad(x, (pad[2], pad[3], pad[0], pad[1])), w, None, *geometry)
    grad = torch.randn(out.shape, generator=g)
    tdc._C.clear_cache()
    before = tdc.jit_stats()["kernels"]
    got = torch.ops.directconv.conv2d_backward_weight(
        grad, x, list(w.shape), shape["stride"], pad, shape["dilation"], shape["groups"]
    )
    assert tdc.jit_stats()["kernels"] > before, "the weight gradient did not run on JIT kernels"
    wr = w.clone().requires_grad_()
    (want,) = torch.autograd.grad(F.conv2d(F.pad(x, (pad[2], pad[3], pad[0], pad[1])), wr, None, *geometry), wr, grad)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
