"""Fake kernels and autograd of the blocked batch-norm and pooling ops (csrc/torch/blocked_ops.cpp).

Every backward is made of the project's own ops, so torch.compile sees the whole training
graph: batch_norm_blocked and bn_apply_blocked differentiate through bn_backward_blocked (at
most two passes over the data), the pools through their *_backward ops. See blocked_ops.py
for what each op computes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _backend  # (also loads the ops)
from ._autograd import _function, _keep_nothing, _no_double_backward, _register, call_op

ops = torch.ops.directconv


# ---- fake kernels -------------------------------------------------------------------------


def pool_out_size(size: int, kernel: int, stride: int, pad: int, dilation: int, ceil_mode: bool) -> int:
    """torch's pooling_output_shape, as the C++ PoolDesc: in ceil mode a last window that would
    start in the right (or bottom) padding is dropped."""
    span = size + 2 * pad - dilation * (kernel - 1) - 1 + (stride - 1 if ceil_mode else 0)
    out = span // stride + 1
    if ceil_mode and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def _pooled(xb: torch.Tensor, kernel, stride, padding, dilation, ceil_mode) -> torch.Tensor:
    p = pool_out_size(xb.shape[2], kernel[0], stride[0], padding[0], dilation[0], ceil_mode)
    q = pool_out_size(xb.shape[3], kernel[1], stride[1], padding[1], dilation[1], ceil_mode)
    return xb.new_empty((xb.shape[0], xb.shape[1], p, q, xb.shape[4]))


@torch.library.register_fake("directconv::bn_stats_blocked")
def _bn_stats_fake(xb, channels):
    # The statistics are fp32 for either dtype of xb.
    return xb.new_empty((channels,), dtype=torch.float32), xb.new_empty((channels,), dtype=torch.float32)


@torch.library.register_fake("directconv::bn_update_running_stats")
def _bn_update_running_stats_fake(running_mean, running_var, num_batches_tracked, mean, var, count, momentum):
    return None


@torch.library.register_fake("directconv::bn_apply_blocked")
def _bn_apply_fake(xb, scale, shift, residual, relu, channels):
    return xb.new_empty(xb.shape)


@torch.library.register_fake("directconv::batch_norm_blocked")
def _batch_norm_fake(xb, mean, var, weight, bias, residual, eps, relu, train, channels):
    return xb.new_empty(xb.shape)


@torch.library.register_fake("directconv::bn_backward_blocked")
def _bn_backward_fake(grad_y, yb, xb, mean, var, weight, eps, train, channels, output_mask):
    # Gradients not asked for are empty (0,) tensors; grad_x and grad_residual are of xb's dtype,
    # grad_weight and grad_bias fp32.
    shapes = (xb.shape, (channels,), (channels,), xb.shape)
    dtypes = (xb.dtype, torch.float32, torch.float32, xb.dtype)
    return tuple(
        xb.new_empty(s if want else (0,), dtype=d) for s, d, want in zip(shapes, dtypes, output_mask, strict=True)
    )


@torch.library.register_fake("directconv::max_pool2d_blocked")
def _max_pool_fake(xb, kernel_size, stride, padding, dilation, ceil_mode, channels):
    return _pooled(xb, kernel_size, stride, padding, dilation, ceil_mode)


@torch.library.register_fake("directconv::max_pool2d_blocked_backward")
def _max_pool_backward_fake(grad_output, xb, yb, kernel_size, stride, padding, dilation, ceil_mode, channels):
    return xb.new_empty(xb.shape)


@torch.library.register_fake("directconv::avg_pool2d_blocked")
def _avg_pool_fake(xb, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override, channels):
    return _pooled(xb, kernel_size, stride, padding, (1, 1), ceil_mode)


@torch.library.register_fake("directconv::avg_pool2d_blocked_backward")
def _avg_pool_backward_fake(
    grad_output, input_size, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override, channels
):
    return grad_output.new_empty(input_size)


@torch.library.register_fake("directconv::global_avg_pool_blocked")
def _global_avg_pool_fake(xb, channels):
    return xb.new_empty((xb.shape[0], channels))


@torch.library.register_fake("directconv::global_avg_pool_blocked_backward")
def _global_avg_pool_backward_fake(grad_output, input_size, channels):
    # Blocked in input_size's layout: bf16 when its blocks are the bf16 layout's.
    bf16 = len(input_size) == 5 and input_size[4] == _backend.vector_width(torch.bfloat16)
    return grad_output.new_empty(input_size, dtype=torch.bfloat16 if bf16 else torch.float32)


# ---- autograd -----------------------------------------------------------------------------


def _setup_batch_norm(ctx, inputs, output) -> None:
    xb, mean, var, weight, bias, residual, eps, relu, train, channels = inputs
    ctx.save_for_backward(xb, mean, var, weight, output if relu else None)
    ctx.args = (eps, relu, train, channels)
    ctx.has = (weight is not None, bias is not None)


def _bn_grads(ctx, grad, xb, mean, var, weight, y, want_x, want_w, want_b, want_res):
    """(grad_x, grad_weight, grad_bias, grad_residual) from bn_backward_blocked, None where not wanted."""
    eps, relu, train, channels = ctx.args
    mask = [want_x, want_w, want_b, want_res and relu]
    got = [None] * 4
    if any(mask):
        out = call_op(ops.bn_backward_blocked.default, grad, y, xb, mean, var, weight, eps, train, channels, mask)
        got = [t if m else None for t, m in zip(out, mask, strict=True)]
    if want_res and not relu:
        got[3] = grad  # without a ReLU the residual's gradient is the output's
    return got


def _backward_batch_norm(ctx, grad):
    """In train mode mean and var are the batch statistics of xb, and their dependence on xb is
    part of grad_x; they get no gradient of their own (nor do running statistics in eval)."""
    xb, mean, var, weight, y = ctx.saved_tensors
    needs = ctx.needs_input_grad
    gx, gw, gb, gr = _bn_grads(
        ctx, grad, xb, mean, var, weight, y, needs[0], needs[3] and ctx.has[0], needs[4] and ctx.has[1], needs[5]
    )
    return gx, None, None, gw, gb, gr, None, None, None, None


def _setup_bn_apply(ctx, inputs, output) -> None:
    xb, scale, shift, residual, relu, channels = inputs
    ctx.save_for_backward(xb, scale, output if relu else None)
    # y = x * scale + shift is batch norm with mean 0 and 1 / sqrt(var + eps) = 1, in eval mode.
    ctx.args = (0.0, relu, False, channels)


def _backward_bn_apply(ctx, grad):
    xb, scale, y = ctx.saved_tensors
    needs = ctx.needs_input_grad
    channels = ctx.args[3]
    # The statistics of this batch norm are fp32, whatever the dtype of scale.
    zeros, ones = scale.new_zeros(channels, dtype=torch.float32), scale.new_ones(channels, dtype=torch.float32)
    gx, gs, gsh, gr = _bn_grads(ctx, grad, xb, zeros, ones, scale, y, *needs[:4])
    return gx, gs, gsh, gr, None, None


def _to_blocked_channels(t: torch.Tensor, cb: int, v: int) -> torch.Tensor:
    """(C,) -> (1, Cb, 1, 1, V), zero-padded, to broadcast over a blocked tensor."""
    return F.pad(t, (0, cb * v - t.shape[0])).view(1, cb, 1, 1, v)


def _setup_bn_stats(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[0], output[0])


def _backward_bn_stats(ctx, grad_mean, grad_var):
    """d mean / dx = 1 / M and d var / dx = 2 (x - mean) / M, M = N * H * W (torch ops: this is not
    the training path, where batch_norm_blocked folds the statistics' gradient into grad_x)."""
    xb, mean = ctx.saved_tensors
    n, cb, h, w, v = xb.shape
    m = n * h * w
    if m == 0:
        return torch.zeros_like(xb), None
    gm = _to_blocked_channels(grad_mean, cb, v) / m
    gv = _to_blocked_channels(grad_var, cb, v) * (2.0 / m)
    return (gm + gv * (xb - _to_blocked_channels(mean, cb, v))).to(xb.dtype), None


def _setup_max_pool(ctx, inputs, output) -> None:
    # The output too: the backward finds each window's argmax as the first tap equal to it (in
    # a CNN the next layer keeps the output anyway, so this costs no memory there).
    ctx.save_for_backward(inputs[0], output)
    ctx.args = inputs[1:]


def _backward_max_pool(ctx, grad):
    xb, yb = ctx.saved_tensors
    return (call_op(ops.max_pool2d_blocked_backward.default, grad, xb, yb, *ctx.args),) + (None,) * 6


def _setup_avg_pool(ctx, inputs, output) -> None:
    ctx.input_size = list(inputs[0].shape)
    ctx.args = inputs[1:]


def _backward_avg_pool(ctx, grad):
    return (call_op(ops.avg_pool2d_blocked_backward.default, grad, ctx.input_size, *ctx.args),) + (None,) * 7


def _setup_global_avg_pool(ctx, inputs, output) -> None:
    ctx.input_size = list(inputs[0].shape)
    ctx.channels = inputs[1]


def _backward_global_avg_pool(ctx, grad):
    return call_op(ops.global_avg_pool_blocked_backward.default, grad, ctx.input_size, ctx.channels), None


# Their autograd kernels are in C++ (csrc/torch/autograd_blocked.cpp), with the same backward.
_function("bn_stats_blocked", _backward_bn_stats, _setup_bn_stats)
_function("bn_apply_blocked", _backward_bn_apply, _setup_bn_apply)
_function("batch_norm_blocked", _backward_batch_norm, _setup_batch_norm)
_function("max_pool2d_blocked", _backward_max_pool, _setup_max_pool)
_function("avg_pool2d_blocked", _backward_avg_pool, _setup_avg_pool)
_function("global_avg_pool_blocked", _backward_global_avg_pool, _setup_global_avg_pool)
for _name in (
    "bn_backward_blocked",
    "max_pool2d_blocked_backward",
    "avg_pool2d_blocked_backward",
    "global_avg_pool_blocked_backward",
):
    _register(_name, _no_double_backward, _keep_nothing)
