// The drivers of the blocked passes, over the torch layer's thread pool (run_shares).
#pragma once

#include <cstdint>
#include <functional>
#include <utility>
#include <vector>

#include "conv/bwd_data.h"
#include "conv/conv_desc.h"
#include "conv/fwd_driver.h"
#include "conv/fwd_plan.h"

namespace dc_torch {

// Writes blocks [begin, end) of one group's packed weights from dst on, in the order of
// the layer's weight blocks.
using PackBlockRange = std::function<void(int64_t begin, int64_t end, float* dst)>;

bool one_unit_per_kgroup(const dc::FwdPlan& plan);
dc::FwdPrepare pack_per_unit(const dc::FwdPlan& plan, const PackBlockRange& pack);

void run_fwd(const dc::FwdPrimitive& prim, const float* src, const float* wei, const float* bias, float* dst,
             bool relu, int64_t groups, int64_t src_group, int64_t wei_group, int64_t bias_group, int64_t dst_group,
             const PackBlockRange& pack = nullptr);

// Writes one thread's share of a phase's weights (Cb, Kb, n_r, n_s, V, V) for every group.
using PackPhase = std::function<void(const dc::BwdDataPhase&, float* dst, int tid, int nthreads)>;
// Writes blocks [begin, end) of a phase's weights (one group) from dst on.
using PackBlocks = std::function<void(const dc::BwdDataPhase&, int64_t begin, int64_t end, float* dst)>;

void run_bwd_data(const dc::ConvDesc& d, const std::vector<dc::BwdDataPhase>& phases, const float* dy, float* dx,
                  int64_t groups, int64_t dy_group, int64_t dx_group, const PackPhase& pack,
                  const PackBlocks& pack_blocks = nullptr);

std::pair<const float*, int64_t> run_upd(const dc::ConvDesc& d, int64_t groups, const float* x_blk, int64_t x_group,
                                         const float* dy_blk, int64_t dy_group, float* out = nullptr);

}  // namespace dc_torch
