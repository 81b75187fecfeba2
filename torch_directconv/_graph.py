"""optimize()'s graph rewrite (DESIGN.md section 8).

The model is traced with torch.fx. Each node is classified (`Op`): the ops that have a blocked
implementation (convolution, batch norm, ReLU and other activations that map 0 to 0, the
residual add, pooling, global average pooling, dropout, identity) and everything else. Then:

1. In-place ops are made out of place where that cannot change a result (the value they write
   was made by an op of ours and nothing reads an alias of it); the readers after them read
   their output. Any other in-place op runs as it is, on NCHW tensors, with every value it may
   write through kept NCHW.
2. Channel counts are inferred from the layers (a blocked tensor does not show them).
3. The ops that can run blocked form regions (connected sets); a region with no convolution
   and no batch norm would only add conversions, and runs NCHW.
4. Chains conv -> batch norm -> add -> ReLU (each part optional) become one `Unit` step.
5. The new graph converts each value at most once each way: to blocked at the first blocked
   reader of an NCHW value (checking its rank and channels), back at the first NCHW reader of
   a blocked one; the model's outputs are NCHW.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

from . import _backend, _steps
from .modules import DirectConv2d

CONV, BN, RELU, ACT, ADD, EW2 = "conv", "batch norm", "relu", "activation", "add", "element-wise"
MAXPOOL, AVGPOOL, GAP, DROPOUT, IDENTITY = "max pool", "avg pool", "global avg pool", "dropout", "identity"
SIZE, DROPIN, OTHER = "size", "drop-in conv", "other"

# Ops whose output is a new tensor, never an alias of an input.
FRESH = {CONV, BN, RELU, ACT, ADD, EW2, MAXPOOL, AVGPOOL, GAP}
# Blocked ops of one operand whose output has the operand's channels.
UNARY = {RELU, ACT, MAXPOOL, AVGPOOL, DROPOUT, IDENTITY}
BLOCKED_KINDS = {CONV, BN, ADD, EW2, GAP} | UNARY


@dataclass
class Op:
    """What a traced node computes, as far as the rewrite cares."""

    kind: str
    name: str  # the layer, as messages and explain() name it
    inputs: tuple = ()  # the operands a blocked implementation reads blocked
    module: nn.Module | None = None
    args: dict = field(default_factory=dict)  # the kind's arguments
    mutates: fx.Node | None = None  # the operand an in-place op writes
    reason: str = ""  # why it runs NCHW
    keeps_channels: bool = False  # an NCHW op whose output has its operand's channels


def _leaf_module(m: nn.Module, qualname: str, default) -> bool:
    # Convolutions (DirectConv2d too) and batch norms are called, not traced through.
    return isinstance(m, (nn.Conv2d, _BatchNorm)) or default(m, qualname)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return _leaf_module(m, module_qualified_name, super().is_leaf_module)


def trace(model: nn.Module) -> fx.Graph:
    """The model's forward as an fx graph (raises what fx raises when it cannot trace it)."""
    return _Tracer().trace(model)


def _hooked(m: nn.Module) -> bool:
    from torch.nn.modules import module as mod

    return bool(
        m._forward_hooks
        or m._forward_pre_hooks
        or m._backward_hooks
        or m._backward_pre_hooks
        or mod._global_forward_hooks
        or mod._global_forward_pre_hooks
        or mod._global_backward_hooks
        or mod._global_backward_pre_hooks
    )


def _plain_conv(m: nn.Conv2d) -> bool:
    # Subclasses that change what forward computes run as themselves.
    t = type(m)
    return t.forward is nn.Conv2d.forward and t._conv_forward in (nn.Conv2d._conv_forward, DirectConv2d._conv_forward)


def _plain_linear(m: nn.Module, args: tuple, kwargs: dict) -> bool:
    """An nn.Linear whose call is F.linear on its weight and bias: no forward of its own (nor a
    parametrization's class), no hooks, one tensor argument."""
    return (
        type(m) is nn.Linear
        and not _hooked(m)
        and len(args) == 1
        and not kwargs
        and isinstance(args[0], fx.Node)
    )


def _is_one(size) -> bool:
    return size == 1 or (isinstance(size, (tuple, list)) and len(size) == 2 and all(s == 1 for s in size))


def _is_hw(dim) -> bool:
    """Whether `dim` names the two spatial dimensions of a 4-D tensor."""
    return isinstance(dim, (tuple, list)) and len(dim) == 2 and {d % 4 for d in dim if isinstance(d, int)} == {2, 3}


def _bind(args: tuple, kwargs: dict, names: tuple[str, ...], defaults: tuple) -> dict | None:
    """args and kwargs by parameter name (the last len(defaults) have defaults), or None when they
    do not fit."""
    if len(args) > len(names) or any(k not in names for k in kwargs):
        return None
    bound = dict(zip(names[len(names) - len(defaults) :], defaults, strict=True))
    bound.update(zip(names, args, strict=False))
    bound.update(kwargs)
    return bound if all(n in bound for n in names) else None


