#include "program.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/jit/python/pybind_utils.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace dc_torch {
namespace {

namespace py = pybind11;

// An argument as the schema types it. A Python number given for a tensor (what `x * 2` passes to
// aten::mul.Tensor) becomes the wrapped-number tensor the dispatcher makes of it.
c10::IValue to_ivalue(const py::handle obj, const c10::TypePtr& type) {
  if (type->kind() == c10::TypeKind::TensorType && (PyLong_Check(obj.ptr()) || PyFloat_Check(obj.ptr()) ||
                                                   PyBool_Check(obj.ptr()) || PyComplex_Check(obj.ptr()))) {
    at::Tensor t = c10::scalar_to_tensor(torch::jit::toIValue(obj, c10::NumberType::get()).toScalar());
    t.unsafeGetTensorImpl()->set_wrapped_number(true);
    return t;
  }
  return torch::jit::toIValue(obj, type);
}

// Where a slot's value goes: the argument, or an item of a list argument (item >= 0).
struct Read {
  size_t arg;
  int64_t item, slot;
};

// One dispatcher call: the operator, its arguments in schema order (the constants converted
// once; a slot's place holds a placeholder), where the slots go, the slot its result goes to,
// and the slots it reads last (released after it, so a value lives as long as it would in
// eager mode).
struct Instr {
  c10::OperatorHandle op;
  std::vector<c10::IValue> args;
  std::vector<Read> reads;
  int64_t out = 0;
  std::vector<int64_t> last_reads;
};

// The program: ops in the order recorded, slots 0 .. n_inputs - 1 the inputs, `outputs` the
// slots returned. Run with CPU autocast excluded: what was recorded is what autocast dispatched
// (its casts are recorded as ops of their own).
class Program {
 public:
  Program(const py::list& instrs, int64_t n_inputs, int64_t n_slots, std::vector<int64_t> outputs)
      : n_inputs_(n_inputs), n_slots_(n_slots), outputs_(std::move(outputs)) {
    TORCH_CHECK(n_inputs >= 0 && n_inputs <= n_slots, "Program: bad slot counts");
    for (const int64_t s : outputs_) TORCH_CHECK(s >= 0 && s < n_slots, "Program: output slot ", s, " out of range");
    for (const py::handle item : instrs) {
      const auto t = item.cast<py::tuple>();
      TORCH_CHECK(t.size() == 6, "Program: an instruction is (name, overload, args, reads, out, last_reads)");
      const auto name = t[0].cast<std::string>();
      const auto overload = t[1].cast<std::string>();
      Instr in{c10::Dispatcher::singleton().findSchemaOrThrow(name.c_str(), overload.c_str()), {}, {}, 0, {}};
      const c10::FunctionSchema& schema = in.op.schema();
      TORCH_CHECK(schema.returns().size() == 1 && schema.returns()[0].type()->kind() == c10::TypeKind::TensorType,
                  "Program: ", name, ".", overload, " does not return one tensor");
      const auto args = t[2].cast<py::list>();
      TORCH_CHECK(args.size() == schema.arguments().size(), "Program: ", name, " takes ",
                  schema.arguments().size(), " arguments, got ", args.size());
      for (const auto& [pos, item, slot] : t[3].cast<std::vector<std::tuple<int64_t, int64_t, int64_t>>>()) {
        TORCH_CHECK(pos >= 0 && pos < static_cast<int64_t>(args.size()) && slot >= 0 && slot < n_slots,
                    "Program: a read out of range");
        in.reads.push_back({static_cast<size_t>(pos), item, slot});
      }
      std::stable_sort(in.reads.begin(), in.reads.end(), [](const Read& a, const Read& b) { return a.arg < b.arg; });
      for (size_t i = 0; i < args.size(); ++i) {
        bool whole = false;
        for (const Read& r : in.reads) whole = whole || (r.arg == i && r.item < 0);
        in.args.push_back(whole ? c10::IValue() : to_ivalue(args[i], schema.arguments()[i].type()));
      }
      for (const Read& r : in.reads) {
        const c10::IValue& a = in.args[r.arg];
        TORCH_CHECK(r.item < 0 || (a.isList() && r.item < static_cast<int64_t>(a.toListRef().size())),
                    "Program: a read of an item out of range");
      }
      in.out = t[4].cast<int64_t>();
      TORCH_CHECK(in.out >= n_inputs && in.out < n_slots, "Program: result slot ", in.out, " out of range");
      in.last_reads = t[5].cast<std::vector<int64_t>>();
      for (const int64_t s : in.last_reads) TORCH_CHECK(s >= 0 && s < n_slots, "Program: a release out of range");
      instrs_.push_back(std::move(in));
    }
  }

