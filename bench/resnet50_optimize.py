#!/usr/bin/env python
"""Whole ResNet-50 v1.5, fp32, 224x224: torch_directconv.optimize(model) against PyTorch and convert().

Random, seeded weights. Two configurations by default: 1 thread with N = 1 and 2 threads with
N = 4. Two modes:
  inference   eval mode, no_grad, one forward;
  training    train mode, one step: forward, cross-entropy, backward, SGD (torch's fused kernel unless --sgd; momentum 0.9,
              weight decay 1e-4).
Every variant is timed in the same run, interleaved iteration by iteration (median after warm-up):
  torch NCHW      the plain model, NCHW;
  torch CL        the plain model and input in channels_last;
  torch.compile   torch.compile(model) (Inductor; inference with torch._inductor.config.freezing);
  convert         torch_directconv.convert(model) (inference: cache_weights=True), NCHW in and out;
  optimize        torch_directconv.optimize(model): blocked end to end, BN/add/ReLU fused;
  bf16 autocast   the plain model, channels_last, under torch.autocast("cpu", torch.bfloat16): a
                  reference from another precision, not a competitor.
Checks: inference outputs against torch NCHW (max |diff| / max |out|); training, the first step's
gradients of every fp32 variant against torch NCHW's (relative norm over all of them). Compile
time is reported apart.
Peak memory (training): the maximum RSS of a process that builds one model and runs training
steps, for torch eager (NCHW, channels_last) and optimize(), each in a fresh child process of its
own, so that no variant's peak hides in another's (--no-memory skips it).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from harness import load_jit

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
VARIANTS = ("torch_nchw", "torch_cl", "compile", "convert", "optimize", "bf16")
LABELS = {
    "torch_nchw": "torch NCHW",
    "torch_cl": "torch CL",
    "compile": "torch.compile",
    "convert": "convert",
    "optimize": "optimize",
    "bf16": "bf16 autocast",
}
FP32 = ("torch_nchw", "torch_cl", "compile", "convert", "optimize")
# The peak memory of a training step: torch eager against optimize().
MEMORY_VARIANTS = ("torch_nchw", "torch_cl", "optimize")
MEMORY_STEPS = 3
BREAKDOWN_STEPS = 3  # optimize() steps timed by op_times() after the interleaved timing
SGD_KINDS = ("fused", "foreach", "loop")


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
        "--sgd",
        choices=SGD_KINDS,
        default="fused",
        help="the optimizer's implementation, the same for every variant (default: fused, torch's fastest on the CPU)",
    )
    ap.add_argument("--isa-cap", choices=("avx2", "avx512", "avx512_bf16", "amx"), default=None, help="cap the JIT's ISA")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default: {DEFAULT_OUT})")
    ap.add_argument("--no-memory", action="store_true", help="skip the training step's peak memory (child processes)")
    ap.add_argument("--memory-child", choices=MEMORY_VARIANTS, help=argparse.SUPPRESS)
    args = check_common_args(ap, ap.parse_args(argv))
    if "torch_nchw" not in args.variants:
        args.variants.insert(0, "torch_nchw")  # every ratio and check is against it
    return args


def check_common_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """--configs as (threads, N) pairs and --iters, checked (the whole-model benchmarks' shared options)."""
    try:
        args.configs = [tuple(int(v) for v in c.split("x")) for c in args.configs.split(",")]
    except ValueError:
        ap.error(f"--configs: expected THREADSxN pairs such as 1x1,2x4, got {args.configs!r}")
    if any(len(c) != 2 or min(c) < 1 for c in args.configs):
        ap.error(f"--configs: expected positive THREADSxN pairs, got {args.configs}")
    if args.iters is not None and args.iters < 1:
        ap.error(f"--iters: expected >= 1, got {args.iters}")
    return args


def warn_if_shared(mode: str, threads: int, n: int, busy: float) -> None:
    """Says on stderr when this process kept fewer CPUs busy than its threads while timing."""
    if busy < 0.75 * threads:
        # With a core taken by another process, a multi-threaded op waits at every barrier.
        print(
            f"!! {mode} {threads}T N={n}: this process kept only {busy:.2f} of {threads} CPUs busy while "
            "timing: other processes hold the cores, and these times are not a measurement",
            file=sys.stderr,
        )


def write_results(torch, args: argparse.Namespace, name: str, start: float, meta: dict, results: dict) -> None:
    """args.out / name: the run's metadata (date, wall time, torch, size, quick, load, and `meta`)
    and its results, as JSON."""
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / name
    meta = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(start)),
        "wall_s": time.time() - start,
        "torch": torch.__version__,
        **meta,
        "size": args.size,
        "quick": args.quick,
        "loadavg_end": os.getloadavg(),
    }
    path.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    print(f"\nwrote {path}; wall time {time.time() - start:.0f} s")


