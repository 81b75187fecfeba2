// A recorded sequence of dispatcher calls, replayed from C++ (optimize()'s eval calls without
// gradients, _replay.py): each op with its constant arguments converted once, and the values
// that flow between the ops in numbered slots.
#pragma once

#include <torch/extension.h>

namespace dc_torch {

void register_program(pybind11::module_& m);

}  // namespace dc_torch
