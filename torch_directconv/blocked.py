"""The blocked layouts (DESIGN.md section 1) and the convolution that stays in them.

Activations are (N, ceil(C/V), H, W, V) and weights (ceil(K/V), ceil(C/V), R, S, V(c), V(k)),
with V = vector_width() (16 on AVX-512, 8 on AVX2) and missing channels zero-padded. bf16
activations are in the bf16 kernels' layout, (N, ceil(C/32), H, W, 32): V =
vector_width(torch.bfloat16).
"""

from __future__ import annotations

import torch

from . import _backend
from ._autograd import call_op
from .functional import IntOr2, _pair, conv_padding


def _require_jit(op: str) -> None:
    reason = _backend.no_jit_reason()
    if reason:
        raise RuntimeError(f"{op}: the blocked API needs the JIT, but {reason}")


def to_blocked(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) of any strides -> (N, ceil(C/V), H, W, V), zero-padded, V = vector_width(x.dtype):
    fp32 blocks of 16 (8 on AVX2), or bf16 rows of 32 channels (exact: the values are moved, not
    converted)."""
    _require_jit("to_blocked")
    return call_op(torch.ops.directconv.to_blocked.default, x, _backend.vector_width(x.dtype))


def from_blocked(xb: torch.Tensor, channels: int) -> torch.Tensor:
    """(N, ceil(C/V), H, W, V) -> (N, channels, H, W), fp32 or bf16 as xb (V 8 or 16 for fp32, 32 for bf16)."""
    _require_jit("from_blocked")
    return call_op(torch.ops.directconv.from_blocked.default, xb, channels)


def to_blocked_weight(w: torch.Tensor) -> torch.Tensor:
    """(K, C, R, S) -> (ceil(K/V), ceil(C/V), R, S, V, V), zero-padded, V = vector_width(w.dtype).

    A bf16 w gives the bf16 kernels' blocked weight (V = 32): bf16, each (kb, cb, r, s) block the
    forward kernels' 1024 packed values (pairs of input channels interleaved), which
    conv2d_blocked takes on bf16 activations. An fp32 w gives the fp32 layout; cast it to bf16
    first for the bf16 one (to_blocked_weight(w.bfloat16()))."""
    _require_jit("to_blocked_weight")
    return call_op(torch.ops.directconv.to_blocked_weight.default, w, _backend.vector_width(w.dtype))


def from_blocked_weight(wb: torch.Tensor, out_channels: int, in_channels: int) -> torch.Tensor:
    """(ceil(K/V), ceil(C/V), R, S, V, V) -> (out_channels, in_channels, R, S): to_blocked_weight's inverse."""
    _require_jit("from_blocked_weight")
    return call_op(torch.ops.directconv.from_blocked_weight.default, wb, out_channels, in_channels)


def _blocked_geometry(op: str, wb: torch.Tensor, stride, padding, dilation) -> tuple[list, list, list]:
    """(stride, padding (top, bottom, left, right), dilation) as the blocked convolution ops take
    them, after checking that the JIT is there and that wb is blocked or (K, C, R, S)."""
    _require_jit(op)
    if wb.dim() not in (4, 6):
        raise RuntimeError(
            f"{op}: expected a blocked 'wb' (K/V, C/V, R, S, V, V) or a (K, C, R, S) one, got shape {tuple(wb.shape)}"
        )
    stride2 = _pair(stride, "stride")
    dilation2 = _pair(dilation, "dilation")
    return list(stride2), list(conv_padding(padding, (wb.shape[2], wb.shape[3]), stride2, dilation2)), list(dilation2)


def conv2d_blocked(
    xb: torch.Tensor,
    wb: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: IntOr2 = 1,
    padding: str | IntOr2 = 0,
    dilation: IntOr2 = 1,
    *,
    relu: bool = False,
    in_channels: int | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """Convolution of blocked tensors (groups = 1); returns the blocked output with no conversion.

    wb is blocked (to_blocked_weight) or, as a module holds it, (K, C, R, S): the op then packs
    it within the call, and its gradient comes back as (K, C, R, S), so a training step has no
    separate packing or unpacking pass. in_channels, when given, lets the kernels skip the zero
    padding of the last channel block (for example the 3-channel image input); by default every
    channel is read (those of a (K, C, R, S) weight, C). residual, a blocked tensor of the
    output's shape, is added in the kernels' epilogue, after the bias and before the ReLU:
    relu(conv(xb, wb) + bias + residual).
    """
    stride2, pad4, dilation2 = _blocked_geometry("conv2d_blocked", wb, stride, padding, dilation)
    return call_op(
        torch.ops.directconv.conv2d_blocked.default,
        xb,
        wb,
        bias,
        stride2,
        pad4,
        dilation2,
        relu,
        in_channels,
        residual,
    )


def conv2d_blocked_stats(
    xb: torch.Tensor,
    wb: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: IntOr2 = 1,
    padding: str | IntOr2 = 0,
    dilation: IntOr2 = 1,
    *,
    channels: int,
    shift: torch.Tensor | None = None,
    in_channels: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """conv2d_blocked with the batch statistics of its first `channels` output channels:
    (yb, mean, biased variance over N, H, W), the statistics from the kernels' epilogue.

    shift (channels,) should lie near each channel's mean (a batch norm's running mean does):
    the epilogue sums y - shift in fp32 over a few pixels, and where a mean is more than a few
    standard deviations from its shift the statistics are recomputed exactly in one more pass
    (jit_stats()['conv_stats_recomputed'] counts those). By default the shift is 0. mean and
    var carry no gradient (a batch norm's training backward differentiates through them).
    """
    stride2, pad4, dilation2 = _blocked_geometry("conv2d_blocked_stats", wb, stride, padding, dilation)
    if shift is None:
        shift = xb.new_zeros(channels)
    return call_op(
        torch.ops.directconv.conv2d_blocked_stats.default,
        xb,
        wb,
        bias,
        stride2,
        pad4,
        dilation2,
        in_channels,
        shift,
        channels,
    )
