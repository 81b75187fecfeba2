#!/usr/bin/env python
"""bf16 weight gradient per ResNet-50 layer: the project's kernels (fp32 dW, for fp32 master
weights; bf16 with --dw bf16) at the amx level (the default) or, with --level avx512_bf16, the
vdpbf16ps kernels, against torch's bf16 weight gradient in channels_last (oneDNN on AMX here:
aten.convolution_backward with output_mask [False, True, False]), and against the core's peak
of the level (the tdpbf16ps loop, or the vdpbf16ps one).

The project's side runs in the C++ helper bench_bf16_upd_amx (built by CMake into
build/core; the bf16 kernels are not wired into the torch ops yet), which answers one
timing command at a time, so the two sides and the peak loop take turns in every round.
Each cell is the median over the rounds of per-round medians of single calls (the peak:
of chunks of 4,000 products). GFLOP/s are nominal (2*N*K*C*R*S*P*Q); % of peak is of the
one-core peak times the threads.

    python bench/bench_bf16_upd.py [--layers L03,L17] [--rounds 5] [--min-time 0.05] [--n 1] [--threads 1]
                                   [--dw f32] [--level amx|avx512_bf16]
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
from bench_bf16_fwd import Helper  # noqa: E402
from problems import select_layers  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def torch_time(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, stride: tuple, pad: tuple, min_time: float) -> float:
    def call() -> None:
        torch.ops.aten.convolution_backward(dy, x, w, None, stride, pad, (1, 1), False, (0, 0), 1, (False, True, False))

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
    ap.add_argument("--threads", type=int, default=1, choices=(1, 2))
    ap.add_argument("--dw", default="f32", choices=("f32", "bf16"), help="our dW's type (torch's is bf16)")
    ap.add_argument("--level", default="amx", choices=("amx", "avx512_bf16"), help="our kernels' level")
    ap.add_argument("--helper", default=str(ROOT / "build" / "core" / "bench_bf16_upd_amx"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    helper = Helper(Path(args.helper))
    r0, w0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak_cmd, peak_name = ("peak", "AMX peak") if args.level == "amx" else ("dotpeak", "vdpbf16ps peak")
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), N={args.n}, our dW {args.dw}, level {args.level},"
        f" {args.rounds} rounds of >= {args.min_time}s samples"
    )
    print(f"load average at start: {os.getloadavg()}")
    print(f"| layer | problem | ours GFLOP/s | % {peak_name} | torch CL GFLOP/s | % {peak_name} | ours / torch |")
    print("|---|---|---:|---:|---:|---:|---:|")
    ratios, weighted_ours, weighted_torch, pcts, peaks_all = [], 0.0, 0.0, [], []
    for layer in select_layers(args.layers):
        c = layer.conv
        problem = f"mb{args.n}" + layer.problem
        flops = 2.0 * args.n * c.oc * c.ic * c.kh * c.kw * c.oh * c.ow
        cl = torch.channels_last
        x = torch.randn(args.n, c.ic, c.ih, c.iw).to(torch.bfloat16).contiguous(memory_format=cl)
        w = torch.randn(c.oc, c.ic, c.kh, c.kw).to(torch.bfloat16).contiguous(memory_format=cl)
        dy = torch.randn(args.n, c.oc, c.oh, c.ow).to(torch.bfloat16).contiguous(memory_format=cl)
        ours, theirs, peaks = [], [], []
        upd = f"upd {problem} {args.threads} {{}} {args.dw} {args.level}"
        helper.ask(upd.format(0.01))  # plan and generate before timing
        for _ in range(args.rounds):
            ours.append(helper.ask(upd.format(args.min_time)))
            theirs.append(torch_time(dy, x, w, c.stride, c.padding, args.min_time))
            peaks.append(args.threads * helper.ask(f"{peak_cmd} {args.min_time}"))
        t_ours, t_torch, peak = statistics.median(ours), statistics.median(theirs), statistics.median(peaks)
        peaks_all.append(peak)
        g_ours, g_torch = flops / t_ours / 1e9, flops / t_torch / 1e9
        ratios.append(t_torch / t_ours)
        pcts.append(100 * g_ours / peak)
        weighted_ours += layer.count * t_ours
        weighted_torch += layer.count * t_torch
        print(
            f"| {layer.id} {layer.name} | {problem} | {g_ours:.0f} | {100 * g_ours / peak:.1f}% | {g_torch:.0f} |"
            f" {100 * g_torch / peak:.1f}% | {t_torch / t_ours:.2f}x |",
            flush=True,
        )
    helper.close()
    r1, w1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime) + (
        c1.ru_utime - c0.ru_utime + c1.ru_stime - c0.ru_stime
    )
    print(f"{peak_name} x threads (own loop, median of the layers' medians): {statistics.median(peaks_all):.0f} GFLOP/s")
    print(f"network-weighted (time x count over the layers): ours / torch = {weighted_torch / weighted_ours:.2f}x")
    print(f"median per-layer ratio {statistics.median(ratios):.2f}x,", end=" ")
    print(f"median % of {peak_name} {statistics.median(pcts):.1f}%")
    print(f"CPU time / wall time over the run: {cpu / (w1 - w0):.2f} ({args.threads}.0: all ours)")
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