def _median_ms(samples: list[float]) -> float:
    return 1e3 * statistics.median(samples)


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def make_sgd(torch, params, kind: str):
    """SGD with momentum 0.9 and weight decay 1e-4, the same for every variant: torch's fused
    kernel by default (its fastest on the CPU), or its foreach or for-loop forms."""
    extra = {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}[kind]
    return torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=1e-4, **extra)


def breakdown(tdc, fn, steps: int) -> dict:
    """The median over `steps` calls of fn of each kind's milliseconds, by the project's own op
    timers (tdc.op_times), plus "total" (the call's wall time)."""
    runs = []
    for _ in range(steps):
        with tdc.op_times() as t:
            fn()
        kinds = {k: 1e3 * v for k, v in t.by_kind().items()}
        kinds["total"] = 1e3 * t.wall
        runs.append(kinds)
    keys = sorted({k for r in runs for k in r})
    return {k: statistics.median(r.get(k, 0.0) for r in runs) for k in keys}


def _time_interleaved(fns: dict, warmup: int, iters: int, turn: int = 1) -> tuple[dict, float]:
    """(name -> median ms, CPUs busy while timing): the variants run round-robin so that a
    disturbance hits all alike; the CPU time this process got over the wall time shows whether
    other processes held the cores meanwhile. Each variant's turn is `turn` calls in a row
    (iters rounded up to whole turns): with 1, every call follows another variant's, which has
    evicted its weights from the caches; with more, all but the first of a turn find the
    caches as a model that serves alone finds them."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict = {k: [] for k in fns}
    cpu0, wall0 = _cpu_seconds(), time.perf_counter()
    for _ in range(-(-iters // turn)):
        for name, fn in fns.items():
            for _ in range(turn):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    busy = (_cpu_seconds() - cpu0) / (time.perf_counter() - wall0)
    return {k: _median_ms(v) for k, v in times.items()}, busy


def run_inference(torch, tdc, base, variants: list[str], n: int, size: int, warmup: int, iters: int, sgd: str) -> tuple:
    x = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(n))
    x_cl = x.contiguous(memory_format=torch.channels_last)
    model_cl = copy.deepcopy(base).to(memory_format=torch.channels_last)
    models = {
        "torch_nchw": (base, x),
        "torch_cl": (model_cl, x_cl),
        "convert": (tdc.convert(base, cache_weights=True), x),
        "optimize": (tdc.optimize(base), x),
        "bf16": (model_cl, x_cl),
    }
    compile_s = None
    if "compile" in variants:
        compiled = torch.compile(copy.deepcopy(base), dynamic=False)
        t0 = time.perf_counter()
        with torch.no_grad(), torch._inductor.config.patch(freezing=True):
            compiled(x)
        compile_s = time.perf_counter() - t0
        models["compile"] = (compiled, x)

    def call(name):
        model, inp = models[name]
        amp = torch.autocast("cpu", dtype=torch.bfloat16) if name == "bf16" else contextlib.nullcontext()
        with amp:
            return model(inp)

    fallbacks0 = tdc.jit_stats()["fallbacks"]
    with torch.no_grad():
        ref = call("torch_nchw")
        scale = ref.abs().max().item()
        diffs = {k: (call(k).float() - ref).abs().max().item() / scale for k in variants}
        med, busy = _time_interleaved({k: lambda k=k: call(k) for k in variants}, warmup, iters)
        parts = breakdown(tdc, lambda: call("optimize"), BREAKDOWN_STEPS) if "optimize" in variants else None
    return med, busy, diffs, compile_s, tdc.jit_stats()["fallbacks"] - fallbacks0, parts


def run_training(torch, tdc, base, variants: list[str], n: int, size: int, warmup: int, iters: int, sgd: str) -> tuple:
    F = torch.nn.functional
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, 3, size, size, generator=gen)
    target = torch.randint(0, 1000, (n,), generator=gen)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    makers = {
        "torch_nchw": lambda: copy.deepcopy(base),
        "torch_cl": lambda: copy.deepcopy(base).to(memory_format=torch.channels_last),
        "compile": lambda: copy.deepcopy(base),
        "convert": lambda: tdc.convert(base),
        "optimize": lambda: tdc.optimize(base),
        "bf16": lambda: copy.deepcopy(base).to(memory_format=torch.channels_last),
    }
    steps, grads, compile_s = {}, {}, None
    for name in variants:
        model = makers[name]()
        fwd = torch.compile(model, dynamic=False) if name == "compile" else model
        inp = x_cl if name in ("torch_cl", "bf16") else x
        opt = make_sgd(torch, model.parameters(), sgd)
        amp = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if name == "bf16" else contextlib.nullcontext

        def step(fwd=fwd, opt=opt, inp=inp, amp=amp, model=model, keep=False):
            opt.zero_grad(set_to_none=True)
            with amp():
                loss = F.cross_entropy(fwd(inp), target)
            loss.backward()
            kept = torch.cat([p.grad.flatten() for p in model.parameters()]) if keep else None
            opt.step()
            return kept

        # The first step (from the same weights for all): gradients to check; compilation happens here.
        t0 = time.perf_counter()
        grads[name] = step(keep=True)
        if name == "compile":
            compile_s = time.perf_counter() - t0
        steps[name] = step
    ref = grads["torch_nchw"]
    diffs = {k: ((g - ref).norm() / ref.norm()).item() for k, g in grads.items()}
    del grads, ref
    med, busy = _time_interleaved(steps, warmup, iters)
    parts = breakdown(tdc, steps["optimize"], BREAKDOWN_STEPS) if "optimize" in steps else None
    return med, busy, diffs, compile_s, 0, parts


def _max_rss_mb() -> float:
    """This process's maximum RSS (MiB): VmHWM, the peak of its own address space. Not getrusage's
    ru_maxrss, which a child process inherits from its parent across fork and exec."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status (the peak memory needs Linux)")


