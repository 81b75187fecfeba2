"""optimize() in bf16: under torch.autocast("cpu", dtype=torch.bfloat16) and for models moved with
.to(torch.bfloat16), the blocked graph keeps bf16 activations blocked (rows of 32 channels) with
fp32 batch-norm statistics and parameters, and fp32 master weights cast and packed in the calls.

bf16 results are not bit-exact against torch's: both round differently. The reference is the
same model in float64, and optimize()'s error against it must stay within a small multiple of
the error of torch's own bf16 autocast on the same model and input (BF16_SLACK): it is as
accurate as the path users would otherwise take. test_bound_catches_a_wrong_layer shows that
an error of one layer (a zeroed tap) fails that bound.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import torch_directconv as tdc
from test_optimize import MODELS, ResNet18ish, _init_bn

pytestmark = [
    pytest.mark.skipif(tdc.isa() not in ("amx", "avx512_bf16"), reason=f"no bf16 kernels at {tdc.isa()}"),
    pytest.mark.filterwarnings("ignore:torch_directconv. grouped convolutions:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:torch_directconv. bf16 grouped:RuntimeWarning"),
]

# optimize()'s error against float64 may be this many times torch autocast's, plus BF16_FLOOR
# of the reference's largest magnitude (a model whose torch error happens to be tiny).
BF16_SLACK = 2.0
BF16_FLOOR = 2.0**-8
BF16_MODELS = ["resnet50", "resnet18ish", "preact", "nobn", "odd", "broadcast", "unsupported"]


def autocast(dtype=torch.bfloat16):
    return torch.autocast("cpu", dtype=dtype)


class BlockedLog(TorchDispatchMode):
    """(op name, dtype of its first tensor argument) of every directconv and aten convolution op."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, torch.dtype | None]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "directconv" or func._opname == "convolution":
            first = next((a for a in args if isinstance(a, torch.Tensor)), None)
            self.calls.append((f"{func.namespace}::{func._opname}", None if first is None else first.dtype))
        return func(*args, **(kwargs or {}))


