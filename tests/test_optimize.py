"""optimize(): the graph engine against the original model, in eval and in train mode.

The references are the same models in float64 (a copy, .double()): outputs, the input
gradient, every parameter gradient, the running statistics and num_batches_tracked. Deep
fp32 models accumulate rounding, so each comparison allows a relative error scaled by the
reference's largest magnitude (as helpers.assert_grad_close does).
"""

from __future__ import annotations

import copy
import io
import os
import sys
import threading
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import torch_directconv as tdc
from helpers import REPO, OpLog, requires_jit
from torch_directconv import _C, _graph, _steps, blocked_ops

sys.path.insert(0, os.path.join(REPO, "bench"))
from resnet50 import randomize_batchnorm, resnet50  # noqa: E402

pytestmark = [
    requires_jit,
    # The grouped convolution of Unsupported runs on torch's convolution, which the drop-in path says.
    pytest.mark.filterwarnings("ignore:torch_directconv. grouped convolutions:RuntimeWarning"),
]


# ---------------------------------------------------------------------------------------------
# Models of several families


class BasicBlock(nn.Module):
    """ResNet-18's block, written as torchvision writes it (+=, the shortcut after bn2)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet18ish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(BasicBlock(16, 16), BasicBlock(16, 16))
        self.layer2 = nn.Sequential(BasicBlock(16, 32, 2), BasicBlock(32, 32))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(32, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x)), inplace=True))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class PreActBlock(nn.Module):
    """BN -> ReLU -> conv, twice, and a plain add (no ReLU after it)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c)
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(torch.relu(self.bn1(x)))
        out = self.conv2(self.bn2(out).relu())
        return torch.add(out, x)


class PreActNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 24, 3, padding=1)
        self.blocks = nn.Sequential(PreActBlock(24), PreActBlock(24))
        self.bn = nn.BatchNorm2d(24)
        self.head = nn.Linear(24, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.blocks(self.stem(x))))
        return self.head(x.mean((2, 3)))


class NoBN(nn.Module):
    """Convolutions with bias, ReLU in every spelling, residual adds in every spelling."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1)
        self.c3 = nn.Conv2d(16, 16, 1)
        self.c4 = nn.Conv2d(16, 16, 3, padding="same", dilation=2)
        self.relu = nn.ReLU()
        self.pool = nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.c1(x))
        y = self.relu(self.c2(x))
        y = torch.relu(y + x)
        z = self.c3(y)
        z.add_(y)
        z = z.relu_()
        w = self.c4(z)
        w = w.add(z)
        w = torch.relu_(w)
        return torch.flatten(self.pool(w), 1)


class OddChannels(nn.Module):
    """3 -> 13 -> 30 channels: every fused op meets padded lanes; BN variants and pooling options."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 13, 3, padding=1, bias=True)
        self.b1 = nn.BatchNorm2d(13, momentum=None)
        self.c2 = nn.Conv2d(13, 30, 5, stride=2, padding=2, bias=False)
        self.b2 = nn.BatchNorm2d(30, affine=False)
        self.c3 = nn.Conv2d(30, 30, (1, 3), padding=(0, 1), bias=False)
        self.b3 = nn.BatchNorm2d(30, momentum=0.3, eps=1e-3)
        self.short = nn.Conv2d(13, 30, 1, stride=2)
        self.b4 = nn.BatchNorm2d(30, track_running_stats=False)
        self.mp = nn.MaxPool2d(3, 2, 1, ceil_mode=True)
        self.ap = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
        self.act = nn.LeakyReLU(0.1)
        self.fc = nn.Linear(30, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.b1(self.c1(x)))
        y = F.relu(self.b2(self.c2(x)))
        y = self.b3(self.c3(y))
        y = F.relu(y + self.b4(self.short(x)))
        y = self.act(self.ap(self.mp(y)))
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


class BroadcastAdd(nn.Module):
    """Residual adds whose operands differ in H and W ((N, C, 1, 1) against a map), either way round."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 12, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(12)
        self.c2 = nn.Conv2d(12, 12, 1, bias=False)
        self.b2 = nn.BatchNorm2d(12)
        self.c3 = nn.Conv2d(12, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.b1(self.c1(x)))
        y = F.relu(self.b2(self.c2(x)) + x.mean((2, 3), keepdim=True))
        return self.c3(F.relu(y.mean((2, 3), keepdim=True) + y))


class Custom(nn.Module):
    """A user module fx traces through: element-wise ops with scalars (which do not map 0 to 0)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 0.5 + 1


class Unsupported(nn.Module):
    """Unsupported ops in the middle of blocked regions: each needs a correct exit."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=2)
        self.reflect = nn.Conv2d(32, 20, 3, padding=1, padding_mode="reflect")
        self.b2 = nn.BatchNorm2d(20)
        self.custom = Custom()
        self.se1 = nn.Conv2d(20, 8, 1)
        self.se2 = nn.Conv2d(8, 20, 1)
        self.c3 = nn.Conv2d(20, 20, 3, padding=1, padding_mode="circular", bias=False)
        self.b3 = nn.BatchNorm2d(20)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.b1(self.c1(x)))
        g = torch.sigmoid(x) * x
        y = torch.cat([self.dw(g), self.grouped(x)], dim=1)
        y = F.relu(self.b2(self.reflect(y)))
        s = torch.sigmoid(self.se2(F.relu(self.se1(y.mean((2, 3), keepdim=True)))))
        y = y * s
        z = self.custom(y)
        return F.relu(self.b3(self.c3(z)) + y)


class Untraceable(nn.Module):
    """Data-dependent control flow: fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y if y.sum() > 0 else -y


