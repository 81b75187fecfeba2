// The drivers of whole blocked passes, over every group, on the caller's pool (RunShares):
// the forward (blocked, or NCHW in and out through the blocked layout), the input gradient
// by phases, and the weight update with the reduction of its private copies. Raw pointers
// and element offsets, no torch.
#pragma once

#include <cstdint>
#include <functional>
#include <utility>
#include <vector>

#include "conv/bwd_data.h"
#include "conv/conv_desc.h"
#include "conv/fwd_driver.h"
#include "conv/fwd_plan.h"
#include "conv/parallel.h"
#include "jit/isa.h"

namespace dc {

// Writes blocks [begin, end) of one group's packed weights from dst on, in the order of
// the layer's weight blocks.
using PackBlockRange = std::function<void(int64_t begin, int64_t end, float* dst)>;

// Whether each output-channel group of the plan is one work unit (every image, every
// row), whose weights no other unit reads: the unit may then pack them itself.
bool one_unit_per_kgroup(const FwdPlan& plan);

// fwd_execute_prepared's prepare for a unit that packs its own output-channel group's
// weights just before its calls, into a per-thread buffer that stays in cache: the weights
// are read once, not packed, written and read again.
FwdPrepare pack_per_unit(const FwdPlan& plan, const PackBlockRange& pack);

// The forward of every group on blocked tensors, group g at src + g * src_group, ... . With
// `pack` (one group, wei null) each work unit packs its own weights (one_unit_per_kgroup
// must hold). The epilogue is the plan's post-ops, with their operands in `post` (a bias or a
// residual of group g at + g * bias_group, + g * dst_group). Runs on plan.threads shares.
void run_fwd(const FwdHandle& handle, const float* src, const float* wei, const FwdPostArgs& post, float* dst,
             int64_t groups, int64_t src_group, int64_t wei_group, int64_t bias_group, int64_t dst_group,
             const RunShares& run_shares, const PackBlockRange& pack = nullptr);

// NCHW (strides xs, group g's channels from x + g * c * xs[1]) in, NCHW (strides ys) out,
// through the blocked kernels of a handle (one group's problem; its post-ops at most a bias and
// a ReLU): the input converted to blocks,
// the kernels run, the output converted back, in the calling thread's scratch. The weights
// are `packed` (every group, as (G, Kb, Cb, R, S, V, V)), or, when that is null, packed at
// this call by `pack` (one group): by each work unit just before its calls when the plan
// allows (one_unit_per_kgroup), else beside the input's conversion. bias_blk: groups x
// (Kb * V) zero-padded values, or null.
void fwd_nchw_via_blocks(const FwdHandle& handle, int64_t groups, const float* x, const int64_t* xs,
                         const float* packed, const PackBlockRange& pack, const float* bias_blk, float* y,
                         const int64_t* ys, const RunShares& run_shares);

// Writes one thread's share of a phase's weights (Cb, Kb, n_r, n_s, V, V) for every group.
using PackPhase = std::function<void(const BwdDataPhase&, float* dst, int tid, int nthreads)>;
// Writes blocks [begin, end) of a phase's weights (one group) from dst on.
using PackBlocks = std::function<void(const BwdDataPhase&, int64_t begin, int64_t end, float* dst)>;

// The input gradient on blocked tensors, group after group: dy (N, Kb, P, Q, V) at dy_group
// floats per group, dx (N, Cb, H, W, V) at dx_group. Every pixel of dx is written: each
// phase with taps by the forward kernels through a strided output view, the others with
// zeros. Two parallel regions in all: one packs the weights of every phase (and zeroes the
// phases no tap reaches), one runs every phase; a thread done with its share of a phase
// goes on to the next, as the phases' pixels are disjoint.
//
// With pack_blocks, one group and plans that give each output-channel group a single work
// unit (every image and row: one image, or the deep layers), every unit packs its own
// weights just before its calls, into a per-thread buffer that stays in cache: the weights
// are read once, not packed, written and read again (the 7x7 layers, where that traffic
// costs about as much as the convolution).
void run_bwd_data(const ConvDesc& d, const std::vector<BwdDataPhase>& phases, const float* dy, float* dx,
                  int64_t groups, int64_t dy_group, int64_t dx_group, const PackPhase& pack, Isa isa, int threads,
                  const FwdPlanOptions& options, const RunShares& run_shares, const PackBlocks& pack_blocks = nullptr);

// Adds the private copies of a minibatch split into the first, for every group: copy p of
// group g's dW (dw_elems floats) at dw + g * (parts * dw_elems) + p * dw_elems.
void reduce_upd_parts(float* dw, int64_t groups, int64_t dw_elems, int parts, int threads,
                      const RunShares& run_shares);

// The weight gradient of every group on blocked tensors, x (N, Cb, H, W, V) at x_group
// floats per group and dy (N, Kb, P, Q, V) at dy_group. Returns dW (Kb, Cb, R, S, V, V) of
// group g at the returned pointer + g * (its second member) floats: straight in `out`
// (dense, one group) when given and no private copies are needed, else in scratch slot 2.
std::pair<const float*, int64_t> run_upd(const ConvDesc& d, int64_t groups, const float* x_blk, int64_t x_group,
                                         const float* dy_blk, int64_t dy_group, Isa isa, int threads,
                                         const RunShares& run_shares, float* out = nullptr);

}  // namespace dc
