"""ResNet-50's batch norms and pools on blocked tensors (torch_directconv.blocked_ops) against
torch's own ops on channels_last tensors, at N = 1 and N = 4, 1 and 2 threads.

Each batch-norm shape is timed four ways, ours against torch's:
- train fwd: blocked_ops.batch_norm(training=True, residual, relu) | F.batch_norm(training=True),
  += residual, relu_ (both update the running statistics);
- eval fwd:  the same with training=False (a batch norm not folded into its convolution);
- train bwd: bn_backward_blocked (grad of x, weight, bias, residual) | torch.autograd.grad
  through F.batch_norm + add + relu;
and ResNet's two pools: the stem's 3x3/2 max pool and the global average pool, forward and backward.

GB/s is the op's least traffic (each tensor read or written once per pass the fused op needs;
see `traffic`) over the time, the same bytes for both sides, so their ratio is the speedup.
`copy` is torch's x.copy_() of the same input in the same round, the machine's streaming rate
for that size: ours / copy says how close the op runs to a plain read and write.
Timing: median of 5 samples of at least 0.05 s each, round-robin over the methods.

--dtype bfloat16 times the bf16 activations (N, C/32, H, W, 32) against torch's bf16
channels_last ops (fp32 batch-norm parameters and statistics on both sides).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import torch_directconv as tdc
from torch_directconv import blocked_ops as bo
from torch_directconv._autograd import call_op

ops = torch.ops.directconv


@dataclass(frozen=True)
class Shape:
    """One batch-norm site of ResNet-50 v1.5 (torchvision): its output, and how often it occurs."""

    name: str
    c: int
    hw: int
    residual: bool
    relu: bool
    count: int


BN_SHAPES = [
    Shape("bn1", 64, 112, False, True, 1),
    Shape("res2_a", 64, 56, False, True, 6),
    Shape("res2_c", 256, 56, True, True, 3),
    Shape("res2_ds", 256, 56, False, False, 1),
    Shape("res3a_a", 128, 56, False, True, 1),
    Shape("res3_b", 128, 28, False, True, 7),
    Shape("res3_c", 512, 28, True, True, 4),
    Shape("res3_ds", 512, 28, False, False, 1),
    Shape("res4a_a", 256, 28, False, True, 1),
    Shape("res4_b", 256, 14, False, True, 11),
    Shape("res4_c", 1024, 14, True, True, 6),
    Shape("res4_ds", 1024, 14, False, False, 1),
    Shape("res5a_a", 512, 14, False, True, 1),
    Shape("res5_b", 512, 7, False, True, 5),
    Shape("res5_c", 2048, 7, True, True, 3),
    Shape("res5_ds", 2048, 7, False, False, 1),
]


def traffic(shape: Shape, op: str) -> int:
    """Tensor passes (multiples of the activation's size) of the fused op's least traffic."""
    r, relu = int(shape.residual), shape.relu
    if op == "train fwd":
        return 1 + (1 + r + 1)  # statistics read x; apply reads x (+ residual), writes y
    if op == "eval fwd":
        return 1 + r + 1
    # Pass 1 reads grad_y, x (and y for the ReLU mask), writing grad_residual when there is one;
    # pass 2 reads g (grad_residual, or grad_y and y again) and x, and writes grad_x.
    pass1 = 2 + int(relu) + r
    pass2 = (2 if r else 2 + int(relu)) + 1
    return pass1 + pass2


@dataclass
class Case:
    label: str
    op: str
    nbytes: int  # the op's least traffic
    input_bytes: int  # the size of x, which the copy reads and writes
    count: int
    fns: dict = field(default_factory=dict)
    times: dict = field(default_factory=dict)


def bn_cases(shape: Shape, n: int, dtype: torch.dtype) -> list[Case]:
    c, hw = shape.c, shape.hw
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, hw, hw, generator=g).to(dtype)
    r = torch.randn(n, c, hw, hw, generator=g).to(dtype) if shape.residual else None
    w, b = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)
    rm, rv = torch.zeros(c), torch.ones(c)
    xb, rb = tdc.to_blocked(x), tdc.to_blocked(r) if r is not None else None
    x_cl = x.contiguous(memory_format=torch.channels_last)
    r_cl = r.contiguous(memory_format=torch.channels_last) if r is not None else None
    size = xb.element_size() * xb.numel()

    def torch_fwd(training: bool):
        y = F.batch_norm(x_cl, rm, rv, w, b, training, 0.1, 1e-5)
        if r_cl is not None:
            y += r_cl
        return y.relu_() if shape.relu else y

    def ours_fwd(training: bool):
        return bo.batch_norm(xb, c, rm, rv, w, b, training, 0.1, 1e-5, residual=rb, relu=shape.relu)

    mean, var = bo.bn_stats(xb, c)
    yb = ours_fwd(True)
    gyb = tdc.to_blocked(torch.randn(x.shape, generator=g).to(dtype))
    mask = [True, True, True, shape.residual and shape.relu]

    def ours_bwd():
        # As autograd calls it: below the autograd key.
        return call_op(
            ops.bn_backward_blocked.default, gyb, yb if shape.relu else None, xb, mean, var, w, 1e-5, True, c, mask
        )

    xl, wl, bl = x_cl.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
    rl = r_cl.clone().requires_grad_() if r_cl is not None else None
    with torch.enable_grad():
        yt = F.batch_norm(xl, None, None, wl, bl, True, 0.1, 1e-5)
        if rl is not None:
            yt = yt + rl
        if shape.relu:
            yt = torch.relu(yt)
    gy_cl = tdc.from_blocked(gyb, c).contiguous(memory_format=torch.channels_last)
    leaves = [t for t in (xl, wl, bl, rl) if t is not None]

    def torch_bwd():
        with torch.enable_grad():
            return torch.autograd.grad(yt, leaves, gy_cl, retain_graph=True)

    copy_dst = torch.empty_like(x_cl)
    cases = []
    for op, ours, theirs in (
        ("train fwd", lambda: ours_fwd(True), lambda: torch_fwd(True)),
        ("eval fwd", lambda: ours_fwd(False), lambda: torch_fwd(False)),
        ("train bwd", ours_bwd, torch_bwd),
    ):
        case = Case(shape.name, op, traffic(shape, op) * size, size, shape.count)
        case.fns = {"ours": ours, "torch": theirs, "copy": lambda: copy_dst.copy_(x_cl)}
        cases.append(case)
    return cases


def maxpool_cases(n: int, dtype: torch.dtype) -> list[Case]:
    """The stem's max pool: 64 x 112 x 112 -> 56 x 56."""
    g = torch.Generator().manual_seed(1)
    x = torch.relu(torch.randn(n, 64, 112, 112, generator=g)).to(dtype)
    xb, x_cl = tdc.to_blocked(x), x.contiguous(memory_format=torch.channels_last)
    size_in = xb.element_size() * xb.numel()
    size_out = size_in // 4
    gyb = tdc.to_blocked(torch.randn(n, 64, 56, 56, generator=g).to(dtype))
    gy_cl = tdc.from_blocked(gyb, 64).contiguous(memory_format=torch.channels_last)
    yb = bo.max_pool2d(xb, 64, 3, 2, 1)
    xl = x_cl.clone().requires_grad_()
    with torch.enable_grad():
        yt = F.max_pool2d(xl, 3, 2, 1)
    copy_dst = torch.empty_like(x_cl)

    def copy():
        return copy_dst.copy_(x_cl)

    fwd = Case("maxpool", "fwd", size_in + size_out, size_in, 1)
    fwd.fns = {
        "ours": lambda: bo.max_pool2d(xb, 64, 3, 2, 1),
        "torch": lambda: F.max_pool2d(x_cl, 3, 2, 1),
        "copy": copy,
    }
    bwd = Case("maxpool", "bwd", 2 * size_in + size_out, size_in, 1)

    def torch_max_bwd():
        with torch.enable_grad():
            return torch.autograd.grad(yt, xl, gy_cl, retain_graph=True)

    bwd.fns = {
        "ours": lambda: call_op(
            ops.max_pool2d_blocked_backward.default, gyb, xb, yb, [3, 3], [2, 2], [1, 1], [1, 1], False, 64
        ),
        "torch": torch_max_bwd,
        "copy": copy,
    }
    return [fwd, bwd]


def gap_cases(n: int, dtype: torch.dtype) -> list[Case]:
    """The global average pool: 2048 x 7 x 7 -> (N, 2048)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, 2048, 7, 7, generator=g).to(dtype)
    xb, x_cl = tdc.to_blocked(x), x.contiguous(memory_format=torch.channels_last)
    gy = torch.randn(n, 2048, generator=g).to(dtype)
    size = xb.element_size() * xb.numel()
    xl = x_cl.clone().requires_grad_()
    with torch.enable_grad():
        yt = xl.mean((2, 3))
    gap_dst = torch.empty_like(x_cl)

    def torch_gap_bwd():
        with torch.enable_grad():
            return torch.autograd.grad(yt, xl, gy, retain_graph=True)

    fwd = Case("gap", "fwd", size, size, 1)
    fwd.fns = {
        "ours": lambda: bo.global_avg_pool(xb, 2048),
        "torch": lambda: x_cl.mean((2, 3)),
        "copy": lambda: gap_dst.copy_(x_cl),
    }
    bwd = Case("gap", "bwd", size, size, 1)
    bwd.fns = {
        "ours": lambda: call_op(ops.global_avg_pool_blocked_backward.default, gy, list(xb.shape), 2048),
        "torch": torch_gap_bwd,
        "copy": lambda: gap_dst.copy_(x_cl),
    }
    return [fwd, bwd]


def time_case(case: Case, samples: int, min_time: float, warmup: int) -> None:
    """Round-robin samples over the methods, so a disturbance hits all alike; medians."""
    reps = {}
    for key, fn in case.fns.items():
        for _ in range(warmup):
            fn()
        t0 = time.perf_counter()
        fn()
        reps[key] = max(1, math.ceil(min_time / max(time.perf_counter() - t0, 1e-7)))
    got: dict[str, list[float]] = {key: [] for key in case.fns}
    for _ in range(samples):
        for key, fn in case.fns.items():
            t0 = time.perf_counter()
            for _ in range(reps[key]):
                fn()
            got[key].append((time.perf_counter() - t0) / reps[key])
    case.times = {key: statistics.median(s) for key, s in got.items()}
    case.fns.clear()


def table(cases: list[Case]) -> str:
    head = "| shape | op | ours us | torch CL us | ours GB/s | torch GB/s | copy GB/s | ours/copy | speedup |"
    rows = [head, "|" + "---|" * 9]
    for c in cases:
        o, t, cp = c.times["ours"], c.times["torch"], c.times["copy"]
        copy_gbs = 2 * c.input_bytes / cp / 1e9  # one read and one write of x
        rows.append(
            f"| {c.label} | {c.op} | {o * 1e6:.1f} | {t * 1e6:.1f} | {c.nbytes / o / 1e9:.1f} | "
            f"{c.nbytes / t / 1e9:.1f} | {copy_gbs:.1f} | {c.nbytes / o / 1e9 / copy_gbs:.2f} | {t / o:.2f}x |"
        )
    return "\n".join(rows)


def network(cases: list[Case]) -> str:
    """ResNet-50's 53 batch norms, weighted by how often each shape occurs."""
    out = []
    for ops_ in (("train fwd", "train bwd"), ("eval fwd",)):
        sel = [c for c in cases if c.op in ops_]
        ours = sum(c.count * c.times["ours"] for c in sel)
        theirs = sum(c.count * c.times["torch"] for c in sel)
        out.append(
            f"all 53 BNs, {' + '.join(ops_)}: ours {ours * 1e3:.2f} ms, torch {theirs * 1e3:.2f} ms, "
            f"speedup {theirs / ours:.2f}x"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--quick", action="store_true", help="3 samples of 0.01 s: a smoke run")
    ap.add_argument("--isa-cap", choices=["avx2", "avx512", "avx512_bf16", "amx"], default=None)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    if args.isa_cap:
        tdc._C.set_isa_cap(args.isa_cap)
    if tdc.isa() == "none":
        print("bench_eltwise: the JIT is not active here; nothing to benchmark", file=sys.stderr)
        return 2
    samples, min_time, warmup = (3, 0.01, 1) if args.quick else (5, 0.05, 2)
    print(
        f"torch {torch.__version__}, ISA {tdc.isa()}, {args.dtype} (V={tdc.vector_width(dtype)}); "
        f"median of {samples} samples "
        f">= {min_time}s, round-robin"
    )
    with torch.no_grad():
        for threads in args.threads:
            torch.set_num_threads(threads)
            for n in args.batch:
                cases = [c for s in BN_SHAPES for c in bn_cases(s, n, dtype)]
                cases += maxpool_cases(n, dtype) + gap_cases(n, dtype)
                for c in cases:
                    time_case(c, samples, min_time, warmup)
                print(f"\n### {threads} thread(s), N = {n}\n\n{table(cases)}\n\n{network(cases)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
