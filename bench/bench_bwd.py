#!/usr/bin/env python
"""Backward-pass benchmark: torch_directconv's training passes against PyTorch on ResNet-50 v1.5's 23 layers.

For every layer, batch size and thread count, three passes are timed, each three ways, in the
same run and round-robin:
  fwd         blocked: conv2d_blocked on blocked tensors (no conversion at all);
              drop-in: torch_directconv.conv2d (NCHW in and out, the weight packed at every
              call, as in training); torch: F.conv2d on NCHW tensors, and on channels_last tensors;
  bwd_data    blocked: torch.ops.directconv.conv2d_blocked_backward_data; drop-in:
              conv2d_backward_data; torch: aten.convolution_backward with output_mask
              [True, False, False], NCHW and channels_last;
  bwd_weight  blocked: conv2d_blocked_backward_weight; drop-in: conv2d_backward_weight; torch:
              the same with output_mask [False, True, False].
Every pass counts the nominal 2*N*K*C*R*S*P*Q flops, shown as % of the FMA peak measured by the
library's own JIT loop in every sampling round. The training total is fwd + bwd_data + bwd_weight
over the network; conv1's input gradient is left out (no one needs the gradient of the image).
See bench/README.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from harness import Timing, config_name, print_jit_and_peaks, run_configs, run_meta, start_run
from problems import Layer, add_run_args, check_run_args

PASSES = ("fwd", "bwd_data", "bwd_weight")
OURS = ("blocked", "ours")
METHODS = OURS + ("torch_nchw", "torch_cl")
TORCH_METHODS = ("torch_nchw", "torch_cl")
LABELS = {"blocked": "blocked", "ours": "drop-in", "torch_nchw": "torch NCHW", "torch_cl": "torch CL"}
FORMATS = {"torch_nchw": "NCHW", "torch_cl": "CL"}
# Training needs no gradient of the network's input: conv1's bwd_data is shown, not counted.
NO_INPUT_GRAD = frozenset({"L01"})
DEFAULT_OUT = Path(__file__).resolve().parent / "results"

Key = tuple[str, str]  # (pass, method)


@dataclass
class Case:
    """One layer at one (threads, N): its callables per (pass, method), and what was measured."""

    layer: Layer
    threads: int
    n: int
    peak: float
    fns: dict[Key, Callable[[], object]] = field(default_factory=dict)
    via: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    max_err: dict[str, float] = field(default_factory=dict)
    jit_kernels: int = 0
    jit_generate_ms: float = 0.0
    upd_parts: int = 1  # the weight update's plan: 1 splits the weight blocks, p > 1 also the minibatch
    times: dict[Key, float] = field(default_factory=dict)
    cpus_busy: float = float("nan")

    @property
    def crowded(self) -> bool:
        """Whether the process kept fewer CPUs busy than it ran threads while this layer was timed."""
        return self.cpus_busy < 0.75 * self.threads

    @property
    def flops(self) -> int:
        return self.layer.conv.flops(self.n)

    def count(self, pas: str) -> int:
        """How often this layer's pass occurs in one training step of the network."""
        return 0 if pas == "bwd_data" and self.layer.id in NO_INPUT_GRAD else self.layer.count

    def gflops(self, pas: str, method: str) -> float:
        t = self.times.get((pas, method))
        return self.flops / t * 1e-9 if t else float("nan")

    def pct(self, pas: str, method: str) -> float:
        return 100.0 * self.gflops(pas, method) / self.peak

    def torch_best(self, pas: str) -> str:
        return min(TORCH_METHODS, key=lambda m: self.times.get((pas, m), math.inf))

    def speedup(self, pas: str, baseline: str, method: str = "ours") -> float:
        """t(baseline) / t(method): above 1 means ours is faster."""
        ours, base = self.times.get((pas, method)), self.times.get((pas, baseline))
        return base / ours if ours and base else float("nan")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(ap, isa_help="cap the JIT's ISA (peak follows)")
    ap.add_argument("--layers", default=None, help="comma-separated layer ids or names, e.g. L03,L04 (default: all 23)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default: {DEFAULT_OUT})")
    args = ap.parse_args(argv)
    check_run_args(ap, args)
    return args


