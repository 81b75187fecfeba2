"""explain(model, example_input): what an optimized model runs, layer by layer, and where its time goes."""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
from collections import defaultdict

import torch
from torch import fx, nn

from . import _backend, _steps
from ._replay import Replayer, _global_state, _signature
from .functional import _pair, conv_padding
from .optimize import OptimizedModule, _build, blocked_path_reason


class _TimedRun(fx.Interpreter):
    """Runs the graph node by node, timing each with perf_counter and noting each step's input shape."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.times: dict = defaultdict(list)
        self.input_shapes: dict = {}
        self.input_dtypes: dict = {}
        self.output_dtypes: dict = {}

    def run_node(self, n: fx.Node):
        t0 = time.perf_counter()
        out = super().run_node(n)
        self.times[n].append(time.perf_counter() - t0)
        return out

    def call_module(self, target, args, kwargs):
        if args and isinstance(args[0], torch.Tensor):
            self.input_shapes[target] = tuple(args[0].shape)
            self.input_dtypes[target] = args[0].dtype
        out = super().call_module(target, args, kwargs)
        if isinstance(out, torch.Tensor):
            self.output_dtypes[target] = out.dtype
        return out


def _problem(conv: nn.Conv2d, xb_shape: tuple) -> str:
    """The benchdnn-style problem string of a blocked convolution's call, as its kernels see it."""
    n, _, h, w, _ = xb_shape
    stride, dilation = _pair(conv.stride, "stride"), _pair(conv.dilation, "dilation")
    if conv.padding_mode != "zeros":
        left, right, top, bottom = conv._reversed_padding_repeated_twice
        h, w, pad = h + top + bottom, w + left + right, (0, 0, 0, 0)
    else:
        pad = conv_padding(conv.padding, conv.kernel_size, stride, dilation)
    r, s = conv.kernel_size
    return (
        f"mb{n}ic{conv.in_channels}ih{h}iw{w}oc{conv.out_channels}kh{r}kw{s}sh{stride[0]}sw{stride[1]}"
        f"ph{pad[0]}pb{pad[1]}pw{pad[2]}pr{pad[3]}dh{dilation[0] - 1}dw{dilation[1] - 1}"
    )


def _unit_what(step: _steps.Unit) -> str:
    """How a unit runs in its modules' current modes."""
    conv, bn = step._parts
    if bn is not None and (bn.training or bn.running_mean is None):
        stats = "conv with the batch statistics in its epilogue" if conv is not None else "batch statistics"
        tail = (" + residual" if step.residual else "") + (" + ReLU" if step.relu else "")
        return stats + ", then one pass: BN" + tail
    parts = []
    if conv is not None:
        parts.append("conv" + (" with BN folded into its weights and bias" if bn is not None else ""))
        fused = [p for p, on in (("+ residual", step.residual), ("ReLU", step.relu)) if on]
        if fused:
            parts[-1] += ", " + " + ".join(fused) + " in its epilogue"
    else:
        parts.append("one pass: " + ("BN" if bn is not None else "") + (" + residual" if step.residual else ""))
        parts[-1] += " + ReLU" if step.relu else ""
    return "; ".join(parts)