def _has_node(values) -> bool:
    found = []
    fx.node.map_arg(values, lambda n: found.append(n))
    return bool(found)


def _fn_name(f) -> str:
    module = getattr(f, "__module__", None) or ""
    prefix = {"torch.nn.functional": "F.", "torch": "torch.", "_operator": "operator."}.get(module, "")
    return prefix + getattr(f, "__name__", repr(f))


# Activation modules that map 0 to 0, each as an out-of-place function of (module, x): named
# functions, so that an optimized model pickles.
def _relu6(m, x):
    return F.hardtanh(x, 0.0, 6.0)


def _leaky_relu(m, x):
    return F.leaky_relu(x, m.negative_slope)


def _hardtanh(m, x):
    return F.hardtanh(x, m.min_val, m.max_val)


def _silu(m, x):
    return F.silu(x)


def _gelu(m, x):
    return F.gelu(x, approximate=m.approximate)


def _tanh(m, x):
    return torch.tanh(x)


def _elu(m, x):
    return F.elu(x, m.alpha)


def _hardswish(m, x):
    return F.hardswish(x)


def _mish(m, x):
    return F.mish(x)


_MODULE_ACTS = {
    nn.ReLU6: _relu6,
    nn.LeakyReLU: _leaky_relu,
    nn.Hardtanh: _hardtanh,
    nn.SiLU: _silu,
    nn.GELU: _gelu,
    nn.Tanh: _tanh,
    nn.ELU: _elu,
    nn.Hardswish: _hardswish,
    nn.Mish: _mish,
}
# Functional activations that map 0 to 0: parameter names after the input, and their defaults.
_FUNCTION_ACTS = {
    F.relu6: (("inplace",), (False,)),
    F.leaky_relu: (("negative_slope", "inplace"), (0.01, False)),
    F.hardtanh: (("min_val", "max_val", "inplace"), (-1.0, 1.0, False)),
    F.silu: (("inplace",), (False,)),
    F.gelu: (("approximate",), ("none",)),
    F.elu: (("alpha", "inplace"), (1.0, False)),
    F.hardswish: (("inplace",), (False,)),
    F.mish: (("inplace",), (False,)),
    torch.tanh: ((), ()),
    F.tanh: ((), ()),
}
_BINARY = {operator.add: ADD, torch.add: ADD, operator.sub: EW2, torch.sub: EW2, operator.mul: EW2, torch.mul: EW2}
_MAXPOOL_PARAMS = (("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
                   (None, 0, 1, False, False))  # fmt: skip
_AVGPOOL_PARAMS = (("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"),
                   (None, 0, False, True, None))  # fmt: skip


def _pool_op(kind: str, name: str, bound: dict | None) -> Op:
    if bound is None or _has_node({k: v for k, v in bound.items() if k != "input"}):
        return Op(OTHER, name, reason="pooling with arguments computed in forward")
    if bound.pop("return_indices", False):
        return Op(OTHER, name, reason="max pooling that returns indices")
    x = bound.pop("input")
    return Op(kind, name, (x,), args=bound)


def _other(name: str, reason: str, mutates=None, keeps_channels: bool = False, module=None) -> Op:
    return Op(
        OTHER,
        name,
        module=module,
        mutates=mutates if isinstance(mutates, fx.Node) else None,
        reason=reason,
        keeps_channels=keeps_channels,
    )


def _classify_module(node: fx.Node, m: nn.Module) -> Op:
    name = node.target
    t = type(m)
    if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
        return _other(name, "called with other arguments than one tensor", module=m)
    x = node.args[0]
    mutated = x if getattr(m, "inplace", False) is True else None
    if _hooked(m):
        return _other(name, "has hooks, which run only when the module itself is called", mutated, module=m)
    if isinstance(m, LazyModuleMixin) and m.has_uninitialized_params():
        return _other(name, "a lazy module not yet initialised", module=m)
    if isinstance(m, nn.Conv2d):
        if not _plain_conv(m):
            return _other(name, f"{t.__name__} has a forward of its own", module=m)
        if m.groups != 1:
            return Op(DROPIN, name, module=m, reason=f"groups={m.groups}: the blocked kernels take groups=1")
        return Op(CONV, name, (x,), m)
    if isinstance(m, _BatchNorm):
        if not isinstance(m, nn.BatchNorm2d) or t.forward is not _BatchNorm.forward:
            return _other(name, f"{t.__name__} is not a plain BatchNorm2d", module=m)
        return Op(BN, name, (x,), m)
    if t is nn.ReLU:
        return Op(RELU, name, (x,), m, mutates=mutated)
    if t in _MODULE_ACTS and (t is not nn.Hardtanh or m.min_val <= 0 <= m.max_val):
        return Op(ACT, name, (x,), m, args={"fn": _MODULE_ACTS[t]}, mutates=mutated)
    if t is nn.MaxPool2d:
        if m.return_indices:
            return _other(name, "max pooling that returns indices", module=m)
        args = {k: getattr(m, k) for k in ("kernel_size", "stride", "padding", "dilation", "ceil_mode")}
        return Op(MAXPOOL, name, (x,), m, args=args)
    if t is nn.AvgPool2d:
        keys = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
        return Op(AVGPOOL, name, (x,), m, args={k: getattr(m, k) for k in keys})
    if t is nn.AdaptiveAvgPool2d and _is_one(m.output_size):
        return Op(GAP, name, (x,), m, args={"keepdim": True})
    if t is nn.Dropout:
        return Op(DROPOUT, name, (x,), m, mutates=mutated)
    if t is nn.Identity:
        return Op(IDENTITY, name, (x,), m)
    keeps = t in (nn.Sigmoid, nn.Hardsigmoid)
    return _other(name, f"{t.__name__} has no blocked implementation", mutated, keeps, module=m)


def _classify_function(node: fx.Node) -> Op:
    f, args, kwargs, name = node.target, node.args, node.kwargs, node.name
    first = args[0] if args else kwargs.get("input")
    if kwargs.get("out") is not None:
        return _other(name, f"{_fn_name(f)} writes to out=", kwargs["out"])
    if f in (F.relu, torch.relu, torch.relu_, F.relu_):
        b = _bind(args, kwargs, ("input", "inplace"), (False,))
        if b is None or not isinstance(b["input"], fx.Node):
            return _other(name, "relu with unusual arguments")
        inplace = f in (torch.relu_, F.relu_) or b["inplace"] is True
        return Op(RELU, name, (b["input"],), mutates=b["input"] if inplace else None)
    if f in _FUNCTION_ACTS:
        names, defaults = _FUNCTION_ACTS[f]
        b = _bind(args, kwargs, ("input", *names), defaults)
        if b is None or not isinstance(b["input"], fx.Node) or _has_node({k: b[k] for k in names}):
            return _other(name, f"{_fn_name(f)} with arguments computed in forward")
        if f is F.hardtanh and not b["min_val"] <= 0 <= b["max_val"]:
            return _other(name, "hardtanh whose range excludes 0 (it would fill the padded channels)")
        x = b.pop("input")
        inplace = b.pop("inplace", False) is True
        return Op(ACT, name, (x,), args={"fn": f, "kwargs": b}, mutates=x if inplace else None)
    if f in _BINARY:
        b = _bind(args, {k: v for k, v in kwargs.items() if k != "alpha"}, ("input", "other"), ())
        alpha = kwargs.get("alpha", 1)
        if b and isinstance(b["input"], fx.Node) and isinstance(b["other"], fx.Node) and not _has_node(alpha):
            call = {"alpha": alpha} if "alpha" in kwargs else {}
            return Op(_BINARY[f], name, (b["input"], b["other"]), args={"fn": f, "kwargs": call, "alpha": alpha})
        return _other(name, f"{_fn_name(f)} of a tensor and a non-tensor")
    if f in (F.max_pool2d, torch.max_pool2d):
        return _pool_op(MAXPOOL, name, _bind(args, kwargs, *_MAXPOOL_PARAMS))
    if f is F.avg_pool2d:
        return _pool_op(AVGPOOL, name, _bind(args, kwargs, *_AVGPOOL_PARAMS))
    if f is F.adaptive_avg_pool2d:
        b = _bind(args, kwargs, ("input", "output_size"), ())
        if b and isinstance(b["input"], fx.Node) and _is_one(b["output_size"]):
            return Op(GAP, name, (b["input"],), args={"keepdim": True})
    if f is torch.mean:
        b = _bind(args, kwargs, ("input", "dim", "keepdim", "dtype"), (False, None))
        if b and isinstance(b["input"], fx.Node) and _is_hw(b["dim"]) and b["dtype"] is None:
            return Op(GAP, name, (b["input"],), args={"keepdim": b["keepdim"] is True})
    if f is F.dropout:
        b = _bind(args, kwargs, ("input", "p", "training", "inplace"), (0.5, True, False))
        if b and isinstance(b["input"], fx.Node) and not _has_node((b["p"], b["training"], b["inplace"])):
            x = b["input"]
            if b["training"] is False:
                return Op(IDENTITY, name, (x,))
            return Op(DROPOUT, name, (x,), args={"p": b["p"]}, mutates=x if b["inplace"] is True else None)
    if f is getattr and len(args) == 2 and args[1] in ("shape", "ndim"):
        return Op(SIZE, name, (args[0],), args={"query": "size" if args[1] == "shape" else "dim"})
    fname = _fn_name(f)
    writes = fname.endswith("_") or f is operator.setitem or kwargs.get("inplace") is True
    keeps = f in (torch.sigmoid, F.sigmoid)
    return _other(name, f"{fname} has no blocked implementation", first if writes else None, keeps)


def _classify_method(node: fx.Node) -> Op:
    m, args, kwargs, name = node.target, node.args, node.kwargs, node.name
    x = args[0]
    if m in ("relu", "relu_") and len(args) == 1 and not kwargs:
        return Op(RELU, name, (x,), mutates=x if m == "relu_" else None)
    if m == "tanh" and len(args) == 1 and not kwargs:
        return Op(ACT, name, (x,), args={"fn": torch.tanh, "kwargs": {}})
    if m.rstrip("_") in ("add", "sub", "mul") and len(args) == 2 and set(kwargs) <= {"alpha"}:
        alpha = kwargs.get("alpha", 1)
        if isinstance(args[1], fx.Node) and not _has_node(alpha):
            kind = ADD if m.rstrip("_") == "add" else EW2
            op_args = {"method": m.rstrip("_"), "kwargs": dict(kwargs), "alpha": alpha}
            return Op(kind, name, (x, args[1]), args=op_args, mutates=x if m.endswith("_") else None)
    if m == "mean":
        b = _bind(args, kwargs, ("self", "dim", "keepdim", "dtype"), (False, None))
        if b and _is_hw(b["dim"]) and b["dtype"] is None:
            return Op(GAP, name, (x,), args={"keepdim": b["keepdim"] is True})
    if m == "size" and len(args) <= 2 and not kwargs:
        return Op(SIZE, name, (x,), args={"query": "size"})
    if m == "dim" and len(args) == 1 and not kwargs:
        return Op(SIZE, name, (x,), args={"query": "dim"})
    writes = m.endswith("_") and not m.startswith("__")
    return _other(name, f".{m}() has no blocked implementation", x if writes else None, m == "sigmoid")


def classify(node: fx.Node, root: nn.Module) -> Op:
    if node.op == "call_module":
        return _classify_module(node, root.get_submodule(node.target))
    if node.op == "call_function":
        return _classify_function(node)
    if node.op == "call_method":
        return _classify_method(node)
    what = {"placeholder": "the model's input", "get_attr": "a tensor of the model", "output": "the model's output"}
    return Op(OTHER, str(node.target), reason=what[node.op])


@dataclass
class Plan:
    """The decisions of the rewrite, per traced node."""

    ops: dict  # node -> Op
    channels: dict  # node -> channel count of its (tensor) value, where known
    required: dict  # node -> (channels, layer) that a blocked reader requires of an NCHW value
    blocked: set  # nodes that run blocked
    regions: dict  # blocked node -> its region's number
    units: dict  # last node of a fused chain -> (conv, bn, add, relu) nodes (None where absent)
    absorbed: set  # nodes that run inside a unit emitted at a later node, or a lone convolution's ReLU
    why: dict  # node -> why it runs NCHW
    lone: dict = field(default_factory=dict)  # a lone convolution (run NCHW) -> the ReLU it fuses, or None


def _functionalize(graph: fx.Graph, ops: dict, root: nn.Module) -> set:
    """Makes in-place ops out of place where no result can change; returns the nodes whose
    values must stay NCHW because an in-place op that stays may write them."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    pinned: set = set()
    for m in list(graph.nodes):
        op = ops[m]
        a = op.mutates
        if a is None:
            continue
        fresh = a.op in ("call_module", "call_function", "call_method") and ops[a].kind in FRESH
        others = [u for u in a.users if u is not m]
        if op.kind != OTHER and fresh and all(order[u] > order[m] or ops[u].kind in FRESH for u in others):
            # What reads `a` after the op reads its result in eager (the same tensor).
            for u in others:
                if order[u] > order[m]:
                    u.replace_input_with(a, m)
                    ops[u] = classify(u, root)
            op.mutates = None
            continue
        if op.kind != OTHER:
            ops[m] = _other(op.name, "writes in place into a tensor that other ops read", a, module=op.module)
        pinned |= _alias_closure(a, ops)
    return pinned


def _alias_closure(a: fx.Node, ops: dict) -> set:
    """a and every value it may be a view of (back through ops that may return a view)."""
    seen, todo = set(), [a]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op in ("call_module", "call_function", "call_method") and ops[n].kind not in FRESH:
            todo.extend(n.all_input_nodes)
    return seen


def _infer_channels(graph: fx.Graph, ops: dict) -> tuple[dict, dict]:
    """(channels of each value where the layers determine it, channels that blocked readers
    require of values with none known). Forward from the convolutions and batch norms through
    channel-preserving ops; backward from a convolution's or batch norm's input."""
    ch: dict = {}
    for n in graph.nodes:
        op = ops[n]
        x = op.inputs[0] if op.inputs else None
        if op.kind in (CONV, BN):
            need = op.module.in_channels if op.kind == CONV else op.module.num_features
            if x in ch and ch[x] != need:
                ops[n] = _other(op.name, f"expects {need} input channels, its input has {ch[x]}", module=op.module)
                continue
            ch[n] = op.module.out_channels if op.kind == CONV else op.module.num_features
        elif op.kind in UNARY and x in ch:
            ch[n] = ch[x]
        elif op.kind in (ADD, EW2) and op.inputs[0] in ch and ch[op.inputs[0]] == ch.get(op.inputs[1]):
            ch[n] = ch[x]
        elif op.kind == GAP and op.args["keepdim"] and x in ch:
            ch[n] = ch[x]
        elif op.kind == OTHER and op.keeps_channels and n.args and n.args[0] in ch:
            ch[n] = ch[n.args[0]]
    required: dict = {}
    for n in reversed(graph.nodes):
        op = ops[n]
        if op.kind in (CONV, BN) and op.inputs[0] not in ch:
            need = op.module.in_channels if op.kind == CONV else op.module.num_features
            required.setdefault(op.inputs[0], (need, op.name))
        elif op.kind in UNARY and n not in ch and n in required:
            ch[n] = required[n][0]
            required.setdefault(op.inputs[0], required[n])
    return ch, required


def _candidate(n: fx.Node, op: Op, ch: dict) -> str | None:
    """None when n can run blocked, else why not."""
    if op.kind not in BLOCKED_KINDS:
        return op.reason or f"{op.kind} has no blocked implementation"
    if op.kind in (ADD, EW2) and n not in ch:
        return "its operands' channels are not both known and equal (it may broadcast)"
    if op.kind == GAP and op.inputs[0] not in ch:
        return "its input's channel count is not known from the layers"
    if op.kind in UNARY and n not in ch:
        return "its channel count is not known from the layers"
    return None


def _regions(graph: fx.Graph, ops: dict, blocked: set) -> dict:
    """node -> region id (the connected sets of blocked nodes)."""
    parent = {n: n for n in blocked}

    def find(n):
        while parent[n] is not n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for n in blocked:
        for p in ops[n].inputs:
            if p in blocked:
                parent[find(p)] = find(n)
    roots: dict = {}
    return {n: roots.setdefault(find(n), len(roots)) for n in graph.nodes if n in blocked}


def _demote_cheap(graph: fx.Graph, ops: dict, blocked: set) -> set:
    """The element-wise ops (ReLU, activations, +, -, *) that cost fewer layout conversions run
    NCHW than blocked: an op between NCHW values (x * torch.sigmoid(x) beside an exit of x) takes
    no conversion NCHW, and would take an entry and an exit blocked."""
    demoted: set = set()

    def nchw_readers(v: fx.Node) -> bool:
        return any(u not in blocked or u in demoted for u in v.users)

    def blocked_readers(v: fx.Node) -> bool:
        return any(u in blocked and u not in demoted for u in v.users)

    for n in graph.nodes:
        if n not in blocked or ops[n].kind not in (RELU, ACT, ADD, EW2):
            continue
        operands = set(ops[n].inputs)
        as_blocked = sum(v not in blocked or v in demoted for v in operands) + nchw_readers(n)
        # Run NCHW: an exit for each blocked operand no other op reads NCHW, an entry for blocked readers.
        as_nchw = sum(
            v in blocked and v not in demoted and not any(u is not n and u not in blocked for u in v.users)
            for v in operands
        ) + blocked_readers(n)
        if as_nchw < as_blocked:
            demoted.add(n)
    return demoted


def _single_blocked_user(n: fx.Node, plan_blocked: set, absorbed: set) -> fx.Node | None:
    users = list(n.users)
    if len(users) == 1 and users[0] in plan_blocked and users[0] not in absorbed:
        return users[0]
    return None


def _chain(n: fx.Node, ops: dict, blocked: set, absorbed: set) -> list:
    """The longest chain conv -> batch norm -> add -> ReLU that starts at n (each part optional,
    each part the only reader of the one before; an add of alpha 1 that reads that part once)."""
    chain = [n]
    for kind in (BN, ADD, RELU):
        if ops[chain[-1]].kind in (kind, RELU) or (kind == BN and ops[n].kind != CONV):
            continue
        u = _single_blocked_user(chain[-1], blocked, absorbed)
        if u is None or ops[u].kind != kind:
            continue
        if kind == ADD and (ops[u].args["alpha"] != 1 or ops[u].inputs.count(chain[-1]) != 1):
            continue
        chain.append(u)
    return chain


def _fuse(graph: fx.Graph, ops: dict, blocked: set) -> tuple[dict, set]:
    """Units among the blocked nodes: every convolution and batch norm, with the longest chain
    after it; and add -> ReLU. No in-place op that stays may run within a unit: the chain is cut
    before it."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    barriers = [order[n] for n in graph.nodes if ops[n].mutates is not None]
    units: dict = {}
    absorbed: set = set()
    for n in graph.nodes:
        if n not in blocked or n in absorbed or n in units or ops[n].kind not in (CONV, BN, ADD):
            continue
        if ops[n].kind == ADD and ops[n].args["alpha"] != 1:
            continue
        chain = _chain(n, ops, blocked, absorbed)
        cut = next((i for i, p in enumerate(chain) if any(order[n] < b < order[p] for b in barriers)), len(chain))
        chain = chain[:cut]
        parts = {ops[p].kind: p for p in chain}
        if ops[n].kind == ADD and RELU not in parts:
            continue  # a lone add stays the torch op
        units[chain[-1]] = (parts.get(CONV), parts.get(BN), parts.get(ADD), parts.get(RELU))
        absorbed.update(chain[:-1])
    return units, absorbed


def _lone_convs(graph: fx.Graph, ops: dict, blocked: set, regions: dict) -> dict:
    """The regions that hold one convolution and nothing else but a ReLU that only it feeds:
    conv -> that ReLU, or None."""
    members: dict = {}
    for n in graph.nodes:
        if n in blocked:
            members.setdefault(regions[n], []).append(n)
    lone = {}
    for nodes in members.values():
        convs = [n for n in nodes if ops[n].kind == CONV]
        if len(convs) != 1:
            continue
        conv, rest = convs[0], [n for n in nodes if n is not convs[0]]
        if not rest:
            lone[conv] = None
        elif len(rest) == 1 and ops[rest[0]].kind == RELU and list(conv.users) == rest and tuple(ops[rest[0]].inputs) == (conv,):
            lone[conv] = rest[0]
    return lone


def plan(graph: fx.Graph, root: nn.Module) -> Plan:
    ops = {n: classify(n, root) for n in graph.nodes}
    pinned = _functionalize(graph, ops, root)
    ch, required = _infer_channels(graph, ops)
    why: dict = {}
    cand: set = set()
    for n in graph.nodes:
        reason = _candidate(n, ops[n], ch)
        if reason is None and n in pinned:
            reason = "an in-place op that stays may write its value, which therefore stays NCHW"
        if reason is None:
            cand.add(n)
        else:
            why[n] = reason
    regions = _regions(graph, ops, cand)
    useful = {regions[n] for n in cand if ops[n].kind in (CONV, BN)}
    blocked = {n for n in cand if regions[n] in useful}
    for n in cand - blocked:
        why[n] = "its region has no convolution or batch norm (converting would cost more than it saves)"
    demoted = _demote_cheap(graph, ops, blocked)
    blocked -= demoted
    for n in demoted:
        why[n] = "it reads and feeds NCHW values: blocked, it would cost more layout conversions"
    lone = _lone_convs(graph, ops, blocked, regions)
    for conv, relu in lone.items():
        blocked -= {conv, relu}
        why[conv] = (
            "the only layer of its region: it runs NCHW in and out as DirectConv2d does (blocked, it would take "
            "an entry and an exit for one op)"
        )
    units, absorbed = _fuse(graph, ops, blocked)
    absorbed |= {relu for relu in lone.values() if relu is not None}
    numbers: dict = {}
    regions = {n: numbers.setdefault(regions[n], len(numbers)) for n in graph.nodes if n in blocked}
    return Plan(ops, ch, required, blocked, regions, units, absorbed, why, lone)


class _Emitter:
    """Writes the optimized graph: each value held blocked, NCHW, or both (converted once)."""

    def __init__(self, graph: fx.Graph, root: nn.Module, p: Plan) -> None:
        self.graph, self.root, self.p = graph, root, p
        self.new = fx.Graph()
        self.attrs: dict = {}  # the new graph module's attributes: modules and steps
        self.module_names: dict = {}  # id(module) -> its name in the new graph module
        self.blocked: dict = {}  # traced node -> new node holding its value blocked
        self.nchw: dict = {}  # traced node -> new node holding its value NCHW
        self.entries: dict = {}  # traced node -> its entry, while no in-place op may have changed it

    def _module_node(self, module: nn.Module, qualname: str) -> str:
        key = id(module)
        if key not in self.module_names:
            name = "m_" + (qualname.replace(".", "_") or "root")
            while name in self.attrs:
                name += "_"
            self.module_names[key] = name
            self.attrs[name] = module
        return self.module_names[key]

    def _step(self, step: _steps.Step, args: tuple, kind: str, hint: str) -> fx.Node:
        name = f"dc{len(self.attrs)}_{hint}"
        self.attrs[name] = step
        node = self.new.call_module(name, args)
        node.meta["dc"] = {"kind": kind}
        return node

    def _hold_blocked(self, n: fx.Node, node: fx.Node) -> None:
        node.meta.setdefault("dc", {"kind": "blocked"})["channels"] = self.p.channels[n]
        self.blocked[n] = node

    def _describe(self, n: fx.Node) -> str:
        return f"'{self.p.ops[n].name}'" if n.op != "placeholder" else f"the model's input '{n.target}'"

    def as_nchw(self, v, reader: fx.Node):
        if not isinstance(v, fx.Node):
            return v
        if v in self.nchw:
            return self.nchw[v]
        why = "the model's output" if reader.op == "output" else f"read by '{self.p.ops[reader].name}', which runs NCHW"
        if reader.op != "output":
            why += f" ({self.p.why.get(reader, 'not blocked')})"
        step = _steps.Exit(self.p.ops[v].name, self.p.channels[v], why)
        self.nchw[v] = self._step(step, (self.blocked[v],), "exit", v.name)
        return self.nchw[v]

    def as_blocked(self, v: fx.Node, reader: fx.Node) -> fx.Node:
        if v in self.blocked:
            return self.blocked[v]
        if v not in self.entries:
            step = self._enter(v, reader)
            self.entries[v] = self._step(step, (self.as_nchw(v, reader),), "enter", v.name)
            self.entries[v].meta["dc"]["channels"] = step.channels
        return self.entries[v]

    def _enter(self, v: fx.Node, reader: fx.Node) -> _steps.Enter:
        name = self.p.ops[reader].name
        channels, origin = (self.p.channels[v], name) if v in self.p.channels else self.p.required[v]
        consumer = f"layer '{name}'" + (f" (for '{origin}')" if origin != name else "")
        return _steps.Enter(self._describe(v), channels, consumer)

    def _enters_folded(self, x, conv: fx.Node | None, residual) -> bool:
        """Whether the unit of conv takes its region's entry in (EnterUnit): x enters the region
        here and nothing else reads it, and the convolution folds its kernel columns in bf16."""
        if conv is None or residual is not None or not isinstance(x, fx.Node) or _backend._C is None:
            return False
        if x in self.blocked or x in self.entries or len(x.users) != 1:
            return False
        m = self.p.ops[conv].module
        return (
            isinstance(m, nn.Conv2d)
            and m.groups == 1
            and m.padding_mode == "zeros"
            and _backend._C.bf16_folds_columns(m.in_channels, m.kernel_size[1])
        )

    def emit(self) -> fx.Graph:
        for n in self.graph.nodes:
            if n in self.p.absorbed:
                continue
            if n in self.p.units:
                self._emit_unit(n)
            elif n in self.p.blocked:
                self._emit_blocked(n)
            else:
                self._emit_nchw(n)
                if self.p.ops[n].mutates is not None:
                    # It may have written a tensor an entry was made from: enter afresh after it.
                    self.entries.clear()
        return self.new

    def _emit_unit(self, last: fx.Node) -> None:
        conv, bn, add, relu = self.p.units[last]
        first = conv or bn or add
        x = self.p.ops[first].inputs[0]
        residual = None
        if add is not None:
            a, b = self.p.ops[add].inputs
            main = bn or conv  # the chain's value that the add reads; None when the unit starts at the add
            residual = b if main is None or a is main else a
        ops = self.p.ops
        names = [ops[p].name for p in (conv, bn, add, relu) if p is not None]
        if self._enters_folded(x, conv, residual):
            step = _steps.EnterUnit(
                self._enter(x, first),
                ops[conv].module,
                ops[bn].module if bn is not None else None,
                names,
                self.p.channels[last],
                relu is not None,
            )
            node = self._step(step, (self.as_nchw(x, first),), "unit", last.name)
            node.meta["dc"]["enters"] = True  # explain() counts it among the conversions to blocked
            self._hold_blocked(last, node)
            return
        step = _steps.Unit(
            ops[conv].module if conv is not None else None,
            ops[bn].module if bn is not None else None,
            names,
            self.p.channels[last],
            residual is not None,
            relu is not None,
        )
        args = (self.as_blocked(x, first),) + ((self.as_blocked(residual, add),) if residual is not None else ())
        self._hold_blocked(last, self._step(step, args, "unit", last.name))

    def _emit_blocked(self, n: fx.Node) -> None:
        """A blocked op outside the units (every convolution and batch norm is in one)."""
        op = self.p.ops[n]
        xs = tuple(self.as_blocked(v, n) for v in op.inputs)
        if op.kind == IDENTITY:
            self.blocked[n] = xs[0]
            return
        if op.kind == GAP:
            # (N, C, 1, 1) stays blocked for a blocked reader (a squeeze-excitation's convolution);
            # else the pooling is the exit.
            stays = op.args["keepdim"] and any(u in self.p.blocked for u in n.users)
            step = _steps.GlobalAvgPool(op.name, self.p.channels[op.inputs[0]], op.args["keepdim"], stays)
            if stays:
                self._hold_blocked(n, self._step(step, xs, "blocked", n.name))
            else:
                self.nchw[n] = self._step(step, xs, "exit", n.name)
            return
        if op.kind in (RELU, ADD, EW2):
            # The same torch op, out of place, on the blocked tensors.
            a = op.args
            if op.kind == RELU:
                node = self.new.call_function(torch.relu, xs)
            elif "method" in a:
                node = self.new.call_method(a["method"], xs, a["kwargs"])
            else:
                node = self.new.call_function(a["fn"], xs, a["kwargs"])
            node.meta["dc"] = {"kind": "blocked", "layers": [op.name], "what": f"{op.kind}, blocked"}
        else:
            if op.kind == ACT:
                step = _steps.Act(op.name, op.args["fn"], op.args.get("kwargs", {}), op.module)
            elif op.kind == DROPOUT:
                step = _steps.Dropout(op.name, self.p.channels[n], op.module, op.args.get("p", 0.5))
            else:
                step = _steps.Pool(op.name, "max" if op.kind == MAXPOOL else "average", self.p.channels[n], op.args)
            node = self._step(step, xs, "blocked", n.name)
        self._hold_blocked(n, node)

    def _emit_nchw(self, n: fx.Node) -> None:
        op = self.p.ops[n]
        if n.op == "output":
            out = self.new.output(fx.node.map_arg(n.args[0], lambda v: self.as_nchw(v, n)))
            out.meta["dc"] = {"kind": "output"}
            return
        if op.kind == SIZE and op.inputs[0] in self.blocked:
            x = op.inputs[0]
            step = _steps.BlockedShape(op.name, self.p.channels[x], op.args["query"])
            self.nchw[n] = self._step(step, (self.blocked[x],) + tuple(n.args[1:2]), "meta", n.name)
            return
        args = fx.node.map_arg(n.args, lambda v: self.as_nchw(v, n))
        kwargs = fx.node.map_arg(n.kwargs, lambda v: self.as_nchw(v, n))
        if op.kind in (DROPIN, CONV):
            # A grouped convolution, one kept NCHW (an in-place op may write its output), or a
            # lone one, with the ReLU it fuses.
            relu = self.p.lone.get(n)
            step = _steps.DropInConv(op.name, op.module, self.p.ops[relu].name if relu is not None else None)
            self.nchw[n] = self._step(step, args, "nchw", n.name)
            self.nchw[n].meta["dc"]["why"] = op.reason or self.p.why.get(n, "")
            if relu is not None:
                self.nchw[relu] = self.nchw[n]
            return
        if n.op == "placeholder":
            node = self.new.node_copy(n)
            # An annotation read under `from __future__ import annotations` is a string, which
            # the graph module's pickling cannot import: the type adds nothing here.
            node.type = None
        elif n.op == "get_attr":
            # Looked up at each call, so a buffer that .to() or a user replaces is followed.
            owner, _, attr = n.target.rpartition(".")
            module = self.root.get_submodule(owner)
            node = self.new.call_function(getattr, (self.new.get_attr(self._module_node(module, owner)), attr))
        elif n.op == "call_module" and _plain_linear(self.root.get_submodule(n.target), args, kwargs):
            # Its bf16 weight kept under autocast in eval (the step runs the module otherwise).
            step = _steps.Linear(op.name, self.root.get_submodule(n.target))
            self.nchw[n] = self._step(step, args, "nchw", n.name)
            self.nchw[n].meta["dc"]["why"] = self.p.why.get(n, "") or op.reason
            return
        elif n.op == "call_module":
            module = self.root.get_submodule(n.target)
            node = self.new.call_module(self._module_node(module, n.target), args, kwargs)
        else:
            node = self.new.create_node(n.op, n.target, args, kwargs, n.name)
        node.meta["dc"] = {"kind": "nchw", "layers": [op.name], "why": self.p.why.get(n, "")}
        self.nchw[n] = node


def build(model: nn.Module, graph: fx.Graph) -> tuple[fx.GraphModule, Plan]:
    """The optimized graph module of a traced model, and the plan it was written from."""
    p = plan(graph, model)
    emitter = _Emitter(graph, model, p)
    new = emitter.emit()
    new.lint()
    return fx.GraphModule(emitter.attrs, new, class_name=f"Blocked{type(model).__name__}"), p
