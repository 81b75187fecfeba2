"""torch_directconv: JIT-generated direct convolutions for x86 CPUs, as PyTorch ops.

    import torch_directconv as tdc
    y = tdc.conv2d(x, w, b, stride=1, padding=1)      # same as F.conv2d
    model = tdc.convert(model)                         # every nn.Conv2d -> DirectConv2d

See README.md for the blocked API, the environment variables and the benchmark.
"""

from . import _autograd, _blocked_ops, _fake, blocked_ops  # noqa: F401  (register autograd and the fake kernels)
from . import distributed
from ._backend import empty_cache, isa, isa_levels, jit_stats, pool_stats, runnable_isa_levels, vector_width
from .blocked import (
    conv2d_blocked,
    conv2d_blocked_stats,
    from_blocked,
    from_blocked_weight,
    to_blocked,
    to_blocked_weight,
)
from .explain import explain
from .functional import conv2d
from .modules import DirectConv2d, convert
from .optimize import OptimizedModule, optimize
from .profiling import op_times

__all__ = [
    "DirectConv2d",
    "OptimizedModule",
    "blocked_ops",
    "conv2d",
    "conv2d_blocked",
    "conv2d_blocked_stats",
    "convert",
    "distributed",
    "empty_cache",
    "explain",
    "from_blocked",
    "from_blocked_weight",
    "isa",
    "isa_levels",
    "jit_stats",
    "op_times",
    "optimize",
    "pool_stats",
    "runnable_isa_levels",
    "to_blocked",
    "to_blocked_weight",
    "vector_width",
]
__version__ = "0.1.0"
