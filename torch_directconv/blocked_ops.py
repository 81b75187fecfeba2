"""Batch norm and pooling on blocked activations, the element-wise ops of a model kept blocked.

Every function takes a blocked fp32 tensor xb of shape (N, ceil(C/V), H, W, V), V =
vector_width(), and its real channel count C (`channels`); channel c is xb[:, c // V, :, :, c % V].
Outputs are blocked the same way (except global_avg_pool, which leaves the layout), and their
padded lanes (channels C and up) are exactly zero, as are those of every gradient, whatever
the inputs hold there. All are differentiable, with backward passes made of the project's own
ops (torch.ops.directconv.*), and traceable by torch.compile(fullgraph=True).

bf16: every function also takes xb of bfloat16 in the bf16 kernels' layout (N, ceil(C/32), H,
W, 32) (to_blocked of a bf16 tensor), on the avx512_bf16 level or above (below it, or with
TORCH_DIRECTCONV_ISA capping it, a bf16 call is an error that says so). The other activations
of a call (residual, and in the backward the gradients) are of xb's dtype; a mix is an error.
The arithmetic is fp32 (sums in double), each bf16 output rounded once to nearest even.
Per-channel tensors stay fp32: statistics, weight and bias, and their gradients; bf16 ones
(a model moved with .to(torch.bfloat16)) are read as fp32, and bf16 running statistics are
updated in fp32 and written back rounded.

    xb = tdc.to_blocked(x)
    yb = blocked_ops.batch_norm(xb, 64, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                training=True, momentum=0.1, eps=1e-5, residual=rb, relu=True)
    yb = blocked_ops.max_pool2d(yb, 64, 3, stride=2, padding=1)
    logits = fc(blocked_ops.global_avg_pool(yb, 2048))
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _blocked_ops  # noqa: F401  (fake kernels and autograd)
from ._autograd import call_op
from .blocked import _require_jit

ops = torch.ops.directconv

IntOr2 = int | Sequence[int]


def _pair(op: str, name: str, value: IntOr2) -> list[int]:
    items = list(value) if isinstance(value, (list, tuple, torch.Size)) else [value]
    if len(items) == 1:
        items *= 2
    if len(items) != 2 or not all(isinstance(v, int) for v in items):
        raise RuntimeError(f"{op}: expected '{name}' to be an int or a pair of ints, got {value!r}")
    return items


def bn_stats(xb: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel batch mean and biased variance over (N, H, W), each of shape (C,).

    Summed in double, shifted by each channel's first value, so a large mean costs no digits
    (torch.var_mean(x, (0, 2, 3), unbiased=False) to fp32 rounding). NaN when N * H * W = 0.
    fp32 for a bf16 xb too (the statistics of its bf16 values).
    """
    _require_jit("bn_stats")
    return call_op(ops.bn_stats_blocked.default, xb, channels)


def bn_apply(
    xb: torch.Tensor,
    channels: int,
    scale: torch.Tensor,
    shift: torch.Tensor,
    residual: torch.Tensor | None = None,
    relu: bool = False,
) -> torch.Tensor:
    """y = x * scale[c] + shift[c] (+ residual), then ReLU when asked, in one pass (a folded batch norm).

    On a bf16 xb (and residual) y is bf16, computed in fp32 with fp32 (or bf16 read as fp32)
    scale and shift and rounded once; their gradients are fp32."""
    _require_jit("bn_apply")
    return call_op(ops.bn_apply_blocked.default, xb, scale, shift, residual, relu, channels)


