"""Autograd of directconv::conv2d and of the blocked API, built from the project's own ops.

The backward ops are torch.library custom ops (directconv::conv2d_backward_data and
conv2d_backward_weight, and their blocked twins), so torch.compile and torch.export see the
whole training graph. The layout conversions (to_blocked, from_blocked, to_blocked_weight,
from_blocked_weight) are differentiable too, so a model whose activations stay blocked trains
end to end.
Double backward through a convolution is not supported and says so.

Every forward op (the convolutions, the layout conversions, and the batch-norm and pooling
ops of _blocked_ops.py) has a C++ autograd kernel (csrc/torch/autograd.cpp,
autograd_blocked.cpp): a C++ node asks the engine which gradients the running backward will
use, so autograd.grad(y, [x]) runs no weight gradient, and an eager call costs no Python
autograd.Function. A Python autograd kernel could not know that (ctx.needs_input_grad says
only which inputs require grad). The backward ops' autograd, registered here with
register_autograd, refuses a double backward.

Every op also has an autograd.Function with the same backward math, which call_op uses under
torch.func transforms (grad, vjp, vmap): the transforms refuse a C++ autograd Function, and
one made by register_autograd has no setup_context, which they need (pytorch/pytorch#168393).
"""

from __future__ import annotations

import torch

from . import _backend  # noqa: F401  (loads the ops)


def call_op(op: torch._ops.OpOverload, *args):
    """A directconv op with autograd. When no gradient can flow, an op with a C++ autograd
    kernel is called as it is (that kernel passes the call on, for less than stepping below
    autograd costs here), and a backward op, whose autograd is Python, goes straight below it,
    minus that kernel's cost. When one can, in eager mode, the op's autograd kernel records the
    node. Under torch.func transforms it always goes through the op's transform-ready
    autograd.Function: which tensors carry gradients (or tangents, which no requires_grad
    shows) is for the transforms to say, level by level. A graph being recorded
    (torch.compile, torch.jit.trace) sees the op itself."""
    if torch.compiler.is_compiling():
        return op(*args)
    if torch._C._are_functorch_transforms_active():
        return _FUNCTIONS[op].apply(*args)
    if op not in _PY_AUTOGRAD or (torch.is_grad_enabled() and torch._C._any_requires_grad(*args)):
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def _setup_context(ctx, inputs, output) -> None:
    input, weight, bias, stride, padding, dilation, groups, relu = inputs
    ctx.save_for_backward(input, weight, output if relu else None)
    ctx.geometry = (list(stride), list(padding), list(dilation), groups)
    ctx.relu = relu
    ctx.has_bias = bias is not None


def _conv_grads(ctx, grad, x, w, output, data_op, weight_op):
    """(input gradient, weight gradient, the output gradient after the fused ReLU), each op called
    only when its gradient is needed; ctx.geometry ends with the op's last argument."""
    if ctx.relu:
        # As torch.relu's backward (threshold_backward): no gradient where the output is <= 0.
        grad = torch.where(output <= 0, torch.zeros_like(grad), grad)
    stride, padding, dilation, last = ctx.geometry
    needs_x, needs_w = ctx.needs_input_grad[:2]
    gx = call_op(data_op, grad, w, list(x.shape), stride, padding, dilation, last) if needs_x else None
    gw = call_op(weight_op, grad, x, list(w.shape), stride, padding, dilation, last) if needs_w else None
    return gx, gw, grad


def _backward(ctx, grad):
    input, weight, output = ctx.saved_tensors
    ops = torch.ops.directconv
    grad_input, grad_weight, grad = _conv_grads(
        ctx, grad, input, weight, output, ops.conv2d_backward_data.default, ops.conv2d_backward_weight.default
    )
    grad_bias = grad.sum((0, 2, 3), dtype=torch.float) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return grad_input, grad_weight, grad_bias, None, None, None, None, None


def _setup_blocked(ctx, inputs, output) -> None:
    xb, wb, bias, stride, padding, dilation, relu, in_channels = inputs[:8]
    ctx.save_for_backward(xb, wb, output if relu else None)
    ctx.geometry = (list(stride), list(padding), list(dilation), in_channels)
    ctx.relu = relu
    ctx.bias_size = bias.shape[0] if bias is not None else None


def _backward_blocked(ctx, grad):
    xb, wb, output = ctx.saved_tensors
    ops = torch.ops.directconv
    grad_xb, grad_wb, grad = _conv_grads(
        ctx,
        grad,
        xb,
        wb,
        output,
        ops.conv2d_blocked_backward_data.default,
        ops.conv2d_blocked_backward_weight.default,
    )
    grad_bias = None
    if ctx.bias_size is not None and ctx.needs_input_grad[2]:
        grad_bias = grad.sum((0, 2, 3), dtype=torch.float).reshape(-1)[: ctx.bias_size]
    # The residual is added before the ReLU: its gradient is the output's, after the mask.
    # A call may leave the residual out (its default), and then has one gradient fewer.
    needs = ctx.needs_input_grad
    grad_residual = grad if len(needs) > 8 and needs[8] else None
    return (grad_xb, grad_wb, grad_bias, None, None, None, None, None, grad_residual)[: len(needs)]