def build_case(tdc, torch, F, layer: Layer, threads: int, n: int, peak: float) -> Case:
    """Makes the tensors, checks our three passes against PyTorch's, and records the JIT cost."""
    conv = layer.conv
    case = Case(layer, threads, n, peak)
    gen = torch.Generator().manual_seed(1000 * int(layer.id[1:]) + n)
    x = torch.randn(conv.input_shape(n), generator=gen)
    w = torch.randn(conv.weight_shape(), generator=gen) * math.sqrt(2.0 / (conv.ic * conv.kh * conv.kw))
    stride, padding, dilation, groups = list(conv.stride), list(conv.padding), list(conv.dilation), conv.g
    pad4 = [conv.ph, conv.ph, conv.pw, conv.pw]
    x_shape, w_shape = list(x.shape), list(w.shape)
    y = F.conv2d(x, w, None, stride, padding, dilation, groups)
    gy = torch.randn(y.shape, generator=gen)
    x_cl, w_cl, gy_cl = (t.contiguous(memory_format=torch.channels_last) for t in (x, w, gy))
    aten_bwd = torch.ops.aten.convolution_backward.default
    data_mask, weight_mask = [True, False, False], [False, True, False]

    def torch_bwd(gy_, x_, w_, mask):
        return aten_bwd(gy_, x_, w_, None, stride, padding, dilation, False, [0, 0], groups, mask)

    ops = torch.ops.directconv
    ours = {
        "fwd": lambda: tdc.conv2d(x, w, None, stride, padding, dilation, groups),
        "bwd_data": lambda: ops.conv2d_backward_data(gy, w, x_shape, stride, pad4, dilation, groups),
        "bwd_weight": lambda: ops.conv2d_backward_weight(gy, x, w_shape, stride, pad4, dilation, groups),
    }
    # The blocked kernels alone: activations, gradients and weights already blocked.
    c_in = conv.ic
    xb, wb, gyb = tdc.to_blocked(x), tdc.to_blocked_weight(w), tdc.to_blocked(gy)
    xb_shape, wb_shape = list(xb.shape), list(wb.shape)
    blocked = {
        "fwd": lambda: ops.conv2d_blocked(xb, wb, None, stride, pad4, dilation, False, c_in),
        "bwd_data": lambda: ops.conv2d_blocked_backward_data(gyb, wb, xb_shape, stride, pad4, dilation, c_in),
        "bwd_weight": lambda: ops.conv2d_blocked_backward_weight(gyb, xb, wb_shape, stride, pad4, dilation, c_in),
    }
    unblock = {
        "fwd": lambda t: tdc.from_blocked(t, conv.oc),
        "bwd_data": lambda t: tdc.from_blocked(t, c_in),
        "bwd_weight": lambda t: t.permute(0, 5, 1, 4, 2, 3).reshape(wb.shape[0] * wb.shape[5], -1, *wb.shape[2:4])[
            : conv.oc, :c_in
        ],
    }
    refs = {"fwd": y, "bwd_data": torch_bwd(gy, x, w, data_mask)[0], "bwd_weight": torch_bwd(gy, x, w, weight_mask)[1]}

    problems = []
    stats0 = tdc.jit_stats()
    for pas, method in [(p, m) for p in PASSES for m in OURS]:
        fallbacks = tdc.jit_stats()["fallbacks"]
        grouped = groups > 1 and method == "blocked"  # the blocked API is for groups = 1
        if grouped:
            continue
        try:
            out = ours[pas]() if method == "ours" else unblock[pas](blocked[pas]())
        except (RuntimeError, ValueError, TypeError) as e:
            # A layer the library rejects is a result to report, not the end of the run.
            problems.append(f"{LABELS[method]} {pas}: {type(e).__name__}: {str(e).strip().splitlines()[0]}")
            continue
        # Every call that does not run on the JIT kernels counts in jit_stats()['fallbacks'] (a call
        # on the JIT may find its kernels in its handle, without the cache seeing it).
        via = "ATen" if tdc.jit_stats()["fallbacks"] != fallbacks else "JIT"
        case.via[pas] = via if method == "ours" or case.via.get(pas, via) == via else "mixed"
        if via == "ATen":
            problems.append(f"{pas} went to PyTorch's convolution (jit_stats()['fallbacks'] grew)")
        if method == "blocked":
            out = out.contiguous()
        ref = refs[pas]
        scale = ref.abs().max().item()
        case.max_err[pas] = max(case.max_err.get(pas, 0.0), (out - ref).abs().max().item() / scale)
        try:
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * scale)
        except AssertionError as e:
            first = [line for line in str(e).splitlines() if line.strip()]
            problems.append(f"{LABELS[method]} {pas} differs from PyTorch's ({'; '.join(first[:3])})")
        if not out.is_contiguous():
            problems.append(f"{pas} result is not NCHW-contiguous (strides {out.stride()})")
    stats1 = tdc.jit_stats()
    if groups == 1:
        plan = tdc._C.upd_plan(conv.to_string(n), threads)
        case.upd_parts = int(plan.split(" parts=")[1].split()[0])
    case.jit_kernels = stats1["kernels"] - stats0["kernels"]
    case.jit_generate_ms = stats1["generate_ms"] - stats0["generate_ms"]
    if problems:
        case.error = "; ".join(problems)
        return case

    for pas in PASSES:
        case.fns[(pas, "ours")] = ours[pas]
        if groups == 1:
            case.fns[(pas, "blocked")] = blocked[pas]
    case.fns[("fwd", "torch_nchw")] = lambda: F.conv2d(x, w, None, stride, padding, dilation, groups)
    case.fns[("fwd", "torch_cl")] = lambda: F.conv2d(x_cl, w_cl, None, stride, padding, dilation, groups)
    case.fns[("bwd_data", "torch_nchw")] = lambda: torch_bwd(gy, x, w, data_mask)
    case.fns[("bwd_data", "torch_cl")] = lambda: torch_bwd(gy_cl, x_cl, w_cl, data_mask)
    case.fns[("bwd_weight", "torch_nchw")] = lambda: torch_bwd(gy, x, w, weight_mask)
    case.fns[("bwd_weight", "torch_cl")] = lambda: torch_bwd(gy_cl, x_cl, w_cl, weight_mask)
    return case


