"""What the layer benchmarks share: timing settings, the peaks, the start of a run and
the loop over thread counts and batch sizes (a warm-up and check pass, then timing)."""

from __future__ import annotations

import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from problems import batch_sizes, select_layers


@dataclass(frozen=True)
class Timing:
    """Median of `samples` samples, each at least `min_time` seconds, after `warmup` calls."""

    samples: int
    min_time: float
    warmup: int
    peak_runs: int
    peak_seconds: float


FULL = Timing(samples=5, min_time=0.05, warmup=2, peak_runs=3, peak_seconds=0.2)
QUICK = Timing(samples=3, min_time=0.01, warmup=1, peak_runs=1, peak_seconds=0.1)


def sample_median(fn: Callable[[], object], min_time: float) -> float:
    """The median of single calls of fn over at least min_time seconds (and 3 calls)."""
    times = []
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < min_time or len(times) < 3:
        a = time.perf_counter()
        fn()
        times.append(time.perf_counter() - a)
    return statistics.median(times)


def config_name(threads: int, n: int) -> str:
    return f"{threads}T N={n}"


# The peak loops: name -> (the level they need, the _C function that times them, its options).
PEAKS = {
    "fp32 FMA": ("avx2", "fma_peak_gflops", {}),
    "bf16 vdpbf16ps": ("avx512_bf16", "bf16_dot_peak_gflops", {}),
    "AMX, tiles from L1": ("amx", "amx_peak_gflops", {"from_l1": True}),
    "AMX, tiles in regs": ("amx", "amx_peak_gflops", {"from_l1": False}),
}


def available_peaks(tdc) -> list[str]:
    """The peak loops the active level runs (the levels are C++'s, tdc.runnable_isa_levels())."""
    levels = tdc.runnable_isa_levels()
    active = levels.index(tdc.isa()) if tdc.isa() in levels else 0
    return [name for name, (needs, _, _) in PEAKS.items() if needs in levels[: active + 1]]


def measure_peak(tdc, threads: int, timing: Timing, kind: str = "fp32 FMA") -> tuple[float, float]:
    """(GFLOP/s, CPUs busy) of one peak loop (a PEAKS name): the best of a few runs, as the
    peak is a maximum; and how many CPUs' worth of time the process used meanwhile, which
    shows whether the threads ran in parallel."""
    _, name, options = PEAKS[kind]
    fn = getattr(tdc._C, name)
    r0, w0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    peak = max(fn(threads, timing.peak_seconds, **options) for _ in range(timing.peak_runs))
    r1, w1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return peak, cpu / (w1 - w0)


@dataclass
class Run:
    """A started run: the modules, the ISA, the layers and the timing settings."""

    torch: object
    F: object
    tdc: object
    isa: str
    layers: list
    timing: Timing
    start: float


def load_jit(args, prog: str) -> tuple:
    """(torch, torch_directconv, ISA name) with --isa-cap applied; exits 2 when the JIT is not
    active (or not the ISA asked for)."""
    # torch first: torch_directconv's extension needs libtorch loaded, or it falls back silently.
    import torch

    import torch_directconv as tdc

    # The cap must be in place before any kernel or plan exists.
    if args.isa_cap:
        tdc._C.set_isa_cap(args.isa_cap)
    isa = tdc.isa()
    problem = ""
    if isa == "none":
        problem = "the JIT is not active on this machine (isa() == 'none'); nothing to benchmark"
    elif args.isa_cap and isa != args.isa_cap:
        problem = f"asked for --isa-cap {args.isa_cap}, but the JIT runs {isa}"
    if problem:
        print(f"{prog}: {problem}", file=sys.stderr)
        sys.exit(2)
    return torch, tdc, isa


