#!/usr/bin/env python
"""Forward convolution benchmark: torch_directconv against PyTorch on ResNet-50 v1.5's 23 layers.

For every layer, batch size and thread count, four ways to run the same convolution are timed
in the same run, round-robin:
  blocked     conv2d_blocked on tensors already in the blocked layout (the kernel view);
  drop-in     a DirectConv2d module on NCHW input, NCHW output, conversions included
              (the weight is packed at every call: exact whatever happens to the weight);
  cached      the same with cache_weights=True (the weight packed once, as for inference);
  torch NCHW  F.conv2d on NCHW tensors;
  torch CL    F.conv2d with input and weight in channels_last.
GFLOP/s are nominal (2*N*K*C*R*S*P*Q) and shown as % of the FMA peak measured by the library's
own JIT loop, which takes a turn in every round of each layer's samples (so the % is against
what the machine gave at that moment). See bench/README.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from harness import Timing, config_name, print_jit_and_peaks, run_configs, run_meta, start_run
from problems import Layer, add_run_args, check_run_args

METHODS = ("blocked", "dropin", "dropin_cached", "torch_nchw", "torch_cl")
JIT_METHODS = ("blocked", "dropin", "dropin_cached")
LABELS = {
    "blocked": "blocked",
    "dropin": "drop-in",
    "dropin_cached": "cached",
    "torch_nchw": "torch NCHW",
    "torch_cl": "torch CL",
}
TORCH_METHODS = ("torch_nchw", "torch_cl")
DEFAULT_OUT = Path(__file__).resolve().parent / "results"


@dataclass
class Case:
    """One layer at one (threads, N): its tensors, the four callables, and what was measured."""

    layer: Layer
    threads: int
    n: int
    peak: float
    fns: dict[str, Callable[[], object]] = field(default_factory=dict)
    error: str | None = None
    max_err: float = float("nan")
    dropin_fallback: bool = False
    jit_kernels: int = 0
    jit_generate_ms: float = 0.0
    first_call_ms: float = float("nan")
    plan: str = ""
    times: dict[str, float] = field(default_factory=dict)

    @property
    def flops(self) -> int:
        return self.layer.conv.flops(self.n)

    def gflops(self, method: str) -> float:
        t = self.times.get(method)
        return self.flops / t * 1e-9 if t else float("nan")

    def pct(self, method: str) -> float:
        return 100.0 * self.gflops(method) / self.peak

    @property
    def torch_best(self) -> str:
        return min(TORCH_METHODS, key=lambda m: self.times.get(m, math.inf))

    def speedup(self, method: str, baseline: str) -> float:
        """t(baseline) / t(method): above 1 means `method` is faster."""
        if method not in self.times or baseline not in self.times:
            return float("nan")
        return self.times[baseline] / self.times[method]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(ap, isa_help="cap the JIT's ISA (peak follows)")
    ap.add_argument("--layers", default=None, help="comma-separated layer ids or names, e.g. L03,L04 (default: all 23)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default: {DEFAULT_OUT})")
    args = ap.parse_args(argv)
    check_run_args(ap, args)
    return args


def build_case(tdc, torch, F, layer: Layer, threads: int, n: int, peak: float) -> Case:
    """Makes the tensors, checks both JIT paths against F.conv2d, and records the JIT cost."""
    conv = layer.conv
    case = Case(layer, threads, n, peak)
    gen = torch.Generator().manual_seed(1000 * int(layer.id[1:]) + n)
    x = torch.randn(conv.input_shape(n), generator=gen)
    w = torch.randn(conv.weight_shape(), generator=gen) * math.sqrt(2.0 / (conv.ic * conv.kh * conv.kw))
    args = (None, conv.stride, conv.padding, conv.dilation)
    ref = F.conv2d(x, w, *args)
    scale = ref.abs().max().item()

    problems = []
    stats0 = tdc.jit_stats()
    try:
        xb = tdc.to_blocked(x)
        wb = tdc.to_blocked_weight(w)
        t0 = time.perf_counter()
        out_blocked = tdc.conv2d_blocked(xb, wb, *args, in_channels=conv.ic)
        case.first_call_ms = 1e3 * (time.perf_counter() - t0)
        module = tdc.DirectConv2d(
            conv.ic,
            conv.oc,
            (conv.kh, conv.kw),
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            bias=False,
        )
        module.weight.copy_(w)
        out_dropin = module(x)
        cached = tdc.DirectConv2d.from_conv2d(module, cache_weights=True)
        out_cached = cached(x)
        case.plan = tdc._C.fwd_plan(conv.to_string(n), threads)
    except (RuntimeError, ValueError, TypeError) as e:
        # A layer the library rejects is a result to report, not the end of the run.
        case.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0]}"
        out_blocked = out_dropin = out_cached = None
    stats1 = tdc.jit_stats()
    case.jit_kernels = stats1["kernels"] - stats0["kernels"]
    case.jit_generate_ms = stats1["generate_ms"] - stats0["generate_ms"]
    case.dropin_fallback = stats1["fallbacks"] != stats0["fallbacks"]

    if case.error is None:
        outs = (("blocked", tdc.from_blocked(out_blocked, conv.oc)), ("drop-in", out_dropin), ("cached", out_cached))
        for label, out in outs:
            err = (out - ref).abs().max().item() / scale
            case.max_err = err if math.isnan(case.max_err) else max(case.max_err, err)
            try:
                torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * scale)
            except AssertionError as e:
                first = str(e).strip().splitlines()
                problems.append(f"{label} output differs from F.conv2d ({'; '.join(first[:3])})")
        if not out_dropin.is_contiguous():
            problems.append(f"drop-in output is not NCHW-contiguous (strides {out_dropin.stride()})")
        if case.dropin_fallback:
            problems.append("drop-in went to PyTorch's convolution (jit_stats()['fallbacks'] grew)")
        if not case.plan.startswith(conv.to_string(n)):
            problems.append(f"fwd_plan describes {case.plan.split()[0]!r}, asked for {conv.to_string(n)!r}")
        if problems:
            case.error = "; ".join(problems)

    x_cl = x.contiguous(memory_format=torch.channels_last)
    w_cl = w.contiguous(memory_format=torch.channels_last)
    if case.error is None:
        case.fns["blocked"] = lambda: tdc.conv2d_blocked(xb, wb, *args, in_channels=conv.ic)
        case.fns["dropin"] = lambda: module(x)
        case.fns["dropin_cached"] = lambda: cached(x)
    case.fns["torch_nchw"] = lambda: F.conv2d(x, w, *args)
    case.fns["torch_cl"] = lambda: F.conv2d(x_cl, w_cl, *args)
    return case


def time_case(case: Case, timing: Timing, tdc) -> None:
    """Round-robin samples over the methods, so drift on a shared machine hits all of them alike.

    The FMA peak loop takes a turn in every round too, and the layer's % of peak is taken
    against the median of those turns: the peak the machine gave while the layer was timed.
    """
    reps = {}
    for method, fn in case.fns.items():
        per_call = math.inf
        for _ in range(2):
            t0 = time.perf_counter()
            fn()
            per_call = min(per_call, time.perf_counter() - t0)
        reps[method] = max(1, math.ceil(1.1 * timing.min_time / per_call))
    samples: dict[str, list[float]] = {m: [] for m in case.fns}
    peaks = []
    for _ in range(timing.samples):
        peaks.append(tdc._C.fma_peak_gflops(case.threads, timing.min_time))
        for method, fn in case.fns.items():
            t0 = time.perf_counter()
            for _ in range(reps[method]):
                fn()
            samples[method].append((time.perf_counter() - t0) / reps[method])
    case.times = {m: statistics.median(s) for m, s in samples.items()}
    case.peak = statistics.median(peaks)


def network_totals(cases: list[Case]) -> dict:
    """Sum over layers of count x time, per method, for the layers where every method ran."""
    complete = [c for c in cases if all(m in c.times for m in METHODS)]
    totals = {m: sum(c.layer.count * c.times[m] for c in complete) for m in METHODS}
    flops = sum(c.layer.count * c.flops for c in complete)
    # The peak while the network's layers ran: their own peaks, weighted as their times are.
    peak = (
        sum(c.layer.count * c.times["blocked"] * c.peak for c in complete)
        / sum(c.layer.count * c.times["blocked"] for c in complete)
        if complete
        else float("nan")
    )
    best = min(TORCH_METHODS, key=lambda m: totals[m]) if complete else "torch_nchw"
    out = {
        "layers": len(complete),
        "layers_skipped": len(cases) - len(complete),
        "convs": sum(c.layer.count for c in complete),
        "gflop": flops * 1e-9,
        "torch_best": best,
        "methods": {},
    }
    for m in METHODS:
        t = totals[m]
        out["methods"][m] = {
            "ms": 1e3 * t,
            "gflops": flops / t * 1e-9 if t else float("nan"),
            "pct_peak": 100.0 * flops / t * 1e-9 / peak if t else float("nan"),
            "x_torch_best": totals[best] / t if t else float("nan"),
            "x_torch_nchw": totals["torch_nchw"] / t if t else float("nan"),
        }
    return out


def cell(gflops: float, pct: float) -> str:
    return "-" if math.isnan(gflops) else f"{gflops:6.1f} ({pct:3.0f}%)"


def ratio(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.2f}x"


def format_table(cases: list[Case], totals: dict) -> str:
    c0 = cases[0]
    head = (
        f"{config_name(c0.threads, c0.n)}: {c0.threads} thread(s), N={c0.n}, "
        f"FMA peak {c0.peak:.1f} GFLOP/s; cells: GFLOP/s (% of peak); ratios: torch time / our time"
    )
    cols = ["id", "name", "MFLOP"] + [LABELS[m] for m in METHODS] + ["best", "blk/best", "drop/NCHW", "cach/NCHW"]
    widths = [4, 12, 7, 14, 14, 14, 14, 14, 4, 8, 9, 9]
    lines = [
        head,
        "  ".join(f"{c:<{w}}" if i < 2 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(cols, widths, strict=False))),
    ]
    lines.append("-" * len(lines[-1]))
    for c in cases:
        best = c.torch_best
        cells = [c.layer.id, c.layer.name[:12], f"{c.flops * 1e-6:.1f}"]
        cells += [cell(c.gflops(m), c.pct(m)) for m in METHODS]
        cells += ["CL" if best == "torch_cl" else "NCHW", ratio(c.speedup("blocked", best))]
        cells += [ratio(c.speedup("dropin", "torch_nchw")), ratio(c.speedup("dropin_cached", "torch_nchw"))]
        lines.append(
            "  ".join(
                f"{v:<{w}}" if i < 2 else f"{v:>{w}}" for i, (v, w) in enumerate(zip(cells, widths, strict=False))
            )
        )
        if c.error:
            lines.append(f"      !! {c.layer.id} FAILED the check, JIT paths not timed: {c.error}")
    lines.append("-" * len(lines[1]))
    tm = totals["methods"]
    cells = ["net", f"{totals['convs']} convs", f"{totals['gflop'] * 1e3:.0f}"]
    cells += [f"{tm[m]['ms']:7.2f}ms ({tm[m]['pct_peak']:2.0f}%)" for m in METHODS]
    cells += ["CL" if totals["torch_best"] == "torch_cl" else "NCHW", ratio(tm["blocked"]["x_torch_best"])]
    cells += [ratio(tm["dropin"]["x_torch_nchw"]), ratio(tm["dropin_cached"]["x_torch_nchw"])]
    lines.append(
        "  ".join(f"{v:<{w}}" if i < 2 else f"{v:>{w}}" for i, (v, w) in enumerate(zip(cells, widths, strict=False)))
    )
    if totals["layers_skipped"]:
        lines.append(f"      (network totals leave out {totals['layers_skipped']} layer(s) that failed the check)")
    kernels = sum(c.jit_kernels for c in cases)
    gen_ms = sum(c.jit_generate_ms for c in cases)
    per = f", {gen_ms / kernels:.3f} ms/kernel" if kernels else ""
    lines.append(f"JIT for this config: {kernels} new kernels, {gen_ms:.1f} ms generating{per}")
    return "\n".join(lines)


def summarize(configs: dict[str, list[Case]], all_totals: dict[str, dict]) -> tuple[str, list[dict]]:
    rows = []
    for name, cases in configs.items():
        totals = all_totals[name]
        for m in METHODS:
            pcts = [c.pct(m) for c in cases if m in c.times]
            faster = [c for c in cases if m in c.times and c.times[m] < c.times[c.torch_best]]
            rows.append(
                {
                    "config": name,
                    "method": m,
                    "layers": len(pcts),
                    "median_pct_peak": statistics.median(pcts) if pcts else float("nan"),
                    "min_pct_peak": min(pcts) if pcts else float("nan"),
                    "max_pct_peak": max(pcts) if pcts else float("nan"),
                    "layers_faster_than_torch_best": len(faster),
                    "network_ms": totals["methods"][m]["ms"],
                    "network_x_torch_best": totals["methods"][m]["x_torch_best"],
                    "network_x_torch_nchw": totals["methods"][m]["x_torch_nchw"],
                }
            )
    head = (
        f"{'config':<9} {'method':<11} {'median%':>7} {'min%':>5} {'faster than torch best':>22} "
        f"{'network ms':>10} {'x torch best':>12} {'x torch NCHW':>12}"
    )
    lines = [
        "Summary (% of the measured FMA peak over the layers; network = sum of count x time)",
        head,
        "-" * len(head),
    ]
    for r in rows:
        jit = r["method"] in JIT_METHODS
        faster = f"{r['layers_faster_than_torch_best']}/{r['layers']}" if jit else ""
        lines.append(
            f"{r['config']:<9} {LABELS[r['method']]:<11} {r['median_pct_peak']:7.1f} {r['min_pct_peak']:5.1f} "
            f"{faster:>22} {r['network_ms']:10.2f} {ratio(r['network_x_torch_best']):>12} "
            f"{ratio(r['network_x_torch_nchw']):>12}"
        )
    return "\n".join(lines), rows


def case_record(c: Case) -> dict:
    rec = {
        "id": c.layer.id,
        "name": c.layer.name,
        "problem": c.layer.conv.to_string(c.n),
        "count": c.layer.count,
        "threads": c.threads,
        "N": c.n,
        "mflop": c.flops * 1e-6,
        "peak_gflops": c.peak,
    }
    for m in METHODS:
        rec[f"{m}_ms"] = 1e3 * c.times[m] if m in c.times else float("nan")
        rec[f"{m}_gflops"] = c.gflops(m)
        rec[f"{m}_pct_peak"] = c.pct(m)
    rec.update(
        torch_best=c.torch_best,
        blocked_x_torch_best=c.speedup("blocked", c.torch_best),
        dropin_x_torch_nchw=c.speedup("dropin", "torch_nchw"),
        dropin_x_torch_best=c.speedup("dropin", c.torch_best),
        check_max_rel_err=c.max_err,
        check_error=c.error or "",
        jit_kernels=c.jit_kernels,
        jit_generate_ms=c.jit_generate_ms,
        first_call_ms=c.first_call_ms,
        plan=c.plan,
    )
    return rec


def write_csv(path: Path, records: list[dict], all_totals: dict[str, dict]) -> None:
    fields = list(records[0].keys())
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in records:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
        for name, totals in all_totals.items():
            threads, n = name.split("T N=")
            row = {k: "" for k in fields}
            row.update(id="NET", name="network", count=totals["convs"], threads=threads, N=n)
            row["mflop"] = f"{totals['gflop'] * 1e3:.6g}"
            for m in METHODS:
                row[f"{m}_ms"] = f"{totals['methods'][m]['ms']:.6g}"
                row[f"{m}_gflops"] = f"{totals['methods'][m]['gflops']:.6g}"
                row[f"{m}_pct_peak"] = f"{totals['methods'][m]['pct_peak']:.6g}"
            row["torch_best"] = totals["torch_best"]
            row["blocked_x_torch_best"] = f"{totals['methods']['blocked']['x_torch_best']:.6g}"
            row["dropin_x_torch_nchw"] = f"{totals['methods']['dropin']['x_torch_nchw']:.6g}"
            row["dropin_x_torch_best"] = f"{totals['methods']['dropin']['x_torch_best']:.6g}"
            writer.writerow(row)


def write_chart(path: Path, configs: dict[str, list[Case]], isa: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(configs)
    ncols = 2 if len(names) > 1 else 1
    nrows = math.ceil(len(names) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(7.5 * ncols, 3.6 * nrows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        cases = configs[name]
        xs = range(len(cases))
        blocked = [c.pct("blocked") for c in cases]
        best = [c.pct(c.torch_best) for c in cases]
        dropin = [c.pct("dropin") for c in cases]
        ax.bar([x - 0.2 for x in xs], blocked, width=0.4, label="blocked (conv2d_blocked)", color="tab:blue")
        ax.bar([x + 0.2 for x in xs], best, width=0.4, label="torch, better of NCHW / CL", color="tab:gray")
        ax.plot(list(xs), dropin, "o", ms=3.5, color="tab:orange", label="drop-in (DirectConv2d, NCHW)")
        ax.axhline(100, color="k", lw=0.6, ls=":")
        ax.set_xticks(list(xs), [c.layer.id for c in cases], rotation=90, fontsize=7)
        ax.set_ylabel("% of FMA peak")
        ax.set_title(f"{name} (peak {cases[0].peak:.0f} GFLOP/s, {isa})", fontsize=10)
        ax.set_ylim(0, max(110, max([v for v in blocked + best + dropin if not math.isnan(v)], default=0) * 1.05))
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle("ResNet-50 v1.5 forward convolutions: % of the measured FMA peak", fontsize=11)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run = start_run(args, "bench_fwd")
    res = run_configs(args, run, build_case, time_case, network_totals, format_table)
    tdc, isa, configs, all_totals, failures = run.tdc, run.isa, res.configs, res.totals, res.failures

    summary_text, summary_rows = summarize(configs, all_totals)
    print(summary_text)
    print_jit_and_peaks(tdc, res, isa)

    records = [case_record(c) for cases in configs.values() for c in cases]
    csv_path, json_path, png_path = (args.out / f"bench_fwd.{ext}" for ext in ("csv", "json", "png"))
    write_csv(csv_path, records, all_totals)
    meta = run_meta(args, run, res)
    doc = {"meta": meta, "layers": records, "network": all_totals, "summary": summary_rows}
    json_path.write_text(json.dumps(doc, indent=1, default=_json_default) + "\n")
    write_chart(png_path, configs, isa)
    print(f"wrote {csv_path}, {json_path.name}, {png_path.name}; wall time {meta['wall_s']:.0f} s")
    if failures:
        print(
            f"bench_fwd: {failures} case(s) FAILED the correctness check; their JIT paths were not timed",
            file=sys.stderr,
        )
        return 1
    return 0


def _json_default(o: object) -> object:
    if isinstance(o, tuple):
        return list(o)
    return str(o)


if __name__ == "__main__":
    sys.exit(main())
