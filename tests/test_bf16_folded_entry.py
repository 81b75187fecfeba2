"""The folded entry of the bf16 blocked model: to_blocked_folded, and optimize()'s EnterUnit.

A layer whose kernel columns times its input channels fit one row of 32 bf16 lanes (conv1's
3 x 7 x 7) runs in bf16 on a copy with the columns folded into the channels, as an R x 1
convolution. to_blocked_folded makes that copy straight from the model's NCHW input (rounded as
`x.to(torch.bfloat16)` rounds); EnterUnit then runs the layer on it with the weight folded the
same way. Both must give exactly what the unfolded path gives (Enter, then the unit, whose
convolution folds inside its call): the same bf16 values through the same kernels.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_directconv as tdc
from torch_directconv import _steps
from test_guard_page import guarded_copy

OP = torch.ops.directconv.to_blocked_folded.default
LANES = 32

needs_bf16 = pytest.mark.skipif(tdc.isa() not in ("amx", "avx512_bf16"), reason=f"no bf16 kernels at {tdc.isa()}")


def ref_folded(x: torch.Tensor, kernel, stride, padding, dilation) -> torch.Tensor:
    """The folded copy from torch's ops: x rounded by torch, padded, each kernel column's
    strided view in lanes s * C .. s * C + C - 1."""
    n, c, h, w = x.shape
    (r, s), (pt, pb, pl, pr) = kernel, padding
    q = (w + pl + pr - dilation[1] * (s - 1) - 1) // stride[1] + 1
    xp = F.pad(x.to(torch.bfloat16).float(), (pl, pr, pt, pb))
    out = torch.zeros(n, 1, h + pt + pb, q, LANES)
    for j in range(s):
        col = j * dilation[1]
        out[:, 0, :, :, j * c : (j + 1) * c] = xp[:, :, :, col : col + stride[1] * (q - 1) + 1 : stride[1]].permute(0, 2, 3, 1)
    return out.to(torch.bfloat16)


def assert_same_bits(got: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal values, bit for bit, NaN matching NaN (torch's own conversions give NaNs of
    different payloads)."""
    assert got.shape == ref.shape and got.dtype == ref.dtype
    gn, rn = torch.isnan(got), torch.isnan(ref)
    assert torch.equal(gn, rn)
    assert torch.equal(got.masked_fill(gn, 0).view(torch.int16), ref.masked_fill(rn, 0).view(torch.int16))


# (N, C, H, W), (R, S), stride, padding (t, b, l, r), dilation
CASES = [
    ((1, 3, 224, 224), (7, 7), (2, 2), (3, 3, 3, 3), (1, 1)),  # conv1
    ((2, 3, 17, 19), (7, 7), (2, 2), (3, 3, 3, 3), (1, 1)),
    ((1, 4, 10, 12), (3, 8), (1, 1), (1, 0, 2, 3), (1, 1)),  # all 32 lanes
    ((1, 2, 9, 9), (3, 5), (1, 3), (0, 1, 1, 0), (1, 2)),  # column dilation
    ((1, 1, 8, 8), (2, 32), (1, 1), (0, 0, 16, 16), (1, 1)),  # one channel, 32 columns
    ((3, 5, 6, 7), (1, 6), (1, 2), (0, 0, 3, 2), (1, 1)),  # five channels
    ((1, 3, 5, 40), (2, 3), (2, 1), (0, 0, 1, 1), (2, 1)),
]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[0])) + f"_k{c[1][0]}x{c[1][1]}")
def test_folded_copy_is_torchs_rounding_folded(case, layout: str) -> None:
    shape, kernel, stride, padding, dilation = case
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g) * 3
    # Rounding's edge cases: ties both ways, a denormal (kept), infinities and NaN.
    edge = torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8, 1e-40, -1e-39, float("inf"), float("-inf"), float("nan")])
    flat = x.view(-1)
    flat[: min(edge.numel(), flat.numel())] = edge[: flat.numel()]
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.randn(shape[0], shape[1], shape[2], 2 * shape[3], generator=g)[..., ::2]
    elif layout == "bf16":
        x = x.to(torch.bfloat16)
    got = OP(x, list(kernel), list(stride), list(padding), list(dilation))
    assert_same_bits(got, ref_folded(x, kernel, stride, padding, dilation))


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_a_nan_has_torchs_bits(layout: str) -> None:
    """A NaN as x.to(torch.bfloat16) writes it (its vectorized loop's bits, or its scalar one's
    for an input whose innermost stride is not 1), as the unfolded entry does."""
    x = torch.randn(1, 3, 8, 18)
    if layout == "strided":
        x = x[..., ::2]
    x[0, 1, 2, 3] = float("nan")
    got = OP(x, [3, 3], [1, 1], [1, 1, 1, 1], [1, 1])
    nan_bits = got.view(torch.int16)[torch.isnan(got)].unique()
    assert nan_bits.numel() == 1 and nan_bits.item() == x.to(torch.bfloat16).view(torch.int16)[0, 1, 2, 3].item()


