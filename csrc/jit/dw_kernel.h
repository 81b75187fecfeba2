// Depthwise forward microkernel (groups == channels, one output channel per group).
//
// Channels live in the vector lanes, so there is nothing to broadcast: one call computes
// `ow` pixels of one channel block, each pixel an accumulator, loading each tap's weight
// vector once and taking the input vectors as FMA memory operands. It reduces over `n_r`
// kernel rows (runtime loop) and every kernel column (unrolled).
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "jit/isa.h"
#include "jit/jit_kernel.h"
#include "jit/row_taps.h"

namespace dc {

struct DwKernelSpec : RowTaps {
  int ow = 1;  // output pixels of the call

  std::string name() const;
};

struct DwCallArgs {
  const float* src;      // input block, first valid kernel row, column iw0
  const float* wei;      // weights [cb][first valid kernel row][0][0]
  float* dst;            // output block, row oh, column ow0
  const float* bias;     // bias + cb * V, or null
  int64_t n_r;           // kernel rows to reduce (0 leaves the bias)
  int64_t flags;         // kRelu
  int64_t src_r_stride;  // bytes from one kernel row to the next in the input
};
constexpr int64_t kRelu = 2;  // max(0, .) before the store

using DwKernelFn = void (*)(const DwCallArgs*);

std::unique_ptr<JitGenerator> make_dw_kernel(const DwKernelSpec& spec);
// Accumulators that fit beside the weight register.
int dw_max_ow(Isa isa);

}  // namespace dc
