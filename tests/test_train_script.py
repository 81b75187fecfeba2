"""examples/imagenet/train.py: multi-process equivalence, resume, a dead rank, real data, its errors.

Single-process runs call train.main() in this process; multi-process runs start one process per
rank with torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR=127.0.0.1, ...), gloo on the
loopback interface only. Every run is seeded, with one thread per process.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "imagenet"
sys.path.insert(0, str(EXAMPLES))

import digits  # noqa: E402
import models  # noqa: E402
import train  # noqa: E402

import torch_directconv as tdc  # noqa: E402

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the script's tests start processes the Linux way")

# A small network with no batch norm: each sample's gradient is independent of the others in
# its batch, so data-parallel training is exactly one large batch (with batch norm, each
# process normalises by its own share of the batch, as DDP does on CPUs).
NO_BN_NET = textwrap.dedent(
    """
    from torch import nn

    def no_bn_net(num_classes):
        return nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes),
        )
    """
)
WORKER = NO_BN_NET + textwrap.dedent(
    """
    import os, signal, sys
    import torch
    sys.path.insert(0, {examples!r})
    import models, train

    models.ARCHS["no_bn_net"] = no_bn_net
    out, die_at, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
    snapshots = []

    def on_step(epoch, step, model):
        snapshots.append(torch.cat([p.detach().flatten() for p in model.parameters()]).clone())
        if die_at != "none" and f"{{epoch}}:{{step}}" == die_at:
            torch.save(torch.stack(snapshots), out)
            sig = signal.SIGKILL if os.environ.get("DIE_HOW") == "kill" else signal.SIGSTOP
            os.kill(os.getpid(), sig)

    train.main(argv, on_step=on_step)
    torch.save(torch.stack(snapshots), out)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_ranks(tmp_path: Path, argv: list[str], world: int = 2, die: dict[int, str] | None = None, how: str = "kill"):
    """One process per rank, each with its own --output-dir (out<rank>) and parameter snapshots (params<rank>.pt)."""
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER.format(examples=str(EXAMPLES)))
    port = _free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ)
        env.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            GLOO_SOCKET_IFNAME="lo",
            DIE_HOW=how,
            PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
        )
        cmd = [sys.executable, str(worker), str(tmp_path / f"params{rank}.pt"), (die or {}).get(rank, "none")]
        cmd += argv + ["--output-dir", str(tmp_path / f"out{rank}")]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def _finish(procs, timeout: float) -> list[tuple[int, str, str]]:
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            results.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


DUMMY = [
    "--dummy",
    "--dummy-images",
    "64",
    "16",
    "--image-size",
    "16",
    "-b",
    "16",
    "--epochs",
    "1",
    "--lr",
    "0.1",
    "-j",
    "0",
    "--threads",
    "1",
    "-p",
    "1",
]


@pytest.mark.parametrize("allreduce", ["shm", pytest.param("backend", marks=pytest.mark.slow)])
def test_two_processes_equal_one_with_the_same_global_batch(tmp_path, one_thread, allreduce):
    """4 steps of a global batch of 16: 2 processes x 8 hold identical parameters after every
    step, equal to those of 1 process x 16; only rank 0 writes. The gradients are all-reduced
    through shared memory (the default) or by gloo."""
    procs = _start_ranks(tmp_path, ["-a", "no_bn_net", *DUMMY, "--allreduce", allreduce])
    results = _finish(procs, timeout=240)
    for rank, (code, _, err) in enumerate(results):
        assert code == 0, f"rank {rank} failed:\n{err}"
    summary = json.loads((tmp_path / "out0" / "summary.json").read_text())
    assert summary["allreduce"] == ("shm" if allreduce == "shm" else "gloo")
    p0, p1 = (torch.load(tmp_path / f"params{r}.pt") for r in (0, 1))
    assert p0.shape[0] == 4
    for step in range(4):
        assert torch.equal(p0[step], p1[step]), f"the ranks differ after step {step}"
    assert (tmp_path / "out0" / "checkpoint.pth.tar").exists() and (tmp_path / "out0" / "summary.json").exists()
    assert not (tmp_path / "out1").exists(), "rank 1 wrote output"
    assert "all-reduce" in results[0][1] and results[1][1] == ""

    namespace: dict = {}
    exec(NO_BN_NET, namespace)
    models.ARCHS["no_bn_net"] = namespace["no_bn_net"]
    single = []
    train.main(
        ["-a", "no_bn_net", *DUMMY, "--output-dir", str(tmp_path / "single")],
        on_step=lambda e, s, m: single.append(torch.cat([p.detach().flatten() for p in m.parameters()]).clone()),
    )
    del models.ARCHS["no_bn_net"]
    assert len(single) == 4
    for step in range(4):
        torch.testing.assert_close(p0[step], single[step], rtol=1e-5, atol=1e-6, msg=f"after step {step}")
    # Not a vacuous match: the parameters did move.
    assert (single[-1] - single[0]).abs().max() > 1e-3


