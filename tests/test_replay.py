"""optimize()'s replay (_replay.py): a call without gradients that repeats the one before it is
recorded as the ops it ran, and later calls run the record from C++ while nothing it depended
on has changed. A replayed call must equal the graph's own, bit for bit, and any change the
graph would follow (weights, attributes, modes, hooks, inputs) must drop the record.

`_replays(opt, x)` tells whether a call replayed: the graph's steps count their calls, and a
replayed call runs none of them.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from test_optimize import ResNet18ish, Unsupported, _init_bn
from torch import nn

import torch_directconv as tdc
from torch_directconv import _replay, _steps

pytestmark = [
    pytest.mark.skipif(tdc.isa() == "none", reason="no JIT kernels here"),
    pytest.mark.filterwarnings("ignore:torch_directconv. grouped convolutions:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:torch_directconv. bf16 grouped:RuntimeWarning"),
]

BF16 = tdc.isa() in ("amx", "avx512_bf16")


class _Counted:
    """Counts the calls of every step of an optimized model's graphs."""

    def __init__(self, opt: nn.Module) -> None:
        self.calls = 0
        steps = {id(s): s for gm in opt._engine.graphs.values() for s in gm.modules() if isinstance(s, _steps.Step)}
        for step in steps.values():
            step.register_forward_pre_hook(self._count)

    def _count(self, *_) -> None:
        self.calls += 1


def _call(opt, x, bf16: bool):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return opt(x)


def _replays(opt, counted: _Counted, x, bf16: bool = False) -> tuple[bool, torch.Tensor]:
    before = counted.calls
    out = _call(opt, x, bf16)
    return counted.calls == before, out


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _init_bn(ResNet18ish()).eval()


MODES = [False] + ([True] if BF16 else [])


@pytest.mark.parametrize("bf16", MODES, ids=lambda b: "bf16" if b else "fp32")
def test_replay_equals_the_graph(bf16: bool) -> None:
    model = _model()
    x = torch.randn(2, 3, 32, 32)
    graph, opt = tdc.optimize(model, replay=False), tdc.optimize(model)
    counted = _Counted(opt)
    want = _call(graph, x, bf16)
    first, out1 = _replays(opt, counted, x, bf16)  # runs the graph
    second, out2 = _replays(opt, counted, x, bf16)  # the same again: recorded
    third, out3 = _replays(opt, counted, x, bf16)
    assert (first, second, third) == (False, False, True)
    for out in (out1, out2, out3):
        assert torch.equal(out, want)
    # A new input of the same signature: the replay computes it, not the recorded output.
    x2 = torch.randn(2, 3, 32, 32)
    replayed, out = _replays(opt, counted, x2, bf16)
    assert replayed and torch.equal(out, _call(graph, x2, bf16))


def test_replay_false_runs_the_graph() -> None:
    opt = tdc.optimize(_model(), replay=False)
    counted = _Counted(opt)
    x = torch.randn(2, 3, 32, 32)
    assert not any(_replays(opt, counted, x)[0] for _ in range(4))


def _recorded(opt, counted, x, bf16: bool = False) -> None:
    for _ in range(2):
        _call(opt, x, bf16)
    assert _replays(opt, counted, x, bf16)[0]


def _changes():
    """(name, change(opt)): every change the graph follows, which the replay must see."""

    def scale_weight(opt):
        with torch.no_grad():
            opt.layer1[0].conv1.weight.mul_(2)

    def new_parameter(opt):
        opt.layer2[1].bn2.weight = nn.Parameter(opt.layer2[1].bn2.weight.detach() * 3)

    def set_data(opt):
        opt.fc.weight.data = opt.fc.weight.detach() + 1

    def running_var(opt):
        opt.bn1.running_var.add_(5)

    def eps(opt):
        opt.layer1[1].bn1.eps = 0.5

    def stride(opt):
        opt.layer2[0].downsample[0].stride = (1, 1)
        opt.layer2[0].conv1.stride = (1, 1)

    def bn_train(opt):
        opt.layer1[0].bn2.train()

    def fc_hook(opt):
        opt.fc.register_forward_hook(lambda m, i, o: o * 0)

    return [
        ("weight in place", scale_weight),
        ("new Parameter", new_parameter),
        ("param.data =", set_data),
        ("running_var in place", running_var),
        ("bn.eps", eps),
        ("conv.stride", stride),
        ("one bn in train mode", bn_train),
        ("hook on fc", fc_hook),
    ]