def memory_child(args: argparse.Namespace) -> int:
    """In a fresh process: one model of the variant, MEMORY_STEPS training steps; prints the
    maximum RSS (MiB) before the first step and after the last, as JSON."""
    torch, tdc, _ = load_jit(args, "resnet50_optimize")
    from resnet50 import randomize_batchnorm, resnet50

    F = torch.nn.functional
    (threads, n), size = args.configs[0], args.size
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = resnet50().train()
    randomize_batchnorm(model, torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, 3, size, size, generator=gen)
    target = torch.randint(0, 1000, (n,), generator=gen)
    if args.memory_child == "torch_cl":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    elif args.memory_child == "optimize":
        model = tdc.optimize(model, inplace=True)  # no copy: the same parameters as the eager model's
    opt = make_sgd(torch, model.parameters(), args.sgd)
    before = _max_rss_mb()
    for _ in range(MEMORY_STEPS):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), target).backward()
        opt.step()
    print(json.dumps({"before_mb": before, "peak_mb": _max_rss_mb()}))
    return 0


def run_memory(args: argparse.Namespace, variants: list[str], threads: int, n: int) -> dict:
    """variant -> {"before_mb", "peak_mb"} of a training step, each from its own child process."""
    script = Path(__file__).resolve()
    out = {}
    for v in variants:
        cmd = [sys.executable, str(script), "--memory-child", v, "--configs", f"{threads}x{n}", "--size", str(args.size)]
        cmd += ["--sgd", args.sgd]
        if args.isa_cap:
            cmd += ["--isa-cap", args.isa_cap]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"the peak-memory child for {v} ({threads}T N={n}) failed:\n{done.stderr}")
        out[v] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def format_memory(rows: list[dict], variants: list[str]) -> str:
    lines = [
        f"ResNet-50 training step, peak memory: maximum RSS (MiB) of a fresh process after {MEMORY_STEPS} steps "
        "(in brackets: before the first step, with the model built); x = the variant's peak / torch NCHW's and "
        "/ torch CL's (at most 1.1x is the target)",
    ]
    head = f"{'config':<9}" + "".join(f"{LABELS[v]:>22}" for v in variants)
    head += f"{'optimize vs NCHW':>18}{'optimize vs CL':>16}" if "optimize" in variants else ""
    lines += [head, "-" * len(head)]
    for r in rows:
        mem = r["memory"]
        line = f"{r['config']:<9}" + "".join(
            f"{mem[v]['peak_mb']:>12.0f} ({mem[v]['before_mb']:>6.0f})" for v in variants
        )
        if "optimize" in variants:
            peak = mem["optimize"]["peak_mb"]
            line += f"{peak / mem['torch_nchw']['peak_mb']:>17.2f}x"
            line += f"{peak / mem['torch_cl']['peak_mb']:>15.2f}x" if "torch_cl" in mem else f"{'-':>16}"
        lines.append(line)
    return "\n".join(lines)


