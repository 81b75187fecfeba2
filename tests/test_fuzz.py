"""Property-based fuzzing (hypothesis) of tdc.conv2d and DirectConv2d against float64 torch.

Each example draws a problem: batch 0..3, channels 0..40 (dense, grouped, depthwise), spatial
sizes from 1, kernels 1..5 (non-square), strides, dilations and paddings from the small ones to
huge ones (2**31, 2**32 + 1, 2**63) where torch's output stays small, 'same' and 'valid', views
of the input and the weight, bias, and the API: tdc.conv2d, DirectConv2d (with a padding mode)
or DirectConv2d(cache_weights=True) under no_grad. The output, and the input, weight and bias
gradients, are checked against torch.nn.functional.conv2d on float64 copies, with the fan-in
tolerance of helpers.assert_conv_close and helpers.assert_grad_close's; where torch raises, tdc
must raise the same type of exception. Where torch is the odd one out, tdc is not failed: torch
leaves invalid arguments unchecked on an empty input (tdc may raise there), float32 torch with
oneDNN, where tdc's fallbacks go, raises where float64 torch returns (tdc may raise the same),
and torch's CPU convolution gets the output size wrong on some huge geometries (check_reference
rejects those examples).

test_matches_float64_torch sets the thread count to 1 or 2 before each call;
test_first_call_on_a_fresh_thread makes the call on a new thread after the main thread changed
the count (SWITCHES), on ordinary problems.

The examples run in one child interpreter (Child), so that a crash or a hang fails its example,
which hypothesis then shrinks like any other failure, instead of killing pytest. Each property
runs twice: a derandomized slice in the default suite, and a long run that draws new examples
each time under `pytest -m slow` (rerun one with --hypothesis-seed). A failure prints its
example; check_example(Example(...), threads) or check_on_fresh_threads(Example(...))
reproduces it in any interpreter.
"""

from __future__ import annotations

import builtins
import dataclasses
import json
import math
import os
import select
import subprocess
import sys
import tempfile
import threading
import traceback
import warnings
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, reject, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from torch import nn

import torch_directconv as tdc
from helpers import REPO, assert_conv_close, assert_grad_close, describe, requires_jit, torch_native

pytestmark = requires_jit
# Hypothesis caches what it collects (constants) in its home directory, ./.hypothesis by
# default: keep that out of the repo, as the example database is (database=None below).
set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), "torch_directconv_hypothesis"))

# Past int32; 2**63 is past int64, where torch raises while parsing. (Not 2**63 - 1: torch's
# own output size overflows there, e.g. to 0 rows for stride 2**63 - 1 with padding 2**32 + 1.)
HUGE_STRIDES = (2**31 - 1, 2**31, 2**32 + 1, 2**63)
HUGE_DILATIONS = (2**31 - 1, 2**31, 2**32 + 1, 2**63)
HUGE_PADDINGS = (2**31 - 1, 2**31, 2**32 + 1, 2**63)
MAX_OUT = 24  # output rows and columns at most: every example stays fast
INPUT_VIEWS = ("contiguous", "channels_last", "transposed", "sliced", "strided", "expanded", "permuted", "unbatched")
WEIGHT_VIEWS = ("contiguous", "channels_last", "transposed", "sliced", "expanded")
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
THREADS = st.sampled_from((1, 2))
# (the count when a new thread starts, the count the main thread sets before the new one's
# call, what the new thread runs before that: nothing, a parallel torch op or a tdc.conv2d)
SWITCHES = tuple((a, b, warm_up) for a, b in ((2, 1), (1, 2)) for warm_up in ("none", "torch", "conv"))
STARTUP_TIMEOUT = 300.0
EXAMPLE_TIMEOUT = 10.0  # an example takes well under a second


class OutputMismatch(AssertionError):
    pass


class InputGradMismatch(AssertionError):
    pass


class WeightGradMismatch(AssertionError):
    pass


class BiasGradMismatch(AssertionError):
    pass


class MissingException(AssertionError):
    """torch raises, tdc returns."""


class WrongException(AssertionError):
    """torch and tdc raise exceptions of different types."""


