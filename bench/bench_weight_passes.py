#!/usr/bin/env python
"""The weights' layout passes of a blocked training step, per ResNet-50 layer, against memory speed.

A training step of optimize(model) moves every weight between layouts twice outside the
convolutions: the forward packs it, (K, C, R, S) -> (K/V, C/V, R, S, V, V) (to_blocked_weight),
and the backward unpacks the blocked weight gradient back (from_blocked_weight; before that op
existed, a 6-D permute + reshape in Python, still timed here as "permute" for comparison).
Each pass reads and writes the weight once, so its bound is 2 x its bytes over the machine's copy
bandwidth, measured here with a large torch copy at each thread count ("bound"), and, as the
cache-resident reference for these few-MB tensors, a plain copy of a tensor of the weight's size
("memcpy"). The variants run interleaved, call by call; medians.

With --ops, the training step's three convolution ops per layer (N images, default 1), the two
designs against each other: the weight blocked beforehand ("pass": to_blocked_weight + the op,
and the op + from_blocked_weight for the weight gradient) and the weight handed over as
(K, C, R, S) ("in op": packed within the forward and the input gradient, by each work unit where
the plan allows, and the weight gradient written as (K, C, R, S) from the kernels' blocks).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

import torch_directconv as tdc
from problems import select_layers


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def copy_bandwidth(mb: int = 256, reps: int = 7) -> float:
    """Bytes per second read plus written by a large contiguous copy (the median of reps)."""
    src = torch.randn(mb * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(reps):
        t0 = clock()
        dst.copy_(src)
        times.append(clock() - t0)
    return 2 * src.numel() * 4 / statistics.median(times)


CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}
clock = time.perf_counter


def interleaved(fns: dict, reps: int) -> dict:
    """name -> median seconds of one call, the variants called round-robin."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = clock()
            fn()
            times[k].append(clock() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def permute_unpack(gb: torch.Tensor, k: int, c: int) -> torch.Tensor:
    kb, cb, r, s, v, _ = gb.shape
    return gb.permute(0, 5, 1, 4, 2, 3).reshape(kb * v, cb * v, r, s)[:k, :c]


def layer_ops(p, v: int, n: int, reps: int) -> dict:
    """The six timings of ops_table for one layer (seconds)."""
    ops = torch.ops.directconv
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, p.ic, p.ih, p.iw, generator=g)
    w = torch.randn(p.oc, p.ic, p.kh, p.kw, generator=g)
    xb = ops.to_blocked(x, v)
    geo = ([p.sh, p.sw], [p.ph, p.ph, p.pw, p.pw], [1, 1])
    wb = ops.to_blocked_weight(w, v)
    gy = torch.randn(ops.conv2d_blocked(xb, wb, None, *geo, False, p.ic).shape, generator=g)
    with torch.no_grad(), torch._C._AutoDispatchBelowAutograd():
        return interleaved(
            {
                "fwd pass": lambda: ops.conv2d_blocked(xb, ops.to_blocked_weight(w, v), None, *geo, False, p.ic),
                "fwd in op": lambda: ops.conv2d_blocked(xb, w, None, *geo, False, p.ic),
                "bwd-d pass": lambda: ops.conv2d_blocked_backward_data(gy, wb, list(xb.shape), *geo, p.ic),
                "bwd-d in op": lambda: ops.conv2d_blocked_backward_data(gy, w, list(xb.shape), *geo, p.ic),
                "bwd-w pass": lambda: ops.from_blocked_weight(
                    ops.conv2d_blocked_backward_weight(gy, xb, list(wb.shape), *geo, p.ic), p.oc, p.ic
                ),
                "bwd-w in op": lambda: ops.conv2d_blocked_backward_weight(gy, xb, list(w.shape), *geo, p.ic),
            },
            reps,
        )


def ops_table(layers, v: int, n: int, reps: int) -> None:
    keys = ("fwd pass", "fwd in op", "bwd-d pass", "bwd-d in op", "bwd-w pass", "bwd-w in op")
    print(f"{'layer':<13}" + "".join(f"{key:>12}" for key in keys) + f"{'pass/in op':>12}")
    total = {"pass": 0.0, "in op": 0.0}
    for layer in layers:
        t = layer_ops(layer.conv, v, n, reps)
        step = {d: sum(val for key, val in t.items() if key.endswith(d)) for d in total}
        for d in total:
            total[d] += layer.count * step[d]
        row = "".join(f"{1e3 * t[key]:>12.3f}" for key in keys)
        print(f"{layer.name:<13}{row}{step['pass'] / step['in op']:>12.3f}")
    print(
        f"ResNet-50 (53 convs, ms): pass {1e3 * total['pass']:.1f}, in op {1e3 * total['in op']:.1f}, "
        f"pass / in op {total['pass'] / total['in op']:.3f}"
    )