def time_case(case: Case, timing: Timing, tdc) -> None:
    """Round-robin samples over every pass and method, with the FMA peak loop taking a turn in
    each round, as bench_fwd.py does; the layer's % of peak is against the median of those turns."""
    reps = {}
    for key, fn in case.fns.items():
        per_call = math.inf
        for _ in range(2):
            t0 = time.perf_counter()
            fn()
            per_call = min(per_call, time.perf_counter() - t0)
        reps[key] = max(1, math.ceil(1.1 * timing.min_time / per_call))
    samples: dict[Key, list[float]] = {key: [] for key in case.fns}
    peaks = []
    r0, w0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(timing.samples):
        peaks.append(tdc._C.fma_peak_gflops(case.threads, timing.min_time))
        for key, fn in case.fns.items():
            t0 = time.perf_counter()
            for _ in range(reps[key]):
                fn()
            samples[key].append((time.perf_counter() - t0) / reps[key])
    r1, w1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    case.cpus_busy = (r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime) / (w1 - w0)
    case.times = {key: statistics.median(s) for key, s in samples.items()}
    case.peak = statistics.median(peaks)


def _method_totals(flops: float, times: dict[str, float], peak: float, best: str) -> dict:
    return {
        m: {
            "ms": 1e3 * t,
            "gflops": flops / t * 1e-9 if t else float("nan"),
            "pct_peak": 100.0 * flops / t * 1e-9 / peak if t else float("nan"),
            "x_torch_best": times[best] / t if t else float("nan"),
            "x_torch_nchw": times["torch_nchw"] / t if t else float("nan"),
        }
        for m, t in times.items()
    }