  std::vector<at::Tensor> run(const std::vector<at::Tensor>& inputs) const {
    TORCH_CHECK(static_cast<int64_t>(inputs.size()) == n_inputs_, "Program: expected ", n_inputs_, " inputs, got ",
                inputs.size());
    std::vector<c10::IValue> slots(static_cast<size_t>(n_slots_));
    for (size_t i = 0; i < inputs.size(); ++i) slots[i] = inputs[i];
    {
      const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
      torch::jit::Stack stack;
      for (const Instr& in : instrs_) {
        stack.assign(in.args.begin(), in.args.end());
        size_t copied = in.args.size();  // the list argument copied last (reads of one list are together)
        for (const Read& r : in.reads) {
          if (r.item < 0) {
            stack[r.arg] = slots[r.slot];
            continue;
          }
          // The constant list is shared by every run: its items are set in a copy.
          if (copied != r.arg) {
            stack[r.arg] = in.args[r.arg].toList().copy();
            copied = r.arg;
          }
          stack[r.arg].toList().set(r.item, slots[r.slot]);
        }
        in.op.callBoxed(stack);
        slots[in.out] = std::move(stack[0]);
        for (const int64_t s : in.last_reads) slots[s] = c10::IValue();
      }
    }
    std::vector<at::Tensor> out;
    for (const int64_t s : outputs_) out.push_back(slots[s].toTensor());
    return out;
  }

  size_t size() const { return instrs_.size(); }

 private:
  std::vector<Instr> instrs_;
  int64_t n_inputs_, n_slots_;
  std::vector<int64_t> outputs_;
};

// The items of some dicts (modules' __dict__ and the dicts in them: parameters, buffers,
// submodules, hooks), as they were: unchanged() while every dict has the same keys bound to
// the same objects, in the same order. The dicts and the objects are held, so no other object
// can take one's address.
class DictsState {
 public:
  explicit DictsState(const py::list& dicts) {
    for (const py::handle d : dicts) {
      TORCH_CHECK(PyDict_Check(d.ptr()), "DictsState: expected dicts");
      Snapshot s{py::reinterpret_borrow<py::dict>(d), {}};
      PyObject *key, *value;
      Py_ssize_t pos = 0;
      while (PyDict_Next(d.ptr(), &pos, &key, &value))
        s.items.emplace_back(py::reinterpret_borrow<py::object>(key), py::reinterpret_borrow<py::object>(value));
      snapshots_.push_back(std::move(s));
    }
  }

  bool unchanged() const {
    for (const Snapshot& s : snapshots_) {
      if (PyDict_Size(s.dict.ptr()) != static_cast<Py_ssize_t>(s.items.size())) return false;
      PyObject *key, *value;
      Py_ssize_t pos = 0;
      size_t i = 0;
      while (PyDict_Next(s.dict.ptr(), &pos, &key, &value)) {
        if (key != s.items[i].first.ptr() || value != s.items[i].second.ptr()) return false;
        ++i;
      }
    }
    return true;
  }

 private:
  struct Snapshot {
    py::dict dict;
    std::vector<std::pair<py::object, py::object>> items;
  };
  std::vector<Snapshot> snapshots_;
};

}  // namespace

void register_program(py::module_& m) {
  py::class_<Program>(m, "Program", "Recorded dispatcher calls, replayed from C++ (optimize()'s eval calls).")
      .def(py::init<const py::list&, int64_t, int64_t, std::vector<int64_t>>(), py::arg("instrs"),
           py::arg("n_inputs"), py::arg("n_slots"), py::arg("outputs"))
      .def("run", &Program::run, py::arg("inputs"), py::call_guard<py::gil_scoped_release>(),
           "The outputs of the recorded calls on these inputs (CPU autocast excluded: the record is what it "
           "dispatched).")
      .def("__len__", &Program::size);
  py::class_<DictsState>(m, "DictsState", "The items of some dicts, to tell whether any was set, added or removed.")
      .def(py::init<const py::list&>(), py::arg("dicts"))
      .def("unchanged", &DictsState::unchanged, "Whether every dict holds the same keys and objects, in order.");
}

}  // namespace dc_torch