@pytest.mark.parametrize("how", ["kill", pytest.param("stop", marks=pytest.mark.slow)])
def test_a_dead_or_hung_rank_makes_the_other_exit(tmp_path, how):
    """Rank 1 is killed (or stopped: it hangs) after its second step; rank 0 exits non-zero with a
    clear error within the gloo timeout instead of waiting for ever."""
    timeout = 8.0
    argv = [
        "-a",
        "resnet10_tiny",
        *DUMMY,
        "--dummy-images",
        "160",
        "16",
        "--epochs",
        "2",
        "--dist-timeout",
        str(timeout),
    ]
    procs = _start_ranks(tmp_path, argv, die={1: "0:1"}, how=how)
    try:
        while procs[1].poll() is None and not (tmp_path / "params1.pt").exists():
            time.sleep(0.05)
            # Rank 0 may not end before rank 1 is gone; once rank 1 has died it may end at
            # once (gloo sees the connection close), even before this loop sees rank 1 exit.
            rank1_alive = procs[1].poll() is None and not (tmp_path / "params1.pt").exists()
            assert procs[0].poll() is None or not rank1_alive, procs[0].communicate()[1]
        died = time.monotonic()
        _, err = procs[0].communicate(timeout=timeout + 30)
        waited = time.monotonic() - died
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    assert procs[0].returncode not in (0, None)
    assert "train.py: rank 0 of 2: a collective failed or timed out" in err, err
    assert "--dist-timeout" in err
    assert waited < timeout + 20, f"rank 0 took {waited:.1f} s to give up"


def test_checkpoint_resume_is_exact(tmp_path, one_thread):
    """Stopped during epoch 1 and resumed from the epoch-0 checkpoint: the same losses, accuracies,
    weights, optimizer state and best checkpoint as the uninterrupted run (real images, random
    augmentation, 2 loader workers)."""
    root = digits.write_digits(tmp_path / "digits")
    base = [
        str(root),
        "-a",
        "resnet10_tiny",
        "--image-size",
        "16",
        "--crop-pct",
        "1",
        "-b",
        "64",
        "--epochs",
        "2",
        "--lr",
        "0.2",
        "--lr-schedule",
        "cosine",
        "--warmup-epochs",
        "0.5",
        "-j",
        "2",
        "--threads",
        "1",
        "-p",
        "100",
    ]
    full = train.main(base + ["--output-dir", str(tmp_path / "full")])

    class Stop(Exception):
        pass

    def stop(epoch, step, model):
        if epoch == 1 and step == 3:
            raise Stop

    with pytest.raises(Stop):
        train.main(base + ["--output-dir", str(tmp_path / "cut")], on_step=stop)
    ckpt = tmp_path / "cut" / "checkpoint.pth.tar"
    assert torch.load(ckpt, weights_only=True)["epoch"] == 1
    resumed = train.main(base + ["--output-dir", str(tmp_path / "cut"), "--resume", str(ckpt)])
    assert resumed["start_epoch"] == 1 and len(resumed["epochs"]) == 1
    keys = ("train_loss", "train_acc1", "val_loss", "val_acc1", "val_acc5", "lr_end")
    assert {k: resumed["epochs"][0][k] for k in keys} == {k: full["epochs"][1][k] for k in keys}
    a = torch.load(tmp_path / "full" / "checkpoint.pth.tar", weights_only=True)
    b = torch.load(ckpt, weights_only=True)
    assert a["epoch"] == b["epoch"] == 2 and a["best_acc1"] == b["best_acc1"]
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    for i, s in a["optimizer"]["state"].items():
        assert torch.equal(s["momentum_buffer"], b["optimizer"]["state"][i]["momentum_buffer"])
    assert a["scheduler"] == b["scheduler"]
    # The state_dict has torchvision's names: it loads into a fresh model of the arch.
    models.create("resnet10_tiny", 10).load_state_dict(a["state_dict"])


