// The drivers of the blocked passes over the torch layer's thread pool: the forward of every
// group, the input-gradient phases and the weight update with its private copies.
#include "drivers.h"

#include <cstring>
#include <memory>

#include "common.h"
#include "conv/scratch.h"
#include "conv/upd_conv.h"
#include "jit/isa.h"
#include "threading.h"

namespace dc_torch {

// Whether each output-channel group of the plan is one work unit (every image, every
// row), whose weights no other unit reads: the unit may then pack them itself.
bool one_unit_per_kgroup(const dc::FwdPlan& plan) {
  return plan.images_per_unit == plan.desc.n && plan.rows_per_group >= plan.desc.p();
}

// fwd_execute_prepared's prepare for a unit that packs its own output-channel group's
// weights just before its calls, into a per-thread buffer that stays in cache: the weights
// are read once, not packed, written and read again.
dc::FwdPrepare pack_per_unit(const dc::FwdPlan& plan, const PackBlockRange& pack) {
  return [&plan, &pack](const dc::FwdCall& first) {
    const int64_t V = plan.v(), per_kb = plan.cb * plan.desc.r * plan.desc.s * V * V;
    // The unit's first output-channel block (bias_off, unlike wei_off, has no tap in it).
    const int64_t kb0 = first.bias_off / V, n = std::min<int64_t>(plan.n_oc, plan.kb - kb0);
    float* buffer = scratch(dc::kScratchUnit, plan.n_oc * per_kb);
    pack(kb0 * plan.cb, (kb0 + n) * plan.cb, buffer);
    // The unit's calls add offsets counted from the first output-channel block.
    return reinterpret_cast<const float*>(reinterpret_cast<intptr_t>(buffer) - kb0 * per_kb * 4);
  };
}

// The forward of every group on blocked tensors. With `pack` (one group, wei null) each
// work unit packs its own weights (one_unit_per_kgroup must hold).
void run_fwd(const dc::FwdPrimitive& prim, const float* src, const float* wei, const float* bias, float* dst,
             bool relu, int64_t groups, int64_t src_group, int64_t wei_group, int64_t bias_group, int64_t dst_group,
             const PackBlockRange& pack) {
  if (prim.plan.desc.n == 0) return;
  // The plan's thread count, never a fresh num_threads(): another thread may have changed
  // torch's since the plan was made, and a stream left unrun is output left unwritten.
  const int nt = prim.plan.threads;
  const dc::FwdKernels kernels = dc::acquire_kernels(prim);
  std::vector<dc::FwdWorkQueue> queues;
  queues.reserve(groups);
  for (int64_t g = 0; g < groups; ++g) queues.emplace_back(nt);
  if (pack) {
    const dc::FwdPrepare prepare = pack_per_unit(prim.plan, pack);
    run_shares(nt, [&](int tid, int) {
      dc::ScratchScope share;  // the pool thread's own packing buffer
      dc::fwd_execute_prepared(prim, kernels, src, prepare, bias, dst, relu, tid, nt > 1 ? &queues[0] : nullptr);
    });
    return;
  }
  run_shares(nt, [&](int tid, int) {
    for (int64_t g = 0; g < groups; ++g)
      dc::fwd_execute(prim, kernels, src + g * src_group, wei + g * wei_group, bias ? bias + g * bias_group : nullptr,
                      dst + g * dst_group, relu, tid, nt > 1 ? &queues[g] : nullptr);
  });
}

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
void run_bwd_data(const ConvDesc& d, const std::vector<dc::BwdDataPhase>& phases, const float* dy, float* dx,
                  int64_t groups, int64_t dy_group, int64_t dx_group, const PackPhase& pack,
                  const PackBlocks& pack_blocks) {
  if (d.n == 0) return;
  const dc::Isa isa = jit_isa();
  const int64_t V = dc::vlen(isa), cb = dc::div_up(d.c, V), kb = dc::div_up(d.k, V);
  const int nt = num_threads();
  struct Job {
    const dc::BwdDataPhase* phase;
    std::shared_ptr<const dc::FwdPrimitive> prim;
    dc::FwdKernels kernels;
    int64_t src_off, dst_off, wei_off, wei_group;
  };
  std::vector<Job> jobs;
  int64_t wei_total = 0;
  for (const dc::BwdDataPhase& ph : phases) {
    if (ph.empty()) continue;
    Job j;
    j.phase = &ph;
    dc::FwdPlanOptions options = fwd_options();
    dc::bwd_data_phase_layout(d, ph, static_cast<int>(V), &options, &j.src_off, &j.dst_off);
    j.prim = dc::get_fwd_primitive(ph.sub, isa, nt, options);
    j.kernels = dc::acquire_kernels(*j.prim);
    j.wei_group = cb * kb * ph.sub.r * ph.sub.s * V * V;
    j.wei_off = wei_total;
    wei_total += groups * j.wei_group;
    jobs.push_back(std::move(j));
  }
  bool per_unit = pack_blocks && groups == 1;
  for (const Job& j : jobs) per_unit = per_unit && one_unit_per_kgroup(j.prim->plan);
  float* wei = per_unit ? nullptr : scratch(dc::kScratchWei, std::max<int64_t>(1, wei_total));
  run_shares(nt, [&](int tid, int n_threads) {
    if (!per_unit)
      for (const Job& j : jobs) pack(*j.phase, wei + j.wei_off, tid, n_threads);
    for (const dc::BwdDataPhase& ph : phases) {
      if (!ph.empty()) continue;
      const int64_t lines = groups * d.n * cb * ph.rows;
      for (int64_t i = lines * tid / n_threads; i < lines * (tid + 1) / n_threads; ++i) {
        const int64_t y = i % ph.rows, blk = i / ph.rows;  // blk runs over (group, image, channel block)
        float* row = dx + (blk / (d.n * cb)) * dx_group + (blk % (d.n * cb)) * d.h * d.w * V +
                     ((ph.a + y * d.stride_h) * d.w + ph.b) * V;
        for (int64_t x = 0; x < ph.cols; ++x) std::memset(row + x * d.stride_w * V, 0, sizeof(float) * V);
      }
    }
  });
  if (jobs.empty()) return;
  std::vector<dc::FwdWorkQueue> queues;
  queues.reserve(jobs.size() * groups);
  for (size_t i = 0; i < jobs.size() * groups; ++i) queues.emplace_back(nt);
  if (per_unit) {
    run_shares(nt, [&](int tid, int) {
      dc::ScratchScope share;  // the pool thread's own packing buffer
      for (size_t i = 0; i < jobs.size(); ++i) {
        const Job& j = jobs[i];
        const PackBlockRange pack_phase = [&](int64_t begin, int64_t end, float* dst) {
          pack_blocks(*j.phase, begin, end, dst);
        };
        const dc::FwdPrepare prepare = pack_per_unit(j.prim->plan, pack_phase);
        dc::fwd_execute_prepared(*j.prim, j.kernels, dy + j.src_off, prepare, nullptr, dx + j.dst_off, false, tid,
                                 nt > 1 ? &queues[i] : nullptr);
      }
    });
    return;
  }
  run_shares(nt, [&](int tid, int) {
    for (size_t i = 0; i < jobs.size(); ++i) {
      const Job& j = jobs[i];
      for (int64_t g = 0; g < groups; ++g)
        dc::fwd_execute(*j.prim, j.kernels, dy + g * dy_group + j.src_off, wei + j.wei_off + g * j.wei_group, nullptr,
                        dx + g * dx_group + j.dst_off, false, tid, nt > 1 ? &queues[i * groups + g] : nullptr);
    }
  });
}

// The weight gradient of every group on blocked tensors, x (N, Cb, H, W, V) at x_group
// floats per group and dy (N, Kb, P, Q, V) at dy_group. Returns dW (Kb, Cb, R, S, V, V) of
// group g at the returned pointer + g * (its second member) floats: straight in `out`
// (dense, one group) when given and no private copies are needed, else in scratch slot 2.
std::pair<const float*, int64_t> run_upd(const ConvDesc& d, int64_t groups, const float* x_blk, int64_t x_group,
                                         const float* dy_blk, int64_t dy_group, float* out) {
  auto prim = dc::get_upd_primitive(d, jit_isa(), num_threads());
  const int nt = prim->plan.threads;
  const dc::UpdKernels kernels = dc::acquire_kernels(*prim);
  const dc::UpdPlan& plan = prim->plan;
  const int64_t dw_elems = plan.dw_elements(), group_stride = plan.parts * dw_elems;
  // The kernels write all of it.
  float* dw = out && groups == 1 && plan.parts == 1 ? out : scratch(dc::kScratchWei, groups * group_stride);
  run_shares(nt, [&](int tid, int) {
    for (int64_t g = 0; g < groups; ++g)
      dc::upd_execute(*prim, kernels, x_blk + g * x_group, dy_blk + g * dy_group, dw + g * group_stride, tid);
  });
  // The private copies of a minibatch split add into the first.
  if (plan.parts > 1)
    run_shares(nt, [&](int tid, int n_threads) {
      const int64_t total = groups * dw_elems;
      for (int64_t i = total * tid / n_threads; i < total * (tid + 1) / n_threads; ++i) {
        float* first = dw + (i / dw_elems) * group_stride + i % dw_elems;
        for (int p = 1; p < plan.parts; ++p) *first += first[p * dw_elems];
      }
    });
  return {dw, group_stride};
}

}  // namespace dc_torch