BREAKDOWN_KINDS = (
    "conv forward",
    "conv input gradient",
    "conv weight gradient",
    "fused element-wise",
    "layout conversions",
    "other directconv ops",
    "outside our ops",
)


def format_breakdown(mode: str, rows: list[dict]) -> str:
    unit = "forward" if mode == "inference" else "training step"
    lines = [
        f"optimize() {unit}, by kind: ms and share of the {unit}, median of {BREAKDOWN_STEPS} runs timed by "
        "tdc.op_times() (each op's wall time, kernels with their per-call setup); outside our ops = torch's ops, "
        "the loss, the optimizer, Python and the autograd engine",
    ]
    head = f"{'config':<9}{'total':>9}" + "".join(f"{k:>22}" for k in BREAKDOWN_KINDS) + f"{'conv share':>12}"
    lines += [head, "-" * len(head)]
    for r in rows:
        b = r["breakdown_ms"]
        if not b:
            continue
        total = b["total"]
        conv = sum(b.get(k, 0.0) for k in BREAKDOWN_KINDS[:3])
        line = f"{r['config']:<9}{total:>9.1f}"
        line += "".join(f"{b.get(k, 0.0):>14.1f} {100 * b.get(k, 0.0) / total:5.1f}%" for k in BREAKDOWN_KINDS)
        lines.append(line + f"{100 * conv / total:>11.1f}%")
    return "\n".join(lines)


