#!/usr/bin/env python
"""The per-call cost of a convolution that does no real work: where the microseconds go.

A 1x16x4x4 input through a 16->16 1x1 convolution (--shape to change it), at one thread. Each
row is one way in, from the whole module down to the op alone, so the differences between rows
are the cost of each layer of the call: nn.Conv2d as the reference, DirectConv2d, the functional
conv2d, call_op, the op below autograd (the dispatcher and the C++ op), and the Python checks
on their own. Inside an optimized model: optimize() of the convolution alone (a region of one
layer, which runs NCHW in and out), and per convolution of optimize() of a chain of 8 (one
blocked region, its entry and exit shared), beside the same chain in torch. Inference
(no_grad) and with a gradient recorded. Rows run interleaved, call by call, in batches of
--inner calls; medians of --reps batches, in microseconds per call.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch
import torch.nn.functional as F

import torch_directconv as tdc
from torch_directconv import functional as tdf
from torch_directconv._autograd import call_op


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def interleaved(fns: dict, reps: int, inner: int) -> dict:
    """name -> (median wall us, median thread-CPU us) per call."""
    for fn in fns.values():
        for _ in range(inner):
            fn()
    times = {k: ([], []) for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            c0, t0 = time.thread_time(), time.perf_counter()
            for _ in range(inner):
                fn()
            times[k][0].append((time.perf_counter() - t0) / inner)
            times[k][1].append((time.thread_time() - c0) / inner)
    return {k: (1e6 * statistics.median(w), 1e6 * statistics.median(c)) for k, (w, c) in times.items()}


CHAIN = 8  # convolutions in the optimized chain whose per-convolution cost is a row


def rows(x: torch.Tensor, torch_conv: torch.nn.Conv2d, ours: tdc.DirectConv2d, models: dict) -> dict:
    w, b = ours.weight, ours.bias
    op = torch.ops.directconv.conv2d.default
    geo = ([1, 1], [0, 0, 0, 0], [1, 1])

    def below_autograd():
        with torch._C._AutoDispatchBelowAutograd():
            return op(x, w, b, *geo, 1, False)

    return {
        "nn.Conv2d": lambda: torch_conv(x),
        "optimize(conv)": lambda: models["lone"](x),
        f"optimize(chain)/{CHAIN}": lambda: models["chain"](x),
        f"nn chain/{CHAIN}": lambda: models["torch_chain"](x),
        "F.conv2d": lambda: F.conv2d(x, w, b),
        "DirectConv2d": lambda: ours(x),
        "tdc.conv2d": lambda: tdc.conv2d(x, w, b),
        "call_op(op)": lambda: call_op(op, x, w, b, *geo, 1, False),
        "op (with autograd key)": lambda: op(x, w, b, *geo, 1, False),
        "op below autograd": below_autograd,
        "  fallback_reason()": lambda: tdf.fallback_reason(x, w, b, 1),
        "  _check()": lambda: tdf._check(x, w, b, 1),
        "  _geometry()": lambda: ours._geometry(),
        "empty output": lambda: torch.empty((x.shape[0], w.shape[0], x.shape[2], x.shape[3])),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="1,16,4,4,16", help="N,C,H,W,K of the 1x1 convolution (default 1,16,4,4,16)")
    ap.add_argument("--reps", type=int, default=31, help="batches per row (default 31)")
    ap.add_argument("--inner", type=int, default=200, help="calls per batch (default 200)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n, c, h, w, k = (int(v) for v in args.shape.split(","))
    torch.manual_seed(0)
    torch_conv = torch.nn.Conv2d(c, k, 1)
    ours = tdc.DirectConv2d.from_conv2d(torch_conv)
    x = torch.randn(n, c, h, w)
    # Inside an optimized model: the convolution alone (a region of one layer, which runs NCHW
    # in and out), and a chain of CHAIN of them (one blocked region: per convolution, a step).
    chain = torch.nn.Sequential(torch_conv, *(torch.nn.Conv2d(k, k, 1) for _ in range(CHAIN - 1))) if c == k else None
    models = {
        "lone": tdc.optimize(torch.nn.Sequential(torch_conv)).eval(),
        "chain": tdc.optimize(chain).eval() if chain is not None else None,
        "torch_chain": chain,
    }
    print(f"{n}x{c}x{h}x{w} -> {k}, 1x1, {args.threads} thread(s), ISA {tdc.isa()}; us per call (median)")
    for mode in ("inference (no_grad)", "with grad (input requires grad)"):
        xin = x if mode.startswith("inference") else x.clone().requires_grad_()
        ctx = torch.no_grad() if mode.startswith("inference") else torch.enable_grad()
        cpu0, wall0 = _cpu(), time.perf_counter()
        with ctx:
            fns = rows(xin, torch_conv, ours, models)
            if chain is None:  # a chain needs as many output channels as input ones
                fns = {k: f for k, f in fns.items() if "chain" not in k}
            t = interleaved(fns, args.reps, args.inner)
            t = {k: (v[0] / CHAIN, v[1] / CHAIN) if "chain" in k else v for k, v in t.items()}
        busy = (_cpu() - cpu0) / (time.perf_counter() - wall0)
        print(f"\n{mode}  (CPUs busy {busy:.2f})")
        ref_wall, ref_cpu = t["nn.Conv2d"]
        print(f"  {'':<26}{'wall':>8}{'':>8}{'CPU':>8}")
        for name, (wall, cpu) in t.items():
            print(f"  {name:<26}{wall:>8.2f}{wall / ref_wall:>7.2f}x{cpu:>8.2f}{cpu / ref_cpu:>7.2f}x  (x nn.Conv2d)")


if __name__ == "__main__":
    main()
