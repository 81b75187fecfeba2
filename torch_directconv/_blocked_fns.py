"""The element-wise work of a blocked model (batch norm, residual add, ReLU, pooling), on
activations in the blocked layout (N, ceil(C/V), H, W, V) whose padded lanes are zero.

These are the functions optimize()'s graphs call. They are written in plain torch ops on the
5-D tensors (differentiable through torch's autograd, except bn_train_blocked, whose backward
is bn_backward_blocked): correct, not fast. Fused C++ ops with the same signatures replace
them here, and only here.

Every function keeps the invariant that the padded lanes of its blocked outputs are zero:
per-channel vectors (scale, shift) are zero-padded to whole blocks before they touch a tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _lanes(v: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:
    """A per-channel vector (C,) zero-padded to (1, Cb, 1, 1, V), to broadcast against xb."""
    cb, vlen = xb.shape[1], xb.shape[4]
    return F.pad(v, (0, cb * vlen - v.shape[0])).view(1, cb, 1, 1, vlen)


def _per_channel(t: torch.Tensor, channels: int) -> torch.Tensor:
    """(Cb, V) per-lane values -> (channels,), dropping the padded lanes."""
    return t.reshape(-1)[:channels]


def bn_stats_blocked(xb: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased variance) per channel over N, H and W, each of shape (channels,).

    Two passes: the mean, then the mean of the squared deviations from it, which stays accurate
    for maps whose mean is large against their spread (E[x^2] - E[x]^2 in fp32 does not).
    """
    mean = xb.mean((0, 2, 3), keepdim=True)
    var = (xb - mean).square_().mean((0, 2, 3))
    return _per_channel(mean, channels), _per_channel(var, channels)


def bn_apply_blocked(
    xb: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    residual: torch.Tensor | None,
    relu: bool,
    channels: int,
) -> torch.Tensor:
    """relu?(xb * scale + shift + residual?) with per-channel scale and shift of shape (channels,).

    The padded lanes get scale 0 and shift 0, so they stay zero (a batch norm's shift would
    otherwise leak into them).
    """
    if scale.shape[0] != channels or shift.shape[0] != channels:
        raise RuntimeError(
            f"bn_apply_blocked: expected scale and shift of shape ({channels},), got {tuple(scale.shape)} and "
            f"{tuple(shift.shape)}"
        )
    # In place after the first op: fresh outputs of each op would cost more than the arithmetic.
    y = torch.addcmul(_lanes(shift, xb), xb, _lanes(scale, xb))
    if residual is not None:
        # A residual that broadcasts y to a larger shape cannot be added in place.
        y = y.add_(residual) if residual.shape == y.shape else y + residual
    return y.relu_() if relu else y


