"""op_times(): the project's own op timers count every directconv op of a block, once."""

import threading

import pytest
import torch

import torch_directconv as tdc
from torch_directconv import profiling
from helpers import requires_jit


@requires_jit
def test_counts_each_op_of_a_training_step_once():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 8, 8, generator=g, requires_grad=True)
    w = torch.randn(16, 16, 3, 3, generator=g, requires_grad=True)
    xb, wb = tdc.to_blocked(x), tdc.to_blocked_weight(w)  # outside the block: not counted
    with tdc.op_times() as t:
        y = tdc.conv2d_blocked(xb, wb, padding=1)
        y.sum().backward()
    ops = {name: calls for name, (_, calls) in t.ops.items()}
    assert ops["conv2d_blocked"] == 1
    assert ops["conv2d_blocked_backward_data"] == 1
    assert ops["conv2d_blocked_backward_weight"] == 1
    # The backward of the conversions made before the block runs inside it.
    assert ops["from_blocked"] == 1
    assert "to_blocked" not in ops
    kinds = t.by_kind()
    assert kinds["conv forward"] > 0 and kinds["conv input gradient"] > 0 and kinds["conv weight gradient"] > 0
    assert sum(s for k, s in kinds.items() if k != "outside our ops") <= t.wall
    assert "conv2d_blocked" in t.table()


@requires_jit
def test_stops_at_the_end_of_the_block():
    x = torch.randn(1, 16, 4, 4)
    with tdc.op_times() as t:
        tdc.to_blocked(x)
    tdc.to_blocked(x)
    with tdc.op_times() as t2:
        pass
    assert t.ops["to_blocked"][1] == 1
    assert t2.ops == {}


@requires_jit
def test_counts_ops_of_other_threads():
    x = torch.randn(1, 16, 4, 4)
    with tdc.op_times() as t:
        threads = [threading.Thread(target=tdc.to_blocked, args=(x,)) for _ in range(3)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    assert t.ops["to_blocked"][1] == 3


@pytest.mark.parametrize(
    ("op", "kind"),
    [
        ("conv2d", "conv forward"),
        ("conv2d_packed", "conv forward"),
        ("conv2d_blocked_backward_weight", "conv weight gradient"),
        ("conv2d_backward_data", "conv input gradient"),
        ("to_blocked_weight", "layout conversions"),
        ("bn_backward_blocked", "fused element-wise"),
        ("max_pool2d_blocked_backward", "fused element-wise"),
        ("something_new", "other directconv ops"),
    ],
)
def test_kinds(op, kind):
    assert profiling.kind_of(op) == kind