DIGITS = [
    "-a",
    "resnet10_tiny",
    "--image-size",
    "24",
    "--crop-pct",
    "1",
    "--scale",
    "0.6",
    "1",
    "--hflip",
    "0",
    "-b",
    "32",
    "--lr",
    "0.2",
    "--epochs",
    "5",
    "--lr-schedule",
    "cosine",
    "--warmup-epochs",
    "0.5",
    "-j",
    "0",
    "--threads",
    "1",
    "-p",
    "1000",
]


def test_digits_real_data_optimize_matches_torch(tmp_path, one_thread):
    """scikit-learn's digits as PNG files: a small ResNet reaches 95% with --impl optimize, within
    1.5 points of the same run in plain PyTorch; and with --bf16 (autocast, the bf16 blocked model
    where this CPU has the bf16 kernels) within 1.5 points of fp32."""
    root = str(digits.write_digits(tmp_path / "digits"))
    runs = {"optimize": ["--impl", "optimize"], "torch": ["--impl", "torch"]}
    if tdc.isa() in ("amx", "avx512_bf16"):
        runs["optimize_bf16"] = ["--impl", "optimize", "--bf16"]
    acc = {}
    for name, flags in runs.items():
        summary = train.main([root, *DIGITS, *flags, "--output-dir", str(tmp_path / name)])
        acc[name] = summary["epochs"][-1]["val_acc1"]
        assert summary["epochs"][-1]["val_images"] == 355
        assert summary["config"]["bf16"] == ("--bf16" in flags)
    assert acc["optimize"] >= 95.0, acc
    assert abs(acc["optimize"] - acc["torch"]) <= 1.5, acc
    if "optimize_bf16" in acc:
        assert abs(acc["optimize_bf16"] - acc["optimize"]) <= 1.5, acc