def bn_backward_blocked(
    grad_yb: torch.Tensor,
    xb: torch.Tensor,
    yb: torch.Tensor | None,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor | None,
    channels: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward of y = relu?(batch_norm(x) + residual?) in training, in two passes.

    yb is the forward's output when it had a ReLU (its zeros mask the gradient), else None.
    Returns (grad_x, grad_weight, grad_bias, grad_z), where grad_z is the gradient after the
    ReLU's mask: the residual's gradient. Pass 1 reduces sum(g) and sum(g * xhat) per channel;
    pass 2 writes grad_x.
    """
    # The ReLU's backward as torch's own: no gradient where the output is <= 0.
    g = grad_yb if yb is None else torch.ops.aten.threshold_backward(grad_yb, yb, 0)
    m = xb.numel() // (xb.shape[1] * xb.shape[4])
    xhat = torch.addcmul(_lanes(-mean * invstd, xb), xb, _lanes(invstd, xb))
    sum_g = _per_channel(g.sum((0, 2, 3)), channels)
    sum_gx = _per_channel((g * xhat).sum((0, 2, 3)), channels)
    scale = invstd if weight is None else invstd * weight
    # grad_x = scale * (g - sum_g / m - xhat * sum_gx / m), in place after the first product.
    grad_x = (g * _lanes(scale, xb)).sub_(_lanes(scale * sum_g / m, xb))
    grad_x.addcmul_(xhat, _lanes(scale * sum_gx / m, xb), value=-1)
    return grad_x, sum_gx, sum_g, g


class _BnTrain(torch.autograd.Function):
    """Batch norm with batch statistics, then the residual add and the ReLU: one pass each way
    for the output (after the statistics), two for the gradients."""

    @staticmethod
    def forward(ctx, xb, weight, bias, residual, relu, channels, eps):
        mean, var = bn_stats_blocked(xb, channels)
        invstd = torch.rsqrt(var + eps)
        scale = invstd if weight is None else invstd * weight
        shift = -mean * scale if bias is None else bias - mean * scale
        yb = bn_apply_blocked(xb, scale, shift, residual, relu, channels)
        ctx.save_for_backward(xb, yb if relu else None, mean, invstd, weight)
        ctx.channels = channels
        ctx.mark_non_differentiable(mean, var)
        return yb, mean, var

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_yb, _grad_mean, _grad_var):
        xb, yb, mean, invstd, weight = ctx.saved_tensors
        grad_x, grad_w, grad_b, grad_z = bn_backward_blocked(
            grad_yb.contiguous(), xb, yb, mean, invstd, weight, ctx.channels
        )
        needs = ctx.needs_input_grad
        return (
            grad_x if needs[0] else None,
            grad_w if needs[1] else None,
            grad_b if needs[2] else None,
            grad_z if needs[3] else None,
            None,
            None,
            None,
        )


def bn_train_blocked(
    xb: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    relu: bool,
    channels: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(relu?(batch_norm(xb) + residual?), batch mean, biased batch variance), batch norm with
    the batch's statistics; differentiable in xb, weight, bias and residual."""
    return _BnTrain.apply(xb, weight, bias, residual, relu, channels, eps)


def _as_channels_last(xb: torch.Tensor) -> torch.Tensor:
    """(N, Cb, H, W, V) viewed, with no copy, as the channels_last tensor (N * Cb, V, H, W): each
    channel block an image, so torch's channels_last kernels pool every lane on its own."""
    n, cb, h, w, v = xb.shape
    return xb.reshape(n * cb, h, w, v).permute(0, 3, 1, 2)


def _from_channels_last(y: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:
    n, cb = xb.shape[:2]
    return y.permute(0, 2, 3, 1).reshape(n, cb, y.shape[2], y.shape[3], xb.shape[4])


def max_pool2d_blocked(xb: torch.Tensor, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
    """F.max_pool2d of the channels of xb, blocked in and out (padded lanes: max of zeros)."""
    y = F.max_pool2d(_as_channels_last(xb), kernel_size, stride, padding, dilation, ceil_mode)
    return _from_channels_last(y, xb)


def avg_pool2d_blocked(
    xb: torch.Tensor,
    kernel_size,
    stride=None,
    padding=0,
    ceil_mode=False,
    count_include_pad=True,
    divisor_override=None,
):
    """F.avg_pool2d of the channels of xb, blocked in and out (padded lanes: mean of zeros)."""
    y = F.avg_pool2d(
        _as_channels_last(xb), kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override
    )
    return _from_channels_last(y, xb)


def global_avg_pool_blocked(xb: torch.Tensor, channels: int) -> torch.Tensor:
    """The mean over H and W of each channel: (N, Cb, H, W, V) -> (N, channels)."""
    pooled = xb.mean((2, 3)).reshape(xb.shape[0], xb.shape[1] * xb.shape[4])
    return pooled if pooled.shape[1] == channels else pooled[:, :channels].contiguous()


def spatial_mean_blocked(xb: torch.Tensor) -> torch.Tensor:
    """The mean over H and W, kept blocked: (N, Cb, H, W, V) -> (N, Cb, 1, 1, V)."""
    return xb.mean((2, 3), keepdim=True)