def _row(gm: fx.GraphModule, n: fx.Node, run: _TimedRun) -> tuple[str, str, str]:
    """(layout, layers, what) of one node of the optimized graph."""
    meta = n.meta.get("dc", {})
    kind = meta.get("kind", "nchw")
    if n.op == "call_module" and isinstance(gm.get_submodule(n.target), _steps.Step):
        step = gm.get_submodule(n.target)
        layers = " + ".join(step.layers)
        if isinstance(step, _steps.Unit):
            what = _unit_what(step)
            conv = step._parts[0]
            if isinstance(step, _steps.EnterUnit):
                bf16 = run.output_dtypes.get(n.target) == torch.bfloat16
                entry = (
                    "the folded entry (to_blocked_folded: NCHW in one pass, unless a gradient must reach the input)"
                    if bf16
                    else step.entry.what
                )
                what = f"{entry}, then {what}"
            if conv is not None and n.target in run.input_shapes:
                shape = run.input_shapes[n.target]
                if len(shape) == 4:  # an EnterUnit's NCHW input
                    shape = (shape[0], None, shape[2], shape[3], None)
                problem = _problem(conv, shape)
                if run.input_dtypes[n.target] == torch.bfloat16 or run.output_dtypes.get(n.target) == torch.bfloat16:
                    plan = _backend._C.bf16_fwd_plan(problem, torch.get_num_threads())
                else:
                    plan = _backend._C.fwd_plan(problem, torch.get_num_threads())
                what += f"\n{'':>28}kernels: {plan}"
            return "BLOCKED", layers, what
        label = {"enter": "ENTER", "exit": "EXIT", "meta": "blocked", "nchw": "NCHW"}.get(kind, "BLOCKED")
        what = step.what + (f" ({meta['why']})" if meta.get("why") else "")
        shape = run.input_shapes.get(n.target, ())
        if isinstance(step, _steps.DropInConv) and run.input_dtypes.get(n.target) == torch.bfloat16 and len(shape) == 4:
            # The drop-in path's bf16 plan (or why torch's convolution runs it).
            conv = step._conv[0]
            why = _backend.bf16_fallback_reason(conv.groups)
            plan = why or _backend._C.bf16_fwd_plan(
                _problem(conv, (shape[0], None, shape[2], shape[3], None)), torch.get_num_threads()
            )
            what += f"\n{'':>28}kernels: {plan}"
        return label, layers, what
    layers = " + ".join(meta.get("layers", [n.name]))
    if kind == "blocked":
        return "BLOCKED", layers, meta.get("what", "")
    return "NCHW", layers, meta.get("why", "")


def explain(model: nn.Module, example_input, *, runs: int = 3, file=None) -> str:
    """Prints, and returns, what optimize(model) runs for example_input, layer by layer: what runs
    blocked and what is fused, where the layout conversions are and why each exit exists, the
    convolutions' problems and kernel plans, and each step's share of the forward time (the
    median of `runs` timed runs after a warm-up, in the model's current train/eval mode).

    model may be an optimize()d module or any model (optimized here, on a copy). Batch-norm
    statistics updated by the runs are restored afterwards.
    """
    file = file if file is not None else sys.stdout
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    lines: list[str] = []
    opt = model if isinstance(model, OptimizedModule) else _build(_copy(model), True)
    if isinstance(opt, str):
        lines.append(f"{type(model).__name__}: not optimized, optimize() falls back to convert(): {opt}")
        return _emit(lines, file)
    reason = blocked_path_reason(inputs, {})
    if reason is not None:
        lines.append(f"{type(model).__name__}: this input runs the original model, not the blocked graph: {reason}")
        lines.extend(_dropin_choices(model, inputs))
        return _emit(lines, file)
    gm = opt._engine.graphs[opt.training]
    run = _TimedRun(gm)
    saved = [(b, b.detach().clone()) for b in opt.buffers()]
    grad = contextlib.nullcontext() if opt.training else torch.no_grad()
    try:
        with grad:
            for _ in range(1 + runs):
                run.run(*inputs)
        replay = _replay_line(opt, gm, inputs)
    finally:
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output", "get_attr")]
    med = {n: statistics.median(run.times[n][1:]) for n in nodes}
    total = sum(med.values()) or 1.0
    mode = "train" if opt.training else "eval"
    bf16 = any(dt == torch.bfloat16 for dt in run.input_dtypes.values())
    kernels = "bf16 activations (rows of 32 channels)" if bf16 else f"fp32 kernels {_backend._C.fp32_isa()}"
    lines.append(
        f"{type(opt._engine.root).__name__}, {mode} mode, input {', '.join(str(tuple(x.shape)) for x in inputs)}, "
        f"{torch.get_num_threads()} thread(s), {kernels} (level {_backend.isa()}): "
        f"forward {1e3 * total:.2f} ms "
        f"(sum of the steps' medians over {runs} run(s))"
    )
    lines.append(
        "BLOCKED: runs in the blocked layout; ENTER / EXIT: a layout conversion (to / from blocked); "
        "NCHW: runs as in the original model, with why"
    )
    lines.append(f"{'#':>4} {'layout':<8} {'ms':>7} {'%':>5}  layers: what")
    shares: dict = defaultdict(float)
    exits, outside = [], []
    for i, n in enumerate(nodes):
        layout, layers, what = _row(gm, n, run)
        step = gm.get_submodule(n.target) if n.op == "call_module" else None
        if layout in ("ENTER", "EXIT"):
            category = "layout conversions"
        elif layout == "NCHW":
            category = "ops outside the blocked regions"
            outside.append(f"#{i} {layers} {100 * med[n] / total:.1f}%")
        elif isinstance(step, _steps.Unit) and step._parts[0] is not None:
            category = "convolutions (with what is fused into them)"
        else:
            category = "other blocked ops"
        shares[category] += med[n]
        if layout == "EXIT":
            exits.append(f"  #{i} {layers}: {what}")
        lines.append(f"{i:>4} {layout:<8} {1e3 * med[n]:7.3f} {100 * med[n] / total:5.1f}  {layers}: {what}")
    p = opt._engine.plans[opt.training]
    entries = sum(1 for n in nodes if n.meta.get("dc", {}).get("kind") == "enter" or n.meta.get("dc", {}).get("enters"))
    lines.append("")
    regions = len(set(p.regions.values()))
    lines.append(f"{regions} blocked region(s); {entries} conversion(s) to blocked, {len(exits)} from blocked")
    lines.append(
        "time: " + ", ".join(f"{k} {100 * v / total:.1f}%" for k, v in sorted(shares.items(), key=lambda kv: -kv[1]))
    )
    lines.append("exits (each converts a value once, whatever the number of its readers):")
    lines.extend(exits or ["  none"])
    lines.append("outside the blocked regions: " + (", ".join(outside) or "nothing"))
    slow = sorted(range(len(nodes)), key=lambda i: -med[nodes[i]])[:5]
    names = {i: _row(gm, nodes[i], run)[1] for i in slow}
    lines.append("slowest steps: " + ", ".join(f"#{i} {names[i]} {100 * med[nodes[i]] / total:.1f}%" for i in slow))
    lines.append(replay)
    return _emit(lines, file)