def _init_bn(model: nn.Module, seed: int = 1) -> nn.Module:
    """Random BN parameters and running statistics, so eval-mode BN is not the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                if m.affine:
                    m.weight.copy_(0.5 + torch.rand(c, generator=g))
                    m.bias.copy_(0.2 * torch.randn(c, generator=g))
                if m.track_running_stats:
                    m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
                    m.running_var.copy_(0.5 + torch.rand(c, generator=g))
    return model


def _resnet50() -> nn.Module:
    model = resnet50(num_classes=10)
    randomize_batchnorm(model, torch.Generator().manual_seed(1))
    return model


# (factory, input shape, relative tolerance)
MODELS = {
    "resnet50": (_resnet50, (2, 3, 64, 64), 3e-4),
    "resnet18ish": (lambda: _init_bn(ResNet18ish()), (2, 3, 32, 32), 1e-4),
    "preact": (lambda: _init_bn(PreActNet()), (2, 3, 12, 12), 1e-4),
    "nobn": (NoBN, (2, 3, 12, 12), 1e-4),
    "odd": (lambda: _init_bn(OddChannels()), (3, 3, 15, 13), 1e-4),
    "unsupported": (lambda: _init_bn(Unsupported()), (2, 3, 10, 10), 1e-4),
    "broadcast": (lambda: _init_bn(BroadcastAdd()), (2, 3, 9, 7), 1e-4),
}


# ---------------------------------------------------------------------------------------------
# Comparisons


def _close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str, floor: float = 0.0) -> None:
    """actual (fp32) against the float64 reference: tol relative, plus tol of the largest magnitude
    (or of `floor`, when that is larger)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = max(expected.abs().max().item() if expected.numel() else 0.0, floor)
    torch.testing.assert_close(
        actual.double(), expected.double(), rtol=tol, atol=tol * scale + 1e-12, msg=lambda m: f"{what}: {m}"
    )


def _check_state(opt: nn.Module, ref: nn.Module, tol: float) -> None:
    for (name, b), (ref_name, rb) in zip(opt.named_buffers(), ref.named_buffers(), strict=True):
        assert name == ref_name
        if b.dtype == torch.int64:
            assert torch.equal(b, rb), f"{name}: {b} != {rb}"
        else:
            _close(b, rb, tol, name)


def _run(model: nn.Module, x: torch.Tensor, seed: int = 5) -> tuple:
    """(output, input gradient, parameter gradients) of one forward and backward."""
    x = x.clone().requires_grad_()
    out = model(x)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    (out * weights.to(out.dtype)).sum().backward()
    return out.detach(), x.grad, [p.grad for p in model.parameters()]


def _compare_runs(run: tuple, ref_run: tuple, names: list[str], tol: float) -> None:
    out, gx, grads = run
    ref_out, ref_gx, ref_grads = ref_run
    _close(out, ref_out, tol, "output")
    _close(gx, ref_gx, tol, "input gradient")
    # A gradient that is zero in exact arithmetic (a bias before a batch norm) is rounding of the
    # size of the other gradients' terms: 1% of the largest gradient is the floor of the scale.
    floor = 0.01 * max(g.abs().max().item() for g in ref_grads if g is not None)
    for name, g, rg in zip(names, grads, ref_grads, strict=True):
        assert (g is None) == (rg is None), name
        if g is not None:
            _close(g, rg, tol, f"gradient of {name}", floor)


def _compare(opt: nn.Module, ref: nn.Module, x: torch.Tensor, tol: float) -> None:
    names = [n for n, _ in opt.named_parameters()]
    _compare_runs(_run(opt, x), _run(ref, x.double()), names, tol)
    _check_state(opt, ref, tol)


# ---------------------------------------------------------------------------------------------
# Against the original model


@pytest.mark.parametrize("name", list(MODELS))
def test_eval_matches_float64(name: str) -> None:
    factory, shape, tol = MODELS[name]
    model = factory().eval()
    ref = copy.deepcopy(model).double()
    opt = tdc.optimize(model)
    x = torch.randn(shape)
    with torch.no_grad():
        _close(opt(x), ref(x.double()), tol, "no_grad output")  # the cached folded weights
    _compare(opt, ref, x, tol)  # gradients through the folding (computed per call)


@pytest.mark.parametrize("name", list(MODELS))
def test_train_matches_float64(name: str) -> None:
    factory, shape, tol = MODELS[name]
    model = factory().train()
    ref = copy.deepcopy(model).double()
    opt = tdc.optimize(model)
    _compare(opt, ref, torch.randn(shape), tol)