def start_run(args, prog: str) -> Run:
    """load_jit, then the run's timing settings and header."""
    torch, tdc, isa = load_jit(args, prog)
    import torch.nn.functional as F

    start = time.time()
    timing = FULL if not args.quick else QUICK
    cpus = os.cpu_count() or 1
    if max(args.threads) > cpus:
        print(f"{prog}: warning: {max(args.threads)} threads on {cpus} CPUs", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    print(
        f"torch {torch.__version__}, torch_directconv {tdc.__version__}, ISA {isa} (V={tdc.vector_width()}), "
        f"{cpus} CPUs, load average {os.getloadavg()[0]:.2f}; timing: median of {timing.samples} samples "
        f">= {timing.min_time}s after {timing.warmup} warm-up(s){' (--quick)' if args.quick else ''}"
    )
    return Run(torch, F, tdc, isa, select_layers(args.layers), timing, start)


@dataclass
class Results:
    configs: dict  # config name -> cases
    totals: dict  # config name -> network totals
    peaks: dict  # threads -> GFLOP/s
    busy: dict  # threads -> CPUs busy during the peak loop
    failures: int


def run_configs(
    args,
    run: Run,
    build_case: Callable,
    time_case: Callable,
    network_totals: Callable,
    format_table: Callable,
) -> Results:
    """For each thread count: the peak, then a check and warm-up pass over every case (it
    generates the kernels and brings the allocator to its steady state: a fresh process pays
    mmap page faults), then the timing of every case, a table per configuration."""
    from tqdm import tqdm

    torch, tdc, timing = run.torch, run.tdc, run.timing
    res = Results({}, {}, {}, {}, 0)
    steps = len(args.threads) * len(batch_sizes(args.batch, 1)) * len(run.layers)
    bar = tqdm(total=2 * steps, unit="step", dynamic_ncols=True, mininterval=0.5)
    with torch.no_grad():
        for threads in args.threads:
            torch.set_num_threads(threads)
            bar.set_description(f"{threads}T peak")
            res.peaks[threads], res.busy[threads] = measure_peak(tdc, threads, timing)
            if res.busy[threads] < 0.75 * threads:
                why = "other processes hold the cores" + (
                    ", or the JIT's threads do not run in parallel" if threads > 1 else ""
                )
                tqdm.write(
                    f"!! the {threads}-thread FMA peak loop kept only {res.busy[threads]:.2f} CPUs busy ({why}): "
                    f"the {threads}T peak ({res.peaks[threads]:.1f} GFLOP/s) and the % of peak are not "
                    f"{threads}-core figures"
                )
            pending = []
            for n in batch_sizes(args.batch, threads):
                cases = []
                for layer in run.layers:
                    bar.set_description(f"{config_name(threads, n)} {layer.id} check+warm-up")
                    case = build_case(tdc, torch, run.F, layer, threads, n, res.peaks[threads])
                    for fn in case.fns.values():
                        for _ in range(timing.warmup):
                            fn()
                    if case.error:
                        res.failures += 1
                        tqdm.write(f"!! {config_name(threads, n)} {layer.id}: {case.error}")
                    cases.append(case)
                    bar.update()
                pending.append((n, cases))
            for n, cases in pending:
                for case in cases:
                    bar.set_description(f"{config_name(threads, n)} {case.layer.id} timing")
                    if case.fns:
                        time_case(case, timing, tdc)
                    case.fns.clear()  # frees the tensors the closures hold
                    bar.update()
                name = config_name(threads, n)
                res.configs[name] = cases
                res.totals[name] = network_totals(cases)
                tqdm.write("\n" + format_table(cases, res.totals[name]) + "\n")
            del pending
    bar.close()
    return res


def print_jit_and_peaks(tdc, res: Results, isa: str) -> None:
    stats = tdc.jit_stats()
    per_kernel = stats["generate_ms"] / stats["kernels"] if stats["kernels"] else float("nan")
    print(
        f"\nJIT cost: {stats['kernels']} kernels generated in {stats['generate_ms']:.1f} ms "
        f"({per_kernel:.3f} ms per kernel); cache {stats['cache_entries']} entries, "
        f"{stats['cache_bytes'] / 1024:.0f} KiB"
    )
    print(
        "FMA peak (GFLOP/s): "
        + ", ".join(f"{t}T {p:.1f} ({res.busy[t]:.2f} CPUs busy)" for t, p in res.peaks.items())
        + f", fp32 kernels {tdc._C.fp32_isa()} (level {isa})"
    )


def run_meta(args, run: Run, res: Results) -> dict:
    """What a results file records about its run: when, where, with what, and the peaks."""
    stats = run.tdc.jit_stats()
    return {
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(run.start)),
        "wall_s": time.time() - run.start,
        "host": platform.node(),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count() or 1,
        "torch": run.torch.__version__,
        "torch_directconv": run.tdc.__version__,
        "isa": run.isa,
        "vector_width": run.tdc.vector_width(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "timing": run.timing.__dict__,
        "peak_gflops": {str(t): p for t, p in res.peaks.items()},
        "peak_cpus_busy": {str(t): b for t, b in res.busy.items()},
        "loadavg_end": os.getloadavg(),
        "jit_stats": stats,
        "jit_ms_per_kernel": stats["generate_ms"] / stats["kernels"] if stats["kernels"] else float("nan"),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
