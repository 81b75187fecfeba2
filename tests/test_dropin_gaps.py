"""Places where DirectConv2d, convert() and tdc.conv2d were not yet drop-ins for torch's: each
test runs the same thing under torch and under torch_directconv and wants the same answer, or
the same kind of error.

- the cached packed weight follows a new tensor even at the address of the old one.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

from helpers import assert_conv_close, requires_jit
from torch_directconv import DirectConv2d

pytestmark = requires_jit


# --- the cached packed weight and the address of a new weight ---------------------------------


def test_cached_weight_follows_a_new_storage_at_the_old_address() -> None:
    """weight.data = a tensor whose storage starts where the old one did is still a new weight.

    Two numpy-backed tensors on one buffer are two storages at one address: the exact case of
    the allocator handing a freed weight's block to the next tensor, made deterministic.
    """
    torch.manual_seed(20)
    m = DirectConv2d(8, 8, 3, cache_weights=True).eval()
    x = torch.randn(2, 8, 7, 7)
    buf = np.empty(tuple(m.weight.shape), np.float32)
    with torch.no_grad():
        for i in range(3):
            buf[...] = np.random.default_rng(i).standard_normal(buf.shape)
            m.weight.data = torch.from_numpy(buf)
            assert_conv_close(m(x), F.conv2d(x, m.weight, m.bias), 72, f"round {i}")


def test_cached_weight_holds_no_copy_of_an_old_weight() -> None:
    """Once the cache follows a new weight, nothing keeps the old weight's storage alive."""
    torch.manual_seed(21)
    m = DirectConv2d(8, 8, 3, cache_weights=True).eval()
    x = torch.randn(1, 8, 6, 6)
    with torch.no_grad():
        m(x)
        old = StorageWeakRef(m.weight.untyped_storage())
        m.weight.data = torch.randn(m.weight.shape)
        m(x)
        assert old.expired(), "the cache still holds the old weight's storage after packing the new one"
        old = StorageWeakRef(m.weight.untyped_storage())
        m.weight = nn.Parameter(torch.randn(m.weight.shape))
        m(x)
        assert old.expired(), "the cache still holds the replaced Parameter's storage"
        old = StorageWeakRef(m.weight.untyped_storage())
        m.weight.data = torch.randn(m.weight.shape)
        m.refresh_packed_weight()
        assert old.expired(), "refresh_packed_weight() kept the old storage"


