#!/usr/bin/env python
"""bf16 input gradient (bwd_data) on AMX, per ResNet-50 layer: the project's kernels against
torch's bf16 input gradient in channels_last (aten.convolution_backward with output_mask
[True, False, False]; oneDNN on AMX here), and against the core's AMX peak (times the
threads).

As bench_bf16_fwd.py: the project's side runs in the C++ helper bench_bf16_fwd_amx (built
by CMake into build/core), which answers one timing command at a time, so the two sides
and the peak loop take turns in every round. Each cell is the median over the rounds of
per-round medians of single calls. GFLOP/s are nominal (2*N*K*C*R*S*P*Q, the forward's).

Our calls take weights packed beforehand; torch's reorder theirs in every call (oneDNN's
verbose log shows it), which is what a caller of torch pays. Packing ours from fp32
(conv/bf16_pack.h, on the same threads) is once per call in the blocked ops; its time is
its own column, with its share of our kernels' time, and the last summary line adds it to
ours. ResNet-50's training shape at 2 threads: --n 4 --threads 2.

    python bench/bench_bf16_bwd.py [--layers L03,L17] [--rounds 5] [--min-time 0.05] [--n 1]
                                   [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_bf16_fwd import ROOT, Helper  # noqa: E402
from problems import select_layers  # noqa: E402


def torch_time(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, stride: int, pad: int, min_time: float) -> float:
    def call() -> None:
        torch.ops.aten.convolution_backward(
            dy, x, w, None, [stride, stride], [pad, pad], [1, 1], False, [0, 0], 1, [True, False, False]
        )

    call()
    times = []
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < min_time or len(times) < 3:
        a = time.perf_counter()
        call()
        times.append(time.perf_counter() - a)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default=None, help="comma-separated ids or names (default: all 23)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--min-time", type=float, default=0.05, help="seconds per sample")
    ap.add_argument("--n", type=int, default=1, help="batch size")
    ap.add_argument("--threads", type=int, default=1, help="threads of both sides (ours: the helper's pool)")
    ap.add_argument("--helper", default=str(ROOT / "build" / "core" / "bench_bf16_fwd_amx"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    helper = Helper(Path(args.helper))
    r0, w0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), N={args.n},"
        f" {args.rounds} rounds of >= {args.min_time}s samples"
    )
    print(f"load average at start: {os.getloadavg()}")
    print(
        "| layer | problem | ours GFLOP/s | % AMX peak | torch CL GFLOP/s | % AMX peak | ours / torch |"
        " ours: pack us | pack / ours | ours / torch with pack |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    ratios, pcts, peaks_all = [], [], []
    weighted_ours, weighted_torch, weighted_pack = 0.0, 0.0, 0.0
    cl = torch.channels_last
    for layer in select_layers(args.layers):
        c = layer.conv
        problem = f"mb{args.n}" + layer.problem
        flops = 2.0 * args.n * c.oc * c.ic * c.kh * c.kw * c.oh * c.ow
        x = torch.randn(args.n, c.ic, c.ih, c.iw).to(torch.bfloat16).contiguous(memory_format=cl)
        w = torch.randn(c.oc, c.ic, c.kh, c.kw).to(torch.bfloat16).contiguous(memory_format=cl)
        dy = torch.randn(args.n, c.oc, c.oh, c.ow).to(torch.bfloat16).contiguous(memory_format=cl)
        ours, theirs, peaks = [], [], []
        packs = []
        helper.ask(f"bwd_data {problem} 0.01 {args.threads}")  # plan and generate before timing
        for _ in range(args.rounds):
            ours.append(helper.ask(f"bwd_data {problem} {args.min_time} {args.threads}"))
            theirs.append(torch_time(dy, x, w, c.sh, c.ph, args.min_time))
            peaks.append(args.threads * helper.ask(f"peak {args.min_time}"))
            packs.append(helper.ask(f"bwd_data_pack {problem} {args.min_time} {args.threads}"))
        t_ours, t_torch, peak = statistics.median(ours), statistics.median(theirs), statistics.median(peaks)
        t_pack = statistics.median(packs)
        peaks_all.append(peak)
        weighted_pack += layer.count * t_pack
        g_ours, g_torch = flops / t_ours / 1e9, flops / t_torch / 1e9
        ratios.append(t_torch / t_ours)
        pcts.append(100 * g_ours / peak)
        weighted_ours += layer.count * t_ours
        weighted_torch += layer.count * t_torch
        print(
            f"| {layer.id} {layer.name} | {problem} | {g_ours:.0f} | {100 * g_ours / peak:.1f}% | {g_torch:.0f} |"
            f" {100 * g_torch / peak:.1f}% | {t_torch / t_ours:.2f}x | {1e6 * t_pack:.0f} | {t_pack / t_ours:.2f} |"
            f" {t_torch / (t_ours + t_pack):.2f}x |",
            flush=True,
        )
    helper.close()
    r1, w1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime) + (
        c1.ru_utime - c0.ru_utime + c1.ru_stime - c0.ru_stime
    )
    print(
        f"AMX peak (own loop at 1 thread, times {args.threads}, median of the layers' medians):"
        f" {statistics.median(peaks_all):.0f} GFLOP/s"
    )
    print(f"network-weighted (time x count over the layers): ours / torch = {weighted_torch / weighted_ours:.2f}x")
    print(
        f"network-weighted with our weight packing ({args.threads} thread(s)) added: ours / torch ="
        f" {weighted_torch / (weighted_ours + weighted_pack):.2f}x"
    )
    print(f"median per-layer ratio {statistics.median(ratios):.2f}x,", end=" ")
    print(f"median % of AMX peak {statistics.median(pcts):.1f}%")
    print(f"CPU time / wall time over the run: {cpu / (w1 - w0):.2f} (1.0: one core, all ours)")
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
