#!/usr/bin/env python
"""The entry of a bf16 blocked region: an fp32 (N, C, H, W) tensor to bf16 rows of 32 channels.
`cast+block` is the two passes (x.to(torch.bfloat16), then to_blocked), `one pass` the
single op (to_blocked(x, 32) of the fp32 tensor), bit-identical to it. The variants take turns
within every round; each cell is the median over the rounds of per-round medians of single
calls, and the ratio is cast+block / one pass.

    python bench/bench_bf16_entry.py [--shapes 1x3x224x224,4x3x224x224] [--threads 1,2] [--rounds 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import sample_median  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch_directconv as tdc  # noqa: E402

DEFAULT_SHAPES = "1x3x224x224,4x3x224x224,1x4x224x224,1x16x112x112,1x64x56x56,1x256x56x56"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated NxCxHxW")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--min-time", type=float, default=0.05, help="seconds per sample")
    ap.add_argument("--channels-last", action="store_true", help="channels_last fp32 inputs")
    args = ap.parse_args(argv)
    why = tdc._backend.bf16_fallback_reason(1)
    if why:
        sys.exit(f"bench_bf16_entry: {why}")
    op = torch.ops.directconv.to_blocked.default
    v = tdc.vector_width(torch.bfloat16)
    print(f"load average {os.getloadavg()[0]:.2f}; {os.cpu_count()} CPUs; isa {tdc.isa()}")
    print(f"{'shape':>16} {'thr':>3} {'cast+block ms':>14} {'one pass ms':>12} {'ratio':>6}")
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for spec in args.shapes.split(","):
            shape = tuple(int(d) for d in spec.split("x"))
            x = torch.randn(shape)
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            variants = {
                "cast+block": lambda x=x: op(x.to(torch.bfloat16), v),
                "one pass": lambda x=x: op(x, v),
            }
            assert torch.equal(variants["cast+block"]().view(torch.int16), variants["one pass"]().view(torch.int16))
            rounds: dict[str, list[float]] = {k: [] for k in variants}
            for _ in range(args.rounds):
                for name, fn in variants.items():
                    rounds[name].append(sample_median(fn, args.min_time))
            two, one = (statistics.median(rounds[k]) * 1e3 for k in variants)
            print(f"{spec:>16} {threads:>3} {two:>14.3f} {one:>12.3f} {two / one:>6.2f}")


if __name__ == "__main__":
    main()