def network_totals(cases: list[Case]) -> dict:
    """Per pass, sum over the timed layers of count x time; and the training step, their sum.

    The training step's torch figure takes, pass by pass, PyTorch's faster format over the network.
    """
    timed = [c for c in cases if c.times]
    out: dict = {"layers": len(timed), "layers_skipped": len(cases) - len(timed)}
    train_times = {m: 0.0 for m in METHODS}
    train_flops = train_peak_weight = train_torch_best = 0.0
    best_per_pass = {}
    for pas in PASSES:
        counted = [c for c in timed if c.count(pas)]
        times = {m: sum(c.count(pas) * c.times.get((pas, m), math.nan) for c in counted) for m in METHODS}
        flops = sum(c.count(pas) * c.flops for c in counted)
        # The peak while the network's layers ran: their own peaks, weighted as our times are.
        weight = sum(c.count(pas) * c.times[(pas, "ours")] * c.peak for c in counted)
        peak = weight / times["ours"] if times["ours"] else float("nan")
        best = min(TORCH_METHODS, key=lambda m: times[m])
        out[pas] = {
            "layers": len(counted),
            "convs": sum(c.count(pas) for c in counted),
            "gflop": flops * 1e-9,
            "peak_gflops": peak,
            "torch_best": best,
            "jit_layers": sum(c.via.get(pas) == "JIT" for c in counted),
            "methods": _method_totals(flops, times, peak, best),
        }
        for m in METHODS:
            train_times[m] += times[m]
        train_flops += flops
        train_peak_weight += weight
        train_torch_best += times[best]
        best_per_pass[pas] = best
    peak = train_peak_weight / train_times["ours"] if train_times["ours"] else float("nan")
    best = min(TORCH_METHODS, key=lambda m: train_times[m])
    methods = _method_totals(train_flops, train_times, peak, best)
    ours = train_times["ours"]
    out["training"] = {
        "convs": sum(out[p]["convs"] for p in PASSES),
        "gflop": train_flops * 1e-9,
        "peak_gflops": peak,
        "torch_best": best,
        "torch_best_per_pass": best_per_pass,
        "torch_best_per_pass_ms": 1e3 * train_torch_best,
        "x_torch_best_per_pass": train_torch_best / ours if ours else float("nan"),
        "methods": methods,
    }
    return out


def cell(gflops: float, pct: float) -> str:
    return "-" if math.isnan(gflops) else f"{gflops:6.1f} {pct:3.0f}%"


def ratio(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.2f}x"


CELL, RATIO, VIA = 11, 6, 5


def _widths(pas: str) -> list[int]:
    # Only the backward passes have a 'via' column: the forward is checked not to fall back.
    return ([VIA] if pas != "fwd" else []) + [CELL] * len(METHODS) + [RATIO] * len(OURS)


def _group(pas: str, values: list[str]) -> str:
    return " | " + " ".join(f"{v:>{w}}" for v, w in zip(values, _widths(pas), strict=True))


def _via(pas: str, text: str) -> list[str]:
    return [text] if pas != "fwd" else []


