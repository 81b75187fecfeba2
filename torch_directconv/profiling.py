"""op_times(): where a model's time goes, by the project's own op timers.

    with tdc.op_times() as t:
        loss = model(x).sum(); loss.backward()
    print(t.table())               # per op: total ms and calls; per kind, with "outside our ops"

Every directconv op (forward and backward, the layout conversions, the fused batch-norm and
pooling passes) is timed from the dispatcher's RecordFunction hook, wall time of the
outermost op per thread. Unlike torch.profiler it records no shapes, stacks or events, so a
short op costs about a microsecond more, not tens. Time outside the ops (torch's own ops,
the optimizer, Python) is the block's wall time minus theirs.
"""

from __future__ import annotations

import contextlib
import time

from . import _backend

# The kinds a time breakdown reports, by op name (presentation only: the ops themselves do
# not depend on it). First match wins.
KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("conv input gradient", ("conv2d_backward_data", "conv2d_blocked_backward_data")),
    ("conv weight gradient", ("conv2d_backward_weight", "conv2d_blocked_backward_weight")),
    ("conv forward", ("conv2d",)),
    ("layout conversions", ("to_blocked", "from_blocked", "pack_weight")),
    ("fused element-wise", ("bn_", "batch_norm", "max_pool", "avg_pool", "global_avg_pool")),
)


def kind_of(op: str) -> str:
    """The breakdown kind of a directconv op name (without the namespace)."""
    for kind, prefixes in KINDS:
        if op.startswith(prefixes):
            return kind
    return "other directconv ops"


class OpTimes:
    """What op_times() measured: `ops` maps an op name to (seconds, calls); `wall` is the
    block's wall time in seconds."""

    def __init__(self) -> None:
        self.ops: dict[str, tuple[float, int]] = {}
        self.wall = 0.0

    def by_kind(self) -> dict[str, float]:
        """Seconds per kind, plus "outside our ops" (the wall time not spent in any op)."""
        kinds: dict[str, float] = {}
        for op, (seconds, _) in self.ops.items():
            kinds[kind_of(op)] = kinds.get(kind_of(op), 0.0) + seconds
        kinds["outside our ops"] = max(0.0, self.wall - sum(kinds.values()))
        return kinds

    def table(self) -> str:
        lines = [f"wall {1e3 * self.wall:.2f} ms"]
        for kind, seconds in sorted(self.by_kind().items(), key=lambda kv: -kv[1]):
            share = 100 * seconds / self.wall if self.wall else 0.0
            lines.append(f"  {kind:<24} {1e3 * seconds:9.2f} ms {share:5.1f}%")
        lines.append("per op:")
        for op, (seconds, calls) in sorted(self.ops.items(), key=lambda kv: -kv[1][0]):
            lines.append(f"  {op:<36} {1e3 * seconds:9.2f} ms {calls:6d} calls")
        return "\n".join(lines)


@contextlib.contextmanager
def op_times():
    """Times every directconv op run inside the block (any thread); yields an OpTimes, filled
    when the block ends. Blocks do not nest."""
    result = OpTimes()
    native = _backend._C  # None where the extension did not load: nothing of ours runs then
    if native is not None:
        native.op_timers_start()
    t0 = time.perf_counter()
    try:
        yield result
    finally:
        result.wall = time.perf_counter() - t0
        if native is not None:
            result.ops = dict(native.op_timers_stop())