def test_train_twice_cumulative_momentum() -> None:
    """momentum=None is a cumulative average over the batches: two steps, then eval."""
    model = _init_bn(OddChannels()).train()
    ref = copy.deepcopy(model).double()
    opt = tdc.optimize(model)
    for _ in range(2):
        x = torch.randn(3, 3, 15, 13)
        _close(opt(x).detach(), ref(x.double()).detach(), 1e-4, "train output")
    assert int(opt.b1.num_batches_tracked) == 2
    _check_state(opt, ref, 1e-4)
    opt.eval()
    ref.eval()
    x = torch.randn(2, 3, 15, 13)
    with torch.no_grad():
        _close(opt(x), ref(x.double()), 1e-4, "eval output after training")


def test_training_step_has_no_weight_layout_pass() -> None:
    """In training the convolutions take their (K, C, R, S) weights and pack them within the
    call, and their weight gradients come back as (K, C, R, S): no packing pass before them
    and no unpacking pass after them. In eval the packed weights are made once and kept."""
    model = _init_bn(ResNet18ish()).train()
    opt = tdc.optimize(model)
    x = torch.randn(2, 3, 32, 32)
    with OpLog() as seen:
        opt(x).sum().backward()
    # conv -> batch norm in training: the statistics come from the convolution's epilogue.
    assert "conv2d_blocked_backward_weight" in seen.names and "conv2d_blocked_stats" in seen.names
    assert "bn_stats_blocked" not in seen.names, sorted(set(seen.names))
    assert not {"to_blocked_weight", "from_blocked_weight"} & set(seen.names), sorted(set(seen.names))
    opt.eval()
    with torch.no_grad():
        opt(x)
        with OpLog() as seen:
            opt(x)
    assert "conv2d_blocked" in seen.names and "to_blocked_weight" not in seen.names, sorted(set(seen.names))


def test_frozen_batch_norm_in_train_mode() -> None:
    """A model in train mode with its batch norms in eval (fine-tuning): per-module flags count."""
    model = _init_bn(ResNet18ish()).train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    ref = copy.deepcopy(model).double()
    opt = tdc.optimize(model)
    _compare(opt, ref, torch.randn(2, 3, 32, 32), 1e-4)


def test_batch_norm_numerics_large_mean() -> None:
    """Batch statistics of a map whose mean is large against its spread (E[x^2] - E[x]^2 fails there).

    No ReLU after it: the fp32 convolution's rounding at 300 is ~1e-4 after the normalisation,
    so a ReLU's mask at outputs that close to zero may differ from float64's in any fp32 code,
    torch's too."""
    model = nn.Sequential(nn.Conv2d(4, 16, 1), nn.BatchNorm2d(16))
    with torch.no_grad():
        model[0].bias.fill_(300.0)
    # Its gradient is zero in exact arithmetic, and fp32 rounding of a sum of 4096 terms of
    # the conv output's size otherwise.
    model[0].bias.requires_grad_(False)
    ref = copy.deepcopy(model).double()
    opt = tdc.optimize(model)
    # 3e-4: the fp32 convolution's own rounding at 300 (torch's too); E[x^2] - E[x]^2 in fp32
    # would be off by several percent.
    _compare(opt, ref, torch.randn(4, 4, 32, 32), 3e-4)