def format_table(cases: list[Case], totals: dict) -> str:
    c0 = cases[0]
    lines = [
        (
            f"{config_name(c0.threads, c0.n)}: {c0.threads} thread(s), N={c0.n}, FMA peak {c0.peak:.1f} GFLOP/s; "
            "cells: GFLOP/s and % of peak; x blk, x dro: time(PyTorch's faster format) / time(ours), blocked and "
            "drop-in; via: the path our ops took"
        )
    ]
    prefix = f"{'':<3} {'':<11} {'':>7}"
    lines.append(prefix + "".join(f" | {pas:<{sum(_widths(pas)) + len(_widths(pas)) - 1}}" for pas in PASSES))
    cols = [LABELS[m] for m in METHODS] + ["x blk", "x dro"]
    head = f"{'id':<3} {'name':<11} {'MFLOP':>7}" + "".join(_group(pas, _via(pas, "via") + cols) for pas in PASSES)
    lines += [head, "-" * len(head)]
    for c in cases:
        row = f"{c.layer.id:<3} {c.layer.name[:11]:<11} {c.flops * 1e-6:7.1f}"
        for pas in PASSES:
            values = [cell(c.gflops(pas, m), c.pct(pas, m)) for m in METHODS]
            values += [ratio(c.speedup(pas, c.torch_best(pas), m)) for m in OURS]
            via = c.via.get(pas, "-") + (f"p{c.upd_parts}" if pas == "bwd_weight" and c.upd_parts > 1 else "")
            row += _group(pas, _via(pas, via + ("" if c.count(pas) else "*")) + values)
        lines.append(row)
        if c.error:
            lines.append(f"    !! {c.layer.id} FAILED the check, not timed: {c.error}")
        elif c.crowded:
            lines.append(
                f"    !! {c.layer.id}: only {c.cpus_busy:.2f} CPUs busy for {c.threads} thread(s) while timed "
                "(other processes held the cores): not a figure for this thread count"
            )
    lines.append("-" * len(head))
    gf_row, ms_row = f"{'net':<3} {'GFLOP/s':<11} {'':>7}", f"{'':<3} {'ms':<11} {'':>7}"
    for pas in PASSES:
        t = totals[pas]
        tm = t["methods"]
        values = [cell(tm[m]["gflops"], tm[m]["pct_peak"]) for m in METHODS]
        values += [ratio(tm[m]["x_torch_best"]) for m in OURS]
        gf_row += _group(pas, _via(pas, f"{t['jit_layers']}/{t['layers']}") + values)
        ms_row += _group(pas, _via(pas, "") + [f"{tm[m]['ms']:9.2f}ms" for m in METHODS] + [""] * len(OURS))
    lines += [gf_row, ms_row]
    lines.append(
        "net: sum over layers of count x median time ("
        + ", ".join(f"{pas} {totals[pas]['convs']} convs" for pas in PASSES)
        + "); its via: layers on the JIT / layers counted"
    )
    uncounted = [c.layer.id for c in cases if not all(c.count(p) for p in PASSES)]
    if uncounted:
        lines.append(f"* {', '.join(uncounted)}: bwd_data shown, not counted (training needs no gradient of the image)")
    if totals["layers_skipped"]:
        lines.append(f"!! the network totals leave out {totals['layers_skipped']} layer(s) that failed the check")
    lines.append(training_line(totals["training"]))
    kernels = sum(c.jit_kernels for c in cases)
    gen_ms = sum(c.jit_generate_ms for c in cases)
    per = f", {gen_ms / kernels:.3f} ms/kernel" if kernels else ""
    lines.append(f"JIT for this config: {kernels} new kernels, {gen_ms:.1f} ms generating{per}")
    return "\n".join(line.rstrip() for line in lines)


def training_line(tr: dict) -> str:
    tm = tr["methods"]
    formats = ", ".join(f"{pas} {FORMATS[m]}" for pas, m in tr["torch_best_per_pass"].items())
    best = tr["torch_best_per_pass_ms"]
    ours = "; ".join(
        f"{LABELS[m]} {tm[m]['ms']:.2f} ms ({tm[m]['pct_peak']:.0f}% of peak) = {ratio(best / tm[m]['ms'])}"
        for m in OURS
    )
    return (
        f"training step (fwd + bwd_data + bwd_weight): {ours} against torch's best per pass {best:.2f} ms "
        f"({formats}); torch NCHW {tm['torch_nchw']['ms']:.2f} ms, torch CL {tm['torch_cl']['ms']:.2f} ms"
    )