@pytest.mark.parametrize("name,change", _changes(), ids=[c[0] for c in _changes()])
def test_changes_drop_the_record(name: str, change) -> None:
    model = _model()
    x = torch.randn(2, 3, 32, 32)
    opt = tdc.optimize(model)
    counted = _Counted(opt)
    _recorded(opt, counted, x)
    change(opt)
    change(model)
    ref = tdc.optimize(model, replay=False)
    replayed, out = _replays(opt, counted, x)
    assert not replayed, name
    assert torch.equal(out, _call(ref, x, False)), name
    # Then it records again and replays the new state.
    for _ in range(2):
        out = _call(opt, x, False)
    assert torch.equal(out, _call(ref, x, False)), name


def test_global_hook_drops_the_record() -> None:
    opt = tdc.optimize(_model())
    counted = _Counted(opt)
    x = torch.randn(2, 3, 32, 32)
    _recorded(opt, counted, x)
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    try:
        assert not _replays(opt, counted, x)[0]
    finally:
        handle.remove()


def test_state_and_input_changes_run_the_graph() -> None:
    model = _model()
    graph = tdc.optimize(model, replay=False)
    opt = tdc.optimize(model)
    counted = _Counted(opt)
    x = torch.randn(2, 3, 32, 32)
    _recorded(opt, counted, x)
    cases = {
        "another shape": (torch.randn(1, 3, 32, 32), {}),
        "a non-contiguous input": (torch.randn(2, 3, 32, 64)[..., ::2], {}),
        "channels_last": (x.contiguous(memory_format=torch.channels_last), {}),
    }
    for what, (xi, _) in cases.items():
        replayed, out = _replays(opt, counted, xi)
        assert not replayed, what
        assert torch.equal(out, _call(graph, xi, False)), what
        _recorded(opt, counted, x)  # back to the recorded signature: recorded again
    # Gradients enabled: the graph runs, and records the autograd graph.
    out = opt(x.requires_grad_())
    assert out.grad_fn is not None
    x.requires_grad_(False)
    # Inference mode is part of the state.
    _recorded(opt, counted, x)
    with torch.inference_mode():
        before = counted.calls
        out = opt(x)
        assert counted.calls > before and out.is_inference()
        opt(x)  # recorded in inference mode
        before = counted.calls
        replayed = opt(x)
        assert counted.calls == before and replayed.is_inference() and torch.equal(replayed, out)
    # Under a dispatch mode (which must see the ops) and torch.func, the graph runs.
    _recorded(opt, counted, x)
    with tdc.op_times():  # not a mode: replayed calls are timed too
        assert _replays(opt, counted, x)[0]


def test_bf16_and_fp32_records_do_not_mix() -> None:
    if not BF16:
        pytest.skip("no bf16 kernels here")
    model = _model()
    graph = tdc.optimize(model, replay=False)
    opt = tdc.optimize(model)
    counted = _Counted(opt)
    x = torch.randn(2, 3, 32, 32)
    _recorded(opt, counted, x, bf16=True)
    replayed, out = _replays(opt, counted, x, bf16=False)
    assert not replayed and out.dtype == torch.float32 and torch.equal(out, _call(graph, x, False))


def test_training_mode_is_not_recorded() -> None:
    """In train mode without gradients the batch norms take the batch's statistics (an op of two
    results) and update their running ones (a mutation): nothing is recorded, and the
    statistics move at every call as the graph's."""
    model = _model().train()
    ref = copy.deepcopy(model)
    opt, graph = tdc.optimize(model, inplace=True), tdc.optimize(ref, inplace=True)
    counted = _Counted(opt)
    x = torch.randn(2, 3, 32, 32)
    for _ in range(4):
        replayed, out = _replays(opt, counted, x)
        assert not replayed
        assert torch.equal(out, _call(graph, x, False))
    assert opt._engine.runners[True].last_refusal is not None
    assert torch.equal(model.bn1.running_mean, ref.bn1.running_mean)
    assert model.bn1.num_batches_tracked.item() == 4
    # After eval(), the same graph module records the eval calls.
    opt.eval()
    _recorded(opt, counted, x)


class _Cat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(3, 16, 1)
        self.c = nn.Conv2d(32, 8, 3, padding=1)

    def forward(self, x):
        return self.c(torch.cat([F.relu(self.a(x)), self.b(x)], 1))


@pytest.mark.parametrize(
    "factory",
    [_Cat, lambda: _init_bn(Unsupported())],
    ids=["cat of values of the call", "fallbacks and writes into values of the call"],
)
def test_other_graphs_are_replayed(factory) -> None:
    """torch.cat of values of the call (a list argument, set at each run); the unsupported
    layers' fallbacks, exits and entries, torch's ops between regions, and ops writing into
    tensors the call made (copy_ into a new tensor)."""
    torch.manual_seed(0)
    model = factory().eval()
    graph, opt = tdc.optimize(model, replay=False), tdc.optimize(model)
    counted = _Counted(opt)
    x = torch.randn(2, 3, 10, 10)
    _recorded(opt, counted, x)
    x2 = torch.randn(2, 3, 10, 10)
    replayed, out = _replays(opt, counted, x2)
    assert replayed and torch.equal(out, _call(graph, x2, False))


