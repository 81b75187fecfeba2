"""The steps an optimized graph runs: layout conversions, the fused convolution / batch-norm /
add / ReLU unit, and the other ops of a blocked region.

Each step is a small nn.Module of the hidden graph module that optimize() builds. A step holds
the user's modules it runs in a tuple, not as registered children, so the optimized model's
parameters, buffers and state_dict keys stay exactly the user's, and every call reads the
modules' current parameters and flags (train/eval, momentum, eps, ...).
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

from . import _backend, blocked_ops
from ._fake import _spatial
from .blocked import conv2d_blocked_stats, from_blocked, to_blocked, to_blocked_weight
from ._autograd import call_op
from .functional import _check, _pair, conv2d, conv2d_packed, conv_padding, fallback_reason, pack_weight


_CONV2D_BLOCKED = torch.ops.directconv.conv2d_blocked.default
# The op's C++ callable, one Python layer fewer than the OpOverload's __call__ (which only calls it).
_CONV2D_BLOCKED_OP = _CONV2D_BLOCKED._op
_CONV2D = torch.ops.directconv.conv2d.default
_TO_BLOCKED = torch.ops.directconv.to_blocked.default
_TO_BLOCKED_FOLDED = torch.ops.directconv.to_blocked_folded.default
# Weights of at least this many elements are packed once and kept while they may be; a smaller
# one costs less to pack within the call than the cache's checks (DropInConv).
_PACK_CACHE_MIN = 4096


class Step(nn.Module):
    """A node of an optimized graph; `layers` are the user's layers it runs (for messages and
    explain()), `what` says how it runs them."""

    def __init__(self, layers: list[str], what: str) -> None:
        super().__init__()
        self.layers = layers
        self.what = what

    def extra_repr(self) -> str:
        return f"{' + '.join(self.layers)}: {self.what}"


def blocked_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a region keeps a value entering it in: bf16 under CPU autocast to bf16 (as the
    convolutions it feeds would cast it) and for a bf16 value, else the value's own (float32:
    optimize's forward sends nothing else here)."""
    return torch.bfloat16 if _bf16_autocast() else x.dtype


def _bf16_autocast() -> bool:
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


class Enter(Step):
    """NCHW -> blocked at a region's entry; checks the rank and channel count first, so that a
    bad input is reported with the layer that needs it. Under bf16 autocast, and for a bf16
    value, the region runs in bf16: the value is rounded to bf16 (bit for bit as autocast
    rounds a convolution's input, in the same pass) and blocked in rows of 32 channels."""

    def __init__(self, value: str, channels: int, consumer: str) -> None:
        super().__init__([value], f"to_blocked ({channels} channels) for {consumer}")
        self.channels = channels
        self.consumer = consumer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check(x)
        dtype = blocked_dtype(x)
        if dtype == torch.bfloat16 and x.dtype == torch.float32:
            # Rounded to bf16 as autocast's cast rounds, and blocked, in one pass.
            return call_op(_TO_BLOCKED, x, _backend.vector_width(dtype))
        return to_blocked(x if x.dtype == dtype else x.to(dtype))

    def check(self, x) -> None:
        """Raises for an input the region cannot take, naming the layer that needs it."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            got = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise RuntimeError(f"optimize: {self.consumer} expected a 4-D (N, C, H, W) input, got {got}")
        if x.shape[1] != self.channels:
            raise RuntimeError(
                f"optimize: {self.consumer} expected an input with {self.channels} channels, got {x.shape[1]} "
                f"(shape {tuple(x.shape)})"
            )


class Exit(Step):
    """Blocked -> NCHW at a region's exit (once per value, whatever the number of readers)."""

    def __init__(self, value: str, channels: int, why: str) -> None:
        super().__init__([value], f"from_blocked ({channels} channels): {why}")
        self.channels = channels

    def forward(self, xb: torch.Tensor) -> torch.Tensor:
        return from_blocked(xb, self.channels)