def batch_norm(
    xb: torch.Tensor,
    channels: int,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    residual: torch.Tensor | None = None,
    relu: bool = False,
    num_batches_tracked: torch.Tensor | None = None,
    stats: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """F.batch_norm on a blocked tensor, then + residual and ReLU when given, fused.

    As F.batch_norm: in training the batch statistics normalise, and running_mean / running_var
    (when given) are updated in place with `momentum`, the variance unbiased; otherwise the
    running statistics normalise. As nn.BatchNorm2d, a num_batches_tracked counter (when given)
    counts the training batches, and momentum=None makes the running statistics their cumulative
    average. The forward reads xb twice in training (statistics, then the fused apply) and once
    in eval; the backward takes at most two passes. In training, `stats` may give xb's batch
    (mean, biased variance) when they are known already (conv2d_blocked_stats computes them in
    the convolution's epilogue): xb is then read once.

    On a bf16 xb (and residual) the output is bf16, rounded once from fp32; the batch statistics
    are fp32; running statistics, weight and bias may be fp32 or bf16 (read as fp32; bf16
    running statistics are written back rounded), and the gradients of weight and bias are
    computed in fp32.
    """
    _require_jit("batch_norm")
    if training:
        n, _, h, w, _ = xb.shape
        if n * h * w == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(xb.shape)}")
        # The statistics' own gradient is folded into batch_norm_blocked's backward.
        if stats is None:
            mean, var = call_op(ops.bn_stats_blocked.default, xb.detach(), channels)
        else:
            mean, var = stats
        update_running_stats(running_mean, running_var, num_batches_tracked, mean, var, n * h * w, momentum)
    else:
        if running_mean is None or running_var is None:
            raise RuntimeError("batch_norm: running_mean and running_var must be defined in evaluation mode")
        mean, var = running_mean, running_var
    return call_op(ops.batch_norm_blocked.default, xb, mean, var, weight, bias, residual, eps, relu, training, channels)


def update_running_stats(
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    num_batches_tracked: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    count: int,
    momentum: float | None,
) -> None:
    """The running statistics after a training batch of `count` values per channel with batch
    `mean` and biased `var`, as nn.BatchNorm2d updates them: num_batches_tracked (when given)
    counts the batch; running = factor * batch + (1 - factor) * running, the variance unbiased
    (var * count / (count - 1)), factor = momentum, or with momentum=None 1 / num_batches_tracked
    (the cumulative average; 0 without a counter, as torch). Absent statistics are skipped.

    One op (directconv::bn_update_running_stats, in place; the rule is C++'s,
    dc::update_running_stats): a chain of small torch ops costs more than the blocked loops on
    ResNet's 7x7 maps. Inside a torch.compile graph it is functionalized like any in-place op.
    bf16 running statistics are updated in fp32 and written back rounded to nearest even; mean
    and var may be fp32 or bf16 (read as fp32)."""
    ops.bn_update_running_stats(running_mean, running_var, num_batches_tracked, mean, var, count, momentum)


def max_pool2d(
    xb: torch.Tensor,
    channels: int,
    kernel_size: IntOr2,
    stride: IntOr2 | None = None,
    padding: IntOr2 = 0,
    dilation: IntOr2 = 1,
    ceil_mode: bool = False,
) -> torch.Tensor:
    """F.max_pool2d on a blocked tensor (NaN propagates; the first maximum of a window gets the
    gradient). The backward finds each window's maximum again from xb, so no indices are kept.
    On bf16 the output and gradient are bf16 (maxima exact, each gradient summed in fp32 and
    rounded once)."""
    _require_jit("max_pool2d")
    op = "max_pool2d"
    k = _pair(op, "kernel_size", kernel_size)
    s = k if stride is None or stride == [] else _pair(op, "stride", stride)
    p, d = _pair(op, "padding", padding), _pair(op, "dilation", dilation)
    return call_op(ops.max_pool2d_blocked.default, xb, k, s, p, d, ceil_mode, channels)


def avg_pool2d(
    xb: torch.Tensor,
    channels: int,
    kernel_size: IntOr2,
    stride: IntOr2 | None = None,
    padding: IntOr2 = 0,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    divisor_override: int | None = None,
) -> torch.Tensor:
    """F.avg_pool2d on a blocked tensor, with torch's divisor rules. On bf16 the output and the
    gradient are bf16, each summed in fp32 and rounded once."""
    _require_jit("avg_pool2d")
    op = "avg_pool2d"
    k = _pair(op, "kernel_size", kernel_size)
    s = k if stride is None or stride == [] else _pair(op, "stride", stride)
    p = _pair(op, "padding", padding)
    return call_op(
        ops.avg_pool2d_blocked.default, xb, k, s, p, ceil_mode, count_include_pad, divisor_override, channels
    )


def global_avg_pool(xb: torch.Tensor, channels: int) -> torch.Tensor:
    """The mean over (H, W): an unblocked (N, C) tensor, the exit to the classifier.

    Of xb's dtype: on bf16 the fp32 mean rounded once (as torch's mean of a bf16 tensor); its
    gradient is bf16 blocked, from a bf16 or fp32 grad."""
    _require_jit("global_avg_pool")
    return call_op(ops.global_avg_pool_blocked.default, xb, channels)


__all__ = ["avg_pool2d", "batch_norm", "bn_apply", "bn_stats", "global_avg_pool", "max_pool2d"]