def format_table(mode: str, rows: list[dict], variants: list[str]) -> str:
    torch_fp32 = [v for v in ("torch_nchw", "torch_cl", "compile") if v in variants]
    diff = (
        "max |out - torch NCHW out| / max |torch NCHW out|"
        if mode == "inference"
        else "the first step's gradients, |g - g_torch NCHW| / |g_torch NCHW|"
    )
    unit = "forward" if mode == "inference" else "training step"
    lines = [
        f"ResNet-50 {mode}: ms per {unit} (median) and x = torch NCHW's time / the variant's (above 1: faster);",
        f"optimize's img/s and its speed-up over the fastest torch fp32 variant; diff = {diff};",
        "CPUs busy = this process's CPU time / wall time while timing (under the thread count: other processes "
        "held the cores)",
    ]
    head = f"{'config':<9}" + "".join(f"{LABELS[v]:>16}" for v in variants)
    if "optimize" in variants:
        head += f"{'optimize img/s':>16}  optimize vs best torch fp32"
    head += f"{'compile s':>11}{'CPUs busy':>11}"
    lines += [head, "-" * len(head)]
    for r in rows:
        line = f"{r['config']:<9}" + "".join(f"{r['ms'][v]:>9.1f} {r['x'][v]:5.2f}x" for v in variants)
        if "optimize" in variants:
            best = min(torch_fp32, key=lambda v: r["ms"][v])
            vs = f"{r['ms'][best] / r['ms']['optimize']:.2f}x ({LABELS[best]})"
            line += f"{r['img_per_s']['optimize']:>16.1f}  {vs:<27}"
        line += f"{r['compile_s']:>11.1f}" if r["compile_s"] is not None else f"{'-':>11}"
        line += f"{r['cpus_busy']:>11.2f}"
        lines.append(line)
        lines.append(f"{'  diff':<9}" + "".join(f"{r['diff'][v]:>16.1e}" for v in variants))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.memory_child:
        return memory_child(args)
    torch, tdc, isa = load_jit(args, "resnet50_optimize")
    from resnet50 import randomize_batchnorm, resnet50

    warmup = 1 if args.quick else 2
    iters = {"inference": args.iters or (3 if args.quick else 10), "training": args.iters or (2 if args.quick else 5)}
    start = time.time()
    print(
        f"ResNet-50 v1.5, {args.size}x{args.size}, fp32, random weights; torch {torch.__version__}, ISA {isa}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; median of "
        f"{iters['inference']} (inference) / {iters['training']} (training) interleaved iterations after "
        f"{warmup} warm-up(s){' (--quick)' if args.quick else ''}"
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
            run = run_inference if mode == "inference" else run_training
            med, busy, diffs, compile_s, fallbacks, parts = run(
                torch, tdc, base, args.variants, n, args.size, warmup, iters[mode], args.sgd
            )
            warn_if_shared(mode, threads, n, busy)
            rows.append(
                {
                    "config": f"{threads}T N={n}",
                    "threads": threads,
                    "N": n,
                    "ms": med,
                    "x": {k: med["torch_nchw"] / v for k, v in med.items()},
                    "img_per_s": {k: 1e3 * n / v for k, v in med.items()},
                    "diff": diffs,
                    "compile_s": compile_s,
                    "fallbacks": fallbacks,
                    "cpus_busy": busy,
                    "breakdown_ms": parts,
                }
            )
            del base
            memory_variants = [v for v in MEMORY_VARIANTS if v in args.variants]
            if mode == "training" and not args.no_memory:
                rows[-1]["memory"] = run_memory(args, memory_variants, threads, n)
            print(f"  done {mode} {threads}T N={n} ({time.time() - start:.0f} s)", file=sys.stderr)
        print("\n" + format_table(mode, rows, args.variants))
        if any(r["breakdown_ms"] for r in rows):
            print("\n" + format_breakdown(mode, rows))
        if mode == "training" and not args.no_memory:
            print("\n" + format_memory(rows, memory_variants))
        # fp32 variants must agree with torch to fp32 noise (bf16 is reported, not checked).
        limit = 1e-3 if mode == "inference" else 1e-2
        for r in rows:
            bad = {k: v for k, v in r["diff"].items() if k in FP32 and v > limit}
            if bad or r["fallbacks"]:
                status = 1
                print(f"!! {mode} {r['config']}: differs from torch NCHW {bad} or fell back to torch", file=sys.stderr)
        results[mode] = rows
    meta = {"isa": isa, "iters": iters, "warmup": warmup, "sgd": args.sgd}
    write_results(torch, args, "resnet50_optimize.json", start, meta, results)
    return status


if __name__ == "__main__":
    sys.exit(main())