class UnexpectedException(AssertionError):
    """tdc raises where torch returns."""


class Crashed(AssertionError):
    pass


class UnreliableReference(Exception):
    """float64 torch's own output size overflows on this example: there is nothing to compare with."""


class Hung(AssertionError):
    pass


# One class per kind of failure: hypothesis reports each kind as its own bug, also when the
# child reports it (Child.run raises the class by name).
FAILURES = {
    cls.__name__: cls
    for cls in (
        OutputMismatch, InputGradMismatch, WeightGradMismatch, BiasGradMismatch,
        MissingException, WrongException, UnexpectedException, Crashed, Hung,
    )
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Example:
    n: int
    c: int
    k: int
    h: int
    w: int
    r: int
    s: int
    stride: int | tuple[int, int]
    padding: int | tuple[int, int] | str
    dilation: int | tuple[int, int]
    groups: int
    bias: bool
    api: str  # 'conv2d' (tdc.conv2d), 'module' (DirectConv2d) or 'cached' (cache_weights=True, under no_grad)
    backward: bool  # the gradients too ('conv2d' and 'module')
    padding_mode: str  # DirectConv2d's; 'zeros' with tdc.conv2d
    input_view: str
    weight_view: str
    seed: int

    @property
    def fan_in(self) -> int:
        return self.c // self.groups * self.r * self.s

    def geometry(self) -> tuple[int, ...]:
        pads = (0, 0) if isinstance(self.padding, str) else pairs(self.padding)
        return (*pairs(self.stride), *pairs(self.dilation), *pads)

    @property
    def invalid(self) -> bool:
        """A stride or dilation below 1, or a negative padding."""
        values = self.geometry()
        return min(values[:4]) < 1 or min(values[4:]) < 0

    def out_size(self) -> tuple[int, int] | None:
        """The output's (rows, columns) by conv2d's formula, in exact integers; None where torch must raise."""
        sh, sw, dh, dw, ph, pw = self.geometry()
        if self.invalid or max(self.geometry()) >= 2**63:
            return None
        if self.padding == "same":
            return (self.h, self.w) if (sh, sw) == (1, 1) else None
        rows, cols = self.h + 2 * ph - dh * (self.r - 1) - 1, self.w + 2 * pw - dw * (self.s - 1) - 1
        return None if min(rows, cols) < 0 else (rows // sh + 1, cols // sw + 1)


def pairs(value: int | tuple[int, int]) -> tuple[int, int]:
    return value if isinstance(value, tuple) else (value, value)


def rarely(draw: Callable, common: tuple, rare: tuple, one_in: int = 8) -> int:
    """An element of common, or one time in one_in of rare; shrinks towards common[0]."""
    if rare and draw(st.integers(0, one_in - 1)) == one_in - 1:
        return draw(st.sampled_from(rare))
    return draw(st.sampled_from(common))


@st.composite
def axes(draw: Callable, padding: str, edge: bool) -> tuple[int, int, int, int, int]:
    """(size, kernel, stride, dilation, padding) of one spatial axis for padding 'explicit', 'same' or 'valid'.

    edge adds the huge values, the invalid ones (stride or dilation 0, padding -1) and sizes
    one below the smallest valid one; without it the axes are mostly unstrided and longer.
    """
    k = draw(st.integers(1, 5))
    common = (1, 2, 3) if edge else (1, 1, 1, 2)
    stride = rarely(draw, common, HUGE_STRIDES + (0,) if edge else ())
    if padding == "same" and draw(st.integers(0, 9)) < 9:
        stride = 1  # torch raises for a strided 'same': try that only now and then
    dilation = rarely(draw, common, HUGE_DILATIONS + (0,) if edge else ())
    if padding == "same" and dilation > 64 and dilation % 2 and k % 2 == 0:
        k += 1  # torch pads an odd total explicitly first: a huge one would not fit in memory
    ext = dilation * (k - 1) + 1
    fit = max(0, (ext - 1) // 2 + draw(st.integers(-1, 1)))  # about the padding that keeps the size
    if padding == "valid":
        pad, total = 0, 0
    elif padding == "same":
        pad, total = 0, ext - 1
    else:
        if ext > 64 and draw(st.integers(0, 3)) < 3:
            pad = fit  # a huge dilation mostly with the huge padding that makes its output small
        else:
            pad = rarely(draw, (0, 1, 2, 3, fit), HUGE_PADDINGS + (-1,) if edge else ())
        total = 2 * pad
        if total > ext + 64 and stride < total:
            stride = draw(st.sampled_from(HUGE_STRIDES))  # the output of a huge padding stays small
    need = ext - total  # the smallest size with one output (below 1 with a wide padding)
    if need > 16:
        size = draw(st.integers(1, 6))  # a huge kernel without its padding: torch raises
    else:
        size = max(1, max(1, need) + draw(st.integers(-1, 8) if edge else st.integers(2, 12)))
    if stride > 0 and dilation > 0 and pad >= 0 and size + total >= ext:
        assume((size + total - ext) // stride + 1 <= MAX_OUT)
    return size, k, stride, dilation, pad


def pair_or_int(draw: Callable, a: int, b: int) -> int | tuple[int, int]:
    return a if a == b and draw(st.booleans()) else (a, b)


@st.composite
def examples(draw: Callable, edge: bool = True) -> Example:
    """An Example; edge adds empty batches and channel counts, huge and invalid geometry."""
    kind = draw(
        st.sampled_from(("dense", "grouped", "depthwise") if edge else ("dense", "dense", "grouped", "depthwise"))
    )
    if kind == "depthwise":
        c = draw(st.integers(1, 40))
        groups, k = c, c * draw(st.integers(1, 2))
    else:
        groups = 1 if kind == "dense" else draw(st.integers(2, 4))
        c = groups * draw(st.integers(0 if edge else 1, 40 // groups))
        k = groups * draw(st.integers(0 if edge else 1, 40 // groups))
    input_view = draw(st.sampled_from(INPUT_VIEWS))
    n = 1 if input_view == "unbatched" else draw(st.integers(0 if edge else 1, 3))
    padding_kind = draw(st.sampled_from(("explicit", "explicit", "same", "valid")))
    h, r, sh, dh, ph = draw(axes(padding_kind, edge))
    w, s, sw, dw, pw = draw(axes(padding_kind, edge))
    padding = pair_or_int(draw, ph, pw) if padding_kind == "explicit" else padding_kind
    api = draw(st.sampled_from(("conv2d", "module", "cached")))
    small = max(ph, pw, dh, dw) <= 3
    return Example(
        n=n, c=c, k=k, h=h, w=w, r=r, s=s,
        stride=pair_or_int(draw, sh, sw), padding=padding, dilation=pair_or_int(draw, dh, dw), groups=groups,
        bias=draw(st.booleans()), api=api, backward=api != "cached" and draw(st.booleans()),
        # Other modes pad the input explicitly (in torch and tdc alike): huge ones would not fit.
        padding_mode=draw(st.sampled_from(PADDING_MODES)) if api != "conv2d" and small else "zeros",
        input_view=input_view, weight_view=draw(st.sampled_from(WEIGHT_VIEWS)), seed=draw(st.integers(0, 2**16)),
    )  # fmt: skip


def make_input(ex: Example, g: torch.Generator) -> torch.Tensor:
    n, c, h, w = ex.n, ex.c, ex.h, ex.w
    view = ex.input_view
    if view == "unbatched":
        return torch.randn(c, h, w, generator=g)
    if view == "channels_last":
        return torch.randn(n, c, h, w, generator=g).contiguous(memory_format=torch.channels_last)
    if view == "transposed":
        return torch.randn(n, c, w, h, generator=g).transpose(2, 3)
    if view == "sliced":
        return torch.randn(n + 1, c + 2, h + 1, w + 3, generator=g)[1:, 1 : c + 1, :h, 2 : w + 2]
    if view == "strided":
        return torch.randn(n, c, 2 * h, 2 * w, generator=g)[:, :, ::2, 1::2]
    if view == "expanded":
        return torch.randn(1, c, h, w, generator=g).expand(n, c, h, w)
    if view == "permuted":
        return torch.randn(h, c, w, n, generator=g).permute(3, 1, 0, 2)
    return torch.randn(n, c, h, w, generator=g)


def make_weight(ex: Example, g: torch.Generator) -> torch.Tensor:
    k, cg, r, s = ex.k, ex.c // ex.groups, ex.r, ex.s
    scale = 1 / math.sqrt(max(ex.fan_in, 1))
    view = ex.weight_view
    if view == "channels_last":
        return (torch.randn(k, cg, r, s, generator=g) * scale).contiguous(memory_format=torch.channels_last)
    if view == "transposed":
        return (torch.randn(k, cg, s, r, generator=g) * scale).transpose(2, 3)
    if view == "sliced":
        return (torch.randn(k + 1, cg + 1, r + 1, s + 2, generator=g) * scale)[1:, :cg, 1:, 1 : s + 1]
    if view == "expanded":
        return (torch.randn(1, cg, r, s, generator=g) * scale).expand(k, cg, r, s)
    return torch.randn(k, cg, r, s, generator=g) * scale


def make_module(cls: type, ex: Example, w: torch.Tensor, b: torch.Tensor | None, **kwargs) -> nn.Conv2d:
    """An nn.Conv2d (or DirectConv2d) of the example whose parameters are w and b, views as they are."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # initialising zero-element parameters
        m = cls(
            ex.c, ex.k, (ex.r, ex.s), ex.stride, ex.padding, ex.dilation, ex.groups,
            bias=b is not None, padding_mode=ex.padding_mode, dtype=w.dtype, **kwargs,
        )  # fmt: skip
    m.weight = nn.Parameter(w, requires_grad=w.requires_grad)
    if b is not None:
        m.bias = nn.Parameter(b, requires_grad=b.requires_grad)
    return m


def forward(ex: Example, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, ours: bool) -> tuple:
    """(output, the leaves to differentiate, a second call or None) on tdc (ours) or torch."""
    if ex.api == "conv2d":
        conv = tdc.conv2d if ours else F.conv2d
        out = conv(x, w, b, ex.stride, ex.padding, ex.dilation, ex.groups)
        return out, [t for t in (x, w, b) if t is not None], None
    if ex.api == "cached":
        m = make_module(tdc.DirectConv2d if ours else nn.Conv2d, ex, w, b, **({"cache_weights": True} if ours else {}))
        return no_grad_call(m, x), [], lambda: no_grad_call(m, x)  # the second call runs on the cached weight
    m = make_module(tdc.DirectConv2d if ours else nn.Conv2d, ex, w, b)
    return m(x), [x, m.weight] + ([m.bias] if b is not None else []), None


def no_grad_call(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return m(x)


def attempt(call: Callable) -> tuple:
    """(result, None), or (None, the exception) when call raises."""
    try:
        return call(), None
    except Exception as e:
        return None, e


def compare_outcomes(ours: tuple, theirs: tuple, what: str, excused: Callable | None = None) -> bool:
    """Where torch raises, tdc raises the same type (as pytest.raises(type) checks); else tdc
    returns, unless excused(its exception). Returns whether both returned."""
    error, torch_error = ours[1], theirs[1]
    if torch_error is not None:
        expected = f"{what}: torch raises {type(torch_error).__name__}: {torch_error}"
        if error is None:
            raise MissingException(f"{expected}; tdc returns")
        if not isinstance(error, type(torch_error)):
            raise WrongException(f"{expected}; tdc raises {type(error).__name__}: {error}") from error
        return False
    if error is None:
        return True
    if excused is not None and excused(error):
        return False
    raise UnexpectedException(f"{what}: torch returns, tdc raises {type(error).__name__}: {error}") from error


def check_reference(ex: Example, want: tuple) -> None:
    """Raises UnreliableReference where torch's CPU convolution gets the output size wrong, as it
    does on some huge geometries: e.g. 0 columns for 2 columns of input, stride 2**32 + 1 and
    padding 2**31 - 1, where the formula gives 1."""
    size = ex.out_size()
    if size is None or max(ex.geometry()) < 2**31:
        return
    out, error = want[0][0] if want[0] else None, want[1]
    got = tuple(out.shape[-2:]) if error is None else str(error)
    if (error is None and got != size) or (error is not None and "Output size is too small" in got):
        raise UnreliableReference(f"float64 torch: {got}; the formula: {size}")


def expect_close(kind: type, got: torch.Tensor, want: torch.Tensor, fan_in: int | None, what: str) -> None:
    """got against float64 torch: the fan-in tolerance for outputs (fan_in), assert_grad_close's for gradients."""
    try:
        if fan_in is None:
            assert_grad_close(got, want.to(got.dtype), what)
        else:
            assert_conv_close(got, want.to(got.dtype), fan_in, what)
    except AssertionError as e:
        raise kind(str(e)) from None


def check_example(ex: Example, threads: tuple[int, int] | None) -> None:
    """tdc against float64 torch on one example, forward and backward.

    threads: the counts set before the first call (the forward) and before the second (the
    backward, or the cached module's second call); None leaves the count alone. The count
    is restored afterwards.
    """
    if threads is None:
        run_example(ex, lambda i: None)
        return
    old = torch.get_num_threads()
    try:
        run_example(ex, lambda i: torch.set_num_threads(threads[i]))
    finally:
        torch.set_num_threads(old)


def run_example(ex: Example, set_threads: Callable) -> None:
    g = torch.Generator().manual_seed(ex.seed)
    x, w = make_input(ex, g), make_weight(ex, g)
    b = torch.randn(ex.k, generator=g) if ex.bias else None
    ours = [None if t is None else t.detach().requires_grad_(ex.backward) for t in (x, w, b)]
    theirs = [None if t is None else t.detach().double().requires_grad_(ex.backward) for t in (x, w, b)]
    # tdc runs first: on a new thread, its call is the first one after the count changed.
    set_threads(0)
    got = attempt(lambda: forward(ex, *ours, ours=True))
    with torch_native(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = attempt(lambda: forward(ex, *theirs, ours=False))
    check_reference(ex, want)

    def excused(error: Exception) -> bool:
        """tdc may raise where float64 torch returns: on invalid arguments that torch leaves
        unchecked on an empty input, and where float32 torch, as a user runs it (oneDNN on, as
        tdc's fallbacks go), raises the same."""
        if ex.invalid and want[0][0].numel() == 0:
            return True
        fp32 = [None if t is None else t.detach() for t in (x, w, b)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch_error = attempt(lambda: forward(ex, *fp32, ours=False))[1]
        return torch_error is not None and isinstance(error, type(torch_error))

    if not compare_outcomes(got, want, "forward", excused):
        return
    (y, leaves, again), (ref, ref_leaves, _) = got[0], want[0]
    expect_close(OutputMismatch, y, ref, ex.fan_in, "output")
    if again is not None:
        set_threads(1)
        y2 = attempt(again)
        if compare_outcomes(y2, (ref, None), "second call", excused):
            expect_close(OutputMismatch, y2[0], ref, ex.fan_in, "output of the second call")
    if not ex.backward:
        return
    grad = torch.randn(ref.shape, generator=g)
    set_threads(1)
    grads = attempt(lambda: torch.autograd.grad(y, leaves, grad))
    with torch_native():
        want_grads = attempt(lambda: torch.autograd.grad(ref, ref_leaves, grad.double()))
    if not compare_outcomes(grads, want_grads, "backward"):
        return
    kinds = (("input", InputGradMismatch), ("weight", WeightGradMismatch), ("bias", BiasGradMismatch))
    for i, ((name, kind), a, e) in enumerate(zip(kinds, grads[0], want_grads[0], strict=False)):
        try:
            expect_close(kind, a, e, None, f"gradient of the {name}")
        except kind:
            torch_fp32 = fp32_torch_gradient(ex, x, w, b, grad, i)
            if torch_fp32 is not None and not grad_close(torch_fp32, e) and grad_close(a, torch_fp32):
                # tdc gives what float32 torch gives, as a user runs it: where that is not float64
                # torch's, the reference is torch's own error (a channels_last weight of some
                # grouped geometries, whose input gradient oneDNN gets wrong), not tdc's.
                raise UnreliableReference(f"float32 torch's gradient of the {name} is not float64 torch's") from None
            raise


def torch_alone(ex: Example) -> None:
    """Float32 torch on ex's tensors, forward and backward, as a user runs it (oneDNN on), its
    errors ignored: whether torch itself survives the example."""
    g = torch.Generator().manual_seed(ex.seed)
    x, w = make_input(ex, g), make_weight(ex, g)
    b = torch.randn(ex.k, generator=g) if ex.bias else None
    leaves = [None if t is None else t.detach().requires_grad_(ex.backward) for t in (x, w, b)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = attempt(lambda: forward(ex, *leaves, ours=False))
        if out[1] is None and ex.backward and out[0][1]:
            y = out[0][0]
            attempt(lambda: torch.autograd.grad(y, out[0][1], torch.ones_like(y)))


def grad_close(got: torch.Tensor, want: torch.Tensor) -> bool:
    try:
        assert_grad_close(got, want.to(got.dtype), "gradient")
    except AssertionError:
        return False
    return True


def fp32_torch_gradient(ex: Example, x, w, b, grad: torch.Tensor, i: int) -> torch.Tensor | None:
    """Float32 torch's gradient of leaf i (as a user runs it, oneDNN on), or None where it raises."""
    leaves = [None if t is None else t.detach().requires_grad_() for t in (x, w, b)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = attempt(lambda: forward(ex, *leaves, ours=False))
        if out[1] is not None:
            return None
        y, ref_leaves, _ = out[0]
        grads = attempt(lambda: torch.autograd.grad(y, ref_leaves, grad))
    return None if grads[1] is not None or i >= len(grads[0]) else grads[0][i]


def check_on_fresh_threads(ex: Example) -> None:
    """check_example on a new thread whose first call comes after the main thread changed the
    count, once for each of SWITCHES.

    Each switch draws other tensors (seed + its index): an output left partly unwritten then
    holds the previous call's different values, never by chance the expected ones.
    """
    for i, (before, after, warm_up) in enumerate(SWITCHES):
        case = dataclasses.replace(ex, seed=ex.seed + i)
        try:
            check_on_fresh_thread(case, before, after, warm_up)
        except AssertionError as e:
            where = f"seed={case.seed}, on a new thread started at {before} threads (warm-up: {warm_up})"
            raise type(e)(f"{where}, called at {after}: {e}") from e


def check_on_fresh_thread(ex: Example, before: int, after: int, warm_up: str) -> None:
    old = torch.get_num_threads()
    torch.set_num_threads(before)
    ready, go = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def work() -> None:
        try:
            if warm_up == "torch":
                torch.randn(1 << 20).sum()
            elif warm_up == "conv":
                tdc.conv2d(torch.randn(1, 8, 9, 9), torch.randn(8, 8, 3, 3), padding=1)
            ready.set()
            go.wait()
            check_example(ex, None)
        except BaseException as e:
            errors.append(e)
        finally:
            ready.set()

    thread = threading.Thread(target=work)
    thread.start()
    try:
        ready.wait()
        torch.set_num_threads(after)
    finally:
        go.set()
        thread.join()
        torch.set_num_threads(old)
    if errors:
        raise errors[0]


class Child:
    """A python that runs the examples for pytest: a crash or a hang there fails its example
    (and a new child starts for the next one) instead of killing pytest."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.log = tempfile.TemporaryFile()  # the child's stderr, from the last call on

    def start(self) -> None:
        tests = os.path.dirname(os.path.abspath(__file__))
        path = os.pathsep.join(p for p in (tests, REPO, os.environ.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-X", "faulthandler", "-c", "import test_fuzz; test_fuzz.serve()"],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": path},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )
        self.answer(STARTUP_TIMEOUT, "starting")

    def run(self, check: Callable, *args) -> None:
        """check(*args) in the child; raises what it raised there, or Crashed, or Hung."""
        if self.proc is None:
            self.start()
        call = f"{check.__name__}{args!r}"
        self.log.seek(0)
        self.log.truncate()
        try:
            self.proc.stdin.write(call + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # answer() says how the child ended
        try:
            kind, message = self.answer(EXAMPLE_TIMEOUT, call)
        except (Crashed, Hung):
            # Where float32 torch alone, as a user runs it, crashes or hangs too (a SIGFPE on
            # some huge dilations under 'same' padding), tdc's fallback to it cannot do better.
            if check is not torch_alone and args and isinstance(args[0], Example) and self.torch_fails(args[0]):
                reject()
            raise
        if kind == UnreliableReference.__name__:
            reject()
        if kind:
            raise failure_type(kind)(message)

    def torch_fails(self, ex: Example) -> bool:
        """Whether float32 torch alone crashes or hangs on ex (in a fresh child)."""
        try:
            self.run(torch_alone, ex)
        except (Crashed, Hung):
            return True
        return False

    def answer(self, timeout: float, call: str) -> list:
        proc = self.proc
        if select.select([proc.stdout], [], [], timeout)[0]:
            line = proc.stdout.readline()
            if line:
                return json.loads(line)
            hung = False
        else:
            hung = True
            proc.kill()
        code = proc.wait()
        self.proc = None
        self.log.seek(0)
        ended = describe(subprocess.CompletedProcess(proc.args, code, "", self.log.read().decode(errors="replace")))
        if hung:
            raise Hung(f"{call} took more than {timeout:.0f} s and was killed: {ended}")
        raise Crashed(f"{call} crashed the child: {ended}")

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def failure_type(name: str) -> type:
    """The exception class the child named: one of FAILURES, a builtin one, else AssertionError."""
    if name in FAILURES:
        return FAILURES[name]
    cls = getattr(builtins, name, None)
    return cls if isinstance(cls, type) and issubclass(cls, Exception) else AssertionError


def serve() -> None:
    """The child's side of Child: runs one call a line, answers [exception type or '', traceback]."""
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever else the process prints goes to the log, not among the answers
    print(json.dumps(["", "ready"]), file=answers, flush=True)
    for line in sys.stdin:
        try:
            eval(line, globals())
            answer = ["", ""]
        except BaseException as e:
            answer = [type(e).__name__, "".join(traceback.format_exception(e))]
        print(json.dumps(answer), file=answers, flush=True)


@pytest.fixture(scope="module")
def child() -> Iterator[Child]:
    runner = Child()
    yield runner
    runner.close()


# No example database (nothing is written into the repo). conftest's seeding fixture is
# function-scoped: it runs once per test, which is fine, the examples seed their own tensors.
FAST = settings(
    max_examples=300,
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=False,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
SLOW = settings(FAST, max_examples=2000, derandomize=False)
MAIN_THREAD = dict(ex=examples(), threads=st.tuples(THREADS, THREADS))
FRESH_THREAD = dict(ex=examples(edge=False))


@FAST
@given(**MAIN_THREAD)
def test_matches_float64_torch(child: Child, ex: Example, threads: tuple[int, int]) -> None:
    """tdc against float64 torch, forward and backward, the thread count set before each call."""
    child.run(check_example, ex, threads)


@pytest.mark.slow
@SLOW
@given(**MAIN_THREAD)
def test_matches_float64_torch_long(child: Child, ex: Example, threads: tuple[int, int]) -> None:
    child.run(check_example, ex, threads)


@settings(FAST, max_examples=50)
@given(**FRESH_THREAD)
def test_first_call_on_a_fresh_thread(child: Child, ex: Example) -> None:
    """The first call on a new thread after the main thread changed the thread count."""
    child.run(check_on_fresh_threads, ex)


@pytest.mark.slow
@settings(SLOW, max_examples=500)
@given(**FRESH_THREAD)
def test_first_call_on_a_fresh_thread_long(child: Child, ex: Example) -> None:
    child.run(check_on_fresh_threads, ex)