def test_state_dict_and_parameters_are_the_models() -> None:
    model = _init_bn(ResNet18ish())
    opt = tdc.optimize(model)
    assert list(opt.state_dict()) == list(model.state_dict())
    assert [n for n, _ in opt.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert [n for n, _ in opt.named_buffers()] == [n for n, _ in model.named_buffers()]
    # A copy by default; inplace=True shares the very tensors.
    assert all(p is not q for p, q in zip(opt.parameters(), model.parameters(), strict=True))
    shared = tdc.optimize(model, inplace=True)
    assert all(p is q for p, q in zip(shared.parameters(), model.parameters(), strict=True))
    assert not opt.eval().training and not any(m.training for m in opt.modules())
    assert opt.train().training and all(m.training for m in opt.modules())


def test_state_dict_round_trips() -> None:
    x = torch.randn(2, 3, 32, 32)
    a = _init_bn(ResNet18ish(), seed=1).eval()
    b = _init_bn(ResNet18ish(), seed=2).eval()
    opt = tdc.optimize(b)
    with torch.no_grad():
        opt(x)  # fills the folded-weight cache with b's weights
        opt.load_state_dict(a.state_dict())  # original -> optimized
        _close(opt(x), a(x), 1e-4, "after loading the original's state_dict")
        fresh = _init_bn(ResNet18ish(), seed=3).eval()
        fresh.load_state_dict(opt.state_dict())  # optimized -> original
        _close(fresh(x), a(x), 1e-5, "the original after loading the optimized state_dict")


def test_eval_follows_weight_updates() -> None:
    """The folded-weight cache follows optimizer steps, in-place buffer changes and .data swaps."""
    model = _init_bn(ResNet18ish()).eval()
    opt = tdc.optimize(model, inplace=True)
    x = torch.randn(2, 3, 32, 32)

    def check(what: str) -> None:
        with torch.no_grad():
            _close(opt(x), model.double()(x.double()), 1e-4, what)
            model.float()

    check("first call")
    sgd = torch.optim.SGD(opt.parameters(), lr=0.1)
    out, _, _ = _run(opt, x)
    sgd.step()
    check("after an optimizer step")
    with torch.no_grad():
        opt.layer1[0].bn1.running_var.mul_(3.0)
        opt.layer2[0].bn2.running_mean.add_(0.5)
    check("after an in-place change of BN buffers")
    opt.layer1[1].conv2.weight.data = opt.layer1[1].conv2.weight.data * 2
    check("after replacing a weight's .data")
    opt.layer2[1].bn1.eps = 0.5
    check("after changing a BN's eps")
    opt.layer1[0].conv2.padding, opt.layer1[0].conv2.dilation = (2, 2), (2, 2)
    check("after changing a convolution's padding and dilation")


def test_inference_mode_then_input_gradients() -> None:
    """Weights folded under inference_mode are inference tensors: they are not reused where
    autograd must save them (an input gradient through frozen weights)."""
    model = _init_bn(ResNet18ish()).eval().requires_grad_(False)
    ref = copy.deepcopy(model).double()
    opt = tdc.optimize(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        _close(opt(x), ref(x.double()), 1e-4, "inference_mode output")
    xg = x.clone().requires_grad_()
    opt(xg).sum().backward()
    xr = x.double().requires_grad_()
    ref(xr).sum().backward()
    _close(xg.grad, xr.grad, 1e-4, "input gradient")


def test_dropout_draws_the_same_mask() -> None:
    """In training, blocked dropout draws torch's mask for the NCHW tensor: the same output."""
    model = nn.Sequential(nn.Conv2d(3, 20, 3), nn.BatchNorm2d(20), nn.ReLU(), nn.Dropout(0.3), nn.Conv2d(20, 5, 1))
    opt = tdc.optimize(model)
    x = torch.randn(2, 3, 9, 9)
    torch.manual_seed(11)
    expected = model(x)
    torch.manual_seed(11)
    _close(opt(x), expected.detach(), 1e-5, "dropout output")


def _padded_lanes(t: torch.Tensor, channels: int) -> torch.Tensor:
    """The lanes of a blocked tensor past its `channels` real channels."""
    return t.permute(0, 2, 3, 1, 4).reshape(-1, t.shape[1] * t.shape[4])[:, channels:]


@pytest.mark.parametrize("name", ["odd", "preact", "unsupported", "broadcast"])
def test_padded_lanes_stay_zero(name: str) -> None:
    """Every blocked value, and the gradient reaching it, has zero padded lanes, in eval and in
    train: 13, 30, 24, 20, 12 and 8 channels through the fused batch norm (its shift too, unfolded
    in the pre-activation blocks), add + ReLU (broadcast ones too), pooling and global pooling."""
    factory, shape, _ = MODELS[name]
    checked, grads = [], []

    def check_grad(n, c):
        def hook(g):
            assert not _padded_lanes(g, c).abs().max(), f"gradient of {n}"
            grads.append(n)

        return hook

    class Check(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            c = n.meta.get("dc", {}).get("channels")
            if c is not None and c % out.shape[4]:
                lanes = _padded_lanes(out, c)
                assert lanes.numel() and not lanes.abs().max(), n.name
                checked.append(n.name)
                if out.requires_grad:
                    out.register_hook(check_grad(n.name, c))
            return out

    for mode in (False, True):
        opt = tdc.optimize(factory()).train(mode)
        x = torch.randn(shape, requires_grad=True)
        Check(opt._engine.graphs[mode]).run(x).sum().backward()
    assert len(checked) >= 8 and len(grads) == len(checked)


# ---------------------------------------------------------------------------------------------
# The graph: regions, exits, fusion, in-place ops


def _steps_of(opt: nn.Module, training: bool = False) -> list:
    gm = opt._engine.graphs[training]
    return [gm.get_submodule(n.target) for n in gm.graph.nodes if n.op == "call_module" and n.target.startswith("dc")]


def test_resnet50_is_one_region() -> None:
    opt = tdc.optimize(_resnet50())
    steps = _steps_of(opt)
    # One entry: conv1's unit takes it in (EnterUnit: folded in bf16, Enter's in fp32).
    assert sum(isinstance(s, (_steps.Enter, _steps.EnterUnit)) for s in steps) == 1
    assert isinstance(steps[0], _steps.EnterUnit)
    assert sum(isinstance(s, (_steps.Exit, _steps.GlobalAvgPool)) for s in steps) == 1
    units = [s for s in steps if isinstance(s, _steps.Unit)]
    assert len(units) == 53 and all(u._parts[0] is not None and u._parts[1] is not None for u in units)
    assert sum(u.residual for u in units) == 16 and sum(u.relu for u in units) == 49
    assert len(set(opt._engine.plans[False].regions.values())) == 1


def test_unsupported_ops_exit_with_reasons() -> None:
    opt = tdc.optimize(_init_bn(Unsupported()))
    exits = [s for s in _steps_of(opt) if isinstance(s, _steps.Exit)]
    reasons = " ".join(s.what for s in exits)
    assert "torch.sigmoid has no blocked implementation" in reasons
    assert "operator.mul of a tensor and a non-tensor" in reasons  # Custom's x * 0.5
    # x * sigmoid(x) reads x's exit and sigmoid's output, and feeds the depthwise conv: it runs
    # NCHW, with no conversion (blocked, it would take an entry and an exit).
    entries = [s.layers[0] for s in _steps_of(opt) if isinstance(s, _steps.Enter)]
    assert "'sigmoid'" not in entries and "'mul'" not in " ".join(s.layers[0] for s in exits)
    drop_in = [s for s in _steps_of(opt) if isinstance(s, _steps.DropInConv)]
    assert [s.layers for s in drop_in] == [["dw"], ["grouped"]]
    # The reflect- and circular-padded convolutions run blocked.
    units = [s for s in _steps_of(opt) if isinstance(s, _steps.Unit)]
    assert {"reflect", "c3"} <= {s.layers[0] for s in units}


def test_inplace_relu_of_a_value_read_later() -> None:
    """x.relu_() changes x for every later reader, as in eager; an in-place op on the input too."""

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(3, 8, 3, padding=1)
            self.c2 = nn.Conv2d(8, 8, 1)

        def forward(self, x):
            a = self.c1(x)
            b = self.c2(a)  # reads a before the in-place ReLU
            a.relu_()
            v = a[:, :4]  # a view (NCHW), then an in-place op on it, which writes a
            v.mul_(2)
            return self.c2(a) + b

    class OnInput(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.Conv2d(3, 8, 3)

        def forward(self, x):
            x.relu_()
            return self.c(x)

    for model in (M(), OnInput()):
        opt = tdc.optimize(model)
        x = torch.randn(2, 3, 8, 8)
        x1, x2 = x.clone(), x.clone()
        with torch.no_grad():
            _close(opt(x1), model(x2), 1e-5, type(model).__name__)
        assert torch.equal(x1, x2)  # the caller's tensor is written as in eager


def test_hooks_converted_and_copied_models() -> None:
    """A convolution with a hook runs as itself (the hook fires); a convert()ed model optimizes
    too; an optimized model pickles, and a deep copy of it is a model of its own."""
    model = _init_bn(ResNet18ish()).eval()
    calls = []
    model.layer1[0].conv2.register_forward_hook(lambda m, i, o: calls.append(o.shape))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        calls.clear()
        opt = tdc.optimize(model)
        _close(opt(x), expected, 1e-4, "with a hook")
        assert calls == [torch.Size((2, 16, 8, 8))]
        _close(tdc.optimize(tdc.convert(model, cache_weights=True))(x), expected, 1e-4, "converted")
        buffer = io.BytesIO()
        torch.save(tdc.optimize(_init_bn(OddChannels())), buffer)  # pickles (activation steps too)
        twin = copy.deepcopy(opt)
        with torch.no_grad():
            twin.fc.bias.add_(1.0)
        _close(opt(x), expected, 1e-4, "the original after changing its copy")
        _close(twin(x), expected + 1, 1e-4, "the copy")


def test_untraceable_model_falls_back_to_convert() -> None:
    model = Untraceable()
    with pytest.warns(UserWarning, match="torch.fx cannot trace Untraceable .*falling back to convert"):
        opt = tdc.optimize(model)
    assert isinstance(opt.conv, tdc.DirectConv2d)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        _close(opt(x), model(x), 1e-5, "fallback output")


def test_non_float32_input_runs_the_original_model() -> None:
    model = _init_bn(ResNet18ish()).eval().double()
    opt = tdc.optimize(model)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(opt(x), model(x))


def test_bad_input_names_the_layer() -> None:
    opt = tdc.optimize(_init_bn(ResNet18ish()))
    with pytest.raises(RuntimeError, match=r"layer 'conv1' expected an input with 3 channels, got 4"):
        opt(torch.randn(2, 4, 32, 32))
    with pytest.raises(
        RuntimeError, match=r"layer 'conv1' expected a 4-D \(N, C, H, W\) input, got shape \(3, 32, 32\)"
    ):
        opt(torch.randn(3, 32, 32))
    # Through a channel-preserving op the message names the layer that needs the channels.
    pooled = tdc.optimize(nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(5, 8, 1)))
    with pytest.raises(RuntimeError, match=r"layer '0' \(for '1'\) expected an input with 5 channels, got 6"):
        pooled(torch.randn(1, 6, 4, 4))
    # A batch norm first, in training: the check comes before any statistics are taken.
    pre = tdc.optimize(nn.Sequential(nn.BatchNorm2d(5), nn.ReLU(), nn.Conv2d(5, 4, 1))).train()
    with pytest.raises(RuntimeError, match=r"layer '0' expected an input with 5 channels, got 3"):
        pre(torch.randn(2, 3, 4, 4))
    with pytest.raises(RuntimeError, match=r"layer '0' expected a 4-D .* got shape \(1, 2, 5, 4, 4\)"):
        pre(torch.randn(1, 2, 5, 4, 4))
    assert int(pre.get_submodule("0").num_batches_tracked) == 0


def test_input_layouts_empty_batch_and_single_values() -> None:
    model = _init_bn(ResNet18ish()).eval()
    opt = tdc.optimize(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for what, inp in (
            ("channels_last", x[:, :, :32, :32].contiguous(memory_format=torch.channels_last)),
            ("strided", x[:, :, ::2, ::2]),
            ("empty batch", x[:0, :, :32, :32]),
        ):
            _close(opt(inp), model(inp), 1e-4, what)
    # Training batch norm needs more than one value per channel, as torch's does.
    small = tdc.optimize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    with pytest.raises(ValueError, match="1: Expected more than 1 value per channel when training"):
        small(torch.randn(1, 3, 3, 3))


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "input-gradient"])
def test_threads_share_one_model(grad: bool) -> None:
    """One optimized model called from several threads at once gives each its own result: in
    no_grad (the folded weights cached and shared) and with an input gradient (folded per call)."""
    opt = tdc.optimize(_init_bn(ResNet18ish())).eval()
    inputs = [torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(4)]

    def call(x: torch.Tensor) -> tuple:
        if not grad:
            with torch.no_grad():
                return (opt(x),)
        x = x.clone().requires_grad_()
        out = opt(x)
        return out.detach(), torch.autograd.grad(out.square().sum(), x)[0]

    expected = [call(x) for x in inputs]
    errors: list = []

    def work(i: int) -> None:
        try:
            for _ in range(3):
                got = call(inputs[i % 4])
                assert all(torch.equal(g, e) for g, e in zip(got, expected[i % 4], strict=True))
        except Exception as e:  # reported below, with the thread's index
            errors.append((i, e))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_torch_compile_fullgraph() -> None:
    """Eager against torch.compile(fullgraph=True), forward and backward, train then eval: the
    odd-channel model has every fused op (batch norm with each option, add + ReLU, both pools,
    global pooling)."""
    model = _init_bn(OddChannels()).train()
    eager = tdc.optimize(model)
    compiled_model = tdc.optimize(model)
    compiled = torch.compile(compiled_model, fullgraph=True)
    x = torch.randn(3, 3, 15, 13)
    names = [n for n, _ in eager.named_parameters()]
    # Inductor fuses and reorders the element-wise work: fp32 rounding differs.
    _compare_runs(_run(compiled, x), _run(eager, x), names, 1e-4)
    _check_state(compiled_model, eager, 1e-5)
    eager.eval()
    compiled_model.eval()
    with torch.no_grad():
        _close(compiled(x), eager(x), 1e-4, "compiled eval output")


def test_explain_shows_regions_exits_and_kernels(capsys) -> None:
    model = _init_bn(Unsupported()).eval()
    text = tdc.explain(model, torch.randn(2, 3, 10, 10), runs=1)
    assert capsys.readouterr().out.strip() == text.strip()
    assert "BLOCKED" in text and "ENTER" in text and "EXIT" in text and "NCHW" in text
    assert "torch.sigmoid has no blocked implementation" in text
    assert "kernels: mb2ic3ih10oc16oh10kh3sh1ph1" in text
    assert "BN folded" in text
    assert "layout conversions" in text and "outside the blocked regions: #" in text
    fallback = tdc.explain(Untraceable(), torch.randn(1, 3, 4, 4))
    assert "falls back to convert()" in fallback


# ---------------------------------------------------------------------------------------------
# The running statistics


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"momentum": None}, {"momentum": 0.3}, {"affine": False}, {"track_running_stats": False}],
    ids=["default", "cumulative", "momentum", "no-affine", "untracked"],
)
def test_update_running_stats_is_batch_norms(kwargs: dict) -> None:
    """The one rule for the running statistics against nn.BatchNorm2d's own update, over three
    batches of different sizes (the cumulative average needs more than one)."""
    bn = nn.BatchNorm2d(21, **kwargs).train()
    ref = copy.deepcopy(bn).double()
    for i in range(3):
        x = torch.randn(2 + i, 21, 5, 4, generator=torch.Generator().manual_seed(i)) * (1 + i) + i
        yb = blocked_ops.batch_norm(
            tdc.to_blocked(x), 21, bn.running_mean, bn.running_var, bn.weight, bn.bias, True, bn.momentum, bn.eps,
            num_batches_tracked=bn.num_batches_tracked,
        )
        _close(tdc.from_blocked(yb, 21), ref(x.double()).detach(), 1e-5, f"batch {i}")
    _check_state(bn, ref, 1e-5)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("counter", [True, False])
