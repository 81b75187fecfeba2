"""Autograd of directconv::conv2d, built from the project's own backward ops.

The backward ops are torch.library custom ops (directconv::conv2d_backward_data and
conv2d_backward_weight), so torch.compile and torch.export see the whole training graph.
Double backward is not supported and says so.
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


def _backward(ctx, grad):
    input, weight, output = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.geometry
    if ctx.relu:
        # As torch.relu's backward (threshold_backward): no gradient where the output is <= 0.
        grad = torch.where(output <= 0, torch.zeros_like(grad), grad)
    grad_input = grad_weight = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_input = torch.ops.directconv.conv2d_backward_data(
            grad, weight, list(input.shape), stride, padding, dilation, groups
        )
    if ctx.needs_input_grad[1]:
        grad_weight = torch.ops.directconv.conv2d_backward_weight(
            grad, input, list(weight.shape), stride, padding, dilation, groups
        )
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_bias = grad.sum((0, 2, 3))
    return grad_input, grad_weight, grad_bias, None, None, None, None, None


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "torch_directconv: double backward (a gradient of a gradient) through conv2d is not supported; "
        "use torch.nn.functional.conv2d for higher-order gradients"
    )


def _keep_nothing(ctx, inputs, output) -> None:
    pass


torch.library.register_autograd("directconv::conv2d", _backward, setup_context=_setup_context)
for _name in ("directconv::conv2d_backward_data", "directconv::conv2d_backward_weight"):
    torch.library.register_autograd(_name, _no_double_backward, setup_context=_keep_nothing)
