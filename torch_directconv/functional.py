"""torch_directconv.conv2d: F.conv2d's signature and semantics, on JIT kernels."""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from . import _backend
from ._autograd import call_op

IntOr2 = int | Sequence[int]


def _shown(value: object) -> str:
    """value's repr, or its type's name where the repr runs long (a tensor's shows its data)."""
    text = repr(value)
    return text if len(text) <= 40 else type(value).__name__


_INT64 = range(-(2**63), 2**63)


def _int(value: object, name: str, expected: str = "an int", in_list: bool = False) -> int:
    """An int, or anything torch takes as one (numpy integers, 0-d integer tensors), within
    int64 as torch's arguments are: past it torch raises ValueError, or TypeError for an
    item of a list."""
    if not isinstance(value, (bool, float)):
        try:
            v = operator.index(value)
        except TypeError:
            pass
        else:
            if v in _INT64:
                return v
            error = TypeError if in_list else ValueError
            raise error(f"conv2d: '{name}' of {v} does not fit a 64-bit integer")
    raise TypeError(f"conv2d: expected '{name}' as {expected}, got {_shown(value)}")


def _pair(value: IntOr2, name: str) -> tuple[int, int]:
    expected = "an int or a pair of ints"
    if isinstance(value, (list, tuple, torch.Size)):
        items = [_int(v, name, expected, in_list=True) for v in value]
        if len(items) == 1:
            items *= 2
        if len(items) != 2:
            raise RuntimeError(f"conv2d: expected '{name}' to be a single int or a list of 2 values, got {list(value)}")
        return (items[0], items[1])
    v = _int(value, name, expected)
    return (v, v)