@pytest.mark.parametrize("side", ["before", "after"])
def test_folded_copy_reads_only_its_input(side: str) -> None:
    for shape, kernel, stride, padding, dilation in CASES[1:]:
        x = torch.randn(shape)
        got = OP(guarded_copy(x, side), list(kernel), list(stride), list(padding), list(dilation))
        assert_same_bits(got, ref_folded(x, kernel, stride, padding, dilation))


def test_folded_copy_errors_name_the_op_and_what_it_takes() -> None:
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(RuntimeError, match="to_blocked_folded: the layer does not fold"):
        OP(x, [3, 1], [1, 1], [0, 0, 0, 0], [1, 1])  # one column
    with pytest.raises(RuntimeError, match="to_blocked_folded: the layer does not fold"):
        OP(torch.randn(1, 5, 16, 16), [7, 7], [1, 1], [0, 0, 0, 0], [1, 1])  # 35 lanes
    with pytest.raises(RuntimeError, match="to_blocked_folded: expected a 4-D 'x'"):
        OP(x[0], [7, 7], [1, 1], [0, 0, 0, 0], [1, 1])
    with pytest.raises(RuntimeError, match="to_blocked_folded"):
        OP(x.to(torch.int32), [7, 7], [1, 1], [0, 0, 0, 0], [1, 1])
    with pytest.raises(RuntimeError, match="to_blocked_folded: kernel size .* larger than the padded input"):
        OP(x, [3, 7], [1, 1], [0, 0, 0, 0], [1, 3])
    with pytest.raises(RuntimeError, match="padding"):
        OP(x, [7, 7], [1, 1], [0, 0], [1, 1])


def test_folds_columns_is_the_kernels_rule() -> None:
    folds = tdc._backend._C.bf16_folds_columns
    assert folds(3, 7) and folds(4, 8) and folds(1, 32) and folds(16, 2)
    assert not folds(3, 1) and not folds(5, 7) and not folds(33, 2) and not folds(1, 33)


def test_opcheck() -> None:
    x = torch.randn(2, 3, 12, 11)
    torch.library.opcheck(OP, (x, [7, 7], [2, 2], [3, 3, 3, 3], [1, 1]))
    torch.library.opcheck(OP, (x.to(torch.bfloat16), [3, 5], [1, 2], [1, 0, 2, 2], [1, 1]))