def test_update_running_stats_in_place(momentum: float | None, counter: bool) -> None:
    """One in-place op: the factor rule (momentum None without a counter leaves the statistics
    as they are, as torch), torch's formula in double, and the version counters moved as an
    in-place torch op moves them."""
    g = torch.Generator().manual_seed(9)
    rm, rv = torch.randn(21, generator=g), torch.rand(21, generator=g) + 0.5
    mean, var = torch.randn(21, generator=g), torch.rand(21, generator=g)
    nbt = torch.tensor(4) if counter else None
    exp_m, exp_v = rm.double(), rv.double()
    factor = momentum if momentum is not None else (1 / 5 if counter else 0.0)
    exp_m = factor * mean.double() + (1 - factor) * exp_m
    exp_v = factor * var.double() * 40 / 39 + (1 - factor) * exp_v
    versions = [t._version for t in (rm, rv, nbt) if t is not None]
    blocked_ops.update_running_stats(rm, rv, nbt, mean, var, 40, momentum)
    torch.testing.assert_close(rm, exp_m.float(), rtol=0, atol=0)
    torch.testing.assert_close(rv, exp_v.float(), rtol=0, atol=0)
    assert nbt is None or int(nbt) == 5
    assert all(t._version > v for t, v in zip([t for t in (rm, rv, nbt) if t is not None], versions, strict=True))
    with pytest.raises(RuntimeError, match="num_batches_tracked"):
        blocked_ops.update_running_stats(rm, rv, torch.tensor(1.0), mean, var, 40, momentum)
    with pytest.raises(RuntimeError, match="running_var"):
        blocked_ops.update_running_stats(rm, rv[:20], None, mean, var, 40, momentum)


