"""Replay of an optimized graph's calls without gradients: the ops a call ran, recorded once and
run again from C++ (_C.Program), while nothing the recording depended on has changed.

An eval call of the blocked graph is a fixed sequence of dispatcher calls: the convolutions on
their cached packed weights, the pooling and layout ops, the classifier. Run from Python, each
step costs its module call, its checks and the op's argument parsing; between convolutions
that stream megabytes, that code finds the caches cold. The replay runs the same calls, with
the same arguments, from one C++ loop.

When a call is recorded: a call without gradients whose inputs, global state and model are as
in the call before it (so its weights were packed then, and the record holds no packing). It is
recorded under a TorchDispatchMode, which sees each op after autocast (its casts are ops of
their own). An op whose tensor arguments are all constants (none comes from an input) is not
recorded: its result is a constant of the program, as the packed weights are.

What a record may not hold (then there is none, and every call runs the graph): a graph node
that is neither one of optimize()'s steps nor a torch function or tensor method (a user's leaf
module may do anything in Python); an op that reads a tensor's value into Python
(`.item()`), that draws random numbers, that returns several tensors, or that writes into a
tensor the call did not make (an input, a constant, a module's buffer; an in-place ReLU on a
value of the call is replayed); an output that is not a tensor the call computed.

Records are kept per input signature (up to MAX_RECORDS, of one global state). When a
record is replayed: the inputs are plain tensors with the recorded shapes, strides,
dtypes and devices; gradients are disabled, autocast, inference mode and the ISA are as
recorded, and nothing records a graph (torch.compile, tracing, torch.func, modes); every
module's attributes, parameters, buffers, submodules and hooks are the same objects (_C.DictsState),
and every parameter and buffer is at its version and storage (_C.TensorsKey). Otherwise every
record is dropped (with the constants they held) and the graph runs.
"""

from __future__ import annotations

import weakref

import torch
from torch import fx, nn
from torch.nn.modules import module as _module
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from . import _backend, _steps

# The global module hooks: a hook added after a recording is one the graph would call.
_GLOBAL_HOOK_DICTS = tuple(
    getattr(_module, name)
    for name in dir(_module)
    if name.startswith("_global_") and isinstance(getattr(_module, name), dict)
)
_LOCAL_SCALAR = torch.ops.aten._local_scalar_dense.default
# What a list argument holds where a value of the call goes (set there at each run).
_PLACEHOLDER = torch.empty(0)


def replayable_graph(gm: fx.GraphModule) -> str | None:
    """Why gm's calls cannot be recorded, or None: every node must be a step of optimize() or a
    torch function or tensor method, which run nothing but ops."""
    for node in gm.graph.nodes:
        if node.op == "call_module":
            if not isinstance(gm.get_submodule(node.target), _steps.Step):
                return f"{node.target} is a module of the model's own, which may run any Python"
        elif node.op == "call_function":
            module = getattr(node.target, "__module__", None) or ""
            if node.target is not getattr and not (module.startswith("torch") or module in ("_operator", "operator")):
                return f"{node.name} calls {getattr(node.target, '__name__', node.target)!r}, which may run any Python"
    return None