_WEIGHT_BIAS = operator.itemgetter("weight", "bias")
_RUNNING_STATS = operator.itemgetter("running_mean", "running_var")


def _read_tensors(conv: nn.Conv2d, bn: nn.BatchNorm2d | None) -> tuple:
    """The tensors a folded unit's weights come from, in _weights' order, from the modules'
    own dicts (KeyError where a name is not there)."""
    if bn is None:
        return _WEIGHT_BIAS(conv._parameters)
    return _WEIGHT_BIAS(conv._parameters) + _WEIGHT_BIAS(bn._parameters) + _RUNNING_STATS(bn._buffers)


class _TensorsKey:
    """The exact tensors a cached result was computed from, their versions (_C.TensorsKey, which
    holds them and aliases of them: same storage, no copy, so a new tensor can never be given an
    old one's address, and `param.data = new`, which keeps the Parameter and its version
    counter, is caught), and the other things it depends on (`extra`)."""

    def __init__(self, tensors: tuple, extra: tuple) -> None:
        self.tensors = tensors
        self.key = _backend._C.TensorsKey(tensors)
        self.count = len(tensors)
        self.extra = extra

    def matches(self, tensors: tuple, extra: tuple) -> bool:
        return extra == self.extra and self.key.unchanged(tensors)

    # A copy (deepcopy, pickle) keys on the copied tensors as they are then.
    def __getstate__(self) -> tuple:
        return self.tensors, self.extra

    def __setstate__(self, state: tuple) -> None:
        self.__init__(*state)


def _blocked_weight(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """w (K, C, R, S), fp32 or bf16, blocked for activations of dtype: the bf16 kernels' layout
    (rounded to bf16 in the packing) or the fp32 one."""
    if dtype == torch.bfloat16:
        return call_op(torch.ops.directconv.to_blocked_weight.default, w, _backend.vector_width(dtype))
    return to_blocked_weight(w)


def _cacheable(owned: bool, tensors: tuple) -> bool:
    """Whether a result computed from `tensors` may be kept across calls: they are the modules'
    own parameters and buffers (not computed in forward, as a parametrization's), no gradient
    must reach them, and no graph is being recorded (torch.compile must see the computation)."""
    if not owned or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is not None and (t.is_inference() or (grad and t.requires_grad)):
            return False
    return True


def _own(module: nn.Module, names: tuple[str, ...]) -> tuple[tuple, bool]:
    """(the module's tensors called `names`, whether each is its own Parameter or buffer or None)."""
    # The modules' own dicts first (what getattr finds for a registered name, without
    # nn.Module.__getattr__'s cost); anything else (a parametrization's property) by getattr.
    params, buffers = module._parameters, module._buffers
    tensors, owned = [], True
    for n in names:
        if n in params:
            t = params[n]
        elif n in buffers:
            t = buffers[n]
        else:
            t = getattr(module, n)
            owned = owned and t is None
        tensors.append(t)
    return tuple(tensors), owned


def _eval_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) of a batch norm with its running statistics, as torch computes them."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift


def _conv_out_shape(conv: nn.Conv2d, xb: torch.Tensor, padding) -> tuple[int, ...]:
    """The blocked output shape of conv on xb (padding: as conv2d_blocked gets it)."""
    stride, dilation = _pair(conv.stride, "stride"), _pair(conv.dilation, "dilation")
    pad4 = conv_padding(padding, conv.kernel_size, stride, dilation)
    p, q = _spatial(xb, *conv.kernel_size, stride, pad4, dilation)
    n, _, _, _, v = xb.shape
    return (n, -(-conv.out_channels // v), p, q, v)


def _check_batch(bn_name: str, xb: torch.Tensor, channels: int) -> None:
    # As F.batch_norm in training: one value per channel has no variance.
    if xb.shape[0] * xb.shape[2] * xb.shape[3] == 1:
        size = torch.Size((xb.shape[0], channels, xb.shape[2], xb.shape[3]))
        raise ValueError(f"{bn_name}: Expected more than 1 value per channel when training, got input size {size}")


class _CachedStep(Step):
    """A step that keeps what it computes from its modules' weights between calls while it may."""

    def __init__(self, layers: list[str], what: str) -> None:
        super().__init__(layers, what)
        self._cache: tuple[_TensorsKey, tuple] | None = None

    def _cached(self, tensors: tuple, owned: bool, extra: tuple, compute) -> tuple:
        """compute(pack): packed once (pack(w, dtype) = the blocked weight for activations of
        dtype) and kept while it may be; else computed at each call with the weight left
        (K, C, R, S) (pack = the identity), which conv2d_blocked packs within its call and whose
        gradient it returns as (K, C, R, S): a training step then has no packing pass, nor an
        unpacking one."""
        if not _cacheable(owned, tensors):
            return compute(lambda w, dtype: w)
        # Made in inference mode, the results are inference tensors: reused only there.
        extra = (*extra, torch.is_inference_mode_enabled())
        entry = self._cache  # one read: other threads may replace it meanwhile
        if entry is not None and entry[0].matches(tensors, extra):
            return entry[1]
        self._cache = None  # drop the old result before the new one is made
        with torch.no_grad():
            result = compute(_blocked_weight)
        self._cache = (_TensorsKey(tensors, extra), result)
        return result


class _ConvStep(_CachedStep):
    """A step that runs a convolution: its weights (folded, packed) and its geometry kept
    between calls while they may be."""

    def __init__(self, layers: list[str], what: str) -> None:
        super().__init__(layers, what)
        self._geo: tuple | None = None

    def _geometry(self, conv: nn.Conv2d, padding) -> tuple[list, list, list]:
        """(stride, padding (top, bottom, left, right), dilation) as conv2d_blocked's op takes
        them, worked out again only when the module's attributes are other objects."""
        geo = self._geo
        if (
            geo is None
            or geo[0] is not conv.stride
            or geo[1] is not padding
            or geo[2] is not conv.dilation
            or geo[3] is not conv.kernel_size
        ):
            stride, dilation = _pair(conv.stride, "stride"), _pair(conv.dilation, "dilation")
            pad4 = conv_padding(padding, conv.kernel_size, stride, dilation)
            geo = (conv.stride, padding, conv.dilation, conv.kernel_size, (list(stride), list(pad4), list(dilation)))
            self._geo = geo
        return geo[4]


class Unit(_ConvStep):
    """conv? -> batch norm? -> + residual? -> ReLU?, blocked in and out.

    Eval: the batch norm is folded into the convolution's weights and bias, and the ReLU runs in
    the convolution's epilogue; a residual add and the ReLU then take one fused pass (bn_apply).
    Training: the batch norm uses the batch statistics (one pass; the running ones are updated
    as torch does), and one fused pass applies it with the add and the ReLU (batch_norm_blocked,
    whose backward takes at most two passes). A batch norm without a convolution before it runs
    as that fused pass in eval too.
    Folded and packed weights are cached while no gradient must reach them, keyed on the
    exact tensors they come from and their versions, so they follow every change torch records.
    """

    def __init__(
        self,
        conv: nn.Conv2d | None,
        bn: nn.BatchNorm2d | None,
        names: list[str],
        channels: int,
        residual: bool,
        relu: bool,
    ) -> None:
        parts = [p for p, on in (("conv", conv), ("batch norm", bn), ("+ residual", residual), ("ReLU", relu)) if on]
        super().__init__(names, " -> ".join(parts))
        self._parts = (conv, bn)
        self.conv_name = names[0] if conv is not None else None
        self.bn_name = names[1 if conv is not None else 0] if bn is not None else None
        self.channels = channels
        self.residual = residual
        self.relu = relu
        # The scale and shift of a lone add -> ReLU pass: bn_apply with the identity's affine.
        self._identity = (torch.ones(channels), torch.zeros(channels)) if residual else None
        # The last eval call without gradients, prepared: (the weight cache's entry it used, what
        # else it depends on (_state), the op's arguments after the input, the batch norm folded
        # into them or None). A call that finds the entry's tensors and the state unchanged runs
        # the op at once.
        self._fast: tuple | None = None

    def _weights(self, conv: nn.Conv2d, bn: nn.BatchNorm2d | None, dtype: torch.dtype, columns: bool = False) -> tuple:
        """(weight, bias) of the convolution, with bn folded in when it is given; the weight
        blocked for activations of `dtype` when it is cached (bf16: folded in fp32, then rounded
        once), else (K, C, R, S), which the op casts and packs within its call. With `columns`,
        the weight of the layer on its column-folded input (fold_columns)."""
        conv_t, conv_owned = _own(conv, ("weight", "bias"))
        key = (_backend.isa(), dtype, columns)
        layer = fold_columns if columns else (lambda w: w)
        if bn is None:
            return self._cached(conv_t, conv_owned, key, lambda pack: (pack(layer(conv_t[0]), dtype), conv_t[1]))
        bn_t, bn_owned = _own(bn, ("weight", "bias", "running_mean", "running_var"))

        def fold(pack) -> tuple:
            scale, shift = _eval_affine(bn)
            w = layer(conv_t[0] * scale.view(-1, 1, 1, 1))
            b = shift if conv_t[1] is None else shift + conv_t[1] * scale
            if pack is not _blocked_weight or dtype != torch.bfloat16:
                return pack(w, dtype), b
            # Kept padded to whole blocks of the bf16 layout, as the op reads it: no copy per call.
            v = _backend.vector_width(dtype)
            return pack(w, dtype), F.pad(b.float(), (0, -(-b.shape[0] // v) * v - b.shape[0]))

        return self._cached(conv_t + bn_t, conv_owned and bn_owned, (*key, bn.eps), fold)

    @staticmethod
    def _padded(conv: nn.Conv2d, xb: torch.Tensor) -> tuple:
        """(input, padding) as conv2d_blocked takes them: the padding modes other than zeros pad
        H and W of the blocked tensor (the lanes get no padding)."""
        if conv.padding_mode == "zeros":
            return xb, conv.padding
        return F.pad(xb, (0, 0, *conv._reversed_padding_repeated_twice), mode=conv.padding_mode), 0

    def _state(self, conv: nn.Conv2d, bn: nn.BatchNorm2d | None, xb: torch.Tensor, residual) -> tuple:
        """What a prepared call depends on besides the weights' tensors: the input's dtype and
        shapes (whether the residual is fused), the attributes the geometry and the folding read,
        inference mode and the ISA."""
        return (
            xb.dtype,
            xb.shape,
            None if residual is None else residual.shape,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.kernel_size,
            conv.padding_mode,
            conv.in_channels,
            None if bn is None else (bn.training, bn.eps),
            torch.is_inference_mode_enabled(),
            _backend._C.isa(),
        )

    def _prepare(self, conv, bn, xb, residual, args: tuple) -> None:
        """Keeps the call just made for the next one, when it ran on cached weights without
        gradients and nothing else decides it (torch.compile, tracing, torch.func)."""
        entry = self._cache
        if (
            entry is None
            or entry[1][0] is not args[0]
            or torch.is_grad_enabled()
            or torch.compiler.is_compiling()
            or torch.jit.is_tracing()
            or torch._C._are_functorch_transforms_active()
        ):
            self._fast = None
            return
        try:
            tensors = _read_tensors(conv, bn)
        except KeyError:  # not where a plain conv and batch norm keep them
            self._fast = None
            return
        if len(tensors) != entry[0].count:
            self._fast = None
            return
        self._fast = (entry, self._state(conv, bn, xb, residual), args, bn)

    def _conv(
        self, conv: nn.Conv2d, xb: torch.Tensor, wb: torch.Tensor, bias, relu: bool, residual=None, bn=None
    ) -> torch.Tensor:
        """relu?(conv(xb) + bias + residual?): the residual (when it has the output's shape) and
        the ReLU in the kernels' epilogue; a residual that broadcasts takes torch's add after.
        bn: the batch norm folded into wb and bias, if any."""
        x0 = xb
        xb, padding = self._padded(conv, xb)
        fused = residual is not None and tuple(residual.shape) == _conv_out_shape(conv, xb, padding)
        # The op itself: the engine has checked the JIT and the weights' shape (conv2d_blocked's
        # own checks), and the geometry is kept between calls.
        args = (wb, bias, *self._geometry(conv, padding), relu and (residual is None or fused), conv.in_channels)
        yb = call_op(_CONV2D_BLOCKED, xb, *args, residual if fused else None)
        if conv.padding_mode == "zeros" and (residual is None or fused):
            self._prepare(conv, bn, x0, residual, args)
        if residual is None or fused:
            return yb
        out = yb + residual
        return torch.relu(out) if relu else out

    def _add_relu(self, yb: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """relu?(yb + residual), in one fused pass."""
        if residual.shape != yb.shape:
            # A residual that broadcasts ((N, C, 1, 1) against a map) is torch's add.
            out = yb + residual
            return torch.relu(out) if self.relu else out
        scale, shift = self._identity
        return blocked_ops.bn_apply(yb, self.channels, scale, shift, residual, self.relu)

    @staticmethod
    def _uses_batch_stats(bn: nn.BatchNorm2d | None) -> bool:
        """Whether bn normalizes with the batch's statistics (training, or no running ones)."""
        return bn is not None and (bn.training or (bn.running_mean is None and bn.running_var is None))

    def _conv_batch_stats(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, xb: torch.Tensor, wb, bias, layer=None) -> tuple:
        """(conv(xb) + bias, its batch mean, its biased batch variance), the statistics summed in
        the convolution's epilogue relative to the running mean (exact either way: the op
        recomputes them where a mean lies far from it). `layer`, (stride, padding, dilation,
        in_channels), replaces conv's own geometry (EnterUnit's folded layer)."""
        if layer is None:
            xb, padding = self._padded(conv, xb)
            layer = (conv.stride, padding, conv.dilation, conv.in_channels)
        track = bn.training and bn.track_running_stats and bn.running_mean is not None
        yb, mean, var = conv2d_blocked_stats(
            xb,
            wb,
            bias,
            layer[0],
            layer[1],
            layer[2],
            channels=self.channels,
            shift=bn.running_mean.detach().float() if track else None,
            in_channels=layer[3],
        )
        return yb, (mean, var)

    def _batch_norm(self, bn: nn.BatchNorm2d, xb: torch.Tensor, batch_stats: bool, residual, relu: bool, stats=None):
        """relu?(bn(xb) + residual?) in one fused pass (after the statistics' pass in training,
        unless `stats` gives them)."""
        c, w, b = self.channels, bn.weight, bn.bias
        if not batch_stats:
            return blocked_ops.batch_norm(
                xb, c, bn.running_mean, bn.running_var, w, b, False, 0.0, bn.eps, residual=residual, relu=relu
            )
        _check_batch(self.bn_name, xb, c)
        # As nn.BatchNorm2d: the running statistics (and the counter) move only in training.
        track = bn.training and bn.track_running_stats
        mean, var, count = (bn.running_mean, bn.running_var, bn.num_batches_tracked) if track else (None, None, None)
        return blocked_ops.batch_norm(
            xb,
            c,
            mean,
            var,
            w,
            b,
            True,
            bn.momentum,
            bn.eps,
            residual=residual,
            relu=relu,
            num_batches_tracked=count,
            stats=stats,
        )

    def forward(self, xb: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        fast = self._fast
        if (
            not torch.compiler.is_compiling()  # first: what torch.compile traces stops here
            and fast is not None
            and fast[0] is self._cache
            and not torch.is_grad_enabled()
            and not torch._C._is_tracing()  # torch.jit.is_tracing(), one Python call fewer
            and not torch._C._are_functorch_transforms_active()
        ):
            conv, bn = self._parts[0], fast[3]
            try:
                tensors = _read_tensors(conv, bn)
            except KeyError:
                tensors = ()
            if fast[1] == self._state(conv, bn, xb, residual) and fast[0][0].key.unchanged(tensors):
                return _CONV2D_BLOCKED_OP(xb, *fast[2], residual)
        return self._forward(xb, residual)

    def _forward(self, xb: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        conv, bn = self._parts
        batch_stats = self._uses_batch_stats(bn)
        if conv is not None:
            fold = bn is not None and not batch_stats
            wb, bias = self._weights(conv, bn if fold else None, xb.dtype)
            if bn is None or fold:
                # The residual add and the ReLU in the convolution's epilogue.
                return self._conv(conv, xb, wb, bias, self.relu, residual, bn if fold else None)
            # Batch statistics: from the convolution's epilogue, then one pass applies the batch norm.
            xb, stats = self._conv_batch_stats(conv, bn, xb, wb, bias)
        else:
            stats = None
        if bn is None:
            return self._add_relu(xb, residual)
        if residual is not None and residual.shape != xb.shape:
            return self._add_relu(self._batch_norm(bn, xb, batch_stats, None, False, stats), residual)
        return self._batch_norm(bn, xb, batch_stats, residual, self.relu, stats)


def fold_columns(w: torch.Tensor) -> torch.Tensor:
    """The weight (K, C, R, S) of a layer as the weight (K, S * C, R, 1) of the same layer on its
    column-folded input (to_blocked_folded: inner channel s * C + c is channel c at column s)."""
    k, c, r, s = w.shape
    return w.permute(0, 3, 1, 2).reshape(k, s * c, r, 1)


class EnterUnit(Unit):
    """Enter -> Unit (no residual) for a convolution that folds its kernel columns into its
    channels in bf16 (conv1's 3 x 7 x 7; _C.bf16_folds_columns). In bf16, when no gradient must
    reach the input, the region's entry is the folded copy itself (to_blocked_folded: one pass
    from the NCHW input, rounded as autocast rounds it), on which the layer is an R x 1
    convolution of C * S channels with the weight fold_columns gives; the 32-lane rows of a
    3-channel input are never written. Otherwise the entry and the unit run as they would apart."""

    def __init__(self, entry: Enter, conv: nn.Conv2d, bn: nn.BatchNorm2d | None, names: list[str], channels: int, relu: bool) -> None:
        super().__init__(conv, bn, names, channels, False, relu)
        self.entry = entry
        self.what = f"{entry.what}, then {self.what}; in bf16 one folded entry (to_blocked_folded)"

    def _folds(self, x: torch.Tensor) -> bool:
        if blocked_dtype(x) != torch.bfloat16 or torch._C._are_functorch_transforms_active():
            return False
        return not (x.requires_grad and torch.is_grad_enabled())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.entry.check(x)
        if not self._folds(x):
            return super().forward(self.entry(x))
        conv, bn = self._parts
        self._fast = None  # the unfolded path's prepared call is not this one
        stride, pad4, dilation = self._geometry(conv, conv.padding)
        xf = _TO_BLOCKED_FOLDED(x, list(conv.kernel_size), stride, pad4, dilation)
        # The layer on the folded copy: R x 1, stride (sh, 1), no padding, C * S channels.
        layer = ([stride[0], 1], 0, [dilation[0], 1], conv.in_channels * conv.kernel_size[1])
        batch_stats = self._uses_batch_stats(bn)
        fold = bn is not None and not batch_stats
        wb, bias = self._weights(conv, bn if fold else None, xf.dtype, columns=True)
        if bn is None or fold:
            return call_op(_CONV2D_BLOCKED, xf, wb, bias, layer[0], [0, 0, 0, 0], layer[2], self.relu, layer[3], None)
        yb, stats = self._conv_batch_stats(conv, bn, xf, wb, bias, layer)
        return self._batch_norm(bn, yb, batch_stats, None, self.relu, stats)


class Pool(Step):
    """Max or average pooling of a blocked tensor (the arguments as F.max_pool2d / F.avg_pool2d take them)."""

    def __init__(self, name: str, kind: str, channels: int, args: dict) -> None:
        super().__init__([name], f"{kind} pooling")
        self._fn = blocked_ops.max_pool2d if kind == "max" else blocked_ops.avg_pool2d
        self.channels = channels
        self.args = args

    def forward(self, xb: torch.Tensor) -> torch.Tensor:
        return self._fn(xb, self.channels, **self.args)


class GlobalAvgPool(Step):
    """The mean over H and W: NCHW out ((N, C, 1, 1) with keepdim, else (N, C)), or with
    blocked_out, blocked out (N, Cb, 1, 1, V)."""

    def __init__(self, name: str, channels: int, keepdim: bool, blocked_out: bool = False) -> None:
        super().__init__([name], "global average pool, blocked" + ("" if blocked_out else " in, NCHW out"))
        self.channels = channels
        self.keepdim = keepdim
        self.blocked_out = blocked_out

    def forward(self, xb: torch.Tensor) -> torch.Tensor:
        if self.blocked_out:
            # An average pool whose window is the whole map.
            return blocked_ops.avg_pool2d(xb, self.channels, (xb.shape[2], xb.shape[3]))
        out = blocked_ops.global_avg_pool(xb, self.channels)
        return out.view(out.shape[0], out.shape[1], 1, 1) if self.keepdim else out


class Act(Step):
    """An element-wise activation that maps 0 to 0 (so the padded lanes stay zero), out of place."""

    def __init__(self, name: str, fn, kwargs: dict, module: nn.Module | None = None) -> None:
        super().__init__([name], "element-wise, blocked")
        self._fn = fn
        self._module = (module,)
        self.kwargs = kwargs

    def forward(self, xb: torch.Tensor) -> torch.Tensor:
        module = self._module[0]
        return self._fn(xb, **self.kwargs) if module is None else self._fn(module, xb)


class Dropout(Step):
    """Dropout of a blocked tensor with the mask torch would draw for the NCHW tensor (the same
    random numbers in the same order), so the result equals the original model's."""

    def __init__(self, name: str, channels: int, module: nn.Module | None, p: float) -> None:
        super().__init__([name], "dropout, blocked (mask drawn in NCHW order)")
        self.channels = channels
        self._module = (module,)
        self.p = p

    def forward(self, xb: torch.Tensor) -> torch.Tensor:
        module = self._module[0]
        p, training = (self.p, True) if module is None else (module.p, module.training)
        if not training or p == 0:
            return xb
        if p == 1:
            return xb * 0
        n, _, h, w, _ = xb.shape
        mask = torch.empty((n, self.channels, h, w), dtype=xb.dtype).bernoulli_(1 - p).div_(1 - p)
        return xb * to_blocked(mask)


class BlockedShape(Step):
    """x.size(), x.size(d), x.shape, x.dim() of a value held blocked, without converting it."""

    def __init__(self, name: str, channels: int, query: str) -> None:
        super().__init__([name], f"{query} of a blocked value (no conversion)")
        self.channels = channels
        self.query = query

    def forward(self, xb: torch.Tensor, dim: int | None = None):
        if self.query == "dim":
            return 4
        n, _, h, w, _ = xb.shape
        size = torch.Size((n, self.channels, h, w))
        return size if dim is None else size[dim]


class DropInConv(_ConvStep):
    """A convolution outside the blocked regions (groups > 1, an output kept NCHW, or a
    region of one convolution, whose entry and exit would cost more than blocking saves), on
    NCHW tensors through the drop-in path (the JIT kernels, depthwise ones too, or torch's
    convolution where they do not apply), with a ReLU that only it feeds in its epilogue. As
    DirectConv2d with cache_weights: the packed weight is kept while no gradient must reach it."""

    def __init__(self, name: str, conv: nn.Conv2d, relu_name: str | None = None) -> None:
        names = [name] + ([relu_name] if relu_name else [])
        super().__init__(names, "drop-in conv2d, NCHW" + (", ReLU in its epilogue" if relu_name else ""))
        self._conv = (conv,)
        self.relu = relu_name is not None
        self._checked: tuple | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self._conv[0]
        padding = conv.padding
        if conv.padding_mode != "zeros":
            x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
            padding = 0
        (w, b), owned = _own(conv, ("weight", "bias"))
        if isinstance(x, torch.Tensor) and blocked_dtype(x) == torch.bfloat16:
            # bf16 (autocast's cast included): conv2d's own bf16 path, which packs in its call.
            return conv2d(x, w, b, conv.stride, padding, conv.dilation, conv.groups, relu=self.relu)
        # What the JIT's choice and the checks depend on; a call like the last checked one skips them.
        sig = (type(x), x.shape, x.dtype, x.device, w.shape, w.dtype, b is None or (b.shape, b.dtype), _backend.isa())
        if sig != self._checked:
            if type(x) is not torch.Tensor or x.dim() != 4 or fallback_reason(x, w, b, conv.groups) is not None:
                return conv2d(x, w, b, conv.stride, padding, conv.dilation, conv.groups, relu=self.relu)
            _check(x, w, b, conv.groups)
            self._checked = sig
        stride, pad4, dilation = self._geometry(conv, padding)
        if w.numel() >= _PACK_CACHE_MIN and _cacheable(owned, (w, b)):
            (packed,) = self._cached(
                (w,), owned, (_backend.isa(), conv.groups), lambda *_: (pack_weight(w, conv.groups),)
            )
            return conv2d_packed(x, packed, b, w.shape[0], stride, pad4, dilation, conv.groups, self.relu)
        # The op packs the weight within its call (and gives its gradient).
        return call_op(_CONV2D, x, w, b, stride, pad4, dilation, conv.groups, self.relu)


def _autocast_cast(t: torch.Tensor | None) -> torch.Tensor | None:
    """t as CPU autocast to bf16 casts an argument of a lower-precision op: floating tensors but
    float64 to bf16, the others as they are."""
    if t is None or not t.is_floating_point() or t.dtype in (torch.float64, torch.bfloat16):
        return t
    return t.to(torch.bfloat16)


class Linear(_CachedStep):
    """A plain nn.Linear, NCHW. Under bf16 autocast, while no gradient must reach its weight and
    bias, they are cast to bf16 once (as autocast casts them at every call) and kept, keyed on
    the exact tensors and their versions as the convolutions' packed weights are; F.linear on
    them is then the op autocast runs, on the same operands. Otherwise (and once the module has
hooks of its own) the module runs itself."""

    def __init__(self, name: str, module: nn.Linear) -> None:
        super().__init__([name], "linear, NCHW (under bf16 autocast without gradients: its bf16 weight and bias kept)")
        self._module = (module,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        module = self._module[0]
        if _bf16_autocast() and not (module._forward_hooks or module._forward_pre_hooks):
            tensors, owned = _own(module, ("weight", "bias"))
            if _cacheable(owned, tensors):
                w, b = self._cached(tensors, owned, (), lambda _: tuple(_autocast_cast(t) for t in tensors))
                return F.linear(x, w, b)
        return module(x)
