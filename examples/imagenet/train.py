#!/usr/bin/env python
"""Train a ResNet on an ImageFolder (or synthetic images) on x86 CPUs, with torch_directconv.

The command line of pytorch/examples' ImageNet script, plus the project's own flags:

    python examples/imagenet/train.py DATA -a resnet50 -b 256 --lr 0.1 --epochs 90
    torchrun --nproc_per_node=2 examples/imagenet/train.py DATA -a resnet50 -b 256

DATA holds train/<class>/<images> and val/<class>/<images>. Under torchrun every process runs
DistributedDataParallel over gloo on its share of each global batch (-b); only rank 0 prints and
writes (checkpoint.pth.tar and model_best.pth.tar each epoch, log.txt, summary.json). See the
README's "Training ResNets" section.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import socket
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # data, meters, models, pil_vision

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import data
import meters
import models

IMPLS = ("optimize", "convert", "torch")

OnStep = Callable[[int, int, nn.Module], None]


def available_cores() -> int:
    return len(os.sched_getaffinity(0))


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("data", metavar="DATA", nargs="?", default=None, help="ImageFolder root: DATA/train, DATA/val")
    p.add_argument(
        "-a",
        "--arch",
        metavar="ARCH",
        default="resnet18",
        choices=sorted(models.ARCHS),
        help=f"model architecture: {' | '.join(sorted(models.ARCHS))} (default: resnet18)",
    )
    p.add_argument(
        "-j",
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="data loading workers per process (default: 4, or fewer: the cores given to each local process)",
    )
    p.add_argument("--epochs", type=int, default=90, metavar="N", help="total epochs (default: 90)")
    p.add_argument(
        "-b", "--batch-size", type=int, default=256, metavar="N", help="global batch over all processes (default: 256)"
    )
    p.add_argument(
        "--lr",
        "--learning-rate",
        type=float,
        default=0.1,
        metavar="LR",
        dest="lr",
        help="initial learning rate for the global batch (default: 0.1)",
    )
    p.add_argument("--momentum", type=float, default=0.9, metavar="M", help="SGD momentum (default: 0.9)")
    p.add_argument(
        "--wd",
        "--weight-decay",
        type=float,
        default=1e-4,
        metavar="W",
        dest="weight_decay",
        help="weight decay (default: 1e-4)",
    )
    p.add_argument("-p", "--print-freq", type=int, default=10, metavar="N", help="print every N steps (default: 10)")
    p.add_argument("--resume", default="", metavar="PATH", help="a checkpoint.pth.tar to continue from")
    p.add_argument(
        "--weights",
        default="",
        metavar="PATH",
        help="a state_dict to start from (a torchvision checkpoint, or the state_dict of ours)",
    )
    p.add_argument("-e", "--evaluate", action="store_true", help="evaluate on the validation set only")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation, the order and the augmentation")
    p.add_argument("--dummy", action="store_true", help="synthetic data instead of DATA (1000 classes)")
    p.add_argument(
        "--dummy-images",
        type=int,
        nargs=2,
        default=(1_281_167, 50_000),
        metavar=("TRAIN", "VAL"),
        help="how many synthetic images (default: ImageNet's 1281167 50000)",
    )
    p.add_argument("--dist-backend", default="gloo", help="torch.distributed backend (default: gloo)")
    p.add_argument(
        "--allreduce",
        choices=("shm", "backend"),
        default="shm",
        help="the gradients' all-reduce: shm, through shared memory when every process runs on this host (else "
        "as backend); backend, the process group's all_reduce (default: shm)",
    )
    p.add_argument(
        "--dist-timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="a collective that waits longer for another process fails, and the run exits (default: 300)",
    )
    p.add_argument(
        "--output-dir", default=".", metavar="DIR", help="checkpoints, log.txt and summary.json (default: .)"
    )
    g = p.add_argument_group("torch_directconv")
    g.add_argument(
        "--impl",
        choices=IMPLS,
        default="optimize",
        help="optimize: tdc.optimize(model), blocked end to end; convert: tdc.convert(model); "
        "torch: plain PyTorch (default: optimize)",
    )
    g.add_argument("--channels-last", action="store_true", help="with --impl torch: model and images in channels_last")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument(
        "--bf16",
        action="store_true",
        help="forward and loss under torch.autocast('cpu', dtype=torch.bfloat16), fp32 master weights and "
        "optimizer (with --impl optimize: bf16 activations blocked end to end)",
    )
    g.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="torch threads per process (default: the available cores divided among the local processes)",
    )
    g.add_argument(
        "--image-size", type=int, default=224, metavar="PX", help="training and validation crop (default: 224)"
    )
    g.add_argument(
        "--crop-pct",
        type=float,
        default=0.875,
        metavar="F",
        help="validation: resize the shorter side to image-size / F, then center-crop (default: 0.875)",
    )
    g.add_argument(
        "--scale",
        type=float,
        nargs=2,
        default=(0.08, 1.0),
        metavar=("MIN", "MAX"),
        help="random-resized-crop area range, as a fraction of the image (default: 0.08 1.0)",
    )
    g.add_argument("--hflip", type=float, default=0.5, metavar="P", help="horizontal flip probability (default: 0.5)")
    g.add_argument(
        "--lr-schedule",
        choices=("step", "cosine"),
        default="step",
        help="step: x lr-gamma every lr-step-size epochs; cosine: down to 0 at the last step (default: step)",
    )
    g.add_argument(
        "--lr-step-size", type=int, default=30, metavar="N", help="step schedule period in epochs (default: 30)"
    )
    g.add_argument("--lr-gamma", type=float, default=0.1, metavar="G", help="step schedule factor (default: 0.1)")
    g.add_argument(
        "--warmup-epochs",
        type=float,
        default=0.0,
        metavar="E",
        help="linear warm-up from lr/steps to lr over E epochs, step by step (default: 0)",
    )
    g.add_argument(
        "--label-smoothing", type=float, default=0.0, metavar="S", help="cross-entropy label smoothing (default: 0)"
    )
    g.add_argument(
        "--sgd",
        choices=("fused", "foreach", "loop"),
        default="fused",
        help="torch's SGD implementation: its fused kernel (default; the fastest on the CPU), foreach, or the "
        "for-loop",
    )
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cores_per_process = max(1, available_cores() // local_world_size())
    if args.threads is None:
        args.threads = cores_per_process
    if args.workers is None:
        args.workers = min(4, cores_per_process)
    checks = [
        (args.batch_size >= 1, f"-b/--batch-size must be at least 1, got {args.batch_size}"),
        (
            args.batch_size % world == 0,
            f"-b/--batch-size {args.batch_size} is the global batch: it must be a multiple of the {world} processes",
        ),
        (args.epochs >= 1, f"--epochs must be at least 1, got {args.epochs}"),
        (args.workers >= 0, f"-j/--workers must be 0 or more, got {args.workers}"),
        (args.lr >= 0, f"--lr must be 0 or more, got {args.lr}"),
        (0 <= args.momentum < 1, f"--momentum must be in [0, 1), got {args.momentum}"),
        (args.weight_decay >= 0, f"--wd must be 0 or more, got {args.weight_decay}"),
        (args.print_freq >= 1, f"-p/--print-freq must be at least 1, got {args.print_freq}"),
        (args.threads >= 1, f"--threads must be at least 1, got {args.threads}"),
        (args.image_size >= 1, f"--image-size must be at least 1, got {args.image_size}"),
        (0 < args.crop_pct <= 1, f"--crop-pct must be in (0, 1], got {args.crop_pct}"),
        (0 < args.scale[0] <= args.scale[1] <= 1, f"--scale must be 0 < MIN <= MAX <= 1, got {list(args.scale)}"),
        (0 <= args.hflip <= 1, f"--hflip must be in [0, 1], got {args.hflip}"),
        (args.lr_step_size >= 1, f"--lr-step-size must be at least 1, got {args.lr_step_size}"),
        (args.lr_gamma > 0, f"--lr-gamma must be positive, got {args.lr_gamma}"),
        (
            0 <= args.warmup_epochs <= args.epochs,
            f"--warmup-epochs must be in [0, --epochs = {args.epochs}], got {args.warmup_epochs}",
        ),
        (0 <= args.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {args.label_smoothing}"),
        (args.dist_timeout > 0, f"--dist-timeout must be positive, got {args.dist_timeout}"),
        (min(args.dummy_images) >= 1, f"--dummy-images must be at least 1 each, got {list(args.dummy_images)}"),
        (
            not args.channels_last or args.impl == "torch",
            f"--channels-last is for --impl torch (--impl {args.impl} chooses its own layout)",
        ),
        (not args.resume or os.path.isfile(args.resume), f"--resume: no file {args.resume!r}"),
        (not args.weights or os.path.isfile(args.weights), f"--weights: no file {args.weights!r}"),
        (
            not (args.resume and args.weights),
            "--resume and --weights exclude each other (a checkpoint holds the weights)",
        ),
        (args.dummy or args.data is not None, "DATA is required (an ImageFolder root), unless --dummy"),
    ]
    for ok, message in checks:
        if not ok:
            parser.error(message)
    if not args.dummy:
        splits = ["val"] if args.evaluate else ["train", "val"]
        for split in splits:
            reason = data.check_image_folder(os.path.join(args.data, split), f"DATA/{split}")
            if reason is not None:
                parser.error(reason)
    return args


class Context:
    """Who this process is, and where its output goes."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.out = Path(args.output_dir)
        self.main = self.rank == 0
        self.log_file = None
        self.logging = False

    def open_log(self) -> None:
        # The file is made at the first line, so a run refused at its start (a bad flag or
        # path) leaves no empty log.txt behind.
        self.logging = self.main

    def log(self, line: str) -> None:
        if self.main:
            print(line, flush=True)
            if self.logging:
                if self.log_file is None:
                    self.out.mkdir(parents=True, exist_ok=True)
                    self.log_file = open(self.out / "log.txt", "a")  # kept open for the run
                self.log_file.write(line + "\n")
                self.log_file.flush()