def summarize(configs: dict[str, list[Case]], all_totals: dict[str, dict]) -> tuple[str, list[dict]]:
    rows = []
    for name, cases in configs.items():
        totals = all_totals[name]
        timed = [c for c in cases if c.times]
        for pas, m in [(p, m) for p in PASSES for m in OURS]:
            t = totals[pas]
            pcts = [c.pct(pas, m) for c in timed if (pas, m) in c.times]
            torch_pcts = [c.pct(pas, c.torch_best(pas)) for c in timed]
            rows.append(
                {
                    "config": name,
                    "path": LABELS[m],
                    "pass": pas,
                    "layers": len(timed),
                    "jit_layers": sum(c.via.get(pas) == "JIT" for c in timed),
                    "median_pct_peak": statistics.median(pcts) if pcts else float("nan"),
                    "min_pct_peak": min(pcts) if pcts else float("nan"),
                    "max_pct_peak": max(pcts) if pcts else float("nan"),
                    "torch_best_median_pct_peak": statistics.median(torch_pcts) if torch_pcts else float("nan"),
                    "layers_faster_than_torch_best": sum(c.speedup(pas, c.torch_best(pas), m) > 1 for c in timed),
                    "network_ms": t["methods"][m]["ms"],
                    "network_pct_peak": t["methods"][m]["pct_peak"],
                    "network_torch_best": t["torch_best"],
                    "network_torch_best_ms": t["methods"][t["torch_best"]]["ms"],
                    "network_x_torch_best": t["methods"][m]["x_torch_best"],
                    "network_x_torch_nchw": t["methods"][m]["x_torch_nchw"],
                }
            )
        tr = totals["training"]
        for m in OURS:
            ms = tr["methods"][m]["ms"]
            rows.append(
                {
                    "config": name,
                    "path": LABELS[m],
                    "pass": "training",
                    "layers": len(timed),
                    "network_ms": ms,
                    "network_pct_peak": tr["methods"][m]["pct_peak"],
                    "network_torch_best": "per pass",
                    "network_torch_best_ms": tr["torch_best_per_pass_ms"],
                    "network_x_torch_best": tr["torch_best_per_pass_ms"] / ms if ms else float("nan"),
                    "network_x_torch_nchw": tr["methods"][m]["x_torch_nchw"],
                }
            )
    head = (
        f"{'config':<8} {'path':<8} {'pass':<10} {'JIT':>5} {'median%':>7} {'min%':>5} {'torch%':>6} {'faster':>6} "
        f"{'network ms':>10} {'net%':>5} {'torch best ms':>18} {'x torch best':>12} {'x torch NCHW':>12}"
    )
    lines = [
        "Summary of ours, blocked and drop-in (median% and min%: % of the measured FMA peak over the layers; "
        + "torch%: the median for PyTorch's faster format;",
        "JIT: layers our drop-in op ran on the JIT; faster: layers where ours beat PyTorch's faster format; network: "
        + "sum of count x time, net% its % of peak; training: the three passes, with PyTorch's faster format picked "
        + "per pass)",
        head,
        "-" * len(head),
    ]
    for r in rows:
        fmt = FORMATS.get(r["network_torch_best"], r["network_torch_best"])
        best_ms = f"{r['network_torch_best_ms']:.2f} ({fmt})"
        if r["pass"] == "training":
            stats = f"{'':>5} {'':>7} {'':>5} {'':>6} {'':>6}"
        else:
            stats = (
                f"{r['jit_layers']:>2}/{r['layers']:<2} {r['median_pct_peak']:7.1f} {r['min_pct_peak']:5.1f} "
                f"{r['torch_best_median_pct_peak']:6.1f} {r['layers_faster_than_torch_best']:>3}/{r['layers']:<2}"
            )
        lines.append(
            f"{r['config']:<8} {r['path']:<8} {r['pass']:<10} {stats} {r['network_ms']:10.2f} "
            f"{r['network_pct_peak']:5.1f} {best_ms:>18} "
            f"{ratio(r['network_x_torch_best']):>12} {ratio(r['network_x_torch_nchw']):>12}"
        )
    for name, cases in configs.items():
        crowded = [c.layer.id for c in cases if c.crowded]
        if crowded:
            lines.append(
                f"!! {name}: {', '.join(crowded)} ran with fewer CPUs busy than threads (other processes held the "
                "cores); their figures, and the totals they enter, are not figures for this thread count"
            )
    return "\n".join(lines), rows


