"""DirectConv2d, a drop-in nn.Conv2d, and convert() for whole models."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from . import _backend
from .functional import _check, _pair, conv2d_packed, conv_padding, fallback_reason, pack_weight


class DirectConv2d(nn.Conv2d):
    """nn.Conv2d whose forward runs on JIT-generated direct-convolution kernels.

    Same constructor, parameters, initialisation and state_dict keys as nn.Conv2d, so an
    nn.Conv2d state_dict loads into it and back. The weights are packed into the blocked
    layout once and re-packed only when they change (tracked by the tensor's version).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._packed: torch.Tensor | None = None
        self._packed_key: tuple | None = None
        self._geometry_cache: tuple | None = None

    @classmethod
    def from_conv2d(cls, conv: nn.Conv2d) -> "DirectConv2d":
        """A DirectConv2d that shares conv's parameters (and so its state_dict)."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"DirectConv2d.from_conv2d: expected an nn.Conv2d, got {type(conv).__name__}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.__dict__.update({k: v for k, v in conv.__dict__.items() if k not in ("_parameters", "_buffers", "_modules")})
        new._parameters = dict(conv._parameters)
        new._buffers = dict(conv._buffers)
        new._modules = dict(conv._modules)
        new._packed = None
        new._packed_key = None
        new._geometry_cache = None
        return new

    def _packed_weight(self, weight: torch.Tensor) -> torch.Tensor:
        key = (weight.data_ptr(), weight._version, tuple(weight.shape), weight.stride(), self.groups, _backend.isa())
        if self._packed is None or self._packed_key != key:
            self._packed = pack_weight(weight, self.groups)
            self._packed_key = key
        return self._packed

    def _geometry(self) -> tuple[tuple[int, int], tuple[int, int, int, int], tuple[int, int]]:
        """(stride, (top, bottom, left, right) padding, dilation), recomputed when they change."""
        key = (self.stride, self.padding, self.dilation, self.kernel_size, self.padding_mode)
        if self._geometry_cache is None or self._geometry_cache[0] != key:
            stride = _pair(self.stride, "stride")
            dilation = _pair(self.dilation, "dilation")
            # Other padding modes pad the input explicitly first.
            padding = self.padding if self.padding_mode == "zeros" else (0, 0)
            self._geometry_cache = (key, (stride, conv_padding(padding, self.kernel_size, stride, dilation), dilation))
        return self._geometry_cache[1]

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.padding_mode != "zeros":
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding: tuple | str = (0, 0)
        else:
            padding = self.padding
        reason = fallback_reason(input, weight, bias, self.groups) if input.dim() in (3, 4) else "bad input"
        if reason:
            if reason != "bad input":
                _backend.note_fallback(reason)
            return F.conv2d(input, weight, bias, self.stride, padding, self.dilation, self.groups)
        _check(input, weight, bias, self.groups)
        stride, pad4, dilation = self._geometry()
        return conv2d_packed(
            input, self._packed_weight(weight), bias, self.out_channels, stride, pad4, dilation, self.groups
        )

    def __getstate__(self):
        state = super().__getstate__()
        state = dict(state)
        state["_packed"] = None
        state["_packed_key"] = None
        state["_geometry_cache"] = None
        return state


def _convertible(m: nn.Module) -> bool:
    # Subclasses that change what forward computes are left alone.
    t = type(m)
    return (
        isinstance(m, nn.Conv2d)
        and not isinstance(m, DirectConv2d)
        and t.forward is nn.Conv2d.forward
        and t._conv_forward is nn.Conv2d._conv_forward
    )


def convert(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Replaces every nn.Conv2d in model, recursively, by a DirectConv2d, and returns the model.

    With inplace=False the model is deep-copied first; with inplace=True the replacements
    share the original parameters, so an optimizer built before still updates them.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: expected an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    if _convertible(model):
        return DirectConv2d.from_conv2d(model)
    for name, child in model.named_children():
        if _convertible(child):
            setattr(model, name, DirectConv2d.from_conv2d(child))
        else:
            convert(child, inplace=True)
    return model