class AllReduceTimer:
    """A DDP communication hook that all-reduces each gradient bucket as DDP does (the mean over
    the processes), through `reduce` (a tdc.distributed.ShmAllReduce: shared memory between the
    processes of one host) or, without one, the process group's all_reduce; it records how long
    each all-reduce took, from its launch to its completion."""

    def __init__(self, world: int, reduce=None) -> None:
        self.world = world
        self.reduce = reduce
        self.spans: list[tuple[float, float]] = []

    def hook(self, state, bucket):  # unannotated: DDP rejects the string annotations of this module
        start = time.perf_counter()
        if self.reduce is not None:
            fut = self.reduce.hook(state, bucket)
        else:
            buf = bucket.buffer().div_(self.world)
            fut = dist.all_reduce(buf, async_op=True).get_future().then(lambda f: f.value()[0])

        def done(f: torch.futures.Future) -> torch.Tensor:
            self.spans.append((start, time.perf_counter()))
            return f.value()

        return fut.then(done)

    def take_busy_seconds(self) -> float:
        """The time during which at least one all-reduce was in flight, since the last call."""
        spans, self.spans = sorted(self.spans), []
        busy, end = 0.0, -math.inf
        for s, e in spans:
            if e > end:
                busy += e - max(s, end)
                end = e
        return busy