class _Recorder(TorchDispatchMode):
    """Records the ops of one call: each as (name, overload, its arguments in schema order with
    a placeholder where a value of the call goes, where those go (argument, item of a list
    argument or -1, slot), the slot of its result)."""

    def __init__(self, inputs: list) -> None:
        super().__init__()
        # id -> (slot, weak reference): a value's id is its only while it lives.
        self._slots = {id(t): (i, weakref.ref(t)) for i, t in enumerate(inputs)}
        self.n_slots = len(inputs)
        # Per slot: whether its memory was made by the call (an input's is the caller's).
        self._fresh = [False] * len(inputs)
        self.instrs: list[list] = []
        self.refused: str | None = None

    def slot(self, t) -> int | None:
        entry = self._slots.get(id(t)) if isinstance(t, torch.Tensor) else None
        return entry[0] if entry is not None and entry[1]() is t else None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.refused is None:
            self.refused = self._record(func, args, kwargs, out)
        return out

    def _record(self, func, args: tuple, kwargs: dict, out) -> str | None:
        schema = func._schema
        if func is _LOCAL_SCALAR:
            return "a tensor's value is read into Python (.item())"
        if torch.Tag.nondeterministic_seeded in func.tags:
            return f"{func} draws random numbers"
        full, reads, slots = [], [], []
        for i, a in enumerate(schema.arguments):
            if not a.kwarg_only and i < len(args):
                v = args[i]
            elif a.name in kwargs:
                v = kwargs[a.name]
            else:
                v = a.default_value
            s = self.slot(v)
            slots.append(s)
            if a.alias_info is not None and a.alias_info.is_write and (s is None or not self._fresh[s]):
                # Writing into an input, a constant or a list of tensors: the next call would
                # not start from what this one found.
                return f"{func} mutates a tensor that the call did not make"
            if s is not None:
                reads.append((i, -1, s))
                v = None
            elif isinstance(v, (list, tuple)) and any(self.slot(t) is not None for t in v):
                items = list(v)
                for j, t in enumerate(items):
                    s = self.slot(t)
                    if s is not None:
                        reads.append((i, j, s))
                        items[j] = _PLACEHOLDER
                v = items
            full.append(v)
        if not reads:
            if schema.is_mutable:
                return f"{func} mutates a tensor that the call did not make"
            return None  # a constant of the program
        if len(schema.returns) != 1 or not isinstance(out, torch.Tensor):
            return f"{func} returns several results (or none)"
        # A result that aliases an argument (a view, an in-place op's self) is fresh memory of
        # the call only if that argument is.
        alias = schema.returns[0].alias_info
        fresh = True
        if alias is not None:
            fresh = any(
                a.alias_info is not None
                and a.alias_info.before_set & alias.before_set
                and slots[i] is not None
                and self._fresh[slots[i]]
                for i, a in enumerate(schema.arguments)
            )
        slot = self.n_slots
        self.n_slots += 1
        self._slots[id(out)] = (slot, weakref.ref(out))
        self._fresh.append(fresh)
        self.instrs.append([schema.name, schema.overload_name, full, reads, slot])
        return None


def _module_dicts(root: nn.Module) -> list:
    """The dicts whose items the graph's behaviour depends on: every module's __dict__ and the
    dicts in it (parameters, buffers, submodules, hooks), and the global hooks."""
    dicts = list(_GLOBAL_HOOK_DICTS)
    for m in root.modules():
        d = m.__dict__
        dicts.append(d)
        dicts.extend(v for v in d.values() if isinstance(v, dict))
    return dicts


def _module_tensors(root: nn.Module) -> tuple:
    return tuple(t for m in root.modules() for d in (m._parameters, m._buffers) for t in d.values() if t is not None)


def _global_state() -> tuple:
    return (
        torch.is_autocast_enabled("cpu"),
        torch.get_autocast_dtype("cpu"),
        torch.is_inference_mode_enabled(),
        _backend._C.isa(),
    )


def _signature(args: tuple) -> tuple | None:
    """The inputs' types, shapes, strides, dtypes and devices; None for a call the replay does
    not take (a keyword argument, a non-tensor or a tensor subclass)."""
    sig = []
    for t in args:
        if type(t) is not torch.Tensor:
            return None
        sig.append((t.shape, t.stride(), t.storage_offset(), t.dtype, t.device, t.requires_grad, t.is_inference()))
    return tuple(sig)


def _recordable() -> bool:
    """Whether nothing records a graph or sees the ops (and gradients are off)."""
    return not (
        torch.is_grad_enabled()
        or torch.compiler.is_compiling()
        or torch._C._is_tracing()
        or torch._C._are_functorch_transforms_active()
        or torch._C._is_torch_function_mode_enabled()
        or torch._C._len_torch_dispatch_stack() > 0
    )


class _Record:
    """A replayable record and what it depends on."""

    def __init__(self, program, state: tuple, dicts, key, tensors: tuple, spec) -> None:
        self.program = program
        self.state = state
        self.dicts = dicts
        self.key = key
        self.tensors = tensors
        self.spec = spec
        self.replays = 0

    def holds(self) -> bool:
        """Whether the model is as recorded (the signature and state are the records' key)."""
        return self.dicts.unchanged() and self.key.unchanged(self.tensors)


