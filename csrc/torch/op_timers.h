// The project's own op timers: wall time and calls of every directconv op, from the
// dispatcher's RecordFunction hook (no torch.profiler, whose per-op bookkeeping inflates
// short custom ops). Off unless started.
#pragma once

#include <torch/extension.h>

namespace dc_torch {

void register_op_timers(pybind11::module_& m);

}  // namespace dc_torch