def lr_factor(step: int, steps_per_epoch: int, args: argparse.Namespace) -> float:
    warmup = int(round(args.warmup_epochs * steps_per_epoch))
    if step < warmup:
        return (step + 1) / warmup
    if args.lr_schedule == "cosine":
        total = args.epochs * steps_per_epoch
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return args.lr_gamma ** ((step // steps_per_epoch) // args.lr_step_size)


def make_datasets(args: argparse.Namespace):
    if args.dummy:
        n_train, n_val = args.dummy_images
        return (
            data.SyntheticImages(n_train, args.image_size, 1000, args.seed),
            data.SyntheticImages(n_val, args.image_size, 1000, args.seed + 1),
        )

    def folder(split: str, transform):
        try:
            return data.image_folder(os.path.join(args.data, split), transform)
        except FileNotFoundError as e:  # an empty class folder, or no class folder at all
            raise UsageError(f"DATA/{split} ({os.path.join(args.data, split)!r}): {e}") from None

    train_set = None
    if not args.evaluate:
        train_set = folder("train", data.train_transform(args.image_size, tuple(args.scale), args.hflip))
    val_set = folder("val", data.val_transform(args.image_size, args.crop_pct))
    if train_set is not None and train_set.classes != val_set.classes:
        raise UsageError(
            f"DATA/train and DATA/val must hold the same class folders: train has {len(train_set.classes)}, "
            f"val has {len(val_set.classes)} (first difference: "
            f"{sorted(set(train_set.classes) ^ set(val_set.classes))[:3]})"
        )
    return train_set, val_set


class UsageError(Exception):
    """A problem with the command line or the data that the user must fix: reported as one line."""


def load_checkpoint(path: str, arch: str) -> dict:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise UsageError(f"--resume: {path!r} is not a checkpoint of train.py (no 'state_dict')")
    if ckpt.get("arch") != arch:
        raise UsageError(f"--resume: {path!r} holds a {ckpt.get('arch')!r} model, but -a/--arch is {arch!r}")
    return ckpt


def load_weights(model: nn.Module, path: str) -> None:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UsageError(f"--weights: {path!r} does not fit the model: {e}") from None


def apply_impl(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    """The module that runs the model's forward (sharing its parameters)."""
    if args.impl == "torch":
        return model.to(memory_format=torch.channels_last) if args.channels_last else model
    import torch_directconv as tdc

    return tdc.convert(model, inplace=True) if args.impl == "convert" else tdc.optimize(model, inplace=True)


def reduce_sums(values: list[float], ctx: Context) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if ctx.world > 1:
        dist.all_reduce(t)
    return t.tolist()


def autocast(args):
    """bf16 autocast on the CPU with --bf16, else nothing."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16)


def train_one_epoch(net, loader, criterion, optimizer, scheduler, epoch, args, ctx, timer, on_step, model) -> dict:
    net.train()
    batch_time, data_time = meters.AverageMeter("Time", ":6.3f"), meters.AverageMeter("Data", ":6.3f")
    losses, top1, top5 = (
        meters.AverageMeter("Loss", ":.4e"),
        meters.AverageMeter("Acc@1", ":6.2f"),
        meters.AverageMeter("Acc@5", ":6.2f"),
    )
    speed = meters.AverageMeter("img/s", ":7.1f")
    progress = meters.ProgressMeter(
        len(loader), [batch_time, data_time, speed, losses, top1, top5], f"Epoch: [{epoch}]"
    )
    sums = [0.0, 0.0, 0.0, 0.0]  # loss * n, correct@1, correct@5, n (this process)
    step_times, allreduce_times = [], []
    start = end = time.perf_counter()
    cpu_start = time.process_time()
    for i, (images, target) in enumerate(loader):
        data_time.update(time.perf_counter() - end)
        if args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(args):
            output = net(images)
            loss = criterion(output, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        n = images.shape[0]
        c1, c5 = meters.correct_topk(output.detach(), target, (1, 5))
        loss_value = float(loss.detach())
        sums = [sums[0] + loss_value * n, sums[1] + c1, sums[2] + c5, sums[3] + n]
        losses.update(loss_value, n)
        top1.update(100.0 * c1 / n, n)
        top5.update(100.0 * c5 / n, n)
        if on_step is not None:
            on_step(epoch, i, model)
        now = time.perf_counter()
        batch_time.update(now - end)
        speed.update(n * ctx.world / (now - end))
        step_times.append(now - end)
        if timer is not None:
            allreduce_times.append(timer.take_busy_seconds())
        end = now
        if i % args.print_freq == 0 or i == len(loader) - 1:
            ctx.log(progress.line(i))
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu_start
    loss_sum, c1, c5, count = reduce_sums(sums, ctx)
    images_seen = int(count)
    result = {
        "epoch": epoch,
        "steps": len(step_times),
        "images": images_seen,
        "train_seconds": elapsed,
        "img_per_s": images_seen / elapsed,
        "img_per_s_median_step": args.batch_size / statistics.median(step_times),
        "data_seconds": data_time.sum,
        # The CPU time of this process's threads (rank 0's) over the wall time it had them for:
        # well under 1 when other work took the cores.
        "cpu_share": cpu / (elapsed * args.threads),
        "train_loss": loss_sum / count,
        "train_acc1": 100.0 * c1 / count,
        "train_acc5": 100.0 * c5 / count,
        "lr_end": optimizer.param_groups[0]["lr"],
    }
    if allreduce_times:
        result["allreduce_ms_median_step"] = 1000.0 * statistics.median(allreduce_times)
        result["step_ms_median"] = 1000.0 * statistics.median(step_times)
    return result


def validate(net, loader, criterion, args, ctx) -> dict:
    net.eval()
    sums = [0.0, 0.0, 0.0, 0.0]
    start = time.perf_counter()
    with torch.no_grad():
        for images, target in loader:
            if args.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast(args):
                output = net(images)
                loss = float(criterion(output, target))
            n = images.shape[0]
            c1, c5 = meters.correct_topk(output, target, (1, 5))
            sums = [sums[0] + loss * n, sums[1] + c1, sums[2] + c5, sums[3] + n]
    loss_sum, c1, c5, count = reduce_sums(sums, ctx)
    result = {
        "val_loss": loss_sum / count,
        "val_acc1": 100.0 * c1 / count,
        "val_acc5": 100.0 * c5 / count,
        "val_images": int(count),
        "val_seconds": time.perf_counter() - start,
    }
    ctx.log(f" * Acc@1 {result['val_acc1']:.3f} Acc@5 {result['val_acc5']:.3f}")
    return result


def save_checkpoint(state: dict, is_best: bool, ctx: Context) -> None:
    path = ctx.out / "checkpoint.pth.tar"
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a run killed while saving leaves the previous checkpoint whole
    if is_best:
        shutil.copyfile(path, ctx.out / "model_best.pth.tar")


def machine_info(args: argparse.Namespace, ctx: Context) -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    info = {
        "hostname": socket.gethostname(),
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "available_cores": available_cores(),
        "load_average": list(os.getloadavg()),
        "processes": ctx.world,
        "threads_per_process": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "data_backend": data.BACKEND,
        "model_source": models.source(args.arch),
    }
    if args.impl != "torch":
        import torch_directconv as tdc

        info.update({"torch_directconv": tdc.__version__, "isa": tdc.isa()})
    return info


def run(args: argparse.Namespace, ctx: Context, on_step: OnStep | None) -> dict:
    torch.set_num_threads(args.threads)
    train_set, val_set = make_datasets(args)
    local_batch = args.batch_size // ctx.world
    if train_set is not None and len(train_set) < args.batch_size:
        raise UsageError(
            f"the training set has {len(train_set)} images, fewer than one global batch (-b {args.batch_size})"
        )
    train_loader, val_loader = data.loaders(
        train_set if train_set is not None else val_set,
        val_set,
        local_batch,
        args.workers,
        ctx.rank,
        ctx.world,
        args.seed,
    )
    num_classes = len(val_set.classes)

    torch.manual_seed(args.seed)  # the same initial model on every process
    model = models.create(args.arch, num_classes)
    ckpt = load_checkpoint(args.resume, args.arch) if args.resume else None
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["state_dict"])
        except RuntimeError as e:
            raise UsageError(f"--resume: {args.resume!r} does not fit the model: {e}") from None
    elif args.weights:
        load_weights(model, args.weights)
    inner = apply_impl(model, args)
    if args.compile:
        inner = torch.compile(inner)
    net, timer, reduce = inner, None, None
    if ctx.world > 1:
        # The gradients are views of DDP's buckets: no copy into the buckets and back per step.
        net = DistributedDataParallel(inner, gradient_as_bucket_view=True)
        if args.allreduce == "shm":
            import torch_directconv as tdc

            reduce = tdc.distributed.ShmAllReduce(timeout=args.dist_timeout)
            if reduce.reason is not None:
                ctx.log(f"=> gradients all-reduced by {reduce.transport}: {reduce.reason}")
                reduce = None
        timer = AllReduceTimer(ctx.world, reduce)
        net.register_comm_hook(None, timer.hook)

    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    sgd = {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}[args.sgd]
    optimizer = torch.optim.SGD(
        model.parameters(), args.lr, momentum=args.momentum, weight_decay=args.weight_decay, **sgd
    )
    steps_per_epoch = len(train_loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, steps_per_epoch, args))
    start_epoch, best_acc1 = 0, 0.0
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_epoch, best_acc1 = int(ckpt["epoch"]), float(ckpt["best_acc1"])

    summary = {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
        "machine": machine_info(args, ctx),
        "model_parameters": sum(p.numel() for p in model.parameters()),
        # How the gradients were all-reduced: "shm" (shared memory) or the process group's backend.
        "allreduce": None if ctx.world == 1 else ("shm" if reduce is not None else dist.get_backend()),
        "start_epoch": start_epoch,
        "epochs": [],
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    ctx.log(
        f"=> {args.arch} ({summary['machine']['model_source']}), --impl {args.impl}"
        f"{' --compile' if args.compile else ''}{' --bf16' if args.bf16 else ''}, {ctx.world} process(es) x {args.threads} thread(s), "
        f"global batch {args.batch_size}, data: {'synthetic' if args.dummy else args.data} ({data.BACKEND})"
    )
    if ckpt is not None:
        ctx.log(f"=> resumed from {args.resume!r} at epoch {start_epoch} (best Acc@1 {best_acc1:.3f})")

    if args.evaluate:
        summary["evaluation"] = validate(inner, val_loader, criterion, args, ctx)
        return summary
    for epoch in range(start_epoch, args.epochs):
        data.seed_epoch(train_loader, args.seed, epoch, ctx.rank)
        record = train_one_epoch(
            net, train_loader, criterion, optimizer, scheduler, epoch, args, ctx, timer, on_step, model
        )
        if ctx.world > 1:
            # Each process updated its batch norms' running statistics with its own share of the
            # last batch: all validate, and rank 0 saves, the model of rank 0.
            for b in model.buffers():
                dist.broadcast(b, 0)
        record.update(validate(inner, val_loader, criterion, args, ctx))
        is_best = record["val_acc1"] > best_acc1
        best_acc1 = max(best_acc1, record["val_acc1"])
        summary["epochs"].append(record)
        summary["best_acc1"] = best_acc1
        if ctx.main:
            state = {
                "epoch": epoch + 1,
                "arch": args.arch,
                "state_dict": model.state_dict(),
                "best_acc1": best_acc1,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
            }
            save_checkpoint(state, is_best, ctx)
            write_summary(summary, ctx)
        extra = (
            f", all-reduce {record['allreduce_ms_median_step']:.1f} ms/step"
            if "allreduce_ms_median_step" in record
            else ""
        )
        ctx.log(
            f"=> epoch {epoch}: {record['img_per_s']:.1f} img/s ({record['img_per_s_median_step']:.1f} at the median "
            f"step{extra}; CPU share {record['cpu_share']:.2f}), train loss {record['train_loss']:.4f}, "
            f"val Acc@1 {record['val_acc1']:.3f}"
        )
    return summary


def write_summary(summary: dict, ctx: Context) -> None:
    tmp = ctx.out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, ctx.out / "summary.json")


def main(argv: list[str] | None = None, on_step: OnStep | None = None) -> dict:
    """Runs the script with `argv` (sys.argv[1:] if None) and returns its summary; on_step(epoch,
    step, model) is called after every optimizer step, on every process."""
    args = parse_args(argv)
    ctx = Context(args)
    if ctx.world > 1:
        dist.init_process_group(args.dist_backend, timeout=datetime.timedelta(seconds=args.dist_timeout))
    try:
        ctx.open_log()
        summary = run(args, ctx, on_step)
    except UsageError as e:
        if ctx.main:
            print(f"train.py: error: {e}", file=sys.stderr, flush=True)
        _exit_now(2, ctx)
    except Exception as e:
        if ctx.world == 1:
            raise
        # Another process that died or hangs shows here as a failed or timed-out collective; a
        # clean shutdown would wait on the process group, so the process exits at once.
        kind = "a collective failed or timed out" if _is_collective_error(e) else "the run failed"
        print(
            f"train.py: rank {ctx.rank} of {ctx.world}: {kind} ({type(e).__name__}: {str(e).strip().splitlines()[0]}); "
            f"another process has probably exited or hung (--dist-timeout {args.dist_timeout:g} s)",
            file=sys.stderr,
            flush=True,
        )
        if not _is_collective_error(e):
            traceback.print_exc()
        _exit_now(1, ctx)
    summary["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    summary["machine"]["load_average_end"] = list(os.getloadavg())
    if ctx.main:
        write_summary(summary, ctx)
        ctx.log(f"=> summary: {ctx.out / 'summary.json'}")
    if ctx.world > 1:
        dist.destroy_process_group()
    return summary


def _is_collective_error(e: BaseException) -> bool:
    """An error of torch.distributed or of gloo, raised in a collective: DDP's broadcasts and
    all-reduces raise gloo's own RuntimeError (from DDP's code, or from the backward)."""
    if isinstance(e, dist.DistError) or "gloo" in str(e) or "torch_directconv shm all-reduce" in str(e):
        return True
    places = (os.path.join("torch", "distributed", ""), os.path.join("torch", "nn", "parallel", ""))
    return any(p in f.filename for f in traceback.extract_tb(e.__traceback__) for p in places)


def _exit_now(code: int, ctx: Context) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    if ctx.world > 1:
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    main()
