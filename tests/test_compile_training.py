"""torch.compile of a converted CNN's training step, with the batch size changing between steps.

With dynamic=True (or the batch dimension marked dynamic) the forward and the backward graph
are traced once, the directconv ops and their fake kernels taking a symbolic batch, and every
later batch size reuses them. A counting backend counts the graphs dynamo hands over and the
forward and backward graphs AOTAutograd compiles; the same harness without dynamic shapes
must count a recompilation per batch size, so the counting is known to see recompiles.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.testing import CompileCounter
from torch._dynamo.utils import counters
from torch._functorch.aot_autograd import make_boxed_func

import torch_directconv as tdc
from helpers import check_expected_isa

BATCHES = (4, 6, 3, 9)  # no 0 or 1: torch.compile specializes those


@pytest.fixture(autouse=True)
def isa() -> str:
    return check_expected_isa()


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


class SmallCNN(nn.Module):
    """Every layer on the JIT: a stem, strided 3x3 and 1x1 layers, whole-block groups, depthwise with reflect."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 1, stride=2, bias=False),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1, groups=2),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1, groups=32, padding_mode="reflect"),
        )
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


class CountingBackend:
    """A torch.compile backend that counts dynamo's graphs (as CompileCounter does) and AOTAutograd's
    forward and backward graphs, and runs them as traced."""

    def __init__(self) -> None:
        self.frames = 0
        self.forward_graphs: list[torch.fx.GraphModule] = []
        self.backward_graphs: list[torch.fx.GraphModule] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.frames += 1

        def fw_compiler(g, _):
            self.forward_graphs.append(g)
            return make_boxed_func(g.forward)

        def bw_compiler(g, _):
            self.backward_graphs.append(g)
            return make_boxed_func(g.forward)

        return aot_autograd(fw_compiler=fw_compiler, bw_compiler=bw_compiler)(gm, example_inputs)

    def counts(self) -> tuple[int, int, int]:
        return self.frames, len(self.forward_graphs), len(self.backward_graphs)


def targets(g: torch.fx.GraphModule) -> set[str]:
    return {str(n.target) for n in g.graph.nodes if n.op == "call_function"}


def training_steps(
    model: nn.Module, compiled, batches=BATCHES, mark_dynamic: bool = False, channels_last: bool = False
) -> None:
    """One forward and backward per batch size through `compiled`, checked against `model` run eagerly."""
    params = list(model.parameters())
    for step, n in enumerate(batches):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(n, 3, 12, 11, generator=g), torch.randint(0, 5, (n,), generator=g)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if mark_dynamic:
            torch._dynamo.mark_dynamic(x, 0)
        loss = F.cross_entropy(compiled(x), y)
        grads = torch.autograd.grad(loss, params)
        ref_loss = F.cross_entropy(model(x), y)
        ref_grads = torch.autograd.grad(ref_loss, params)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"batch {n}: loss: {m}")
        for (name, _), a, b in zip(model.named_parameters(), grads, ref_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, n=n, p=name: f"batch {n}: {p}: {m}")


def converted_model(seed: int) -> nn.Module:
    """A converted SmallCNN that has run once eagerly.

    The eager call fills DirectConv2d's geometry cache, so the compiled graphs do not depend on
    whether it is filled yet; test_repeated_calls_compile_once checks that case on its own.
    """
    torch.manual_seed(seed)
    model = tdc.convert(SmallCNN())
    with torch.no_grad():
        model(torch.randn(2, 3, 12, 11))
    return model


@pytest.mark.parametrize(
    "how,expected",
    [("dynamic=True", (1, 1, 1)), ("mark_dynamic", (1, 1, 1)), ("automatic", (2, 2, 2))],
)
def test_batch_size_change_does_not_recompile(how: str, expected: tuple[int, int, int]) -> None:
    """Training steps at four batch sizes: one graph pair with dynamic=True or a batch marked dynamic;
    by default (automatic dynamic shapes) one recompile at the first change, then none."""
    model = converted_model(0)
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=True if how == "dynamic=True" else None)
    before = tdc.jit_stats()["fallbacks"]
    training_steps(model, compiled, mark_dynamic=how == "mark_dynamic")
    assert tdc.jit_stats()["fallbacks"] == before, "a layer fell back to torch's convolution"
    assert backend.counts() == expected, f"(dynamo graphs, forward graphs, backward graphs) = {backend.counts()}"
    # The last graph pair really is the training step on the directconv ops, with a symbolic batch.
    fw, bw = targets(backend.forward_graphs[-1]), targets(backend.backward_graphs[-1])
    assert "directconv.conv2d.default" in fw, sorted(fw)
    assert {"directconv.conv2d_backward_data.default", "directconv.conv2d_backward_weight.default"} <= bw, sorted(bw)
    inputs = [n.meta["val"] for n in backend.forward_graphs[-1].graph.nodes if n.op == "placeholder"]
    images = [v for v in inputs if isinstance(v, torch.Tensor) and v.dim() == 4 and v.shape[1:] == (3, 12, 11)]
    assert len(images) == 1 and isinstance(images[0].shape[0], torch.SymInt), f"no symbolic batch: {images}"


def test_counting_sees_recompiles() -> None:
    """The control: with dynamic=False every batch size compiles anew, and the counting backend sees
    it, so test_batch_size_change_does_not_recompile can fail."""
    model = converted_model(0)
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
    training_steps(model, compiled)
    assert backend.counts() == (len(BATCHES),) * 3, backend.counts()


def test_repeated_calls_compile_once() -> None:
    """A converted model compiled before any eager call: calls with the same input compile once."""
    torch.manual_seed(2)
    model = tdc.convert(SmallCNN())
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x = torch.randn(2, 3, 12, 11)
    for _ in range(3):
        compiled(x).sum().backward()
    assert counter.frame_count == 1, f"{counter.frame_count} compilations for three identical calls"


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_inductor_training_step_with_dynamic_batch_matches_eager(channels_last: bool) -> None:
    """The default backend (inductor), dynamic=True: losses and gradients as eager, one graph for every batch.

    Inductor checks the strides of every op's output against its fake kernel's, so the
    channels_last model also checks that the backward ops' fake kernels give the real layouts.
    Inductor's on-disk caches are off: an entry compiled by an earlier build of the extension
    (whose op schemas may have differed) would bring back that build's guards.
    """
    model = converted_model(1)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        training_steps(model, compiled, batches=BATCHES[:3], channels_last=channels_last)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