def conv_padding(
    padding: str | IntOr2, kernel_size: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int]
) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) for an int, a pair, 'same' or 'valid', as torch reads them."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding == "same":
            if stride != (1, 1):
                raise RuntimeError("conv2d: padding='same' is not supported for strided convolutions")
            th, tw = (dilation[0] * (kernel_size[0] - 1), dilation[1] * (kernel_size[1] - 1))
            return (th // 2, th - th // 2, tw // 2, tw - tw // 2)
        raise RuntimeError(f"conv2d: invalid padding string {padding!r}, should be one of 'valid', 'same'")
    ph, pw = _pair(padding, "padding")
    if ph < 0 or pw < 0:
        raise RuntimeError(f"conv2d: expected non-negative 'padding', got {padding!r}")
    return (ph, ph, pw, pw)


def _check_types(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"conv2d: expected 'input' to be a Tensor, got {type(input).__name__}")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"conv2d: expected 'weight' to be a Tensor, got {type(weight).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"conv2d: expected 'bias' to be a Tensor or None, got {type(bias).__name__}")


def op_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype the ops compute t in: under CPU autocast, as for torch's convolution, floating
    tensors other than float64 are cast to the autocast type (the ops' autocast kernels do it)."""
    if t.is_floating_point() and t.dtype != torch.float64 and torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu")
    return t.dtype


def _check(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, groups: int) -> None:
    _check_types(input, weight, bias)
    if input.dim() not in (3, 4):
        raise RuntimeError(
            f"conv2d: expected a 3-D (C, H, W) or 4-D (N, C, H, W) 'input', got shape {tuple(input.shape)}"
        )
    if weight.dim() != 4:
        raise RuntimeError(f"conv2d: expected a 4-D 'weight' (K, C/groups, R, S), got shape {tuple(weight.shape)}")
    if groups < 1:
        raise RuntimeError(f"conv2d: expected 'groups' to be a positive int, got {groups!r}")
    input_dtype, weight_dtype = op_dtype(input), op_dtype(weight)
    if input_dtype != weight_dtype:
        raise RuntimeError(f"conv2d: 'input' ({input_dtype}) and 'weight' ({weight_dtype}) must have the same dtype")
    if bias is not None and op_dtype(bias) != weight_dtype:
        raise RuntimeError(f"conv2d: 'bias' ({op_dtype(bias)}) and 'weight' ({weight_dtype}) must have the same dtype")
    c = input.shape[-3]
    if weight.shape[0] < groups:
        raise RuntimeError(
            f"conv2d: expected 'weight' to have at least groups={groups} output channels, got shape "
            f"{tuple(weight.shape)}"
        )
    if weight.shape[0] % groups:
        raise RuntimeError(
            f"conv2d: 'groups' ({groups}) must divide the output channels of 'weight' ({weight.shape[0]})"
        )
    if c % groups:
        raise RuntimeError(f"conv2d: 'groups' ({groups}) must divide the input channels ({c})")
    if c != weight.shape[1] * groups:
        raise RuntimeError(
            f"conv2d: 'input' has {c} channels, but 'weight' of shape {tuple(weight.shape)} with groups={groups} "
            f"expects {weight.shape[1] * groups}"
        )
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise RuntimeError(f"conv2d: expected 'bias' of shape ({weight.shape[0]},), got {tuple(bias.shape)}")


def fallback_reason(
    input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, groups: int = 1
) -> str | None:
    """Why this call must go to torch's convolution, or None when the JIT takes it."""
    reason = _backend.no_jit_reason()
    if reason:
        return reason
    for name, t in (("input", input), ("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.device.type != "cpu":
            return f"'{name}' is on {t.device.type}, not the CPU"
        dtype = op_dtype(t)
        if dtype not in (torch.float32, torch.bfloat16):
            return f"dtype {dtype} is not supported (float32 and bfloat16 only)"
    if input.shape[-3] == 0:
        # torch gives an output with no channels here, whatever the weight and bias.
        return "'input' has no channels"
    if op_dtype(weight) == torch.bfloat16:
        return _backend.bf16_fallback_reason(groups)
    if groups > 1 and not _backend.jit_covers_groups(groups, weight.shape[0], weight.shape[1]):
        kg, cg = weight.shape[0] // groups, weight.shape[1]
        return f"grouped convolutions with {cg} input and {kg} output channels per group are not covered by the JIT"
    return None


def conv2d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: IntOr2 = 1,
    padding: str | IntOr2 = 0,
    dilation: IntOr2 = 1,
    groups: int = 1,
    *,
    relu: bool = False,
) -> torch.Tensor:
    """Same as torch.nn.functional.conv2d; relu=True fuses a ReLU into the kernel's epilogue."""
    # As torch: every argument is parsed, in order, before any shape is checked; and as its
    # parser, the items of the lists first (an item past int64 is its TypeError), then the bare
    # ints (past int64: ValueError, when the op reads them).
    _check_types(input, weight, bias)
    for value, name in ((stride, "stride"), (padding, "padding"), (dilation, "dilation")):
        if isinstance(value, (list, tuple, torch.Size)):
            _pair(value, name)
    stride2 = _pair(stride, "stride")
    if not isinstance(padding, str):
        _pair(padding, "padding")
    dilation2 = _pair(dilation, "dilation")
    groups = _int(groups, "groups")
    _check(input, weight, bias, groups)
    if min(stride2) < 1:
        raise RuntimeError(f"conv2d: expected 'stride' >= 1, got {stride!r}")
    if min(dilation2) < 1:
        raise RuntimeError(f"conv2d: expected 'dilation' >= 1, got {dilation!r}")
    pad4 = conv_padding(padding, (weight.shape[2], weight.shape[3]), stride2, dilation2)
    reason = fallback_reason(input, weight, bias, groups)
    if reason:
        _backend.note_fallback(reason)
        out = F.conv2d(input, weight, bias, stride, padding, dilation, groups)
        return torch.relu(out) if relu else out
    unbatched = input.dim() == 3
    x = input.unsqueeze(0) if unbatched else input
    out = call_op(
        torch.ops.directconv.conv2d.default, x, weight, bias, list(stride2), list(pad4), list(dilation2), groups, relu
    )
    return out.squeeze(0) if unbatched else out


def conv2d_packed(
    input: torch.Tensor,
    packed_weight: torch.Tensor,
    bias: torch.Tensor | None,
    out_channels: int,
    stride: tuple[int, int],
    padding: tuple[int, int, int, int],
    dilation: tuple[int, int],
    groups: int,
    relu: bool = False,
    channels_last: bool = False,
) -> torch.Tensor:
    """conv2d on a 4-D input with weights packed by pack_weight (as DirectConv2d caches them).

    channels_last asks for a channels_last output, as torch gives when the weight is.
    """
    return torch.ops.directconv.conv2d_packed(
        input,
        packed_weight,
        bias,
        out_channels,
        list(stride),
        list(padding),
        list(dilation),
        groups,
        relu,
        channels_last,
    )


def pack_weight(weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """(K, C/groups, R, S) -> (groups, K/V, C/V, R, S, V, V) for the active ISA."""
    return torch.ops.directconv.pack_weight(weight, groups)


def pack_weight_bf16(weight: torch.Tensor) -> torch.Tensor:
    """(K, C, R, S) fp32 or bf16 -> the bf16 kernels' packed weights (flat, both levels'), rounded to nearest even."""
    return torch.ops.directconv.pack_weight_bf16(weight)


def conv2d_packed_bf16(
    input: torch.Tensor,
    packed_weight: torch.Tensor,
    bias: torch.Tensor | None,
    weight_size: Sequence[int],
    stride: tuple[int, int],
    padding: tuple[int, int, int, int],
    dilation: tuple[int, int],
    relu: bool = False,
    channels_last: bool = False,
) -> torch.Tensor:
    """conv2d on a 4-D bf16 input (cast from fp32 under autocast) with weights packed by pack_weight_bf16."""
    return torch.ops.directconv.conv2d_packed_bf16(
        input, packed_weight, bias, list(weight_size), list(stride), list(padding), list(dilation), relu, channels_last
    )