class _WritesInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x):
        x.mul_(0.5)
        return self.conv2(F.relu(self.conv(x)))


def test_a_graph_writing_into_its_input_is_not_replayed() -> None:
    """Writing into an input (or a constant) is refused: every call runs the graph, which
    writes it again, and the refusal says why."""
    model = _WritesInput().eval()
    graph, opt = tdc.optimize(model, replay=False), tdc.optimize(model)
    counted = _Counted(opt)
    x = torch.randn(2, 3, 10, 10)
    xs = [x.clone(), x.clone()]
    for _ in range(3):
        replayed, out = _replays(opt, counted, xs[0])
        assert not replayed and torch.equal(out, _call(graph, xs[1], False))
    assert torch.equal(xs[0], x * 0.125)
    assert "mutates a tensor that the call did not make" in opt._engine.runners[False].last_refusal


class _Leaf(nn.Module):
    """A module fx does not trace into: it may run any Python."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x * self.calls


class _WithLeaf(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.leaf = _Leaf()

    def forward(self, x):
        return self.leaf(self.conv2(F.relu(self.conv(x))))


def test_a_models_own_leaf_module_is_not_replayed(monkeypatch) -> None:
    from torch_directconv import _graph

    real = _graph._leaf_module
    monkeypatch.setattr(_graph, "_leaf_module", lambda m, q, d: isinstance(m, _Leaf) or real(m, q, d))
    model = _WithLeaf().eval()
    opt = tdc.optimize(model)
    assert "leaf" in opt._engine.runners[False].why_not
    x = torch.randn(1, 3, 8, 8)
    outs = [_call(opt, x, False) for _ in range(3)]
    assert model.leaf.calls == 0 and opt.leaf.calls == 3
    assert torch.equal(outs[2], outs[0] * 3)


def test_recorder_refuses_what_it_cannot_replay() -> None:
    x = torch.randn(4)
    const = torch.randn(4)
    cases = {
        "mutates": lambda: x.add_(const),
        "random": lambda: x + torch.rand(4),
        "into Python": lambda: x * (x.sum() > 0).item(),
    }
    for what, fn in cases.items():
        rec = _replay._Recorder([x])
        with rec:
            fn()
        assert rec.refused is not None and what in rec.refused.replace(".item()", "into Python"), (what, rec.refused)
    for what, fn in {
        "a constant": lambda: const.add_(x),
        "a view of an input": lambda: x[1:].mul(2) + x[:3].relu_(),
    }.items():
        rec = _replay._Recorder([x])
        with rec:
            fn()
        assert rec.refused is not None and "mutates" in rec.refused, what
    # Ops on constants alone are constants of the program, not recorded; in-place ops on values
    # the call made are.
    rec = _replay._Recorder([x])
    with rec:
        ((const * 2 + 1) * x).relu_()[1:].mul_(2)
    assert rec.refused is None and [i[0] for i in rec.instrs] == [
        "aten::mul",
        "aten::relu_",
        "aten::slice",
        "aten::mul_",
    ]


def test_copies_and_pickles_record_their_own() -> None:
    model = _model()
    x = torch.randn(2, 3, 32, 32)
    opt = tdc.optimize(model)
    counted = _Counted(opt)
    _recorded(opt, counted, x)
    for copy_of in (copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))):
        other = copy_of(opt)
        assert not other._engine.runners[False].records
        with torch.no_grad():
            other.fc.weight.mul_(-1)
        other_counted = _Counted(other)
        outs = [_replays(other, other_counted, x) for _ in range(3)]
        assert [r for r, _ in outs] == [False, False, True]
        assert torch.equal(outs[2][1], outs[0][1])
        assert not torch.equal(outs[2][1], _call(opt, x, False))
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)  # the state dict is the model's, record or not


def test_program_checks_its_instructions() -> None:
    C = tdc._backend._C
    with pytest.raises(RuntimeError, match="out of range"):
        C.Program([("aten::relu", "", [None], [(0, -1, 5)], 1, [])], 1, 2, [1])
    with pytest.raises(RuntimeError, match="does not return one tensor"):
        C.Program([("aten::split", "Tensor", [None, 1, 0], [(0, -1, 0)], 1, [])], 1, 2, [1])
    with pytest.raises(RuntimeError, match="expected 1 inputs"):
        C.Program([], 1, 1, [0]).run([])
    prog = C.Program([("aten::relu", "", [None], [(0, -1, 0)], 1, [0])], 1, 2, [1])
    x = torch.randn(5)
    assert torch.equal(prog.run([x])[0], torch.relu(x))


def test_weights_that_change_at_every_call_are_rarely_recorded(monkeypatch) -> None:
    """A loop that updates a weight before every no-grad call (an eval after each step) drops
    every record unreplayed: the patience doubles, so recordings become rare, and the outputs
    follow the weights."""
    model = _model()
    opt = tdc.optimize(model, inplace=True)
    runner = opt._engine.runners[False]
    recordings = []
    real = runner._record_call
    monkeypatch.setattr(runner, "_record_call", lambda *a: recordings.append(1) or real(*a))
    x = torch.randn(2, 3, 32, 32)
    for i in range(40):
        with torch.no_grad():
            opt.fc.bias.add_(1.0)
        out = _call(opt, x, False)
        ref = tdc.optimize(model, replay=False)
        assert torch.equal(out, _call(ref, x, False)), i
    assert 3 <= len(recordings) <= 6, len(recordings)
    # Once calls repeat again, a record is replayed and the patience is back to 1.
    for _ in range(70):
        _call(opt, x, False)
    (record,) = runner.records.values()
    assert record.replays > 0 and runner._patience == 1


def test_explain_says_whether_calls_are_replayed() -> None:
    model = _model()
    x = torch.randn(2, 3, 32, 32)
    eval_text = tdc.explain(model, x, runs=1, file=io.StringIO())
    assert "replay: calls without gradients that repeat the one before run as a record of" in eval_text
    train_text = tdc.explain(copy.deepcopy(model).train(), x, runs=1, file=io.StringIO())
    assert "replay: calls without gradients run the steps above (" in train_text
    assert "returns several results" in train_text
    off = tdc.explain(tdc.optimize(model, replay=False), x, runs=1, file=io.StringIO())
    assert "run the steps above (replay=False)" in off


def test_replays_from_several_threads() -> None:
    """The record runs without the GIL: threads replaying it at once each get their own result."""
    import threading

    model = _model()
    graph, opt = tdc.optimize(model, replay=False), tdc.optimize(model)
    counted = _Counted(opt)
    x = torch.randn(2, 3, 32, 32)
    _recorded(opt, counted, x)
    inputs = [torch.randn(2, 3, 32, 32) for _ in range(4)]
    wants = [_call(graph, xi, False) for xi in inputs]
    errors: list = []

    def work(i: int) -> None:
        try:
            for _ in range(5):
                if not torch.equal(_call(opt, inputs[i], False), wants[i]):
                    errors.append(i)
        except Exception as e:  # reported below
            errors.append(e)

    before = counted.calls
    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert counted.calls == before  # every call replayed


def test_records_per_signature(monkeypatch) -> None:
    """A loop whose last batch is smaller, then the full batch again: each signature keeps its
    record (one recording each), while the model does not change; a change drops them all, and
    a change of state (autocast) keeps only that state's."""
    model = _model()
    graph, opt = tdc.optimize(model, replay=False), tdc.optimize(model)
    runner = opt._engine.runners[False]
    recordings = []
    real = runner._record_call
    monkeypatch.setattr(runner, "_record_call", lambda *a: recordings.append(1) or real(*a))
    counted = _Counted(opt)
    sizes = [4, 4, 4, 1, 1] * 4
    for i, n in enumerate(sizes):
        x = torch.randn(n, 3, 16, 16)
        replayed, out = _replays(opt, counted, x)
        assert torch.equal(out, _call(graph, x, False)), i
    assert len(recordings) == 2 and len(runner.records) == 2
    monkeypatch.setattr(_replay, "MAX_RECORDS", 3)
    for n in (2, 3, 5):
        for _ in range(2):
            _call(opt, torch.randn(n, 3, 16, 16), False)
    assert len(runner.records) == 3  # the oldest went first
    assert all(sig[0][0][0] in (2, 3, 5) for sig, _ in runner.records)
    with torch.no_grad():
        opt.fc.bias.add_(1)
    assert not _replays(opt, counted, torch.randn(5, 3, 16, 16))[0]
    assert not runner.records
    if BF16:
        # (The dropped record was never replayed: two calls in a row now before a recording. The
        # bf16 record drops the fp32 one.)
        for n, bf16 in ((2, False), (2, True), (3, True)):
            for _ in range(3):
                _call(opt, torch.randn(n, 3, 16, 16), bf16)
        assert len(runner.records) == 2 and {r.state[0] for r in runner.records.values()} == {True}
