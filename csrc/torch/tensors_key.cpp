#include "tensors_key.h"

#include <torch/csrc/autograd/python_variable.h>

#include <cstdint>
#include <vector>

namespace dc_torch {
namespace {

// The exact tensors a cached result was computed from (None allowed), and their versions.
// Holding each tensor keeps its TensorImpl alive, so no other tensor can take its address;
// the alias (same storage, another TensorImpl) keeps the storage too and catches
// `param.data = new`, which keeps the Parameter and its version counter.
class TensorsKey {
 public:
  explicit TensorsKey(const pybind11::sequence& tensors) {
    for (const pybind11::handle item : tensors) {
      Entry e;
      if (!item.is_none()) {
        e.tensor = unpack(item.ptr());
        e.alias = e.tensor.detach();
        e.version = e.tensor._version();
      }
      entries_.push_back(std::move(e));
    }
  }

  // Whether `tensors` are the key's tensors, in order, each at its version and still set to
  // the storage, offset, sizes and strides it had.
  bool unchanged(const pybind11::sequence& tensors) const {
    if (static_cast<size_t>(pybind11::len(tensors)) != entries_.size()) return false;
    size_t i = 0;
    for (const pybind11::handle item : tensors) {
      const Entry& e = entries_[i++];
      if (item.is_none()) {
        if (e.tensor.defined()) return false;
        continue;
      }
      if (!e.tensor.defined() || !THPVariable_Check(item.ptr())) return false;
      const at::Tensor& t = THPVariable_Unpack(item.ptr());
      if (t.unsafeGetTensorImpl() != e.tensor.unsafeGetTensorImpl() || t._version() != e.version ||
          !set_to(t, e.alias))
        return false;
    }
    return true;
  }

 private:
  struct Entry {
    at::Tensor tensor, alias;
    int64_t version = 0;
  };

  // What Tensor::is_set_to compares (storage, offset, sizes, strides), without a dispatch per
  // tensor; a tensor without storage (a transform's wrapper) is never the one kept.
  static bool set_to(const at::Tensor& t, const at::Tensor& alias) {
    return t.has_storage() && t.storage().unsafeGetStorageImpl() == alias.storage().unsafeGetStorageImpl() &&
           t.storage_offset() == alias.storage_offset() && t.sizes() == alias.sizes() &&
           t.strides() == alias.strides();
  }

  static at::Tensor unpack(PyObject* obj) {
    TORCH_CHECK(THPVariable_Check(obj), "TensorsKey: expected tensors or None");
    return THPVariable_Unpack(obj);
  }

  std::vector<Entry> entries_;
};

}  // namespace

void register_tensors_key(pybind11::module_& m) {
  pybind11::class_<TensorsKey>(m, "TensorsKey",
                               "The exact tensors (or None) a cached result comes from, and their versions.")
      .def(pybind11::init<const pybind11::sequence&>(), pybind11::arg("tensors"))
      .def("unchanged", &TensorsKey::unchanged, pybind11::arg("tensors"),
           "Whether these are the same tensors, in order, at the same versions and storage.");
}

}  // namespace dc_torch
