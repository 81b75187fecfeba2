"""The forward kernels' fused epilogue on ResNet-50's conv3 layers (the 1x1 that closes each
bottleneck, followed in eval by the residual add and the ReLU), blocked tensors throughout:

- fused:    conv2d_blocked(xb, wb, b, relu=True, residual=rb), one pass;
- bn_apply: conv2d_blocked(xb, wb, b), then blocked_ops.bn_apply(scale 1, shift 0, rb, relu);
- add_relu: conv2d_blocked(xb, wb, b), then torch's y.add_(rb).relu_();
- conv:     conv2d_blocked(xb, wb, b) alone, the floor;

and, for training (no bias), the batch statistics of the output:

- stats:    conv2d_blocked_stats(xb, wb, channels=K, shift=running mean), one pass;
- bn_stats: conv2d_blocked(xb, wb), then blocked_ops.bn_stats (the exact statistics pass).

Timing: median of `--samples` samples of at least `--min-time` s each, round-robin over the
methods within each layer, so a slow spell of the machine falls on all of them. `cpu/wall` is
the process's CPU time over the wall time of the timed part: about the thread count when the
CPUs were ours, less when another process took them. On a shared machine, `--clock cpu` (one
thread only) times each sample by the thread's own CPU time, which the time other processes
take from it does not inflate (their pressure on the caches still shows).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

import torch

import torch_directconv as tdc
from torch_directconv import blocked_ops as bo

# (name, input channels, input height = width, output channels) of ResNet-50 v1.5's conv3s.
LAYERS = [
    ("res2_conv3", 64, 56, 256),
    ("res3_conv3", 128, 28, 512),
    ("res4_conv3", 256, 14, 1024),
    ("res5_conv3", 512, 7, 2048),
]


def sample(fn, min_time: float, clock) -> float:
    """Seconds per call over at least min_time of `clock`."""
    calls, start = 0, clock()
    while True:
        fn()
        calls += 1
        elapsed = clock() - start
        if elapsed >= min_time:
            return elapsed / calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--samples", type=int, default=15)
    ap.add_argument("--min-time", type=float, default=0.05)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    args = ap.parse_args()
    if args.clock == "cpu" and args.threads != 1:
        ap.error("--clock cpu times one thread: use it with --threads 1")
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    print(
        f"isa={tdc.isa()} threads={args.threads} N={args.batch} samples={args.samples}x{args.min_time}s "
        f"clock={args.clock} "
        f"loadavg at start: {os.getloadavg()[0]:.2f}"
    )
    header = f"{'layer':<12}{'problem':<20}{'fused':>8}{'bn_apply':>10}{'add_relu':>10}{'conv':>8}"
    header += f"{'stats':>8}{'bn_stats':>10}{'conv nb':>9}"
    print(header + f"{'bn_apply/fused':>16}{'add_relu/fused':>16}{'bn_stats/stats':>16}{'cpu/wall':>10}  (us)")
    g = torch.Generator().manual_seed(0)
    for name, c, hw, k in LAYERS:
        n = args.batch
        xb = tdc.to_blocked(torch.randn(n, c, hw, hw, generator=g))
        wb = tdc.to_blocked_weight(torch.randn(k, c, 1, 1, generator=g) / c**0.5)
        b = torch.randn(k, generator=g)
        rb = tdc.to_blocked(torch.randn(n, k, hw, hw, generator=g))
        ones, zeros = torch.ones(k), torch.zeros(k)
        _, running_mean, _ = tdc.conv2d_blocked_stats(xb, wb, channels=k)
        fns = {
            "fused": lambda: tdc.conv2d_blocked(xb, wb, b, relu=True, residual=rb),
            "bn_apply": lambda: bo.bn_apply(tdc.conv2d_blocked(xb, wb, b), k, ones, zeros, rb, relu=True),
            "add_relu": lambda: tdc.conv2d_blocked(xb, wb, b).add_(rb).relu_(),
            "conv": lambda: tdc.conv2d_blocked(xb, wb, b),
            "stats": lambda: tdc.conv2d_blocked_stats(xb, wb, channels=k, shift=running_mean),
            "bn_stats": lambda: bo.bn_stats(tdc.conv2d_blocked(xb, wb), k),
            "conv nb": lambda: tdc.conv2d_blocked(xb, wb),
        }
        recomputed = tdc.jit_stats()["conv_stats_recomputed"]
        with torch.no_grad():
            want = fns["add_relu"]()
            for key in ("fused", "bn_apply"):
                torch.testing.assert_close(fns[key](), want, rtol=1e-5, atol=1e-5)
            _, mean, var = fns["stats"]()
            exact_mean, exact_var = fns["bn_stats"]()
            torch.testing.assert_close((mean, var), (exact_mean, exact_var), rtol=1e-4, atol=1e-5)
            times = {key: [] for key in fns}
            r0, w0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            for _ in range(args.samples):
                for key, fn in fns.items():
                    times[key].append(sample(fn, args.min_time, clock))
            r1, w1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        assert tdc.jit_stats()["conv_stats_recomputed"] == recomputed, "the statistics needed the exact pass"
        busy = ((r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)) / (w1 - w0)
        med = {key: statistics.median(t) * 1e6 for key, t in times.items()}
        problem = f"mb{n}ic{c}ih{hw}oc{k}"
        print(
            f"{name:<12}{problem:<20}{med['fused']:>8.1f}{med['bn_apply']:>10.1f}{med['add_relu']:>10.1f}"
            f"{med['conv']:>8.1f}{med['stats']:>8.1f}{med['bn_stats']:>10.1f}{med['conv nb']:>9.1f}"
            f"{med['bn_apply'] / med['fused']:>16.3f}{med['add_relu'] / med['fused']:>16.3f}"
            f"{med['bn_stats'] / med['stats']:>16.3f}{busy:>10.2f}"
        )
    print(f"loadavg at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
