"""Autograd of directconv::conv2d and of the blocked API, built from the project's own ops.

The backward ops are torch.library custom ops (directconv::conv2d_backward_data and
conv2d_backward_weight, and their blocked twins), so torch.compile and torch.export see the
whole training graph. The layout conversions (to_blocked, from_blocked, to_blocked_weight)
are differentiable too, so a model whose activations stay blocked trains end to end.
Double backward through a convolution is not supported and says so.
"""

from __future__ import annotations

import torch

from . import _backend  # noqa: F401  (loads the ops)


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
    gx = data_op(grad, w, list(x.shape), stride, padding, dilation, last) if ctx.needs_input_grad[0] else None
    gw = weight_op(grad, x, list(w.shape), stride, padding, dilation, last) if ctx.needs_input_grad[1] else None
    return gx, gw, grad


def _backward(ctx, grad):
    input, weight, output = ctx.saved_tensors
    ops = torch.ops.directconv
    grad_input, grad_weight, grad = _conv_grads(
        ctx, grad, input, weight, output, ops.conv2d_backward_data, ops.conv2d_backward_weight
    )
    grad_bias = grad.sum((0, 2, 3)) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return grad_input, grad_weight, grad_bias, None, None, None, None, None


def _setup_blocked(ctx, inputs, output) -> None:
    xb, wb, bias, stride, padding, dilation, relu, in_channels = inputs
    ctx.save_for_backward(xb, wb, output if relu else None)
    ctx.geometry = (list(stride), list(padding), list(dilation), in_channels)
    ctx.relu = relu
    ctx.bias_size = bias.shape[0] if bias is not None else None


def _backward_blocked(ctx, grad):
    xb, wb, output = ctx.saved_tensors
    ops = torch.ops.directconv
    grad_xb, grad_wb, grad = _conv_grads(
        ctx, grad, xb, wb, output, ops.conv2d_blocked_backward_data, ops.conv2d_blocked_backward_weight
    )
    grad_bias = None
    if ctx.bias_size is not None and ctx.needs_input_grad[2]:
        grad_bias = grad.sum((0, 2, 3)).reshape(-1)[: ctx.bias_size]
    return grad_xb, grad_wb, grad_bias, None, None, None, None, None


def _setup_to_blocked(ctx, inputs, output) -> None:
    ctx.channels = inputs[0].shape[1]


def _backward_to_blocked(ctx, grad):
    return torch.ops.directconv.from_blocked(grad, ctx.channels), None


def _setup_from_blocked(ctx, inputs, output) -> None:
    ctx.vlen = inputs[0].shape[4]


def _backward_from_blocked(ctx, grad):
    return torch.ops.directconv.to_blocked(grad, ctx.vlen), None


def _setup_to_blocked_weight(ctx, inputs, output) -> None:
    ctx.kc = inputs[0].shape[:2]


def _backward_to_blocked_weight(ctx, grad):
    kb, cb, r, s, v, _ = grad.shape
    k, c = ctx.kc
    # (K/V, C/V, R, S, V(c), V(k)) -> (K, C, R, S), dropping the padding.
    return grad.permute(0, 5, 1, 4, 2, 3).reshape(kb * v, cb * v, r, s)[:k, :c], None


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "torch_directconv: double backward (a gradient of a gradient) through conv2d is not supported; "
        "use torch.nn.functional.conv2d for higher-order gradients"
    )


def _keep_nothing(ctx, inputs, output) -> None:
    pass


torch.library.register_autograd("directconv::conv2d", _backward, setup_context=_setup_context)
torch.library.register_autograd("directconv::conv2d_blocked", _backward_blocked, setup_context=_setup_blocked)
torch.library.register_autograd("directconv::to_blocked", _backward_to_blocked, setup_context=_setup_to_blocked)
torch.library.register_autograd("directconv::from_blocked", _backward_from_blocked, setup_context=_setup_from_blocked)
torch.library.register_autograd(
    "directconv::to_blocked_weight", _backward_to_blocked_weight, setup_context=_setup_to_blocked_weight
)
for _name in (
    "directconv::conv2d_backward_data",
    "directconv::conv2d_backward_weight",
    "directconv::conv2d_blocked_backward_data",
    "directconv::conv2d_blocked_backward_weight",
):
    torch.library.register_autograd(_name, _no_double_backward, setup_context=_keep_nothing)
