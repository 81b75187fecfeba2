#!/usr/bin/env python
"""bf16 forward at the torch level, per ResNet-50 layer: tdc.conv2d on bf16 NCHW tensors (the
layout conversions, the per-call weight packing and the AMX kernels included) against torch's
bf16 F.conv2d in channels_last (oneDNN on AMX here); and, under CPU autocast, DirectConv2d
against nn.Conv2d on fp32 NCHW (ours) and channels_last (torch) inputs, autocast's casts
included. The "cached" columns are DirectConv2d(cache_weights=True) (inference: the bf16
packing kept), on the bf16 input and under autocast.

The variants take turns within every round; each cell is the median over the rounds of
per-round medians of single calls. GFLOP/s are nominal (2*N*K*C*R*S*P*Q).

    python bench/bench_bf16_ops.py [--layers L03,L17] [--rounds 5] [--min-time 0.05] [--n 1] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import sample_median  # noqa: E402
from problems import select_layers  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch_directconv as tdc  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default=None, help="comma-separated ids or names (default: all 23)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--min-time", type=float, default=0.05, help="seconds per sample")
    ap.add_argument("--n", type=int, default=1, help="batch size")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    why = tdc._backend.bf16_fallback_reason(1)
    if why:
        sys.exit(f"bench_bf16_ops: {why}")
    torch.set_num_threads(args.threads)
    r0, w0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    print(f"torch {torch.__version__}, level {tdc.isa()}, {args.threads} thread(s), N={args.n}, {args.rounds} rounds"
          " of >= "
          f"{args.min_time}s samples")  # fmt: skip
    print(f"load average at start: {os.getloadavg()}")
    print("| layer | problem | tdc.conv2d bf16 NCHW GFLOP/s | cached | F.conv2d bf16 CL GFLOP/s | ratio | cached ratio |"
          " DirectConv2d autocast | cached | nn.Conv2d autocast CL | ratio | cached ratio |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    sums = {k: 0.0 for k in ("ours", "ours_cached", "torch", "ours_ac", "ours_ac_cached", "torch_ac")}
    ratios, ratios_ac = [], []
    for layer in select_layers(args.layers):
        c = layer.conv
        flops = 2.0 * args.n * c.oc * c.ic * c.kh * c.kw * c.oh * c.ow
        x = torch.randn(args.n, c.ic, c.ih, c.iw)
        conv = nn.Conv2d(c.ic, c.oc, (c.kh, c.kw), c.stride, c.padding, bias=False)
        ours_mod = tdc.DirectConv2d.from_conv2d(conv)
        cached_mod = tdc.DirectConv2d.from_conv2d(conv, cache_weights=True)
        cached_bf16 = tdc.DirectConv2d.from_conv2d(copy.deepcopy(conv).bfloat16(), cache_weights=True)
        torch_mod = nn.Conv2d(c.ic, c.oc, (c.kh, c.kw), c.stride, c.padding, bias=False)
        torch_mod.weight = nn.Parameter(conv.weight.detach().contiguous(memory_format=torch.channels_last))
        xb, wb = x.bfloat16(), conv.weight.detach().bfloat16()
        xb_cl, wb_cl = (t.contiguous(memory_format=torch.channels_last) for t in (xb, wb))
        x_cl = x.contiguous(memory_format=torch.channels_last)
        variants = {
            "ours": lambda: tdc.conv2d(xb, wb, None, c.stride, c.padding),
            "ours_cached": lambda: cached_bf16(xb),
            "torch": lambda: F.conv2d(xb_cl, wb_cl, None, c.stride, c.padding),
            "ours_ac": lambda: ours_mod(x),
            "ours_ac_cached": lambda: cached_mod(x),
            "torch_ac": lambda: torch_mod(x_cl),
        }
        samples: dict[str, list[float]] = {k: [] for k in variants}
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
            before = tdc.jit_stats()["fallbacks"]
            for _ in range(args.rounds):
                for name, fn in variants.items():
                    if "_ac" in name:
                        with torch.autocast("cpu", dtype=torch.bfloat16):
                            fn()
                            samples[name].append(sample_median(fn, args.min_time))
                    else:
                        fn()
                        samples[name].append(sample_median(fn, args.min_time))
            assert tdc.jit_stats()["fallbacks"] == before, f"{layer.id}: a call fell back to torch"
        t = {k: statistics.median(v) for k, v in samples.items()}
        for k in sums:
            sums[k] += layer.count * t[k]
        ratios.append(t["torch"] / t["ours"])
        ratios_ac.append(t["torch_ac"] / t["ours_ac"])
        gf = {k: flops / v / 1e9 for k, v in t.items()}
        print(
            f"| {layer.id} {layer.name} | mb{args.n}{layer.problem} | {gf['ours']:.0f} | {gf['ours_cached']:.0f} |"
            f" {gf['torch']:.0f} | {ratios[-1]:.2f}x | {t['torch'] / t['ours_cached']:.2f}x |"
            f" {gf['ours_ac']:.0f} | {gf['ours_ac_cached']:.0f} | {gf['torch_ac']:.0f} | {ratios_ac[-1]:.2f}x |"
            f" {t['torch_ac'] / t['ours_ac_cached']:.2f}x |",
            flush=True,
        )
    r1, w1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    cpu = r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime
    print(f"network-weighted (time x count), torch / ours: bf16 tensors {sums['torch'] / sums['ours']:.2f}x "
          f"(cached {sums['torch'] / sums['ours_cached']:.2f}x); autocast {sums['torch_ac'] / sums['ours_ac']:.2f}x "
          f"(cached {sums['torch_ac'] / sums['ours_ac_cached']:.2f}x)")  # fmt: skip
    print(f"median per-layer ratio: bf16 tensors {statistics.median(ratios):.2f}x, "
          f"autocast {statistics.median(ratios_ac):.2f}x")  # fmt: skip
    print(f"CPU time / wall time over the run: {cpu / (w1 - w0):.2f} ({args.threads}.0: all ours)")
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