def case_records(c: Case) -> list[dict]:
    """One row per pass of the case."""
    recs = []
    for pas in PASSES:
        rec = {
            "config": config_name(c.threads, c.n),
            "threads": c.threads,
            "N": c.n,
            "id": c.layer.id,
            "name": c.layer.name,
            "problem": c.layer.conv.to_string(c.n),
            "pass": pas,
            "count": c.count(pas),
            "mflop": c.flops * 1e-6,
            "peak_gflops": c.peak,
            "via": c.via.get(pas, ""),
            "upd_parts": c.upd_parts if pas == "bwd_weight" else "",
        }
        for m in METHODS:
            t = c.times.get((pas, m))
            rec[f"{m}_ms"] = 1e3 * t if t else float("nan")
            rec[f"{m}_gflops"] = c.gflops(pas, m)
            rec[f"{m}_pct_peak"] = c.pct(pas, m)
        rec.update(
            torch_best=c.torch_best(pas) if c.times else "",
            x_torch_best=c.speedup(pas, c.torch_best(pas)),
            blocked_x_torch_best=c.speedup(pas, c.torch_best(pas), "blocked"),
            x_torch_nchw=c.speedup(pas, "torch_nchw"),
            check_max_rel_err=c.max_err.get(pas, float("nan")),
            check_error=c.error or "",
            jit_kernels=c.jit_kernels,
            jit_generate_ms=c.jit_generate_ms,
            cpus_busy=c.cpus_busy,
        )
        recs.append(rec)
    return recs


def network_records(name: str, totals: dict) -> list[dict]:
    """The NET rows: one per pass and one for the training step."""
    threads, n = name.split("T N=")
    recs = []
    for pas in PASSES + ("training",):
        t = totals[pas]
        tm = t["methods"]
        training = pas == "training"
        rec = {
            "config": name,
            "threads": int(threads),
            "N": int(n),
            "id": "NET",
            "name": "network",
            "problem": "",
            "pass": pas,
            "count": t["convs"],
            "mflop": t["gflop"] * 1e3,
            "peak_gflops": t["peak_gflops"],
            "via": "" if training else f"{t['jit_layers']} JIT",
        }
        for m in METHODS:
            rec[f"{m}_ms"] = tm[m]["ms"]
            rec[f"{m}_gflops"] = tm[m]["gflops"]
            rec[f"{m}_pct_peak"] = tm[m]["pct_peak"]
        rec.update(
            torch_best="per_pass" if training else t["torch_best"],
            x_torch_best=t["x_torch_best_per_pass"] if training else tm["ours"]["x_torch_best"],
            x_torch_nchw=tm["ours"]["x_torch_nchw"],
            blocked_x_torch_best=(
                t["torch_best_per_pass_ms"] / tm["blocked"]["ms"] if training else tm["blocked"]["x_torch_best"]
            ),
        )
        recs.append(rec)
    return recs


def write_csv(path: Path, records: list[dict]) -> None:
    fields = list(records[0].keys())
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        for r in records:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run = start_run(args, "bench_bwd")
    res = run_configs(args, run, build_case, time_case, network_totals, format_table)
    tdc, isa, configs, all_totals, failures = run.tdc, run.isa, res.configs, res.totals, res.failures

    summary_text, summary_rows = summarize(configs, all_totals)
    print(summary_text)
    print_jit_and_peaks(tdc, res, isa)

    records = [r for cases in configs.values() for c in cases for r in case_records(c)]
    records += [r for name, totals in all_totals.items() for r in network_records(name, totals)]
    csv_path, json_path = (args.out / f"bench_bwd.{ext}" for ext in ("csv", "json"))
    write_csv(csv_path, records)
    meta = run_meta(args, run, res)
    meta["no_input_grad"] = sorted(NO_INPUT_GRAD)
    doc = {"meta": meta, "rows": records, "network": all_totals, "summary": summary_rows}
    json_path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    print(f"wrote {csv_path}, {json_path.name}; wall time {meta['wall_s']:.0f} s")
    if failures:
        print(f"bench_bwd: {failures} case(s) FAILED the correctness check; they were not timed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
