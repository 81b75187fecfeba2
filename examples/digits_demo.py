#!/usr/bin/env python
"""Train a ResNet on scikit-learn's digits twice, with torch_directconv.optimize() and with plain
PyTorch, through examples/imagenet/train.py, and print the accuracy and speed of both.

The digits (1797 images of 8x8 pixels) are written out once as an ImageFolder of PNG files and
read back through the script's data path (decoding, random-resized crops, normalisation), as
ImageNet would be. Both runs have the same seed, flags and thread count; the speed is the
training img/s at the median step (the first steps, which generate the kernels, do not count)
and over whole epochs. A machine shared with other work makes the speeds noisy; the ratio of
one run is what to read.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TRAIN = HERE / "imagenet" / "train.py"
sys.path.insert(0, str(HERE / "imagenet"))

import digits  # noqa: E402

IMPLS = ("optimize", "torch")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--work-dir",
        default=str(HERE.parent / "bench" / "results" / "digits_demo"),
        help="where the ImageFolder and each run's output go (default: bench/results/digits_demo)",
    )
    ap.add_argument("-a", "--arch", default="resnet18_small", help="a train.py arch (default: resnet18_small)")
    ap.add_argument("--epochs", type=int, default=6, help="epochs per run (default: 6)")
    ap.add_argument("--image-size", type=int, default=64, help="the digits are scaled up to this (default: 64)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: train.py's, all the cores)")
    return ap.parse_args()


def run(impl: str, args: argparse.Namespace, data: Path, out: Path) -> dict:
    cmd = [
        sys.executable,
        str(TRAIN),
        str(data),
        "-a",
        args.arch,
        "--impl",
        impl,
        "--epochs",
        str(args.epochs),
        "--image-size",
        str(args.image_size),
        "--crop-pct",
        "1",
        "--scale",
        "0.5",
        "1",
        "--hflip",
        "0",
        "-b",
        "64",
        "--lr",
        "0.2",
        "--lr-schedule",
        "cosine",
        "--warmup-epochs",
        "1",
        "-j",
        "1",
        "-p",
        "1000",
        "--seed",
        "0",
        "--output-dir",
        str(out),
    ]
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    print(f"--- --impl {impl}: {' '.join(cmd[1:])}", flush=True)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as p:
        for line in p.stdout:
            if line.startswith(("=> epoch", " * ")):
                print("   ", line.rstrip(), flush=True)
    if p.returncode != 0:
        sys.exit(f"digits_demo: the --impl {impl} run failed (exit code {p.returncode}); see {out / 'log.txt'}")
    return json.loads((out / "summary.json").read_text())


def main() -> None:
    args = parse_args()
    work = Path(args.work_dir)
    data = digits.write_digits(work / "digits")
    start = time.perf_counter()
    results = {impl: run(impl, args, data, work / impl) for impl in IMPLS}
    machine = results["optimize"]["machine"]
    print(
        f"\nscikit-learn digits as PNGs ({data}): {args.arch} at {args.image_size}x{args.image_size}, "
        f"{args.epochs} epochs, batch 64, {machine['threads_per_process']} thread(s), {machine['cpu']}, "
        f"ISA {machine.get('isa')}; load average at the start {machine['load_average'][0]:.1f}"
    )
    print(f"{'':10} {'val Acc@1':>9} {'best':>7} {'img/s (median step)':>20} {'img/s (epochs)':>15}")
    speed = {}
    for impl, s in results.items():
        last = s["epochs"][-1]
        median = sorted(e["img_per_s_median_step"] for e in s["epochs"])[len(s["epochs"]) // 2]
        whole = sum(e["images"] for e in s["epochs"]) / sum(e["train_seconds"] for e in s["epochs"])
        speed[impl] = median
        print(f"{impl:10} {last['val_acc1']:9.2f} {s['best_acc1']:7.2f} {median:20.1f} {whole:15.1f}")
    print(
        f"optimize / torch, training img/s: {speed['optimize'] / speed['torch']:.2f}x "
        f"(demo took {time.perf_counter() - start:.0f} s; logs and summaries in {work})"
    )


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
