#!/usr/bin/env python
"""examples/imagenet/train.py's speed on ResNet-50 (synthetic data), the issue-9 targets:

  optimize      --impl optimize, 1 process x T threads
  torch CL      --impl torch --channels-last, 1 process x T threads
  DDP 2x1       --impl optimize under torchrun, 2 processes x 1 thread (same global batch), the
                gradients all-reduced through shared memory (--allreduce shm, the default)
  DDP 2x1 gloo  the same, all-reduced by gloo over TCP (--allreduce backend)

Every variant is a whole run of the script (its own process, kernels generated in its first
step), interleaved round by round, so a disturbance of a shared machine falls on all alike. The
speed of a run is the script's training img/s at its median step; this prints the median over
the rounds, the ratios, the all-reduce time per step of the DDP runs, and the share of its
threads' time each run really got (well under 1: other work had the cores).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "examples" / "imagenet" / "train.py"
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "train_targets"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(variant: str, args: argparse.Namespace, out: Path) -> dict:
    n_train = args.batch * (args.steps + 1)  # the first step generates the kernels
    # A small lr: random labels at lr 0.1 diverge, and overflowing values would skew the times.
    common = (
        f"--dummy --dummy-images {n_train} {args.batch} -a {args.arch} -b {args.batch} --image-size {args.image_size} "
        f"--epochs 1 -j 1 -p 1000 --lr 0.001"
    ).split() + ["--output-dir", str(out)]
    if variant == "optimize":
        cmd = [sys.executable, str(TRAIN), *common, "--impl", "optimize", "--threads", str(args.threads)]
    elif variant == "torch_cl":
        cmd = [
            sys.executable,
            str(TRAIN),
            *common,
            "--impl",
            "torch",
            "--channels-last",
            "--threads",
            str(args.threads),
        ]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_addr=127.0.0.1",
            f"--master_port={free_port()}",
            str(TRAIN),
            *common,
            "--impl",
            "optimize",
            "--threads",
            "1",
            "--allreduce",
            "backend" if variant == "ddp_2x1_gloo" else "shm",
        ]
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"train_targets: {variant} failed:\n{done.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    want = {"ddp_2x1": "shm", "ddp_2x1_gloo": "gloo"}.get(variant)
    if summary.get("allreduce") != want:
        sys.exit(f"train_targets: {variant} all-reduced by {summary.get('allreduce')!r}, not {want!r}")
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=8, help="the global batch (default: 8)")
    ap.add_argument("--threads", type=int, default=2, help="threads of the 1-process runs (default: 2)")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per run (default: 8)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument(
        "--variants",
        nargs="+",
        default=["optimize", "torch_cl", "ddp_2x1", "ddp_2x1_gloo"],
        choices=["optimize", "torch_cl", "ddp_2x1", "ddp_2x1_gloo"],
    )
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    args = ap.parse_args()
    runs: dict[str, list[dict]] = {v: [] for v in args.variants}
    for r in range(args.rounds):
        for v in args.variants:
            s = run(v, args, Path(args.out) / f"{v}-{r}")
            e = s["epochs"][0]
            runs[v].append(e)
            extra = (
                f", all-reduce {e['allreduce_ms_median_step']:.0f} ms/step" if "allreduce_ms_median_step" in e else ""
            )
            step_ms = 1000 * args.batch / e["img_per_s_median_step"]
            print(
                f"round {r} {v:12} {e['img_per_s_median_step']:7.2f} img/s (median step {step_ms:.0f} ms{extra}), "
                f"CPU share {e['cpu_share']:.2f}, load {s['machine']['load_average'][0]:.1f}",
                flush=True,
            )
    speed = {v: statistics.median(e["img_per_s_median_step"] for e in es) for v, es in runs.items()}
    print(
        f"\n{args.arch} {args.image_size}x{args.image_size}, global batch {args.batch}, {args.steps} timed steps, "
        f"medians of {args.rounds} round(s):"
    )
    for v, x in speed.items():
        print(f"  {v:12} {x:7.2f} img/s   CPU share {statistics.median(e['cpu_share'] for e in runs[v]):.2f}")
    if "optimize" in speed and "torch_cl" in speed:
        print(f"  optimize / torch CL ({args.threads} threads): {speed['optimize'] / speed['torch_cl']:.2f}x")
    for v, how in (("ddp_2x1", "shared memory"), ("ddp_2x1_gloo", "gloo")):
        if "optimize" not in speed or v not in speed:
            continue
        print(f"  {v} / 1x{args.threads} ({how}): {speed[v] / speed['optimize']:.2f}x")
        ar = statistics.median(e["allreduce_ms_median_step"] for e in runs[v])
        step = statistics.median(e["step_ms_median"] for e in runs[v])
        print(f"    gradient all-reduce in flight: {ar:.0f} ms of a {step:.0f} ms step (median)")


if __name__ == "__main__":
    main()
