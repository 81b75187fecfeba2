"""The convolutions' backward computes only the gradients the autograd engine will use.

conv2d and conv2d_blocked have C++ autograd kernels that ask the engine (needs_input_grad,
answered from the running graph task), not whether each input requires grad: so
autograd.grad(y, [x]) runs no weight-gradient op, autograd.grad(y, [w]) no input-gradient op,
and backward() of a model whose input does not require grad no input-gradient op. The ops
that run are logged by a dispatch mode, below autograd.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import torch_directconv as tdc
from helpers import requires_jit

pytestmark = requires_jit

ops = torch.ops.directconv


class OpLog(TorchDispatchMode):
    """The names of the directconv ops that run under it."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "directconv":
            self.names.append(func._opname)
        return func(*args, **(kwargs or {}))


def _blocked(relu: bool, bias: bool):
    """(forward, x, w, b, the backward ops' names, reference) for conv2d_blocked on 20 -> 24 channels."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 20, 9, 9, generator=g)
    w = torch.randn(24, 20, 3, 3, generator=g) * 0.1
    b = torch.randn(24, generator=g) if bias else None
    xb = tdc.to_blocked(x).requires_grad_()
    wb = tdc.to_blocked_weight(w).requires_grad_()
    bb = b.clone().requires_grad_() if bias else None

    def forward(xb, wb, bb):
        return tdc.conv2d_blocked(xb, wb, bb, stride=2, padding=1, relu=relu, in_channels=20)

    return forward, xb, wb, bb, ("conv2d_blocked_backward_data", "conv2d_blocked_backward_weight")


def _dropin(relu: bool, bias: bool):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 20, 9, 9, generator=g).requires_grad_()
    w = (torch.randn(24, 20, 3, 3, generator=g) * 0.1).requires_grad_()
    b = torch.randn(24, generator=g).requires_grad_() if bias else None

    def forward(x, w, b):
        return tdc.conv2d(x, w, b, stride=2, padding=1, relu=relu)

    return forward, x, w, b, ("conv2d_backward_data", "conv2d_backward_weight")


def _reference(forward_is_blocked: bool, x, w, b, relu: bool, grad_out):
    """torch's gradients of the same convolution, for the values."""
    if forward_is_blocked:
        x = tdc.from_blocked(x.detach(), 20)
        w = w.detach().permute(0, 5, 1, 4, 2, 3).reshape(w.shape[0] * w.shape[4], -1, 3, 3)[:24, :20]
        grad_out = tdc.from_blocked(grad_out, 24)
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    b = b.detach().requires_grad_() if b is not None else None
    y = F.conv2d(x, w, b, stride=2, padding=1)
    y = F.relu(y) if relu else y
    return torch.autograd.grad(y, [t for t in (x, w, b) if t is not None], grad_out)


MAKERS = {"blocked": _blocked, "dropin": _dropin}


@pytest.mark.parametrize("kind", sorted(MAKERS))
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("asked", ["x", "w", "b", "xw", "xwb"])
def test_autograd_grad_runs_only_the_asked_gradients(kind: str, relu: bool, bias: bool, asked: str) -> None:
    if "b" in asked and not bias:
        pytest.skip("no bias to ask for")
    forward, x, w, b, (data_op, weight_op) = MAKERS[kind](relu, bias)
    y = forward(x, w, b)
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    if kind == "blocked":
        grad_out = tdc.to_blocked(tdc.from_blocked(grad_out, 24))  # zero padded lanes
    wanted = [t for name, t in (("x", x), ("w", w), ("b", b)) if name in asked]
    with OpLog() as log:
        grads = torch.autograd.grad(y, wanted, grad_out)
    assert (data_op in log.names) == ("x" in asked), log.names
    assert (weight_op in log.names) == ("w" in asked), log.names
    ref = dict(zip("xwb", _reference(kind == "blocked", x, w, b, relu, grad_out), strict=False))
    for name, got in zip([n for n in "xwb" if n in asked], grads, strict=True):
        if kind == "blocked" and name == "x":
            got = tdc.from_blocked(got, 20)
        if kind == "blocked" and name == "w":
            got = got.permute(0, 5, 1, 4, 2, 3).reshape(got.shape[0] * got.shape[4], -1, 3, 3)[:24, :20]
        torch.testing.assert_close(got, ref[name], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_backward_without_input_grad_runs_no_input_gradient(kind: str) -> None:
    forward, x, w, b, (data_op, weight_op) = MAKERS[kind](relu=True, bias=True)
    y = forward(x.detach(), w, b)
    with OpLog() as log:
        y.square().sum().backward()
    assert data_op not in log.names, log.names
    assert weight_op in log.names, log.names
    assert w.grad is not None and b.grad is not None


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_backward_with_a_frozen_weight_runs_no_weight_gradient(kind: str) -> None:
    forward, x, w, b, (data_op, weight_op) = MAKERS[kind](relu=False, bias=False)
    y = forward(x, w.detach(), None)
    with OpLog() as log:
        y.sum().backward()
    assert weight_op not in log.names, log.names
    assert data_op in log.names, log.names
    assert x.grad is not None


def test_a_layer_between_two_others_gets_only_what_flows_through_it() -> None:
    """autograd.grad of the input through two drop-in layers: no weight gradient for either."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 16, 8, 8, generator=g, requires_grad=True)
    w1 = torch.randn(16, 16, 3, 3, generator=g, requires_grad=True)
    w2 = torch.randn(16, 16, 3, 3, generator=g, requires_grad=True)
    y = tdc.conv2d(tdc.conv2d(x, w1, padding=1, relu=True), w2, padding=1)
    with OpLog() as log:
        (gx,) = torch.autograd.grad(y.sum(), [x])
    assert log.names.count("conv2d_backward_data") == 2 and "conv2d_backward_weight" not in log.names, log.names
    xr = x.detach().requires_grad_()
    yr = F.conv2d(F.relu(F.conv2d(xr, w1.detach(), padding=1)), w2.detach(), padding=1)
    (ref,) = torch.autograd.grad(yr.sum(), [xr])
    torch.testing.assert_close(gx, ref, rtol=1e-4, atol=1e-4)
