// Forward direct-convolution microkernel (DESIGN.md section 2).
//
// One call computes an output tile of `oh` rows x `ow` pixels x `n_oc` channel blocks,
// held in vector registers, reducing over `n_cb` input-channel blocks and `n_r` kernel
// rows (runtime loops) and over every kernel column and channel of a block (unrolled).
// Per unrolled step it loads n_oc weight vectors, broadcasts each input scalar once into
// a register and feeds it to n_oc FMAs, so loads per FMA stay well below one.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "jit/isa.h"
#include "jit/jit_kernel.h"
#include "jit/row_taps.h"

namespace dc {

// The epilogue of a tile's last input-channel chunk, applied in this order: + bias (one
// vector per output block), + residual (a tensor laid out as the output, read at the
// tile's offsets), max(0, .), the store; then the statistics of what was stored: per
// output channel, the tile's sums of (y - shift) and (y - shift)^2 in fp32 over its few
// pixels, for batch norm (conv/fwd_stats.h merges them). Calls on earlier chunks run a
// kernel without post-ops, so a kernel's name says everything it computes.
struct FwdPostOps {
  bool bias = false;
  bool add = false;
  bool relu = false;
  bool stats = false;
  bool any() const { return bias || add || relu || stats; }
  std::string name() const;  // "" or "_post_bias_add_relu_stats" (the ones present)
  bool operator==(const FwdPostOps& o) const {
    return bias == o.bias && add == o.add && relu == o.relu && stats == o.stats;
  }
};

// What the generated code depends on; name() is the cache key.
struct FwdKernelSpec : RowTaps {
  int oh = 1, ow = 1, n_oc = 1;  // tile: rows x pixels x output-channel blocks
  int c_valid = 16;              // channels of each input block that are used (< V for a tail)
  // Software prefetch: while reducing, touch the same rows of the next call's input tile
  // (FwdCallArgs::pf_src), one cache line per unrolled step.
  bool prefetch = false;
  // Vectors from one output pixel to the next: 1 for a dense output row, more when the
  // output is a strided view (the phases of a strided layer's input gradient).
  int dst_px = 1;
  // Bytes from the weight vector of one input channel to the next within a block: 0 for
  // the packed V x V blocks (V elements). The NCHW 1x1 plan reads the input rows themselves as
  // its "weights", one channel's row of pixels after the other (conv/fwd_plan.h).
  int64_t wei_c_stride = 0;
  // Bytes from one output pixel to the next when it is not a whole number of vectors (the
  // NCHW 1x1 plan's output channel rows); 0: dst_px vectors.
  int64_t dst_px_bytes = 0;
  // AVX-512 only: the lanes of the tile's last output block that exist (the NCHW 1x1 plan's
  // last vector of pixels); its weight vectors are loaded and its outputs stored under a
  // mask. 0: every lane.
  int last_oc_lanes = 0;
  FwdPostOps post;

  int64_t wei_c_bytes() const { return wei_c_stride ? wei_c_stride : v() * es(); }
  int64_t dst_px_step() const { return dst_px_bytes ? dst_px_bytes : static_cast<int64_t>(dst_px) * v() * es(); }
  std::string name() const;
};

// The kernel's one argument; offsets are read through offsetof.
struct FwdCallArgs {
  const float* src;        // input block cb0, first valid kernel row, column iw0
  const float* wei;        // weights [kb0][cb0][first valid kernel row][0][0][0]
  float* dst;              // output block kb0, row oh0, column ow0
  const float* bias;       // bias + kb0 * V (read when the spec's post-ops add a bias)
  int64_t n_r;             // kernel rows to reduce (0 leaves zero or the old values)
  int64_t n_cb;            // input-channel blocks to reduce (>= 1)
  int64_t flags;           // kAccumulate: start from dst, else from zero
  int64_t src_r_stride;    // bytes from one kernel row to the next in the input
  int64_t src_row_stride;  // bytes from one tile row to the next in the input
  int64_t src_cb_stride;   // bytes per input-channel block
  int64_t wei_cb_stride;   // bytes per input-channel block of the weights
  int64_t wei_kb_stride;   // bytes per output-channel block of the weights
  int64_t dst_row_stride;  // bytes per output row
  int64_t dst_kb_stride;   // bytes per output-channel block
  const float* pf_src;     // the next call's src, when the kernel prefetches
  const float* residual;   // the residual at dst's offsets, same strides (read when post-ops add it)
  const float* stats_shift;  // shift + kb0 * V (read by the stats post-op)
  float* stats;              // the tile's sums: per output block, V sums of y - shift, then V of its square
};
constexpr int64_t kAccumulate = 1;

using FwdKernelFn = void (*)(const FwdCallArgs*);

std::unique_ptr<JitGenerator> make_fwd_kernel(const FwdKernelSpec& spec);

// Register budget of the tile, as the generator will allocate it.
int fwd_vector_registers(const FwdKernelSpec& spec);
int isa_vector_registers(Isa isa);

}  // namespace dc
