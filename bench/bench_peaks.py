"""The machine's peaks, measured by the project's own loops: the fp32 FMA peak and, where the
level allows, the bf16 vdpbf16ps (avx512_bf16) and AMX tdpbf16ps (amx) peaks.

    python bench/bench_peaks.py --threads 1 2 --rounds 5

Each round times every loop once at every thread count, interleaved, so that a noisy
neighbour hits them all alike; the table gives the median GFLOP/s over the rounds, the ratio
to the fp32 FMA peak, and the CPUs the process kept busy (a 2-thread figure is a 2-core
figure only when that is near 2).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import PEAKS, Timing, available_peaks, measure_peak  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=0.2, help="length of one timed run of a loop")
    ap.add_argument("--isa-cap", choices=("avx2", "avx512", "avx512_bf16", "amx"), default=None)
    args = ap.parse_args()

    import torch
    import torch_directconv as tdc

    if args.isa_cap:
        tdc._C.set_isa_cap(args.isa_cap)
    kinds = available_peaks(tdc)
    if not kinds:
        sys.exit("the JIT is not active on this machine (isa() == 'none'); no peak loop to run")
    timing = Timing(samples=1, min_time=0.0, warmup=0, peak_runs=1, peak_seconds=args.seconds)
    gflops = {(k, t): [] for k in kinds for t in args.threads}
    busy = {(k, t): [] for k in kinds for t in args.threads}
    for _ in range(args.rounds):
        for t in args.threads:
            torch.set_num_threads(t)
            for k in kinds:
                g, b = measure_peak(tdc, t, timing, k)
                gflops[k, t].append(g)
                busy[k, t].append(b)
    print(
        f"torch {torch.__version__}, level {tdc.isa()} (offered: {', '.join(tdc.isa_levels())}); "
        f"median of {args.rounds} rounds of {args.seconds} s; load average at the end {os.getloadavg()[0]:.2f}"
    )
    print(f"{'loop':<20} {'level':<12} " + " ".join(f"{f'{t}T GFLOP/s':>13} {'x FMA':>6} {'busy':>5}" for t in args.threads))
    for k in kinds:
        cells = []
        for t in args.threads:
            med = statistics.median(gflops[k, t])
            fma = statistics.median(gflops["fp32 FMA", t])
            cells.append(f"{med:13.1f} {med / fma:6.2f} {statistics.median(busy[k, t]):5.2f}")
        print(f"{k:<20} {PEAKS[k][0]:<12} " + " ".join(cells))


if __name__ == "__main__":
    main()