def layer_passes(p, v: int, reps: int) -> tuple[dict, int]:
    """(the pass timings of one layer's weight in seconds, the blocked weight's elements)."""
    ops = torch.ops.directconv
    k, c = p.oc, p.ic
    w = torch.randn(k, c, p.kh, p.kw)
    with torch.no_grad(), torch._C._AutoDispatchBelowAutograd():
        wb = ops.to_blocked_weight(w, v)
        flat = torch.empty(wb.numel())
        flat_dst = torch.empty_like(flat)
        t = interleaved(
            {
                "memcpy": lambda: flat_dst.copy_(flat),
                "pack": lambda: ops.to_blocked_weight(w, v),
                "unpack": lambda: ops.from_blocked_weight(wb, k, c),
                "permute": lambda: permute_unpack(wb, k, c),
            },
            reps,
        )
    return t, wb.numel()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2", help="thread counts, comma-separated (default 1,2)")
    ap.add_argument("--layers", default=None, help="layer ids or names, comma-separated (default: all)")
    ap.add_argument("--reps", type=int, default=51, help="calls per variant (default 51)")
    ap.add_argument("--ops", action="store_true", help="the training ops per layer, pass against in op (ms)")
    ap.add_argument("--n", type=int, default=1, help="images for --ops (default 1)")
    ap.add_argument(
        "--clock",
        choices=CLOCK,
        default="wall",
        help="wall time, or the process's CPU time (all its threads), which other processes on a loaded machine "
        "do not inflate (default wall)",
    )
    args = ap.parse_args()
    global clock
    clock = CLOCK[args.clock]
    v = tdc.vector_width()
    layers = select_layers(args.layers)
    print(f"ISA {tdc.isa()}, V = {v}; {args.clock} times in us (median of {args.reps}); x = time / bound")
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        if args.ops:
            cpu0, wall0 = _cpu(), time.perf_counter()
            print(f"\n{threads} thread(s), N = {args.n}: ms per call (median of {args.reps})")
            ops_table(layers, v, args.n, args.reps)
            print(f"CPUs busy {(_cpu() - cpu0) / (time.perf_counter() - wall0):.2f}")
            continue
        bw = copy_bandwidth()
        print(f"\n{threads} thread(s): large-copy bandwidth {bw / 1e9:.1f} GB/s (read + write)")
        head = f"{'layer':<13}{'K,C,R,S':>18}{'KB':>8}{'bound':>8}{'memcpy':>8}{'pack':>8}{'unpack':>8}{'permute':>9}"
        print(head + f"{'pack x':>8}{'unpack x':>9}{'permute x':>10}")
        totals = dict.fromkeys(("bound", "memcpy", "pack", "unpack", "permute"), 0.0)
        cpu0, wall0 = _cpu(), time.perf_counter()
        for layer in layers:
            p = layer.conv
            t, numel = layer_passes(p, v, args.reps)
            t["bound"] = 2 * numel * 4 / bw
            for key in totals:
                totals[key] += layer.count * t[key]
            us = {key: 1e6 * val for key, val in t.items()}
            print(
                f"{layer.name:<13}{f'{p.oc},{p.ic},{p.kh},{p.kw}':>18}{numel * 4 // 1024:>8}{us['bound']:>8.1f}"
                f"{us['memcpy']:>8.1f}{us['pack']:>8.1f}{us['unpack']:>8.1f}{us['permute']:>9.1f}"
                f"{t['pack'] / t['bound']:>8.2f}{t['unpack'] / t['bound']:>9.2f}{t['permute'] / t['bound']:>10.2f}"
            )
        busy = (_cpu() - cpu0) / (time.perf_counter() - wall0)
        ms = {key: 1e3 * val for key, val in totals.items()}
        print(
            f"{'ResNet-50':<13}{'(53 convs)':>18}{'':>8}{ms['bound']:>7.2f}m{ms['memcpy']:>7.2f}m{ms['pack']:>7.2f}m"
            f"{ms['unpack']:>7.2f}m{ms['permute']:>8.2f}m{totals['pack'] / totals['bound']:>8.2f}"
            f"{totals['unpack'] / totals['bound']:>9.2f}{totals['permute'] / totals['bound']:>10.2f}"
            f"   (totals in ms; CPUs busy {busy:.2f})"
        )


if __name__ == "__main__":
    main()