def test_eval_after_training_follows_the_running_statistics() -> None:
    """eval (its folded weights cached), a training step (the running statistics move in place),
    eval again: the second eval folds the new statistics."""
    model = _init_bn(OddChannels())
    ref = copy.deepcopy(model).double()
    opt = tdc.optimize(model)
    x = torch.randn(2, 3, 15, 13)
    with torch.no_grad():
        _close(opt.eval()(x), ref.eval()(x.double()), 1e-4, "first eval")
    # With gradients, as a training step: the weights are not cached then, so the eval entry stays.
    xt = torch.randn(3, 3, 15, 13) * 2 + 1
    opt.train()(xt)
    ref.train()(xt.double())
    _check_state(opt, ref, 1e-4)
    with torch.no_grad():
        _close(opt.eval()(x), ref.eval()(x.double()), 1e-4, "eval after the training step")


def test_warns_nothing_for_supported_models() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = tdc.optimize(_init_bn(ResNet18ish()))
        with torch.no_grad():
            opt(torch.randn(1, 3, 32, 32))
    assert _graph.trace(ResNet18ish()) is not None


class BroadcastResidual(nn.Module):
    """conv -> BN -> + a per-channel (N, C, 1, 1) value -> ReLU: a residual the epilogue cannot take."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 20, 3, padding=1)
        self.conv2 = nn.Conv2d(20, 20, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(20)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(x)
        return torch.relu(self.bn(self.conv2(y)) + y.mean((2, 3), keepdim=True))


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_broadcasting_residual(mode: str) -> None:
    model = _init_bn(BroadcastResidual()).train(mode == "train")
    ref = copy.deepcopy(model).double()
    opt = tdc.optimize(model)
    _compare(opt, ref, torch.randn(2, 3, 9, 9), 1e-5)


class LoneConvs(nn.Module):
    """Convolutions each alone between ops that run NCHW (sigmoid does not keep zero at zero)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)  # a small weight: packed within each call
        self.b = nn.Conv2d(16, 64, 3, padding=1, bias=False)  # packed once in eval, kept while it may be
        self.c = nn.Conv2d(64, 10, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.sigmoid(self.a(x))
        x = torch.sigmoid(F.relu(self.b(x)))
        return torch.sigmoid(self.c(x))


def test_lone_convolutions_run_nchw() -> None:
    """A region of one convolution (and the ReLU only it feeds) runs NCHW in and out, as
    DirectConv2d does: no entry or exit, the ReLU in its epilogue, the same results, and the
    packed weight follows every change of the weight."""
    model = LoneConvs()
    opt = tdc.optimize(model, inplace=True)
    for training in (False, True):
        steps = _steps_of(opt, training)
        assert not any(isinstance(s, (_steps.Enter, _steps.Exit, _steps.Unit)) for s in steps), steps
        convs = [s for s in steps if isinstance(s, _steps.DropInConv)]
        assert [s.relu for s in convs] == [False, True, False]
        assert opt._engine.plans[training].lone
    x = torch.randn(2, 3, 9, 11)
    ref = copy.deepcopy(model).double()
    _compare(opt.eval(), ref.eval(), x, 1e-5)
    _compare(opt.train(), ref.train(), x, 1e-5)
    opt.eval()

    def check(what: str) -> None:
        with torch.no_grad():
            _close(opt(x), model.double()(x.double()), 1e-5, what)
            model.float()

    check("first call")
    check("second call (the kept packing)")
    with torch.no_grad():
        opt.b.weight.mul_(-2.0)
    check("after an in-place change of the weight")
    opt.b.weight.data = torch.randn_like(opt.b.weight)
    check("after replacing the weight's .data")
    opt.b.weight = nn.Parameter(torch.randn_like(opt.b.weight))
    check("after replacing the parameter")
    opt.b.padding = (0, 0)
    check("after changing the padding")


def _conv_units(opt) -> list:
    steps = opt._engine.graphs[False].modules()
    return [m for m in steps if isinstance(m, tdc._steps.Unit) and m._parts[0] is not None]


def test_eval_prepared_calls_follow_every_change(monkeypatch) -> None:
    """In eval without gradients each unit keeps its last call prepared and reruns it while
    nothing it depends on changed: the second of two calls runs no unit's full path, and
    every change below is seen by the next call (the units it touches take the full path)."""
    model = _init_bn(ResNet18ish()).eval()
    opt = tdc.optimize(model, inplace=True)
    units = _conv_units(opt)
    full_calls: list = []
    full = tdc._steps.Unit._forward
    monkeypatch.setattr(tdc._steps.Unit, "_forward", lambda self, *a: full_calls.append(self) or full(self, *a))
    conv, bn = opt.layer1[0].conv2, opt.layer1[0].bn2
    g = torch.Generator().manual_seed(8)

    def check(what: str, x: torch.Tensor, tol: float = 1e-4) -> None:
        ref = copy.deepcopy(model).double()(x.double())
        with torch.no_grad():
            _close(opt(x), ref, tol, what)
            assert all(u._fast is not None for u in units), what
            full_calls.clear()
            _close(opt(x), ref, tol, f"{what}, prepared")
        assert not full_calls, f"{what}: {len(full_calls)} units took the full path again"

    x = torch.randn(2, 3, 32, 32, generator=g)
    check("first calls", x)
    with torch.no_grad():
        conv.weight.mul_(-1.5)
    check("in-place weight update", x)
    with torch.no_grad():
        bn.running_var.mul_(3.0)
    check("in-place running statistics", x)
    conv.weight.data = torch.randn_like(conv.weight) * 0.1
    check("weight.data =", x)
    bn.weight = nn.Parameter(torch.rand_like(bn.weight) + 0.5)
    check("a new Parameter", x)
    bn.eps = 0.25
    check("a batch norm's eps", x)
    conv.padding, conv.dilation = (2, 2), (2, 2)
    check("padding and dilation", x)
    check("another input shape", torch.randn(1, 3, 24, 40, generator=g))
    with torch.inference_mode():
        opt(x)
        opt(x)
    check("after inference mode", x)
    cap = tdc.isa()
    try:
        _C.set_isa_cap("avx512")
        check("another ISA", x)
    finally:
        _C.set_isa_cap(cap)
    check("the ISA back", x)
    if tdc.isa() in ("amx", "avx512_bf16"):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            opt(x)
            low = opt(x)
        # conv1's EnterUnit runs bf16 on its folded entry, which keeps no prepared call.
        assert all(u._fast[1][0] == torch.bfloat16 for u in units if not isinstance(u, tdc._steps.EnterUnit))
        assert all(u._fast is None for u in units if isinstance(u, tdc._steps.EnterUnit))
        _close(low.float(), copy.deepcopy(model).double()(x.double()), 5e-2, "bf16 under autocast")
        check("fp32 after bf16", x)
    # Gradients: the full path, which records the graph.
    xg = x.clone().requires_grad_()
    xr = x.double().requires_grad_()
    ref = copy.deepcopy(model).double()
    opt(xg).sum().backward()
    ref(xr).sum().backward()
    _close(xg.grad, xr.grad, 1e-4, "input gradient after prepared calls")
    _close(conv.weight.grad, ref.layer1[0].conv2.weight.grad, 1e-4, "weight gradient after prepared calls")
    opt.zero_grad()


def test_eval_prepared_calls_under_compile_func_and_bad_input() -> None:
    """Prepared calls leave torch.compile the op itself, torch.func its transforms, and a bad
    input the full path's error."""
    model = _init_bn(ResNet18ish()).eval()
    opt = tdc.optimize(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = opt(x)
        opt(x)
    graphs = []

    def backend(gm, inputs):
        graphs.append(str(gm.graph))
        return gm

    with torch.no_grad():
        torch._dynamo.reset()
        got = torch.compile(opt, backend=backend, fullgraph=True)(x)
    _close(got, want.double(), 1e-5, "compiled")
    assert any("directconv.conv2d_blocked" in g for g in graphs), graphs
    xr = x.double().requires_grad_()
    ref = copy.deepcopy(model).double()
    ref(xr).sum().backward()
    out, vjp = torch.func.vjp(opt, x)
    (gx,) = vjp(torch.ones_like(out))
    _close(gx, xr.grad, 1e-4, "torch.func.vjp after prepared calls")
    unit = next(u for u in _conv_units(opt) if not isinstance(u, tdc._steps.EnterUnit))  # blocked in
    with torch.no_grad():
        xb = tdc.to_blocked(torch.randn(2, unit._parts[0].in_channels, 16, 16))
        unit(xb)
        unit(xb)
        assert unit._fast is not None
        with pytest.raises(RuntimeError) as prepared:
            unit(xb.double())
        unit._fast = None
        with pytest.raises(RuntimeError) as fresh:
            unit(xb.double())
    assert str(prepared.value) == str(fresh.value)
