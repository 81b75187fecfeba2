"""Fake (meta) kernels of the directconv ops: shapes, dtypes and memory formats only, so
that torch.compile, torch.export and FakeTensor can trace them."""

from __future__ import annotations

import torch

from . import _backend


def _out_size(size: int, pad: int, kernel: int, stride: int, dilation: int) -> int:
    span = size + pad - dilation * (kernel - 1) - 1
    if span < 0:
        raise RuntimeError("conv2d: kernel size (dilated) is larger than the padded input")
    return span // stride + 1


def _spatial(x: torch.Tensor, r: int, s: int, stride, padding, dilation) -> tuple[int, int]:
    h, w = x.shape[2], x.shape[3]
    return (
        _out_size(h, padding[0] + padding[1], r, stride[0], dilation[0]),
        _out_size(w, padding[2] + padding[3], s, stride[1], dilation[1]),
    )


def _nchw_out(x: torch.Tensor, k: int, p: int, q: int, channels_last: bool) -> torch.Tensor:
    cl = channels_last or _backend.is_channels_last(x)
    return x.new_empty((x.shape[0], k, p, q)).contiguous(
        memory_format=torch.channels_last if cl else torch.contiguous_format
    )


@torch.library.register_fake("directconv::conv2d")
def _conv2d(input, weight, bias, stride, padding, dilation, groups, relu):
    p, q = _spatial(input, weight.shape[2], weight.shape[3], stride, padding, dilation)
    return _nchw_out(input, weight.shape[0], p, q, _backend.is_channels_last(weight))


@torch.library.register_fake("directconv::conv2d_packed")
def _conv2d_packed(input, weight, bias, out_channels, stride, padding, dilation, groups, relu, channels_last):
    r, s = (weight.shape[1], weight.shape[2]) if weight.dim() == 4 else (weight.shape[3], weight.shape[4])
    p, q = _spatial(input, r, s, stride, padding, dilation)
    return _nchw_out(input, out_channels, p, q, channels_last)


@torch.library.register_fake("directconv::pack_weight")
def _pack_weight(weight, groups):
    v = _backend.vector_width()
    k, c, r, s = weight.shape
    if _backend._C.is_depthwise(groups, k, c):
        return weight.new_empty((-(-k // v), r, s, v))
    return weight.new_empty((groups, -(-(k // groups) // v), -(-c // v), r, s, v, v))


@torch.library.register_fake("directconv::pack_weight_bf16")
def _pack_weight_bf16(weight):
    return weight.new_empty((_backend._C.bf16_packed_weight_elems(*weight.shape),), dtype=torch.bfloat16)


@torch.library.register_fake("directconv::conv2d_packed_bf16")
def _conv2d_packed_bf16(input, weight, bias, weight_size, stride, padding, dilation, relu, channels_last):
    p, q = _spatial(input, weight_size[2], weight_size[3], stride, padding, dilation)
    return _nchw_out(input, weight_size[0], p, q, channels_last)


@torch.library.register_fake("directconv::conv2d_blocked")
def _conv2d_blocked(xb, wb, bias, stride, padding, dilation, relu, in_channels, residual=None):
    p, q = _spatial(xb, wb.shape[2], wb.shape[3], stride, padding, dilation)
    kb = wb.shape[0] if wb.dim() == 6 else -(-wb.shape[0] // xb.shape[4])
    shape = (xb.shape[0], kb, p, q, xb.shape[4])
    if residual is not None:
        torch._check(
            tuple(residual.shape) == shape,
            lambda: f"conv2d_blocked: expected a blocked 'residual' of the output's shape {list(shape)}, "
            f"got {list(residual.shape)}",
        )
    return xb.new_empty(shape)


@torch.library.register_fake("directconv::conv2d_blocked_stats")
def _conv2d_blocked_stats(xb, wb, bias, stride, padding, dilation, in_channels, shift, channels):
    out = _conv2d_blocked(xb, wb, bias, stride, padding, dilation, False, in_channels)
    # The statistics are fp32 for bf16 outputs too.
    return out, shift.new_empty((channels,), dtype=torch.float32), shift.new_empty((channels,), dtype=torch.float32)


@torch.library.register_fake("directconv::to_blocked")
def _to_blocked(x, vlen):
    n, c, h, w = x.shape
    # vlen 32 is the bf16 rows of 32, bf16 from fp32 (rounded) or bf16 activations.
    dtype = torch.bfloat16 if vlen == _backend.vector_width(torch.bfloat16) else x.dtype
    return x.new_empty((n, -(-c // vlen), h, w, vlen), dtype=dtype)


@torch.library.register_fake("directconv::to_blocked_folded")
def _to_blocked_folded(x, kernel_size, stride, padding, dilation):
    n, _, h, w = x.shape
    q = (w + padding[2] + padding[3] - dilation[1] * (kernel_size[1] - 1) - 1) // stride[1] + 1
    return x.new_empty((n, 1, h + padding[0] + padding[1], q, _backend.vector_width(torch.bfloat16)), dtype=torch.bfloat16)


@torch.library.register_fake("directconv::from_blocked")
def _from_blocked(xb, channels):
    return xb.new_empty((xb.shape[0], channels, xb.shape[2], xb.shape[3]))


@torch.library.register_fake("directconv::to_blocked_weight")
def _to_blocked_weight(w, vlen):
    k, c, r, s = w.shape
    # vlen 32 is the bf16 kernels' layout, bf16 from fp32 or bf16 weights.
    dtype = torch.bfloat16 if vlen == _backend.vector_width(torch.bfloat16) else w.dtype
    return w.new_empty((-(-k // vlen), -(-c // vlen), r, s, vlen, vlen), dtype=dtype)


@torch.library.register_fake("directconv::from_blocked_weight")
def _from_blocked_weight(wb, k, c):
    return wb.new_empty((k, c, wb.shape[2], wb.shape[3]))


@torch.library.register_fake("directconv::conv2d_backward_data")
def _conv2d_backward_data(grad_output, weight, input_size, stride, padding, dilation, groups):
    # As the real op: channels_last when grad_output or the weight is.
    cl = _backend.is_channels_last(grad_output) or _backend.is_channels_last(weight)
    return grad_output.new_empty(input_size).contiguous(
        memory_format=torch.channels_last if cl else torch.contiguous_format
    )


@torch.library.register_fake("directconv::conv2d_backward_weight")
def _conv2d_backward_weight(grad_output, input, weight_size, stride, padding, dilation, groups):
    return grad_output.new_empty(weight_size)


@torch.library.register_fake("directconv::conv2d_blocked_backward_data")
def _conv2d_blocked_backward_data(grad_output, wb, input_size, stride, padding, dilation, in_channels):
    return grad_output.new_empty(input_size)


@torch.library.register_fake("directconv::conv2d_blocked_backward_weight")
def _conv2d_blocked_backward_weight(grad_output, xb, weight_size, stride, padding, dilation, in_channels):
    # bf16 activations: an fp32 (K, C, R, S) gradient (for fp32 master weights), or a bf16 blocked one.
    dtype = torch.float32 if len(weight_size) == 4 else grad_output.dtype
    return grad_output.new_empty(weight_size, dtype=dtype)
