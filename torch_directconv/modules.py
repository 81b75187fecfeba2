"""DirectConv2d, a drop-in nn.Conv2d, and convert() for whole models."""

from __future__ import annotations

import copy
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.utils import parametrize
from torch.nn.utils.weight_norm import WeightNorm

from . import _backend
from ._autograd import call_op
from .functional import (
    _check,
    _pair,
    conv2d_packed,
    conv2d_packed_bf16,
    conv_padding,
    fallback_reason,
    op_dtype,
    pack_weight,
    pack_weight_bf16,
)

# The smallest image the NCHW 1x1 GEMM takes (C++'s, read once).
_NCHW_GEMM_MIN_PIXELS = _backend._C.nchw_gemm_min_pixels() if _backend._C is not None else 2**63


class DirectConv2d(nn.Conv2d):
    """nn.Conv2d whose forward runs on JIT-generated direct-convolution kernels.

    Same constructor, parameters, initialisation and state_dict keys as nn.Conv2d, so an
    nn.Conv2d state_dict loads into it and back.

    By default each call packs the weight into the blocked layout, so the output always
    follows the weight exactly. With ``cache_weights=True`` (for inference) the packed
    weight is kept and packed again only when PyTorch records a change to the weight: a
    new tensor or Parameter (``weight.data = ...`` included), or an in-place update that
    bumps its version counter (optimizer steps, ``load_state_dict``, ``copy_`` under
    ``no_grad``). Writes PyTorch does not see cannot be detected: in-place writes through
    ``weight.data``, through a numpy view (``weight.detach().numpy()[...] = ...``) or
    through DLPack. After those, call ``refresh_packed_weight()``.
    """

    def __init__(self, *args, cache_weights: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.cache_weights = cache_weights
        self._reset_caches()

    def _reset_caches(self) -> None:
        self.refresh_packed_weight()
        self._geometry_cache: tuple | None = None
        # (signature, the op's geometry arguments) of the last call that passed every check and
        # went to the op with the weight as it is (see _signature).
        self._call_cache: tuple | None = None

    @classmethod
    def from_conv2d(cls, conv: nn.Conv2d, cache_weights: bool = False) -> DirectConv2d:
        """A DirectConv2d that shares conv's parameters, buffers, parametrizations and hooks.

        An unmaterialised nn.LazyConv2d gives a LazyDirectConv2d, which becomes a DirectConv2d
        on its first forward, as nn.LazyConv2d becomes an nn.Conv2d.
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"DirectConv2d.from_conv2d: expected an nn.Conv2d, got {type(conv).__name__}")
        new_cls = LazyDirectConv2d if isinstance(conv, LazyModuleMixin) else cls
        new = new_cls.__new__(new_cls)
        nn.Module.__init__(new)
        new.__dict__.update(
            {k: v for k, v in conv.__dict__.items() if k not in ("_parameters", "_buffers", "_modules")}
        )
        new._parameters = dict(conv._parameters)
        new._buffers = dict(conv._buffers)
        new._modules = dict(conv._modules)
        if parametrize.is_parametrized(conv):
            # A parametrized tensor is a property of a class made for the one module (torch's
            # Parametrized<Class>), bound to it (its cache is keyed by that module): new gets a
            # class and properties of its own, made as register_parametrization makes them.
            parametrize._inject_new_class(new)
            for name in conv.parametrizations:
                parametrize._inject_property(new, name)
        new.cache_weights = cache_weights
        new._reset_caches()
        return new

    def refresh_packed_weight(self) -> None:
        """Forgets the cached packed weight (needed only after writes PyTorch does not see)."""
        self._packed: torch.Tensor | None = None
        # The exact tensor that was packed, as an alias (same storage, offset, sizes, strides;
        # no copy): it keeps that storage alive, so no new weight can be given its address.
        self._packed_alias: torch.Tensor | None = None
        # Which Parameter: one made from weight.data shares the storage, not the version counter.
        self._packed_param: weakref.ref | None = None
        self._packed_key: tuple | None = None  # (version, groups, isa, bf16)

    def _packed_weight(self, weight: torch.Tensor, bf16: bool = False) -> torch.Tensor:
        """The packing for the fp32 kernels, or with bf16 for the bf16 kernels (of an fp32
        weight too, as autocast casts it: rounded to nearest even)."""
        # An inference tensor has no version counter to watch, and a weight computed in forward
        # (a parametrization) is new at every call: nothing to cache.
        pack = pack_weight_bf16 if bf16 else lambda w: pack_weight(w, self.groups)
        if weight.is_inference() or weight is not self._parameters.get("weight"):
            return pack(weight)
        key = (weight._version, self.groups, _backend.isa(), bf16)
        if (
            self._packed_alias is None
            or not weight.is_set_to(self._packed_alias)
            or self._packed_param() is not weight
            or self._packed_key != key
        ):
            self.refresh_packed_weight()  # frees the old packing before the new one is made
            self._packed = pack(weight)
            self._packed_alias = weight.detach()
            self._packed_param = weakref.ref(weight)
            self._packed_key = key
        return self._packed

    def _apply(self, fn, recurse: bool = True):
        # .to(), .double(), .cuda() replace the weight: drop the packing and its alias now, not
        # at a next cached call, which a dtype or a device torch computes may never make.
        self.refresh_packed_weight()
        return super()._apply(fn, recurse)

    def _nchw_gemm(self, x: torch.Tensor, weight: torch.Tensor, stride: tuple, pad4: tuple) -> bool:
        """Whether the op takes its NCHW 1x1 GEMM (no packing, no layout conversion), and it
        beats the cached packing: the C++ rule (conv/paths.h), asked only for images large
        enough for it."""
        if self.kernel_size != (1, 1) or self.groups != 1 or stride != (1, 1) or any(pad4):
            return False
        if x.shape[2] * x.shape[3] < _NCHW_GEMM_MIN_PIXELS:
            return False
        return (
            x.is_contiguous()
            and weight.is_contiguous()
            and not _backend.is_channels_last(x)
            and not _backend.is_channels_last(weight)
            and _backend._C.nchw_gemm_applies(x.shape[1], x.shape[2], x.shape[3], weight.shape[0])
        )

    def _geometry(self) -> tuple[tuple[int, int], tuple[int, int, int, int], tuple[int, int]]:
        """(stride, (top, bottom, left, right) padding, dilation), recomputed when they change."""
        key = (self.stride, self.padding, self.dilation, self.kernel_size, self.padding_mode)
        if self._geometry_cache is not None and self._geometry_cache[0] == key:
            return self._geometry_cache[1]
        stride = _pair(self.stride, "stride")
        dilation = _pair(self.dilation, "dilation")
        # Other padding modes pad the input explicitly first.
        padding = self.padding if self.padding_mode == "zeros" else (0, 0)
        geometry = (stride, conv_padding(padding, self.kernel_size, stride, dilation), dilation)
        # While torch.compile traces, a write to the module would become a guard (and a
        # recompile on the next call): the geometry is only computed then, not cached.
        if not torch.compiler.is_compiling():
            self._geometry_cache = (key, geometry)
        return geometry

    def _signature(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple:
        """What the checks, the fallback choice and the geometry of a call depend on: the
        tensors' shapes, dtypes and devices, the module's settings and the active ISA. A call
        whose signature is that of the last checked one runs with no check repeated."""
        return (
            input.shape,
            input.dtype,
            input.device,
            weight.shape,
            weight.dtype,
            weight.device,
            None if bias is None else (bias.shape, bias.dtype, bias.device),
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            self.padding_mode,
            self.cache_weights,
            _backend.isa(),
            torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"),
        )

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # A graph being recorded never reads the cache (torch.compile would guard on it).
        entry = None if torch.compiler.is_compiling() or torch._C._get_tracing_state() else self._call_cache
        if entry is not None and type(input) is torch.Tensor and entry[0] == self._signature(input, weight, bias):
            x = input.unsqueeze(0) if input.dim() == 3 else input
            out = call_op(torch.ops.directconv.conv2d.default, x, weight, bias, *entry[1])
            return out.squeeze(0) if input.dim() == 3 else out
        if self.padding_mode != "zeros":
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding: tuple | str = (0, 0)
        else:
            padding = self.padding
        # torch's convolution raises its own errors for an input that is no 3-D or 4-D tensor.
        wellformed = isinstance(input, torch.Tensor) and input.dim() in (3, 4)
        reason = fallback_reason(input, weight, bias, self.groups) if wellformed else "bad input"
        if reason:
            if wellformed:
                _backend.note_fallback(reason)
            return F.conv2d(input, weight, bias, self.stride, padding, self.dilation, self.groups)
        # As torch: the geometry is parsed before any shape is checked.
        stride, pad4, dilation = self._geometry()
        _check(input, weight, bias, self.groups)
        unbatched = input.dim() == 3
        x = input.unsqueeze(0) if unbatched else input
        needs_grad = torch.is_grad_enabled() and (
            input.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
        )
        # The cached packed weight has no autograd: training takes the op that packs per call.
        # A graph being recorded (torch.compile, torch.jit.trace) must read the weight, not
        # bake in a packing of it as a constant (and a trace sees sizes as tensors).
        # A layer that runs as a GEMM on NCHW tensors reads the weight as it is: nothing to cache.
        bf16 = op_dtype(weight) == torch.bfloat16
        cached = (
            self.cache_weights
            and not needs_grad
            and not torch.compiler.is_compiling()
            and not torch.jit.is_tracing()
        )
        if cached and bf16:
            out = conv2d_packed_bf16(
                x,
                self._packed_weight(weight, bf16=True),
                bias,
                weight.shape,
                stride,
                pad4,
                dilation,
                channels_last=_backend.is_channels_last(weight),
            )
        elif cached and not self._nchw_gemm(x, weight, stride, pad4):
            out = conv2d_packed(
                x,
                self._packed_weight(weight),
                bias,
                self.out_channels,
                stride,
                pad4,
                dilation,
                self.groups,
                channels_last=_backend.is_channels_last(weight),
            )
        else:
            args = (list(stride), list(pad4), list(dilation), self.groups, False)
            out = call_op(torch.ops.directconv.conv2d.default, x, weight, bias, *args)
            # Only a call that takes this branch whatever the grad mode (weights not cached), on
            # plain tensors, outside a graph being recorded, is remembered.
            if (
                not self.cache_weights
                and self.padding_mode == "zeros"
                and type(input) is torch.Tensor
                and not torch.compiler.is_compiling()
                and not torch._C._get_tracing_state()
            ):
                self._call_cache = (self._signature(input, weight, bias), args)
        return out.squeeze(0) if unbatched else out

    def __getstate__(self):
        state = dict(super().__getstate__())
        for key in ("_packed", "_packed_alias", "_packed_param", "_packed_key", "_call_cache"):
            state[key] = None
        return state


class LazyDirectConv2d(nn.LazyConv2d, DirectConv2d):
    """What convert() makes of an unmaterialised nn.LazyConv2d: its first forward reads
    in_channels from the input, initialises the weights as nn.LazyConv2d does, and makes the
    module a DirectConv2d."""

    cls_to_become = DirectConv2d


def _convertible(m: nn.Module) -> bool:
    # Subclasses that change what forward computes are left alone.
    t = type(m)
    return (
        isinstance(m, nn.Conv2d)
        and not isinstance(m, DirectConv2d)
        and t.forward is nn.Conv2d.forward
        and t._conv_forward is nn.Conv2d._conv_forward
    )


def _deepcopy(model: nn.Module) -> nn.Module:
    """copy.deepcopy, which torch refuses for a module under the old hook-based weight_norm: the
    weight that weight_norm leaves on it is computed, not a leaf. The copy's hook computes its
    own before every forward, so the copy starts from a detached clone of the value."""
    computed = [
        getattr(m, hook.name)
        for m in model.modules()
        for hook in m._forward_pre_hooks.values()
        if isinstance(hook, WeightNorm)
    ]
    memo = {id(w): w.detach().clone() for w in computed if w.grad_fn is not None}
    return copy.deepcopy(model, memo)


def convert(model: nn.Module, inplace: bool = False, cache_weights: bool = False) -> nn.Module:
    """Replaces every nn.Conv2d in model, recursively, by a DirectConv2d, and returns the model.

    With inplace=False the model is deep-copied first; with inplace=True the replacements
    share the original parameters, so an optimizer built before still updates them. A
    convolution used at several places stays one shared module. cache_weights is passed
    to every DirectConv2d (see there; meant for inference). Parametrized convolutions
    (torch.nn.utils.parametrizations, and the old hook-based weight_norm) stay parametrized,
    with the same state_dict keys; an unmaterialised nn.LazyConv2d becomes a DirectConv2d on
    its first forward.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: expected an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = _deepcopy(model)
    replaced: dict[int, DirectConv2d] = {}

    def replacement(conv: nn.Module) -> DirectConv2d:
        if id(conv) not in replaced:
            replaced[id(conv)] = DirectConv2d.from_conv2d(conv, cache_weights=cache_weights)
        return replaced[id(conv)]

    if _convertible(model):
        return replacement(model)
    visited: set[int] = set()

    def walk(parent: nn.Module) -> None:
        visited.add(id(parent))
        # _modules, not named_children(): a module shared by several names is listed once there.
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            if _convertible(child):
                parent._modules[name] = replacement(child)
            elif id(child) not in visited:
                walk(child)

    walk(model)
    return model