def _err(actual: torch.Tensor, ref: torch.Tensor) -> float:
    """max |actual - ref| / max |ref|."""
    return ((actual.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _rel_norm(actual: torch.Tensor, ref: torch.Tensor) -> float:
    return ((actual.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _within(ours: float, torchs: float, what: str) -> None:
    assert ours <= BF16_SLACK * torchs + BF16_FLOOR, f"{what}: optimize's error {ours:.3e}, torch autocast's {torchs:.3e}"


def _run(model: nn.Module, x: torch.Tensor, amp: bool, seed: int = 5) -> tuple:
    """(output, input gradient, parameter gradients) of one forward (under bf16 autocast when amp)
    and backward of a fixed random projection of the output."""
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        out = model(x)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    (out.double() * weights).sum().backward()
    return out.detach(), x.grad, [p.grad for p in model.parameters()]


@pytest.mark.parametrize("name", BF16_MODELS)
def test_eval_under_autocast_is_as_accurate_as_torch(name: str) -> None:
    factory, shape, _ = MODELS[name]
    model = factory().eval()
    ref64 = copy.deepcopy(model).double()
    opt = tdc.optimize(model)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = ref64(x.double())
        with autocast():
            theirs = model(x)
            log = BlockedLog()
            with log:
                ours = opt(x)  # the cached, folded, packed bf16 weights
            again = opt(x)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    assert torch.equal(ours, again)
    _within(_err(ours, ref), _err(theirs, ref), f"{name} eval output")
    convs = [dt for op, dt in log.calls if op == "directconv::conv2d_blocked"]
    assert convs and all(dt == torch.bfloat16 for dt in convs), log.calls
    if name not in ("unsupported",):
        assert not any(op == "aten::convolution" for op, _ in log.calls), log.calls


@pytest.mark.parametrize("name", BF16_MODELS)
def test_train_under_autocast_is_as_accurate_as_torch(name: str) -> None:
    factory, shape, _ = MODELS[name]
    model = factory().train()
    ref64 = copy.deepcopy(model).double()
    theirs_model = copy.deepcopy(model)
    opt = tdc.optimize(model)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    ref = _run(ref64, x.double(), amp=False)
    theirs = _run(theirs_model, x, amp=True)
    ours = _run(opt, x, amp=True)
    assert ours[0].dtype == theirs[0].dtype
    _within(_err(ours[0], ref[0]), _err(theirs[0], ref[0]), f"{name} output")
    _within(_rel_norm(ours[1], ref[1]), _rel_norm(theirs[1], ref[1]), f"{name} input gradient")
    # A gradient much smaller than the others (a bias before a batch norm, zero in exact
    # arithmetic) is rounding of their size: the floor is relative to the largest one.
    largest = max(r.norm().item() for r in ref[2] if r is not None)
    for (pname, p), g, tg, rg in zip(opt.named_parameters(), ours[2], theirs[2], ref[2], strict=True):
        assert (g is None) == (rg is None), pname
        if g is None:
            continue
        assert g.dtype == p.dtype == torch.float32, pname  # fp32 master weights get fp32 gradients
        ours_err, theirs_err = (g.double() - rg).norm().item(), (tg.double() - rg).norm().item()
        assert ours_err <= BF16_SLACK * theirs_err + BF16_FLOOR * largest, (
            f"{name} gradient of {pname}: optimize's error {ours_err:.3e}, torch autocast's {theirs_err:.3e}"
        )
    # The running statistics and the counters moved as torch's did (fp32 buffers).
    for (bname, b), tb, rb in zip(opt.named_buffers(), theirs_model.buffers(), ref64.buffers(), strict=True):
        if b.dtype == torch.int64:
            assert torch.equal(b, tb), bname
        else:
            assert b.dtype == torch.float32, bname
            _within(_err(b, rb), _err(tb, rb), f"{name} {bname}")


def test_bound_catches_a_wrong_layer() -> None:
    """One zeroed tap of one convolution's weight fails the eval bound (the test can fail)."""
    factory, shape, _ = MODELS["resnet18ish"]
    model = factory().eval()
    ref = copy.deepcopy(model).double()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.layer1[0].conv2.weight[:, :, 1, 1] = 0
        opt = tdc.optimize(broken)
        with autocast():
            theirs, ours = model(x), opt(x)
        r = ref(x.double())
    assert _err(ours, r) > BF16_SLACK * _err(theirs, r) + BF16_FLOOR


def test_bf16_model_eval_and_train() -> None:
    """A model moved with .to(torch.bfloat16), no autocast: bf16 parameters and buffers throughout."""
    model = _init_bn(ResNet18ish())
    ref64 = copy.deepcopy(model).double()
    bf = model.to(torch.bfloat16)
    theirs_model = copy.deepcopy(bf)
    opt = tdc.optimize(bf)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    for training in (False, True):
        opt.train(training)
        theirs_model.train(training)
        ref64.train(training)
        log = BlockedLog()
        with torch.no_grad():
            with log:
                ours = opt(x.bfloat16())
            theirs = theirs_model(x.bfloat16())
            ref = ref64(x.double())
        assert ours.dtype == torch.bfloat16
        convs = ("directconv::conv2d_blocked", "directconv::conv2d_blocked_stats")
        assert any(op in convs and dt == torch.bfloat16 for op, dt in log.calls), log.calls
        _within(_err(ours, ref), _err(theirs, ref), f"bf16 model output (training={training})")
    for b, tb in zip(opt.buffers(), theirs_model.buffers(), strict=True):
        assert b.dtype == tb.dtype
        if b.dtype == torch.int64:
            assert torch.equal(b, tb)
    # A training step's gradients are bf16, as the parameters.
    opt.train()
    out = opt(x.bfloat16())
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in opt.parameters())


def test_float16_autocast_runs_the_original_model() -> None:
    model = _init_bn(ResNet18ish()).eval()
    opt = tdc.optimize(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), autocast(torch.float16):
        assert torch.equal(opt(x), model(x))


def test_eval_cache_follows_weight_updates_and_dtype() -> None:
    """The packed bf16 weights are cached per dtype: an fp32 call after a bf16 one (and back) and a
    weight update in between each get the right weights."""
    opt = tdc.optimize(_init_bn(ResNet18ish()).eval(), inplace=True)
    model = opt._engine.root  # the same parameters
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        with autocast():
            a = opt(x)
        f32 = opt(x)
        torch.testing.assert_close(f32, model(x), rtol=1e-4, atol=1e-4)
        with autocast():
            assert torch.equal(opt(x), a)
        opt.fc.weight.mul_(2)
        opt.layer1[0].conv1.weight.mul_(-1)
        with autocast():
            b = opt(x)
            theirs = model(x)
    assert not torch.equal(b, a)
    ref = copy.deepcopy(model).double()(x.double())
    _within(_err(b, ref), _err(theirs, ref), "after the update")


def test_compile_under_autocast_matches_eager() -> None:
    model = _init_bn(ResNet18ish()).train()
    opt = tdc.optimize(model)
    compiled = torch.compile(tdc.optimize(copy.deepcopy(model)), fullgraph=True)
    x = torch.randn(2, 3, 32, 32)
    eager = _run(opt, x, amp=True)
    comp = _run(compiled, x, amp=True)
    # Inductor fuses torch's ops around ours (the head's flatten and linear) and may round
    # between them differently: a bf16 ulp or so, not more.
    for what, c, e in (("output", comp[0], eager[0]), ("input gradient", comp[1], eager[1])):
        torch.testing.assert_close(c.float(), e.float(), rtol=2**-6, atol=2**-6 * e.abs().max().item(), msg=what)
    for g, e in zip(comp[2], eager[2], strict=True):
        torch.testing.assert_close(g, e, rtol=2**-6, atol=2**-6 * e.abs().max().item())


def test_explain_shows_the_bf16_blocked_graph() -> None:
    model = _init_bn(ResNet18ish()).eval()
    x = torch.randn(1, 3, 32, 32)
    with autocast():
        text = tdc.explain(model, x, file=io.StringIO())
    assert "runs the original model" not in text, text
    assert "bf16" in text, text


def test_training_steps_converge_like_torch() -> None:
    """A few SGD steps under autocast: the loss falls as torch autocast's does."""
    torch.manual_seed(0)
    model = _init_bn(ResNet18ish()).train()
    theirs = copy.deepcopy(model)
    opt_model = tdc.optimize(model)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(8, 3, 32, 32, generator=g)
    y = torch.randint(0, 7, (8,), generator=g)
    losses = {}
    for name, m in (("ours", opt_model), ("torch", theirs)):
        sgd = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
        trace = []
        for _ in range(8):
            sgd.zero_grad()
            with autocast():
                loss = F.cross_entropy(m(x), y)
            loss.backward()
            sgd.step()
            trace.append(loss.item())
        losses[name] = trace
    assert losses["ours"][-1] < 0.5 * losses["ours"][0], losses
    assert abs(losses["ours"][-1] - losses["torch"][-1]) < 0.1 * losses["torch"][0] + 0.05, losses


def _linear_step(opt) -> tdc._steps.Linear:
    (step,) = [m for m in opt._engine.graphs[False].modules() if isinstance(m, tdc._steps.Linear)]
    return step


class CastLog(TorchDispatchMode):
    """The shapes of every aten::_to_copy's input (autocast's casts)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._opname == "_to_copy":
            self.shapes.append(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))


def test_linear_keeps_its_bf16_weight_bit_identical_to_autocast() -> None:
    """Under bf16 autocast without gradients the model's nn.Linear runs on its bf16 weight and
    bias cast once: bit-identical to the module under autocast, no cast of them in later calls,
    and the kept cast follows in-place updates, `.data =`, a new Parameter and a removed bias."""
    model = _init_bn(ResNet18ish()).eval()
    opt = tdc.optimize(model, inplace=True)
    fc, step = model.fc, _linear_step(opt)
    assert "linear" in step.what
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(4, 32, generator=g)

    def check(what: str) -> torch.Tensor:
        for x in (feats, feats.bfloat16()):
            with torch.no_grad(), autocast():
                got, want = step(x), fc(x)
            assert got.dtype == want.dtype == torch.bfloat16, what
            assert torch.equal(got.view(torch.int16), want.view(torch.int16)), what
        return got

    first = check("first call")
    with torch.no_grad(), autocast(), CastLog() as log:
        step(feats)
        opt(torch.randn(1, 3, 32, 32, generator=g))
    assert (7, 32) not in log.shapes and (7,) not in log.shapes, log.shapes
    with torch.no_grad():
        fc.weight.mul_(-2)
    assert not torch.equal(check("in-place update"), first)
    fc.weight.data = torch.randn(7, 32, generator=g)
    check("weight.data =")
    fc.bias = nn.Parameter(torch.randn(7, generator=g))
    check("a new Parameter")
    fc.bias = None
    check("no bias")
    with torch.no_grad():
        y = opt(torch.randn(2, 3, 32, 32, generator=g))
    assert y.dtype == torch.float32 and y.shape == (2, 7)


def test_linear_gradients_and_other_modes_run_the_module() -> None:
    """Where a gradient must reach the Linear's weight (eval with gradients, training), or
    without autocast, it runs as the module itself; a frozen Linear keeps its cast."""
    model = _init_bn(ResNet18ish()).eval()
    opt = tdc.optimize(model, inplace=True)
    fc, step = model.fc, _linear_step(opt)
    feats = torch.randn(3, 32, generator=torch.Generator().manual_seed(4))
    with autocast():
        out = step(feats)
        want = fc(feats)
    assert step._cache is None and out.requires_grad
    (gw,) = torch.autograd.grad(out.float().sum(), fc.weight)
    (gw_want,) = torch.autograd.grad(want.float().sum(), fc.weight)
    assert torch.equal(gw, gw_want)
    assert torch.equal(step(feats), fc(feats))  # no autocast: fp32, the module
    fc.requires_grad_(False)
    with autocast():
        out = step(feats)
        assert step._cache is not None and torch.equal(out, fc(feats))


def test_explain_shows_the_linear_step() -> None:
    model = _init_bn(ResNet18ish()).eval()
    with torch.no_grad(), autocast():
        text = tdc.explain(model, torch.randn(1, 3, 32, 32), file=io.StringIO())
    assert "fc: linear, NCHW" in text, text