class Stem(nn.Module):
    """conv1 -> bn -> relu -> maxpool -> conv -> bn -> relu -> pool -> fc, ResNet's stem."""

    def __init__(self, c_in: int = 3, kernel: int = 7) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, 24, kernel, 2, kernel // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.conv2 = nn.Conv2d(24, 40, 3, 1, 1)
        self.bn2 = nn.BatchNorm2d(40)
        self.fc = nn.Linear(40, 10)

    def forward(self, x):
        y = self.pool(F.relu(self.bn1(self.conv1(x))))
        y = F.relu(self.bn2(self.conv2(y)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


def _stem(seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    m = Stem(**kw)
    for bn in (m.bn1, m.bn2):
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.2, 0.2)
    return m


def test_the_stem_enters_through_the_folded_unit() -> None:
    opt = tdc.optimize(_stem())
    kinds = [type(m).__name__ for m in opt._engine.graphs[False].children()]
    assert kinds[0] == "EnterUnit", kinds
    assert "Enter" not in kinds, kinds
    # A second reader of the input keeps the plain entry.
    class TwoReaders(Stem):
        def forward(self, x):
            return super().forward(x) + x.mean()

    kinds = [type(m).__name__ for m in tdc.optimize(TwoReaders()).eval()._engine.graphs[False].children()]
    assert "EnterUnit" not in kinds and "Enter" in kinds, kinds


def _run(model: nn.Module, x: torch.Tensor, folds: bool, train: bool):
    """The optimized model's output, input gradient (when x needs one) and parameter gradients
    under bf16 autocast, with the folded entry on or off, from a copy of model."""
    m = tdc.optimize(copy.deepcopy(model).train(train))
    x = x.detach().requires_grad_(x.requires_grad)
    original = _steps.EnterUnit._folds
    try:
        if not folds:
            _steps.EnterUnit._folds = lambda self, x: False
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(x)
        y.float().square().sum().backward()
    finally:
        _steps.EnterUnit._folds = original
    grads = [p.grad for p in m.parameters()]
    buffers = [b.clone() for b in m.buffers()]
    return y, x.grad, grads, buffers


@needs_bf16
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("kw", [{}, {"c_in": 4, "kernel": 5}, {"c_in": 1, "kernel": 3}], ids=["c3k7", "c4k5", "c1k3"])
def test_folded_entry_is_exactly_the_unfolded_path(train: bool, kw: dict) -> None:
    """Outputs and the running statistics bit for bit, and every parameter's gradient: in eval
    the batch norm's weight reaches the folded weight through one more permute, so its fp32
    gradient sums the same products in another order (a few ulps)."""
    model = _stem(**kw)
    x = torch.randn(3, kw.get("c_in", 3), 29, 31, generator=torch.Generator().manual_seed(5))
    ours, theirs = _run(model, x, True, train), _run(model, x, False, train)
    assert torch.equal(ours[0], theirs[0])
    for a, b in zip(ours[2], theirs[2]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * b.abs().max().item())
    for a, b in zip(ours[3], theirs[3]):
        assert torch.equal(a, b)


@needs_bf16
def test_folded_entry_is_close_to_float64() -> None:
    """Against the float64 model, as torch's own autocast is (the unfolded path is checked by
    test_bf16_optimize; this guards a folded weight that is wrong in both)."""
    model = _stem().eval()
    x = torch.randn(2, 3, 40, 36, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours = tdc.optimize(model)(x).double()
            theirs = model(x).double()
    scale = ref.abs().max()
    assert (ours - ref).abs().max() <= 2 * (theirs - ref).abs().max() + 2**-8 * scale


@needs_bf16
def test_input_gradient_takes_the_plain_entry() -> None:
    """The folded copy has no gradient: an input that needs one enters as before, and gets the
    unfolded path's gradient."""
    model = _stem()
    x = torch.randn(2, 3, 21, 23, generator=torch.Generator().manual_seed(3)).requires_grad_()
    ours, theirs = _run(model, x, True, True), _run(model, x, False, True)
    assert ours[1] is not None and torch.equal(ours[1], theirs[1])
    with torch.profiler.profile() as prof:
        _run(model, x, True, False)
    names = {e.key for e in prof.key_averages()}
    assert "directconv::to_blocked" in names and "directconv::to_blocked_folded" not in names


@needs_bf16
def test_the_folded_entry_writes_no_32_lane_rows_of_the_input() -> None:
    model = tdc.optimize(_stem()).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), torch.profiler.profile() as prof:
        model(x)
    names = {e.key for e in prof.key_averages()}
    assert "directconv::to_blocked_folded" in names and "directconv::to_blocked" not in names, names


@needs_bf16
def test_compile_matches_eager() -> None:
    model = tdc.optimize(_stem()).eval()
    x = torch.randn(2, 3, 30, 30)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)(x)
    assert torch.equal(eager, compiled)
