"""optimize(model): the model as a graph whose regions of supported ops run in the blocked layout.

See _graph.py for the rewrite and _steps.py for what each step of the new graph runs.
"""

from __future__ import annotations

import warnings

import torch
from torch import fx, nn
from torch.utils._pytree import tree_leaves

from . import _backend, _graph
from ._replay import Replayer
from .modules import _deepcopy, convert


class _Engine:
    """What an OptimizedModule runs, kept out of its registered attributes: the user's model
    (whose modules it shares), and the optimized graph module and plan for train and for eval
    mode (traced in that mode, so Python code that reads self.training is followed), and what
    runs each graph: its Replayer (_replay.py; with replay=False, the graph itself at every call)."""

    def __init__(
        self, root: nn.Module, graphs: dict[bool, fx.GraphModule], plans: dict[bool, _graph.Plan], replay: bool
    ) -> None:
        self.root = root
        self.graphs = graphs
        self.plans = plans
        # One replayer per graph module (one graph may serve both modes).
        made = {id(g): Replayer(root, g, replay) for g in graphs.values()}
        self.runners = {m: made[id(g)] for m, g in graphs.items()}


class OptimizedModule(nn.Module):
    """What optimize() returns: the user's model, with its parameters, buffers, submodules and
    state_dict keys (the very same objects), whose forward runs the optimized graph."""

    def __init__(self, root: nn.Module, engine: _Engine) -> None:
        super().__init__()
        # The same dicts as the model's: every parameter, buffer and submodule, under its names.
        self._parameters = root._parameters
        self._buffers = root._buffers
        self._non_persistent_buffers_set = root._non_persistent_buffers_set
        self._modules = root._modules
        self.training = root.training
        object.__setattr__(self, "_engine", engine)

    def train(self, mode: bool = True) -> OptimizedModule:
        super().train(mode)
        self._engine.root.training = mode  # the model's own flag: the fallback path runs its forward
        return self

    def forward(self, *args, **kwargs):
        engine = self._engine
        if blocked_path_reason(args, kwargs) is not None:
            return engine.root(*args, **kwargs)
        if kwargs:
            return engine.graphs[self.training].forward(*args, **kwargs)
        # The graph module's forward itself (it is internal: no hooks of the user's are on it,
        # and its __call__ would only add a traceback wrapper), or its replay.
        return engine.runners[self.training](args)

    def extra_repr(self) -> str:
        p = self._engine.plans[self.training]
        units = sum(1 for n in p.units if p.units[n][0] is not None)
        regions = len(set(p.regions.values()))
        return f"optimized: {regions} blocked region(s), {units} fused convolution(s); see torch_directconv.explain()"


def blocked_path_reason(args: tuple, kwargs: dict) -> str | None:
    """Why a call with these inputs runs the original model instead of the blocked graph, or None.

    The blocked graph runs float32 inputs in fp32, and in bf16 under CPU autocast to bfloat16
    or for bfloat16 inputs (a model moved with .to(torch.bfloat16)) where this CPU has the bf16
    kernels; other inputs (float16 autocast, other dtypes and devices) get exactly what the
    original model computes."""
    reason = _backend.no_jit_reason()
    if reason is not None:
        return reason
    bf16 = False
    if torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
        if dtype != torch.bfloat16:
            return f"CPU autocast to {dtype} is enabled (the blocked kernels take float32 and bfloat16)"
        bf16 = True
    # The usual call, tensors as positional arguments, without flattening a tree.
    leaves = args if not kwargs and all(type(a) is torch.Tensor for a in args) else tree_leaves((args, kwargs))
    for t in leaves:
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            if t.device.type != "cpu" or t.dtype not in (torch.float32, torch.bfloat16):
                return f"an input is {t.dtype} on {t.device.type} (the blocked kernels take float32 and bfloat16 on the CPU)"
            bf16 = bf16 or t.dtype == torch.bfloat16
    if bf16:
        why = _backend.bf16_fallback_reason(1)
        if why is not None:
            return f"the bf16 blocked kernels do not run here ({why})"
    return None


def _trace_both_modes(model: nn.Module) -> dict[bool, fx.Graph]:
    """The model's graph in its current mode, with every module's own flag as it is (a model in
    training with frozen batch norms), and in the other mode, after model.train(other)."""
    flags = [(m, m.training) for m in model.modules()]
    graphs = {model.training: _graph.trace(model)}
    try:
        model.train(not model.training)
        graphs[model.training] = _graph.trace(model)
    finally:
        for m, training in flags:
            m.training = training
    return graphs


def _build(model: nn.Module, replay: bool) -> OptimizedModule | str:
    """The optimized module (sharing model's modules), or why fx cannot trace the model."""
    try:
        graphs = _trace_both_modes(model)
    except Exception as e:  # fx raises many kinds (TraceError, TypeError, NotImplementedError, ...)
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return f"torch.fx cannot trace {type(model).__name__} ({type(e).__name__}: {first_line})"
    built = {True: _graph.build(model, graphs[True])}
    # Most models trace the same in both modes: then one graph serves both.
    same = str(graphs[True]) == str(graphs[False])
    built[False] = built[True] if same else _graph.build(model, graphs[False])
    engine = _Engine(model, {m: b[0] for m, b in built.items()}, {m: b[1] for m, b in built.items()}, replay)
    return OptimizedModule(model, engine)


def optimize(model: nn.Module, inplace: bool = False, replay: bool = True) -> nn.Module:
    """The model, traced with torch.fx, with its longest regions of supported ops run in the
    blocked layout: converted once at each region's entry and once at each exit, batch norm,
    residual add and ReLU fused with the convolutions.

    The result computes what model computes, in train and in eval mode, with the same
    parameters, buffers, state_dict keys and train()/eval() behaviour. With inplace=False the
    model is deep-copied first; with inplace=True the result shares the model's parameters and
    buffers (an optimizer made before still updates them). A model fx cannot trace falls back to
    convert(model) with a warning that says why. torch_directconv.explain() shows what runs how.

    With replay=True, a call without gradients that repeats the one before it (same input
    shapes, dtypes, modes and model) is recorded as the ops it runs, and the calls after it run
    that record from C++ while all of that stays the same (see _replay.py); replay=False runs
    the graph's Python at every call.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize: expected an nn.Module, got {type(model).__name__}")
    if isinstance(model, OptimizedModule):
        return model if inplace else _deepcopy(model)
    if not inplace:
        model = _deepcopy(model)
    built = _build(model, replay)
    if isinstance(built, str):
        warnings.warn(f"optimize: {built}; falling back to convert(model)", UserWarning, stacklevel=2)
        return convert(model, inplace=True)
    return built
