#!/usr/bin/env python
"""Whole ResNet-50 v1.5 training step: eager against torch.compile, converted against plain.

Random, seeded weights; train mode; 224x224 images (--size to change); N = 1 and N = 2 x threads.
One training step is forward, a cross-entropy loss, backward and an SGD update. Every variant is
timed in the same run, interleaved step by step (median after warm-up):
  torch eager       the plain model (NCHW);
  converted eager   convert(model): every nn.Conv2d is a DirectConv2d, NCHW in and out;
  converted compiled  torch.compile(convert(model), fullgraph=True): the same model under
                    Inductor, the custom ops inside one graph.
The compiled model must not be slower than the eager one; its gradients are checked against
eager's after the first step (relative norm over all of them). Compile time is reported apart.
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
VARIANTS = ("torch_eager", "converted_eager", "converted_compiled")
LABELS = {"torch_eager": "torch eager", "converted_eager": "conv. eager", "converted_compiled": "conv. compiled"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=224, help="image height and width (default 224)")
    args = parse_model_run_args(ap, argv, iters=(7, 2), out=DEFAULT_OUT)
    if args.size < 32:
        ap.error(f"--size: expected >= 32, got {args.size}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch, tdc, isa = load_jit(args, "resnet50_training")
    from resnet50 import randomize_batchnorm, resnet50

    warmup = 1 if args.quick else 2
    start = time.time()
    print(
        f"ResNet-50 v1.5 training step (fwd, loss, bwd, SGD), {args.size}x{args.size}, random weights; "
        f"torch {torch.__version__}, ISA {isa}; median of {args.iters} interleaved steps after {warmup} warm-up(s)"
    )
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for n in batch_sizes(args.batch, threads):
            gen = torch.Generator().manual_seed(n)
            x = torch.randn(n, 3, args.size, args.size, generator=gen)
            target = torch.randint(0, 1000, (n,), generator=gen)
            torch.manual_seed(0)
            base = resnet50().train()
            randomize_batchnorm(base, torch.Generator().manual_seed(1))
            models = {
                "torch_eager": copy.deepcopy(base),
                "converted_eager": tdc.convert(base),
                "converted_compiled": tdc.convert(base),
            }
            fwds = {k: torch.compile(m, fullgraph=True) if k == "converted_compiled" else m for k, m in models.items()}
            steps = {}
            for name, model in models.items():
                opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

                def step(fwd=fwds[name], opt=opt, x=x, target=target):
                    opt.zero_grad(set_to_none=True)
                    loss = torch.nn.functional.cross_entropy(fwd(x), target)
                    loss.backward()
                    opt.step()
                    return loss

                steps[name] = step
            # The first steps: check the gradients of the compiled model against eager's (the same
            # weights, as both converted copies start from `base`), and time the compilation.
            grads = {}
            for name in VARIANTS:
                model = models[name]
                t0 = time.perf_counter()
                model.zero_grad()
                torch.nn.functional.cross_entropy(fwds[name](x), target).backward()
                if name == "converted_compiled":
                    compile_s = time.perf_counter() - t0
                grads[name] = [p.grad.clone() for p in model.parameters()]
            # Relative difference of all gradients as one vector (single tensors of near-zero
            # gradients would make a per-tensor ratio meaningless).
            flat = {k: torch.cat([g.flatten() for g in v]) for k, v in grads.items()}

            def rel(a: str, b: str, flat: dict = flat) -> float:
                return ((flat[a] - flat[b]).norm() / flat[b].norm()).item()

            max_diff = rel("converted_compiled", "converted_eager")
            # The float noise of this network and batch: our eager gradients against torch's own.
            noise = rel("converted_eager", "torch_eager")
            for name in VARIANTS:
                for _ in range(warmup):
                    steps[name]()
            times: dict[str, list[float]] = {k: [] for k in VARIANTS}
            for _ in range(args.iters):
                for name in VARIANTS:
                    t0 = time.perf_counter()
                    steps[name]()
                    times[name].append(time.perf_counter() - t0)
            med = {k: statistics.median(v) for k, v in times.items()}
            rows.append(
                {
                    "threads": threads,
                    "N": n,
                    **{f"{k}_ms": 1e3 * med[k] for k in VARIANTS},
                    "x_compiled_vs_eager": med["converted_eager"] / med["converted_compiled"],
                    "x_converted_vs_torch": med["torch_eager"] / med["converted_eager"],
                    "x_compiled_vs_torch": med["torch_eager"] / med["converted_compiled"],
                    "compile_s": compile_s,
                    "grad_max_rel_diff": max_diff,
                    "grad_rel_diff_eager_vs_torch": noise,
                }
            )
            print(f"  done {threads}T N={n}", file=sys.stderr)
            del models, steps

    print(format_table(rows))
    # Compiled gradients may differ from eager ones by the float noise of the network (Inductor
    # fuses BatchNorm and ReLU with other reduction orders), not by more.
    bad = [r for r in rows if r["grad_max_rel_diff"] > 3 * max(r["grad_rel_diff_eager_vs_torch"], 1e-3)]
    for r in bad:
        print(
            f"!! {r['threads']}T N={r['N']}: compiled gradients differ ({r['grad_max_rel_diff']:.2e}), more than 3x "
            f"the float noise of eager vs torch ({r['grad_rel_diff_eager_vs_torch']:.2e})",
            file=sys.stderr,
        )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "resnet50_training.json"
    meta = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(start)),
        "wall_s": time.time() - start,
        "torch": torch.__version__,
        "isa": isa,
        "iters": args.iters,
        "warmup": warmup,
        "size": args.size,
        "loadavg_end": os.getloadavg(),
    }
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(f"wrote {path}; wall time {time.time() - start:.0f} s")
    return 1 if bad else 0


def format_table(rows: list[dict]) -> str:
    head = (
        f"{'config':<8} {'torch eager':>11} {'conv. eager':>11} {'conv. compiled':>14} {'compiled/eager':>14} "
        f"{'eager x torch':>13} {'compiled x torch':>16} {'compile s':>9} {'grad diff':>9}"
    )
    lines = [
        "Step times in ms (median); x = the other's time / this one's (above 1.00x: faster); compiled/eager = "
        "converted eager time / converted compiled time; grad diff = |g_compiled - g_eager| / |g_eager| over "
        "all the first step's gradients, (vs torch) = the same for converted eager against torch eager",
        head,
        "-" * len(head),
    ]
    for r in rows:
        lines.append(
            f"{str(r['threads']) + 'T N=' + str(r['N']):<8} {r['torch_eager_ms']:11.1f} "
            f"{r['converted_eager_ms']:11.1f} "
            f"{r['converted_compiled_ms']:14.1f} {r['x_compiled_vs_eager']:13.2f}x {r['x_converted_vs_torch']:12.2f}x "
            f"{r['x_compiled_vs_torch']:15.2f}x {r['compile_s']:9.1f} {r['grad_max_rel_diff']:9.1e} "
            f"{r['grad_rel_diff_eager_vs_torch']:10.1e}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