def _replay_line(opt: OptimizedModule, gm, inputs: tuple) -> str:
    """Whether calls like this one without gradients are replayed (_replay.py), from a recording
    of one such call by a replayer of its own (the model's is left as it is)."""
    runner = Replayer(opt._engine.root, gm, opt._engine.runners[opt.training].enabled)
    sig, state = _signature(inputs), _global_state()
    if runner.why_not is None and sig is not None:
        with torch.no_grad():
            runner._record_call(inputs, sig, state)
    if runner.why_not is not None:
        why = runner.why_not
    elif sig is None:
        why = "an input is not a plain tensor"
    elif (sig, state) not in runner.records:
        why = runner.last_refusal
    else:
        return (
            f"replay: calls without gradients that repeat the one before run as a record of "
            f"{len(runner.records[sig, state].program)} ops from C++, not the steps above "
            "(optimize(replay=False) to time those)"
        )
    return f"replay: calls without gradients run the steps above ({why})"


def _dropin_choices(model: nn.Module, inputs: tuple) -> list[str]:
    """For an input that runs the original model (bf16, CPU autocast): what convert(model) runs
    each convolution on, with the fallback reason, from one forward under hooks (batch-norm
    statistics restored)."""
    from .functional import fallback_reason, op_dtype

    lines = ["what convert(model) runs each convolution on for this input (the drop-in path):"]

    def record(name: str):
        def hook(conv: nn.Conv2d, args: tuple) -> None:
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor) or x.dim() not in (3, 4):
                lines.append(f"  {name}: torch's convolution (its input is not a 3-D or 4-D tensor)")
                return
            why = fallback_reason(x, conv.weight, conv.bias, conv.groups)
            if why:
                lines.append(f"  {name}: torch's convolution: {why}")
            elif op_dtype(conv.weight) != torch.bfloat16:
                lines.append(f"  {name}: the fp32 kernels ({_backend._C.fp32_isa()})")
            else:
                n, _, h, w = x.shape if x.dim() == 4 else (1, *x.shape)
                try:
                    plan = _backend._C.bf16_fwd_plan(_problem(conv, (n, None, h, w, None)), torch.get_num_threads())
                except ValueError as e:
                    plan = f"no plan ({e}): torch's convolution"
                lines.append(f"  {name}: {plan}")

        return hook

    convs = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    handles = [m.register_forward_pre_hook(record(name)) for name, m in convs]
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)
    return lines if convs else []


def _copy(model: nn.Module) -> nn.Module:
    from .modules import _deepcopy

    return _deepcopy(model)


def _emit(lines: list[str], file) -> str:
    text = "\n".join(lines)
    print(text, file=file)
    return text
