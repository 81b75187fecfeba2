// The key of a result cached from module tensors (optimize()'s folded and packed weights): the
// exact tensors and their versions, checked in one call per use.
#pragma once

#include <torch/extension.h>

namespace dc_torch {

void register_tensors_key(pybind11::module_& m);

}  // namespace dc_torch