def _setup_blocked_stats(ctx, inputs, output) -> None:
    xb, wb, bias, stride, padding, dilation, in_channels, shift, channels = inputs
    ctx.save_for_backward(xb, wb, None)
    ctx.geometry = (list(stride), list(padding), list(dilation), in_channels)
    ctx.relu = False
    ctx.bias_size = bias.shape[0] if bias is not None else None
    # The statistics carry no gradient: a training batch norm's backward (bn_backward_blocked
    # with train=True) already differentiates through its batch statistics.
    ctx.mark_non_differentiable(output[1], output[2])


def _backward_blocked_stats(ctx, grad, grad_mean, grad_var):
    grad_xb, grad_wb, grad_bias = _backward_blocked(ctx, grad)[:3]
    return grad_xb, grad_wb, grad_bias, None, None, None, None, None, None


def _setup_to_blocked(ctx, inputs, output) -> None:
    ctx.channels = inputs[0].shape[1]
    ctx.dtype = inputs[0].dtype


def _backward_to_blocked(ctx, grad):
    # An fp32 x blocked in bf16 rows (vlen 32) gets its gradient back in fp32, as a cast's.
    return call_op(torch.ops.directconv.from_blocked.default, grad, ctx.channels).to(ctx.dtype), None


def _setup_from_blocked(ctx, inputs, output) -> None:
    ctx.vlen = inputs[0].shape[4]


def _backward_from_blocked(ctx, grad):
    return call_op(torch.ops.directconv.to_blocked.default, grad, ctx.vlen), None


def _setup_to_blocked_weight(ctx, inputs, output) -> None:
    ctx.kc = inputs[0].shape[:2]


def _backward_to_blocked_weight(ctx, grad):
    k, c = ctx.kc
    return call_op(torch.ops.directconv.from_blocked_weight.default, grad, k, c), None


def _setup_from_blocked_weight(ctx, inputs, output) -> None:
    ctx.vlen = inputs[0].shape[4]


def _backward_from_blocked_weight(ctx, grad):
    return call_op(torch.ops.directconv.to_blocked_weight.default, grad, ctx.vlen), None, None


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "torch_directconv: double backward (a gradient of a gradient) through its convolution, batch-norm and "
        "pooling ops is not supported; use torch's own for higher-order gradients"
    )


def _keep_nothing(ctx, inputs, output) -> None:
    pass


_FUNCTIONS: dict[torch._ops.OpOverload, type[torch.autograd.Function]] = {}
_PY_AUTOGRAD: set[torch._ops.OpOverload] = set()  # the ops whose autograd kernel is Python (_register)


def _register(name: str, backward, setup_context) -> None:
    """register_autograd for directconv::name (a backward op, whose autograd is Python), and
    its autograd.Function for torch.func."""
    torch.library.register_autograd(f"directconv::{name}", backward, setup_context=setup_context)
    _PY_AUTOGRAD.add(getattr(torch.ops.directconv, name).default)
    _function(name, backward, setup_context)


def _function(name: str, backward, setup_context) -> None:
    """The autograd.Function of directconv::name, which call_op uses under torch.func transforms
    (an op with a C++ autograd kernel: the same backward math)."""
    op = getattr(torch.ops.directconv, name).default

    def forward(*args):
        return op(*args)

    _FUNCTIONS[op] = type(
        f"{name}_function",
        (torch.autograd.Function,),
        {
            "forward": staticmethod(forward),
            "setup_context": staticmethod(setup_context),
            "backward": staticmethod(backward),
            # Under vmap, forward and backward run on batched tensors (the ops' batched fallback).
            "generate_vmap_rule": True,
        },
    )


# Their autograd kernels are in C++ (csrc/torch/autograd.cpp, autograd_blocked.cpp).
_function("conv2d", _backward, _setup_context)
_function("conv2d_blocked", _backward_blocked, _setup_blocked)
_function("conv2d_blocked_stats", _backward_blocked_stats, _setup_blocked_stats)
_function("to_blocked", _backward_to_blocked, _setup_to_blocked)
_function("from_blocked", _backward_from_blocked, _setup_from_blocked)
_function("to_blocked_weight", _backward_to_blocked_weight, _setup_to_blocked_weight)
_function("from_blocked_weight", _backward_from_blocked_weight, _setup_from_blocked_weight)
for _name in (
    "conv2d_backward_data",
    "conv2d_backward_weight",
    "conv2d_blocked_backward_data",
    "conv2d_blocked_backward_weight",
):
    _register(_name, _no_double_backward, _keep_nothing)