# Records kept per graph module, one per input signature (a last, smaller batch; a few batch
# sizes served in turn), all of one global state: those of another state would hold the other
# dtype's packed weights, which the steps no longer keep. The oldest goes first.
MAX_RECORDS = 8


class Replayer:
    """The records of one graph module's calls (of one mode), made and dropped as above."""

    def __init__(self, root: nn.Module, gm: fx.GraphModule, enabled: bool = True) -> None:
        self._root = root
        self._gm = gm
        self.enabled = enabled
        self.why_not = replayable_graph(gm) if enabled else "replay=False"
        self.last_refusal: str | None = None  # why the last record was refused
        # By (signature, state); the dict is replaced, never changed in place.
        self.records: dict[tuple, _Record] = {}
        self._last: tuple | None = None  # (signature, state) of the last call that ran the graph
        self._streak = 0  # calls before it, in a row, with the same
        # Calls in a row that run the graph before one is recorded: doubled (up to 64) each time a
        # record is dropped before any replay (weights that change at every call), so that such a
        # loop pays for few recordings; back to 1 once a record is replayed.
        self._patience = 1
        # (signature, state, the modules' DictsState) of a call whose record was refused: not
        # tried again while they hold (a mode's flags, a module's attributes, decide what runs).
        self._refused: tuple | None = None

    # A copy (deepcopy, pickle) starts without a record: one is made again for its own modules.
    def __getstate__(self) -> tuple:
        return self._root, self._gm, self.enabled

    def __setstate__(self, state: tuple) -> None:
        self.__init__(*state)

    def __call__(self, args: tuple):
        sig = _signature(args) if self.why_not is None and _recordable() else None
        if sig is None:
            return self._gm.forward(*args)
        state = _global_state()
        record = self.records.get((sig, state))  # one read: another thread may replace the dict
        if record is not None:
            if record.holds():
                if not record.replays:
                    self._patience = 1
                record.replays += 1
                return tree_unflatten(record.program.run(list(args)), record.spec)
            # The model changed: every record is stale, and goes with its constants.
            self.records = {}
            if not record.replays:
                self._patience = min(2 * self._patience, 64)
        refused = self._refused
        if refused is not None:
            if refused[:2] == (sig, state) and refused[2].unchanged():
                return self._gm.forward(*args)
            self._refused = None
        if self._last != (sig, state):
            self._last, self._streak = (sig, state), 0
            return self._gm.forward(*args)
        self._streak += 1
        if self._streak < self._patience:
            return self._gm.forward(*args)
        self._streak = 0
        return self._record_call(args, sig, state)

    def _record_call(self, args: tuple, sig: tuple, state: tuple):
        dicts = _backend._C.DictsState(_module_dicts(self._root))
        tensors = _module_tensors(self._root)
        key = _backend._C.TensorsKey(tensors)
        rec = _Recorder(list(args))
        with rec:
            out = self._gm.forward(*args)
        leaves, spec = tree_flatten(out)
        slots = [rec.slot(t) for t in leaves]
        if rec.refused is None and all(s is not None for s in slots):
            last: dict[int, int] = {}
            for i, (_, _, _, reads, _) in enumerate(rec.instrs):
                for _, _, s in reads:
                    last[s] = i
            releases = [[] for _ in rec.instrs]
            for s, i in last.items():
                if s not in slots:
                    releases[i].append(s)
            instrs = [(*ins, releases[i]) for i, ins in enumerate(rec.instrs)]
            program = _backend._C.Program(instrs, len(args), rec.n_slots, slots)
            # Recorded from the state before the call: a call that changed it (it may not) is not kept.
            if dicts.unchanged() and key.unchanged(tensors):
                # The other signatures' records that still hold (same state, same model).
                kept = {k: r for k, r in self.records.items() if k != (sig, state) and r.state == state and r.holds()}
                while len(kept) >= MAX_RECORDS:
                    del kept[next(iter(kept))]
                kept[(sig, state)] = _Record(program, state, dicts, key, tensors, spec)
                self.records = kept
        else:
            self.last_refusal = rec.refused or "an output is not a tensor the call computed"
            self._refused = (sig, state, dicts)
        return out


__all__ = ["Replayer", "replayable_graph"]
