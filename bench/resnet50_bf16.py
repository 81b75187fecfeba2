#!/usr/bin/env python
"""Whole ResNet-50 v1.5 in bf16, 224x224: torch_directconv.optimize(model) under bf16 autocast
against PyTorch's best bf16 paths on this machine.

Random, seeded weights (fp32 master weights: every variant runs the same fp32 model under
torch.autocast("cpu", dtype=torch.bfloat16)). Two configurations by default: 1 thread with
N = 1 and 2 threads with N = 4. Two modes:
  inference   eval mode, no_grad, one forward;
  training    train mode, one step: forward under autocast, cross-entropy, backward, SGD (torch's
              fused kernel; momentum 0.9, weight decay 1e-4) on the fp32 master weights.
Variants, all timed in the same run, interleaved iteration by iteration (median after warm-up):
  torch CL        the model and input in channels_last under autocast (oneDNN's bf16 convolutions,
                  on AMX where the CPU has it);
  torch.compile   torch.compile(model) (Inductor) under autocast, channels_last; inference with
                  torch._inductor.config.freezing (weights folded and pre-packed);
  optimize        torch_directconv.optimize(model) under autocast: bf16 activations blocked end to
                  end in rows of 32 channels, batch norm / add / ReLU fused, fp32 statistics; its
                  inference calls replayed from C++ after the first two (--no-replay: not).
Checks (reported; bf16 is not bit-exact): inference outputs against the fp32 model's (max |diff| /
max |out|), and against torch CL's bf16 output; training, the first step's gradients of every
variant against the fp32 model's (relative norm over all of them).
The targets (issue 10): inference >= 1.3x torch.compile with freezing, training step >= 1.5x
torch.compile, at 1T N=1 and 2T N=4 on AMX.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

from harness import load_jit
from resnet50_optimize import (
    BREAKDOWN_STEPS,
    _time_interleaved,
    breakdown,
    check_common_args,
    make_sgd,
    warn_if_shared,
    write_results,
)

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
VARIANTS = ("torch_cl", "compile", "optimize")
LABELS = {"torch_cl": "torch CL bf16", "compile": "torch.compile bf16", "optimize": "optimize bf16"}
TARGETS = {"inference": 1.3, "training": 1.5}  # optimize vs torch.compile


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--configs", default="1x1,2x4", help="threads x N, comma-separated (default: 1x1,2x4: 1T N=1 and 2T N=4)"
    )
    ap.add_argument("--modes", nargs="+", choices=("inference", "training"), default=["inference", "training"])
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--size", type=int, default=224, help="image height and width (default 224)")
    ap.add_argument("--quick", action="store_true", help="fewer iterations: a smoke run, not a measurement")
    ap.add_argument("--iters", type=int, default=None, help="timed iterations (default: inference 10, training 5)")
    ap.add_argument(
        "--turn",
        type=int,
        default=1,
        help="calls in a row per variant in the round-robin (default 1: every call follows another variant's, "
        "which has evicted its weights from the caches; more: as a model serving alone finds them)",
    )
    ap.add_argument(
        "--no-replay",
        action="store_true",
        help="optimize(model, replay=False): inference runs the graph's Python at every call instead of replaying",
    )
    ap.add_argument("--isa-cap", choices=("avx512_bf16", "amx"), default=None, help="cap the JIT's ISA")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default: {DEFAULT_OUT})")
    args = check_common_args(ap, ap.parse_args(argv))
    if "torch_cl" not in args.variants:
        args.variants.insert(0, "torch_cl")  # the outputs are checked against it
    return args


def _autocast(torch):
    return torch.autocast("cpu", dtype=torch.bfloat16)


def run_inference(
    torch, tdc, base, variants: list[str], n: int, size: int, warmup: int, iters: int, turn: int, replay: bool = True
) -> tuple:
    x = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(n))
    x_cl = x.contiguous(memory_format=torch.channels_last)
    model_cl = copy.deepcopy(base).to(memory_format=torch.channels_last)
    models = {"torch_cl": (model_cl, x_cl), "optimize": (tdc.optimize(base, replay=replay), x)}
    compile_s = None
    if "compile" in variants:
        compiled = torch.compile(copy.deepcopy(base).to(memory_format=torch.channels_last), dynamic=False)
        t0 = time.perf_counter()
        with torch.no_grad(), _autocast(torch), torch._inductor.config.patch(freezing=True):
            compiled(x_cl)
        compile_s = time.perf_counter() - t0
        models["compile"] = (compiled, x_cl)

    def call(name):
        model, inp = models[name]
        with _autocast(torch):
            return model(inp)

    fallbacks0 = tdc.jit_stats()["fallbacks"]
    with torch.no_grad():
        ref = base(x)  # the fp32 model
        scale = ref.abs().max().item()
        outs = {k: call(k).float() for k in variants}
        diffs = {k: (o - ref).abs().max().item() / scale for k, o in outs.items()}
        vs_torch = {k: (o - outs["torch_cl"]).abs().max().item() / scale for k, o in outs.items()}
        med, busy = _time_interleaved({k: lambda k=k: call(k) for k in variants}, warmup, iters, turn)
        parts = breakdown(tdc, lambda: call("optimize"), BREAKDOWN_STEPS) if "optimize" in variants else None
    return med, busy, diffs, vs_torch, compile_s, tdc.jit_stats()["fallbacks"] - fallbacks0, parts


def run_training(torch, tdc, base, variants: list[str], n: int, size: int, warmup: int, iters: int, turn: int) -> tuple:
    F = torch.nn.functional
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, 3, size, size, generator=gen)
    target = torch.randint(0, 1000, (n,), generator=gen)
    x_cl = x.contiguous(memory_format=torch.channels_last)

    ref_model = copy.deepcopy(base)
    F.cross_entropy(ref_model(x), target).backward()
    ref = torch.cat([p.grad.flatten() for p in ref_model.parameters()])
    del ref_model

    makers = {
        "torch_cl": lambda: copy.deepcopy(base).to(memory_format=torch.channels_last),
        "compile": lambda: copy.deepcopy(base).to(memory_format=torch.channels_last),
        "optimize": lambda: tdc.optimize(base),
    }
    steps, diffs, compile_s = {}, {}, None
    fallbacks0 = tdc.jit_stats()["fallbacks"]
    for name in variants:
        model = makers[name]()
        fwd = torch.compile(model, dynamic=False) if name == "compile" else model
        inp = x if name == "optimize" else x_cl
        opt = make_sgd(torch, model.parameters(), "fused")

        def step(fwd=fwd, opt=opt, inp=inp, model=model, keep=False):
            opt.zero_grad(set_to_none=True)
            with _autocast(torch):
                loss = F.cross_entropy(fwd(inp), target)
            loss.backward()
            kept = torch.cat([p.grad.flatten() for p in model.parameters()]) if keep else None
            opt.step()
            return kept

        # The first step (from the same weights for all): gradients to check; compilation happens here.
        t0 = time.perf_counter()
        g = step(keep=True)
        if name == "compile":
            compile_s = time.perf_counter() - t0
        diffs[name] = ((g - ref).norm() / ref.norm()).item()
        steps[name] = step
    med, busy = _time_interleaved(steps, warmup, iters, turn)
    parts = breakdown(tdc, steps["optimize"], BREAKDOWN_STEPS) if "optimize" in steps else None
    return med, busy, diffs, None, compile_s, tdc.jit_stats()["fallbacks"] - fallbacks0, parts


def format_table(mode: str, rows: list[dict], variants: list[str]) -> str:
    unit = "forward" if mode == "inference" else "training step"
    diff = (
        "max |diff| / max |out| against the fp32 model (and against torch CL bf16)"
        if mode == "inference"
        else "first step's gradients against the fp32 model's, relative norm"
    )
    lines = [
        f"ResNet-50 bf16 {mode}: ms per {unit} (median); x = the variant's speed-up over torch.compile bf16"
        f" (target for optimize: >= {TARGETS[mode]}x); diff = {diff}; CPUs busy = CPU time / wall time while timing",
    ]
    head = f"{'config':<9}" + "".join(f"{LABELS[v]:>22}" for v in variants)
    head += f"{'optimize img/s':>16}{'vs torch CL':>13}{'compile s':>11}{'CPUs busy':>11}"
    lines += [head, "-" * len(head)]
    for r in rows:
        base = r["ms"].get("compile")
        line = f"{r['config']:<9}" + "".join(
            f"{r['ms'][v]:>14.1f} {base / r['ms'][v] if base else float('nan'):5.2f}x" for v in variants
        )
        if "optimize" in variants:
            line += f"{r['img_per_s']['optimize']:>16.1f}{r['ms']['torch_cl'] / r['ms']['optimize']:>12.2f}x"
        else:
            line += f"{'-':>16}{'-':>13}"
        line += f"{r['compile_s']:>11.1f}" if r["compile_s"] is not None else f"{'-':>11}"
        line += f"{r['cpus_busy']:>11.2f}"
        lines.append(line)
        cells = []
        for v in variants:
            cell = f"{r['diff'][v]:.1e}"
            if r.get("vs_torch"):
                cell += f" ({r['vs_torch'][v]:.1e})"
            cells.append(f"{cell:>22}")
        lines.append(f"{'  diff':<9}" + "".join(cells))
    return "\n".join(lines)


def format_breakdown(mode: str, rows: list[dict]) -> str:
    unit = "forward" if mode == "inference" else "training step"
    lines = [f"optimize() bf16 {unit} by kind (tdc.op_times(), median of {BREAKDOWN_STEPS} runs), ms:"]
    for r in rows:
        parts = r["breakdown_ms"] or {}
        total = parts.get("total", 0.0)
        cells = ", ".join(f"{k} {v:.1f}" for k, v in sorted(parts.items(), key=lambda kv: -kv[1]) if k != "total")
        lines.append(f"  {r['config']}: total {total:.1f}: {cells}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch, tdc, isa = load_jit(args, "resnet50_bf16")
    from resnet50 import randomize_batchnorm, resnet50

    if tdc.isa() not in ("amx", "avx512_bf16"):
        print(f"resnet50_bf16: the bf16 kernels need the amx or avx512_bf16 level; this run is at {tdc.isa()}")
        return 1
    warmup = 1 if args.quick else 2
    iters = {"inference": args.iters or (3 if args.quick else 10), "training": args.iters or (2 if args.quick else 5)}
    start = time.time()
    print(
        f"ResNet-50 v1.5, {args.size}x{args.size}, bf16 autocast, random weights; torch {torch.__version__}, ISA {isa}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; median of {iters['inference']} (inference) / "
        f"{iters['training']} (training) interleaved iterations, {args.turn} in a row per variant, after {warmup} "
        f"warm-up(s){'; optimize without replay' if args.no_replay else ''}"
        f"{' (--quick)' if args.quick else ''}"
    )
    results: dict = {}
    status = 0
    for mode in args.modes:
        rows = []
        for threads, n in args.configs:
            torch.set_num_threads(threads)
            torch.manual_seed(0)
            base = resnet50().train(mode == "training")
            randomize_batchnorm(base, torch.Generator().manual_seed(1))
            common = (torch, tdc, base, args.variants, n, args.size, warmup, iters[mode], args.turn)
            if mode == "inference":
                out = run_inference(*common, replay=not args.no_replay)
            else:
                out = run_training(*common)
            med, busy, diffs, vs_torch, compile_s, fallbacks, parts = out
            warn_if_shared(mode, threads, n, busy)
            if fallbacks:
                status = 1
                print(f"!! {mode} {threads}T N={n}: {fallbacks} call(s) fell back to torch's convolution", file=sys.stderr)
            rows.append(
                {
                    "config": f"{threads}T N={n}",
                    "threads": threads,
                    "N": n,
                    "ms": med,
                    "img_per_s": {k: 1e3 * n / v for k, v in med.items()},
                    "vs_compile": {k: med["compile"] / v for k, v in med.items()} if "compile" in med else None,
                    "diff": diffs,
                    "vs_torch": vs_torch,
                    "compile_s": compile_s,
                    "fallbacks": fallbacks,
                    "cpus_busy": busy,
                    "breakdown_ms": parts,
                }
            )
            del base
            print(f"  done {mode} {threads}T N={n} ({time.time() - start:.0f} s)", file=sys.stderr)
        print("\n" + format_table(mode, rows, args.variants))
        if any(r["breakdown_ms"] for r in rows):
            print("\n" + format_breakdown(mode, rows))
        results[mode] = rows
    write_results(torch, args, "resnet50_bf16.json", start, {"isa": isa, "iters": iters, "warmup": warmup}, results)
    return status


if __name__ == "__main__":
    sys.exit(main())
