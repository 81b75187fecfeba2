"""Loads the compiled extension and keeps the fallback bookkeeping.

On a CPU without AVX2, off x86, or where the extension cannot load, every call goes to
PyTorch's own convolution, and a warning says so once per reason.
"""

from __future__ import annotations

import os
import platform
import threading
import warnings

import torch  # noqa: F401  (loads libtorch, which _C links against)
from torch._prims_common import suggest_memory_format

try:
    from . import _C  # noqa: F401  (also registers torch.ops.directconv)

    _LOAD_ERROR: str | None = None
except ImportError as e:  # pragma: no cover - only on broken or foreign installs
    _C = None
    _LOAD_ERROR = f"the compiled extension could not be loaded ({e})"

_lock = threading.Lock()
_warned: set[str] = set()
_fallbacks = 0


def _new_lock_in_child() -> None:
    # A fork may copy _lock held by a thread the child does not have. Each change to what it
    # guards is one step under the GIL, so the child finds those whole: it needs only a lock.
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_new_lock_in_child)


def _constant_under_compile(fn):
    # The ISA does not change while a compiled graph runs; torch.compile may bake it in.
    return torch._dynamo.assume_constant_result(fn)


@_constant_under_compile
def isa() -> str:
    """The active ISA level: 'amx', 'avx512_bf16', 'avx512', 'avx2' or 'none' (PyTorch's
    convolution). The fp32 kernels run their avx512 code at the two bf16 levels."""
    if _C is None or not _IS_X86:
        return "none"
    return _C.isa()


def isa_levels() -> list[str]:
    """The levels this CPU offers (and the OS saves the state of), lowest first, from 'none'
    up: 'amx' too where the OS refuses this process AMX tile data (runnable_isa_levels() then
    stops at 'avx512_bf16')."""
    if _C is None or not _IS_X86:
        return ["none"]
    return list(_C.isa_levels())


def runnable_isa_levels() -> list[str]:
    """The levels this process may run, lowest first, from 'none' up: the values
    TORCH_DIRECTCONV_ISA can usefully take here (isa_levels() without 'amx' where the OS
    refuses tile data)."""
    if _C is None or not _IS_X86:
        return ["none"]
    return list(_C.runnable_isa_levels())


@_constant_under_compile
def jit_covers_groups(groups: int, out_channels: int, in_channels_per_group: int) -> bool:
    """Whether the JIT kernels cover these groups (the C++ rule, conv/paths.h)."""
    return _C.jit_covers_groups(groups, out_channels, in_channels_per_group)


@_constant_under_compile
def bf16_fallback_reason(groups: int) -> str | None:
    """Why a bf16 convolution of these groups runs on torch's convolution at the active level, or
    None when the bf16 kernels of that level (amx or avx512_bf16) take it (the C++ rule, conv/paths.h)."""
    return _C.bf16_fallback_reason(groups)


@_constant_under_compile
def vector_width(dtype: torch.dtype = torch.float32) -> int:
    """Channels per block of the blocked layouts of dtype: for float32 16 from the avx512 level
    up, 8 for AVX2; for bfloat16 32 (rows of 64 bytes, whatever the level); 0 when the JIT is off."""
    if _C is None or not _IS_X86 or _C.isa() == "none":
        return 0
    return _C.bf16_vector_width() if dtype == torch.bfloat16 else _C.vector_width()


def note_fallback(reason: str) -> None:
    """Counts a call that goes to torch's convolution, and warns once per reason.

    Not while torch.compile traces: the choice is made at trace time and the compiled graph
    simply calls torch's convolution, so there is nothing to count per call.
    """
    global _fallbacks
    if torch.compiler.is_compiling():
        return
    with _lock:
        _fallbacks += 1
        first = reason not in _warned
        _warned.add(reason)
    if first:
        warnings.warn(f"torch_directconv: {reason}; using PyTorch's convolution", RuntimeWarning, stacklevel=4)


_IS_X86 = platform.machine().lower() in ("x86_64", "amd64")


@_constant_under_compile
def no_jit_reason() -> str | None:
    """Why the JIT cannot run at all on this machine, or None when it can."""
    if _C is not None and _IS_X86 and _C.isa() != "none":
        return None
    if _C is None:
        return _LOAD_ERROR
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"this CPU ({platform.machine()}) is not x86-64"
    if _C.isa() == "none":
        if _C.detected_isa() == "none":
            return "this CPU has neither AVX-512 nor AVX2"
        return "the JIT is disabled (TORCH_DIRECTCONV_ISA=none)"
    return None


def is_channels_last(t: torch.Tensor) -> bool:
    """Whether torch would treat t as channels_last (its suggested memory format)."""
    if t.dim() != 4:
        return False
    if suggest_memory_format(t) == torch.channels_last:
        return True
    # An empty batch suggests no format, but torch still follows its channels_last strides.
    return t.numel() == 0 and t.shape[1] > 1 and t.stride(1) == 1 and t.is_contiguous(memory_format=torch.channels_last)


def jit_stats() -> dict:
    """Kernel-cache statistics; 'kernels' counts generated kernels, 'fallbacks' calls sent to torch."""
    stats = dict(_C.jit_stats()) if _C is not None else {"kernels": 0}
    # Calls the Python layer sent to torch, and those the ops sent there themselves.
    stats["fallbacks"] = _fallbacks + stats.get("aten_fallbacks", 0)
    stats["isa"] = isa()
    return stats


def pool_stats() -> dict:
    """The tensor pool's counters: the memory the ops' outputs, saved tensors and gradients come from.

    'held_bytes' / 'held_blocks' are kept for reuse, 'in_use_bytes' back live tensors, 'peak_bytes'
    is the most ever mapped at once; 'hits' are requests served by a held block, 'misses' by fresh
    pages; 'released_blocks' went back to the OS; 'cap_bytes' bounds what is held
    (TORCH_DIRECTCONV_POOL_MB) and 'min_bytes' is the smallest tensor the pool takes.
    """
    return dict(_C.pool_stats()) if _C is not None else {}


def empty_cache() -> None:
    """Returns every block the tensor pool holds to the OS. Tensors in use keep their memory."""
    if _C is not None:
        _C.empty_pool()
