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
from torch_directconv import blocked_ops
from helpers import OpLog, requires_jit

pytestmark = requires_jit

ops = torch.ops.directconv


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


# ---------------------------------------------------------------------------------------------
# The blocked model's other ops: C++ autograd kernels too


class ArgLog(TorchDispatchMode):
    """The directconv ops that run under it, with their arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "directconv":
            self.calls.append((func._opname, args))
        return func(*args, **(kwargs or {}))

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    def masks(self) -> list[list[bool]]:
        """The output masks bn_backward_blocked ran with."""
        return [list(args[9]) for name, args in self.calls if name == "bn_backward_blocked"]


def _bn_inputs(relu: bool):
    """batch_norm_blocked's arguments on 20 channels in train mode, with a residual, all of
    xb, weight, bias and the residual requiring grad."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 20, 5, 6, generator=g)
    xb = tdc.to_blocked(x).requires_grad_()
    rb = tdc.to_blocked(torch.randn(2, 20, 5, 6, generator=g)).requires_grad_()
    weight = (torch.rand(20, generator=g) + 0.5).requires_grad_()
    bias = torch.randn(20, generator=g).requires_grad_()
    mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
    return {"xb": xb, "mean": mean, "var": var, "weight": weight, "bias": bias, "residual": rb, "relu": relu}


def _bn_call(a: dict, op=ops.batch_norm_blocked.default):
    return op(a["xb"], a["mean"], a["var"], a["weight"], a["bias"], a["residual"], 1e-5, a["relu"], True, 20)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("asked", ["xb", "weight", "bias", "residual", "weight+bias", "xb+residual"])
def test_batch_norm_backward_computes_only_the_asked_gradients(relu: bool, asked: str) -> None:
    """The C++ kernel passes the engine's needs to bn_backward_blocked as its output mask; a
    residual alone, without a ReLU, needs no backward op at all (its gradient is the output's)."""
    a = _bn_inputs(relu)
    y = _bn_call(a)
    assert type(y.grad_fn).__name__ == "CppFunction"
    names = asked.split("+")
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(5))
    with ArgLog() as log:
        got = torch.autograd.grad(y, [a[n] for n in names], g)
    want = [n in names for n in ("xb", "weight", "bias")] + ["residual" in names and relu]
    assert log.masks() == ([want] if any(want) else []), log.calls
    ref = torch.autograd.grad(_bn_call(a, _FUNCTIONS_OP(ops.batch_norm_blocked.default)), [a[n] for n in names], g)
    for n, x, r in zip(names, got, ref, strict=True):
        torch.testing.assert_close(x, r, rtol=0, atol=0, msg=n)


def _FUNCTIONS_OP(op):
    """The op's Python autograd.Function (the reference backward), as a callable."""
    return tdc._autograd._FUNCTIONS[op].apply


def test_conv_stats_backward_computes_only_the_asked_gradients() -> None:
    g = torch.Generator().manual_seed(6)
    xb = tdc.to_blocked(torch.randn(2, 20, 9, 9, generator=g)).requires_grad_()
    w = (torch.randn(24, 20, 3, 3, generator=g) * 0.1).requires_grad_()
    b = torch.randn(24, generator=g).requires_grad_()
    args = ([2, 2], [1, 1, 1, 1], [1, 1], 20, torch.zeros(24), 24)
    op = ops.conv2d_blocked_stats.default
    y, mean, var = op(xb, w, b, *args)
    assert type(y.grad_fn).__name__ == "CppFunction" and not mean.requires_grad and not var.requires_grad
    gy = torch.randn(y.shape, generator=g)
    ref = torch.autograd.grad(_FUNCTIONS_OP(op)(xb, w, b, *args)[0], (xb, w, b), gy)
    for asked, data, weight in (("x", True, False), ("w", False, True), ("b", False, False), ("xwb", True, True)):
        with OpLog() as log:
            got = torch.autograd.grad(op(xb, w, b, *args)[0], [t for n, t in zip("xwb", (xb, w, b)) if n in asked], gy)
        assert ("conv2d_blocked_backward_data" in log.names) == data, log.names
        assert ("conv2d_blocked_backward_weight" in log.names) == weight, log.names
        want = [r for n, r in zip("xwb", ref) if n in asked]
        for gt, r in zip(got, want, strict=True):
            torch.testing.assert_close(gt, r, rtol=0, atol=0)


