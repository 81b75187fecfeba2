#!/usr/bin/env python
"""Whole ResNet-50 v1.5 inference: the plain PyTorch model against torch_directconv.convert(model).

Random, seeded weights; eval mode; 224x224 images; N = 1 and N = 2 x threads. Every variant is
timed in the same run, interleaved iteration by iteration (median after warm-up):
  torch NCHW   the plain model on an NCHW input;
  torch CL     the plain model and input in channels_last (PyTorch's other format);
  converted    convert(model, cache_weights=True): every nn.Conv2d becomes a DirectConv2d
               that packs its weight once; NCHW in and out.
The first-call cost is the first forward of a freshly converted model after clear_cache()
(it plans, generates every kernel and packs every weight) minus the steady-state forward.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

from harness import load_jit
from problems import batch_sizes, parse_model_run_args

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    return parse_model_run_args(ap, argv, iters=(10, 3), out=DEFAULT_OUT)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch, tdc, isa = load_jit(args, "resnet50_inference")
    from resnet50 import randomize_batchnorm, resnet50

    warmup = 1 if args.quick else 3
    start = time.time()
    torch.manual_seed(0)
    model = resnet50().eval()
    randomize_batchnorm(model, torch.Generator().manual_seed(1))
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    print(
        f"ResNet-50 v1.5 inference, 224x224, random weights; torch {torch.__version__}, ISA {isa}; "
        f"median of {args.iters} interleaved iterations after {warmup} warm-up(s)"
    )

    rows = []
    with torch.no_grad():
        for threads in args.threads:
            torch.set_num_threads(threads)
            for n in batch_sizes(args.batch, threads):
                x = torch.randn(n, 3, 224, 224, generator=torch.Generator().manual_seed(n))
                x_cl = x.contiguous(memory_format=torch.channels_last)
                # Allocator warm-up before anything is timed, the first call included.
                for _ in range(warmup):
                    ref = model(x)

                tdc._C.clear_cache()
                converted = tdc.convert(model, cache_weights=True)  # inference: pack each weight once
                s0 = tdc.jit_stats()
                t0 = time.perf_counter()
                out = converted(x)
                first = time.perf_counter() - t0
                s1 = tdc.jit_stats()

                variants = {"torch_nchw": (model, x), "torch_cl": (model_cl, x_cl), "converted": (converted, x)}
                for m, inp in variants.values():
                    for _ in range(warmup):
                        m(inp)
                times: dict[str, list[float]] = {k: [] for k in variants}
                for _ in range(args.iters):
                    for name, (m, inp) in variants.items():
                        t0 = time.perf_counter()
                        m(inp)
                        times[name].append(time.perf_counter() - t0)
                med = {k: statistics.median(v) for k, v in times.items()}
                scale = ref.abs().max().item()
                out_cl = model_cl(x_cl)
                best = min(("torch_nchw", "torch_cl"), key=lambda k: med[k])
                rows.append(
                    {
                        "threads": threads,
                        "N": n,
                        "torch_nchw_ms": 1e3 * med["torch_nchw"],
                        "torch_cl_ms": 1e3 * med["torch_cl"],
                        "converted_ms": 1e3 * med["converted"],
                        "torch_best": best,
                        "x_torch_nchw": med["torch_nchw"] / med["converted"],
                        "x_torch_best": med[best] / med["converted"],
                        "converted_img_per_s": n / med["converted"],
                        "max_rel_diff": (out - ref).abs().max().item() / scale,
                        "torch_cl_max_rel_diff": (out_cl - ref).abs().max().item() / scale,
                        "same_top1": bool((out.argmax(1) == ref.argmax(1)).all()),
                        "first_call_ms": 1e3 * first,
                        "first_call_extra_ms": 1e3 * (first - med["converted"]),
                        "jit_kernels": s1["kernels"] - s0["kernels"],
                        "jit_generate_ms": s1["generate_ms"] - s0["generate_ms"],
                        "fallbacks": tdc.jit_stats()["fallbacks"] - s0["fallbacks"],
                    }
                )
                print(f"  done {threads}T N={n}", file=sys.stderr)
                del converted, variants

    print(format_table(rows))
    bad = [r for r in rows if r["max_rel_diff"] > 1e-3 or not r["same_top1"] or r["fallbacks"]]
    for r in bad:
        print(
            f"!! {r['threads']}T N={r['N']}: converted output differs (max rel diff {r['max_rel_diff']:.2e}, "
            f"same top-1: {r['same_top1']}) or fell back to torch ({r['fallbacks']} call(s))",
            file=sys.stderr,
        )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "resnet50_inference.json"
    meta = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(start)),
        "wall_s": time.time() - start,
        "torch": torch.__version__,
        "isa": isa,
        "iters": args.iters,
        "warmup": warmup,
        "loadavg_end": os.getloadavg(),
    }
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(f"wrote {path}; wall time {time.time() - start:.0f} s")
    return 1 if bad else 0


def format_table(rows: list[dict]) -> str:
    cols = [
        ("config", 8),
        ("torch NCHW", 10),
        ("torch CL", 9),
        ("converted", 9),
        ("x NCHW", 6),
        ("x best", 6),
        ("img/s", 6),
        ("max diff", 8),
        ("(CL diff)", 9),
        ("1st call", 8),
        ("1st extra", 9),
        ("kernels", 7),
        ("gen ms", 6),
    ]
    head = "  ".join(f"{c:>{w}}" if i else f"{c:<{w}}" for i, (c, w) in enumerate(cols))
    lines = [
        (
            "Times in ms (median); x = torch time / converted time; "
            "diffs = max |out - torch NCHW out| / max |torch NCHW out|;"
        ),
        "1st call = first forward of a freshly converted model after clear_cache(); 1st extra = 1st call - converted.",
        head,
        "-" * len(head),
    ]
    for r in rows:
        cells = [
            f"{r['threads']}T N={r['N']}",
            f"{r['torch_nchw_ms']:.1f}",
            f"{r['torch_cl_ms']:.1f}",
            f"{r['converted_ms']:.1f}",
            f"{r['x_torch_nchw']:.2f}",
            f"{r['x_torch_best']:.2f}",
            f"{r['converted_img_per_s']:.1f}",
            f"{r['max_rel_diff']:.1e}",
            f"{r['torch_cl_max_rel_diff']:.1e}",
            f"{r['first_call_ms']:.1f}",
            f"{r['first_call_extra_ms']:.1f}",
            f"{r['jit_kernels']}",
            f"{r['jit_generate_ms']:.1f}",
        ]
        lines.append(
            "  ".join(f"{v:>{w}}" if i else f"{v:<{w}}" for i, (v, (_, w)) in enumerate(zip(cells, cols, strict=False)))
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