def _run_cli(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    return e.value.code, capsys.readouterr().err


def test_clear_errors(tmp_path, capsys, one_thread, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default --output-dir
    missing = tmp_path / "nowhere"
    code, err = _run_cli([str(missing)], capsys)
    assert code == 2 and f"DATA/train: no folder '{missing / 'train'}'" in err

    root = tmp_path / "data"
    for split in ("train", "val"):
        (root / split / "cat").mkdir(parents=True)
        (root / split / "dog").mkdir(parents=True)
    for split in ("train", "val"):
        (root / split / "cat" / "notes.txt").write_text("not an image")
    code, err = _run_cli([str(root), "--threads", "1"], capsys)
    assert code == 2 and "DATA/train" in err and "Found no valid file for the classes cat, dog" in err, err

    bad = [
        (["-a", "resnet51"], "argument -a/--arch: invalid choice: 'resnet51'"),
        (["-b", "0"], "-b/--batch-size must be at least 1"),
        (["--lr", "-1"], "--lr must be 0 or more"),
        (["--epochs", "2", "--warmup-epochs", "3"], "--warmup-epochs must be in [0, --epochs = 2]"),
        (["--channels-last"], "--channels-last is for --impl torch"),
        (["--impl", "fast"], "argument --impl: invalid choice: 'fast'"),
        (["--scale", "0.5", "0.2"], "--scale must be 0 < MIN <= MAX <= 1"),
        (["--label-smoothing", "1"], "--label-smoothing must be in [0, 1)"),
        (["--resume", str(tmp_path / "none.pth.tar")], "--resume: no file"),
        (["--threads", "0"], "--threads must be at least 1"),
    ]
    for flags, message in bad:
        code, err = _run_cli(["--dummy", *flags], capsys)
        assert code == 2 and message in err, (flags, err)
    code, err = _run_cli([], capsys)
    assert code == 2 and "DATA is required" in err

    code, err = _run_cli(["--dummy", "--dummy-images", "8", "8", "-b", "16", "--threads", "1"], capsys)
    assert code == 2 and "the training set has 8 images, fewer than one global batch (-b 16)" in err

    ckpt = tmp_path / "other.pth.tar"
    torch.save({"state_dict": {}, "arch": "resnet18"}, ckpt)
    code, err = _run_cli(
        [
            "--dummy",
            "--dummy-images",
            "16",
            "8",
            "-b",
            "8",
            "--threads",
            "1",
            "-a",
            "resnet10_tiny",
            "--resume",
            str(ckpt),
            "--output-dir",
            str(tmp_path / "o"),
        ],
        capsys,
    )
    assert code == 2 and "holds a 'resnet18' model, but -a/--arch is 'resnet10_tiny'" in err
    # A run refused at its start writes no log.
    assert not (tmp_path / "log.txt").exists() and not (tmp_path / "o" / "log.txt").exists()


def test_lr_schedules():
    args = train.parse_args(["--dummy", "--epochs", "4", "--warmup-epochs", "1", "--lr-schedule", "cosine"])
    f = [train.lr_factor(s, 10, args) for s in range(40)]
    assert f[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert f[10] == 1.0 and f[39] == pytest.approx(0.5 * (1 + math.cos(math.pi * 29 / 30)))
    assert all(a >= b for a, b in zip(f[10:], f[11:], strict=False))
    args = train.parse_args(["--dummy", "--epochs", "90", "--lr-step-size", "30"])
    assert [train.lr_factor(e * 5, 5, args) for e in (0, 29, 30, 59, 60)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])


def test_architectures_have_torchvision_names_and_sizes():
    # torchvision's parameter counts (1000 classes) and a few of its state_dict keys.
    counts = {
        "resnet18": 11_689_512,
        "resnet34": 21_797_672,
        "resnet50": 25_557_032,
        "resnet101": 44_549_160,
        "resnext50_32x4d": 25_028_904,
    }
    for arch, n in counts.items():
        m = models.create(arch, 1000)
        assert sum(p.numel() for p in m.parameters()) == n, arch
    keys = models.create("resnet50", 1000).state_dict().keys()
    for k in (
        "conv1.weight",
        "bn1.running_mean",
        "layer1.0.downsample.0.weight",
        "layer1.0.downsample.1.bias",
        "layer4.2.conv3.weight",
        "layer4.2.bn3.num_batches_tracked",
        "fc.weight",
        "fc.bias",
    ):
        assert k in keys, k
    assert models.create("resnext50_32x4d", 1000).layer1[0].conv2.groups == 32


def test_convert_channels_last_weights_and_evaluate(tmp_path, one_thread):
    """--impl convert and --impl torch --channels-last train; --weights starts from a state_dict
    and --evaluate validates it alone, giving the accuracy that the run reported for it."""
    small = [
        "--dummy",
        "--dummy-images",
        "32",
        "16",
        "--image-size",
        "32",
        "-b",
        "8",
        "-a",
        "resnet10_tiny",
        "--epochs",
        "1",
        "-j",
        "0",
        "--threads",
        "1",
        "-p",
        "100",
    ]
    runs = {}
    for name, flags in {"convert": ["--impl", "convert"], "cl": ["--impl", "torch", "--channels-last"]}.items():
        runs[name] = train.main(small + flags + ["--output-dir", str(tmp_path / name)])
        assert runs[name]["epochs"][0]["steps"] == 4
    state = torch.load(tmp_path / "convert" / "checkpoint.pth.tar", weights_only=True)["state_dict"]
    torch.save(state, tmp_path / "weights.pth")
    for impl in ("optimize", "torch"):
        ev = train.main(
            small
            + [
                "--impl",
                impl,
                "-e",
                "--weights",
                str(tmp_path / "weights.pth"),
                "--output-dir",
                str(tmp_path / f"eval-{impl}"),
            ]
        )["evaluation"]
        assert ev["val_images"] == 16
        assert ev["val_acc1"] == runs["convert"]["epochs"][0]["val_acc1"]
        assert ev["val_loss"] == pytest.approx(runs["convert"]["epochs"][0]["val_loss"], rel=1e-4)


@pytest.mark.slow
def test_compile(tmp_path, one_thread):
    small = [
        "--dummy",
        "--dummy-images",
        "16",
        "8",
        "--image-size",
        "32",
        "-b",
        "8",
        "-a",
        "resnet10_tiny",
        "--epochs",
        "1",
        "-j",
        "0",
        "--threads",
        "1",
        "-p",
        "100",
        "--compile",
    ]
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    losses = {}
    for impl in ("optimize", "torch"):
        s = train.main(small + ["--impl", impl, "--output-dir", str(tmp_path / impl)])
        losses[impl] = s["epochs"][0]["train_loss"]
    assert losses["optimize"] == pytest.approx(losses["torch"], rel=1e-3)


@pytest.mark.slow
def test_torchrun_command_line(tmp_path):
    """The README's command: torchrun --nproc_per_node=2 train.py ..., one thread per process by default."""
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        str(EXAMPLES / "train.py"),
        "--dummy",
        "--dummy-images",
        "32",
        "8",
        "--image-size",
        "16",
        "-b",
        "8",
        "-a",
        "resnet10_tiny",
        "--epochs",
        "2",
        "--output-dir",
        str(tmp_path),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["machine"]["processes"] == 2 and summary["machine"]["threads_per_process"] == 1
    assert [e["steps"] for e in summary["epochs"]] == [4, 4]
    assert done.stdout.count(" * Acc@1 ") == 2  # rank 0 alone prints