def _cases():
    """(op, its arguments, the indices of the tensor arguments to differentiate) for every op of
    the blocked model with a C++ autograd kernel but the convolutions (above)."""
    g = torch.Generator().manual_seed(7)
    v = tdc.vector_width()
    xb = tdc.to_blocked(torch.randn(2, 20, 7, 6, generator=g))
    scale, shift = torch.rand(20, generator=g) + 0.5, torch.randn(20, generator=g)
    rb = tdc.to_blocked(torch.randn(2, 20, 7, 6, generator=g))
    return {
        "to_blocked": (ops.to_blocked.default, (torch.randn(2, 20, 4, 3, generator=g), v), (0,)),
        "from_blocked": (ops.from_blocked.default, (xb, 20), (0,)),
        "to_blocked_weight": (ops.to_blocked_weight.default, (torch.randn(24, 20, 3, 3, generator=g), v), (0,)),
        "from_blocked_weight": (
            ops.from_blocked_weight.default,
            (tdc.to_blocked_weight(torch.randn(24, 20, 3, 3, generator=g)), 24, 20),
            (0,),
        ),
        "bn_apply": (ops.bn_apply_blocked.default, (xb, scale, shift, rb, True, 20), (0, 1, 2, 3)),
        "bn_apply_no_relu": (ops.bn_apply_blocked.default, (xb, scale, shift, rb, False, 20), (0, 1, 2, 3)),
        "bn_stats": (ops.bn_stats_blocked.default, (xb, 20), (0,)),
        "batch_norm_eval": (
            ops.batch_norm_blocked.default,
            (xb, shift, scale, scale, shift, None, 1e-5, True, False, 20),
            (0, 3, 4),
        ),
        "max_pool": (ops.max_pool2d_blocked.default, (xb, [3, 3], [2, 2], [1, 1], [1, 1], True, 20), (0,)),
        "avg_pool": (ops.avg_pool2d_blocked.default, (xb, [3, 2], [2, 1], [1, 0], False, False, None, 20), (0,)),
        "global_avg_pool": (ops.global_avg_pool_blocked.default, (xb, 20), (0,)),
    }


@pytest.mark.parametrize("case", sorted(_cases()))
def test_cpp_autograd_kernels_match_the_python_functions(case: str) -> None:
    """Each op's C++ autograd kernel records a C++ node, and its gradients are exactly those of
    the op's Python autograd.Function (the backward torch.func uses), for every input at once
    and for each alone."""
    op, args, diff = _cases()[case]
    args = list(args)
    for i in diff:
        args[i] = args[i].clone().requires_grad_()
    outs = op(*args)
    outs = outs if isinstance(outs, tuple) else (outs,)
    assert type(outs[0].grad_fn).__name__ == "CppFunction", outs[0].grad_fn
    ref = _FUNCTIONS_OP(op)(*args)
    ref = ref if isinstance(ref, tuple) else (ref,)
    g = torch.Generator().manual_seed(8)
    grads = [torch.randn(o.shape, generator=g) for o in outs]
    for asked in [diff, *[(i,) for i in diff]] if len(diff) > 1 else [diff]:
        got = torch.autograd.grad(outs, [args[i] for i in asked], grads, retain_graph=True)
        want = torch.autograd.grad(ref, [args[i] for i in asked], grads, retain_graph=True)
        for i, a, e in zip(asked, got, want, strict=True):
            torch.testing.assert_close(a, e, rtol=0, atol=0, msg=f"gradient of argument {i}")


def test_a_double_backward_through_a_pool_is_refused() -> None:
    """A backward recorded with create_graph calls the backward ops through their autograd,
    so a second backward meets its error rather than a wrong (missing) gradient."""
    xb = tdc.to_blocked(torch.randn(1, 20, 6, 6)).requires_grad_()
    y = blocked_ops.max_pool2d(xb, 20, 3, stride=2, padding=1)
    (gx,) = torch.autograd.grad(y.sum(), [xb], create_graph=True)
    assert gx.requires_grad
    with pytest.raises(RuntimeError, match="double backward"):
        gx.sum().backward()
