#include "conv/drivers.h"

#include <algorithm>
#include <cstring>
#include <memory>

#include "conv/driver_util.h"
#include "conv/reorder.h"
#include "conv/scratch.h"
#include "conv/upd_conv.h"

namespace dc {

bool one_unit_per_kgroup(const FwdPlan& plan) {
  return plan.images_per_unit == plan.desc.n && plan.rows_per_group >= plan.desc.p();
}

FwdPrepare pack_per_unit(const FwdPlan& plan, const PackBlockRange& pack) {
  return [&plan, &pack](const FwdCall& first) {
    const int64_t V = plan.v(), per_kb = plan.cb * plan.desc.r * plan.desc.s * V * V;
    // The unit's first output-channel block (bias_off, unlike wei_off, has no tap in it).
    const int64_t kb0 = first.bias_off / V, n = std::min<int64_t>(plan.n_oc, plan.kb - kb0);
    float* buffer = scratch_floats(kScratchUnit, plan.n_oc * per_kb);
    pack(kb0 * plan.cb, (kb0 + n) * plan.cb, buffer);
    // The unit's calls add offsets counted from the first output-channel block.
    return static_cast<const float*>(at_offset(buffer, -kb0 * per_kb));
  };
}

void run_fwd(const FwdHandle& handle, const float* src, const float* wei, const FwdPostArgs& post, float* dst,
             int64_t groups, int64_t src_group, int64_t wei_group, int64_t bias_group, int64_t dst_group,
             const RunShares& run_shares, const PackBlockRange& pack) {
  const FwdPrimitive& prim = *handle.prim;
  const FwdKernels& kernels = handle.kernels;
  if (prim.plan.desc.n == 0) return;
  // The plan's thread count, never a fresh num_threads(): another thread may have changed
  // torch's since the plan was made, and a stream left unrun is output left unwritten.
  const int nt = prim.plan.threads;
  std::vector<FwdWorkQueue> queues;
  queues.reserve(groups);
  for (int64_t g = 0; g < groups; ++g) queues.emplace_back(nt);
  if (pack) {
    const FwdPrepare prepare = pack_per_unit(prim.plan, pack);
    run_shares(nt, [&](int tid, int) {
      ScratchScope share;  // the pool thread's own packing buffer
      fwd_execute_prepared(prim, kernels, src, prepare, post, dst, tid, nt > 1 ? &queues[0] : nullptr);
    });
    return;
  }
  run_shares(nt, [&](int tid, int) {
    for (int64_t g = 0; g < groups; ++g)
      fwd_execute(prim, kernels, src + g * src_group, wei + g * wei_group,
                  {post.bias ? post.bias + g * bias_group : nullptr,
                   post.residual ? post.residual + g * dst_group : nullptr, post.stats_shift, post.stats},
                  dst + g * dst_group, tid, nt > 1 ? &queues[g] : nullptr);
  });
}

void fwd_nchw_via_blocks(const FwdHandle& handle, int64_t groups, const float* x, const int64_t* xs,
                         const float* packed, const PackBlockRange& pack, const float* bias_blk, float* y,
                         const int64_t* ys, const RunShares& run_shares) {
  const FwdPrimitive& prim = *handle.prim;
  const ConvDesc& d = prim.plan.desc;
  if (d.n == 0) return;
  const int V = prim.plan.v(), nt = prim.plan.threads;
  const int64_t cg = d.c, kg = d.k, cb = div_up(cg, V), kb = div_up(kg, V), P = d.p(), Q = d.q();
  const bool per_unit = !packed && one_unit_per_kgroup(prim.plan);
  const int64_t src_group = d.n * cb * d.h * d.w * V, dst_group = d.n * kb * P * Q * V;
  const int64_t wei_group = kb * cb * d.r * d.s * V * V;
  float* src_blk = scratch_floats(kScratchSrc, groups * src_group);
  float* dst_blk = scratch_floats(kScratchDst, groups * dst_group);
  float* wei_blk = packed || per_unit ? nullptr : scratch_floats(kScratchWei, wei_group);
  run_shares(nt, [&](int tid, int n_threads) {
    for (int64_t g = 0; g < groups; ++g)
      reorder_to_blocked(x + g * cg * xs[1], xs, d.n, cg, d.h, d.w, V, src_blk + g * src_group, tid, n_threads);
    if (wei_blk) {
      const int64_t blocks = kb * cb, begin = blocks * tid / n_threads, end = blocks * (tid + 1) / n_threads;
      pack(begin, end, wei_blk + begin * d.r * d.s * V * V);
    }
  });
  run_fwd(handle, src_blk, packed ? packed : wei_blk, {bias_blk}, dst_blk, groups, src_group, wei_group, kb * V,
          dst_group, run_shares, per_unit ? pack : nullptr);
  run_shares(nt, [&](int tid, int n_threads) {
    for (int64_t g = 0; g < groups; ++g)
      reorder_from_blocked(dst_blk + g * dst_group, d.n, kg, P, Q, V, y + g * kg * ys[1], ys, tid, n_threads);
  });
}

void run_bwd_data(const ConvDesc& d, const std::vector<BwdDataPhase>& phases, const float* dy, float* dx,
                  int64_t groups, int64_t dy_group, int64_t dx_group, const PackPhase& pack, Isa isa, int threads,
                  const FwdPlanOptions& fwd_options, const RunShares& run_shares, const PackBlocks& pack_blocks) {
  if (d.n == 0) return;
  const int64_t V = vlen(isa), cb = div_up(d.c, V), kb = div_up(d.k, V);
  const int nt = threads;
  struct Job {
    const BwdDataPhase* phase;
    std::shared_ptr<const FwdPrimitive> prim;
    FwdKernels kernels;
    int64_t src_off, dst_off, wei_off, wei_group;
  };
  std::vector<Job> jobs;
  int64_t wei_total = 0;
  for (const BwdDataPhase& ph : phases) {
    if (ph.empty()) continue;
    Job j;
    j.phase = &ph;
    FwdPlanOptions options = fwd_options;
    bwd_data_phase_layout(d, ph, static_cast<int>(V), &options, &j.src_off, &j.dst_off);
    const auto handle = get_fwd_handle(ph.sub, isa, nt, options);
    j.prim = handle->prim;
    j.kernels = handle->kernels;
    j.wei_group = cb * kb * ph.sub.r * ph.sub.s * V * V;
    j.wei_off = wei_total;
    wei_total += groups * j.wei_group;
    jobs.push_back(std::move(j));
  }
  bool per_unit = pack_blocks && groups == 1;
  for (const Job& j : jobs) per_unit = per_unit && one_unit_per_kgroup(j.prim->plan);
  float* wei = per_unit ? nullptr : scratch_floats(kScratchWei, std::max<int64_t>(1, wei_total));
  run_shares(nt, [&](int tid, int n_threads) {
    if (!per_unit)
      for (const Job& j : jobs) pack(*j.phase, wei + j.wei_off, tid, n_threads);
    for (const BwdDataPhase& ph : phases) {
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
  std::vector<FwdWorkQueue> queues;
  queues.reserve(jobs.size() * groups);
  for (size_t i = 0; i < jobs.size() * groups; ++i) queues.emplace_back(nt);
  if (per_unit) {
    run_shares(nt, [&](int tid, int) {
      ScratchScope share;  // the pool thread's own packing buffer
      for (size_t i = 0; i < jobs.size(); ++i) {
        const Job& j = jobs[i];
        const PackBlockRange pack_phase = [&](int64_t begin, int64_t end, float* dst) {
          pack_blocks(*j.phase, begin, end, dst);
        };
        const FwdPrepare prepare = pack_per_unit(j.prim->plan, pack_phase);
        fwd_execute_prepared(*j.prim, j.kernels, dy + j.src_off, prepare, {}, dx + j.dst_off, tid,
                             nt > 1 ? &queues[i] : nullptr);
      }
    });
    return;
  }
  run_shares(nt, [&](int tid, int) {
    for (size_t i = 0; i < jobs.size(); ++i) {
      const Job& j = jobs[i];
      for (int64_t g = 0; g < groups; ++g)
        fwd_execute(*j.prim, j.kernels, dy + g * dy_group + j.src_off, wei + j.wei_off + g * j.wei_group, {},
                    dx + g * dx_group + j.dst_off, tid, nt > 1 ? &queues[i * groups + g] : nullptr);
    }
  });
}

void reduce_upd_parts(float* dw, int64_t groups, int64_t dw_elems, int parts, int threads,
                      const RunShares& run_shares) {
  const int64_t group_stride = parts * dw_elems;
  run_shares(threads, [&](int tid, int n_threads) {
    const int64_t total = groups * dw_elems;
    for (int64_t i = total * tid / n_threads; i < total * (tid + 1) / n_threads; ++i) {
      float* first = dw + (i / dw_elems) * group_stride + i % dw_elems;
      for (int p = 1; p < parts; ++p) *first += first[p * dw_elems];
    }
  });
}

std::pair<const float*, int64_t> run_upd(const ConvDesc& d, int64_t groups, const float* x_blk, int64_t x_group,
                                         const float* dy_blk, int64_t dy_group, Isa isa, int threads,
                                         const RunShares& run_shares, float* out) {
  auto prim = get_upd_primitive(d, isa, threads);
  const int nt = prim->plan.threads;
  const UpdKernels kernels = acquire_kernels(*prim);
  const UpdPlan& plan = prim->plan;
  const int64_t dw_elems = plan.dw_elements(), group_stride = plan.parts * dw_elems;
  // The kernels write all of it.
  float* dw = out && groups == 1 && plan.parts == 1 ? out : scratch_floats(kScratchWei, groups * group_stride);
  run_shares(nt, [&](int tid, int) {
    for (int64_t g = 0; g < groups; ++g)
      upd_execute(*prim, kernels, x_blk + g * x_group, dy_blk + g * dy_group, dw + g * group_stride, tid);
  });
  if (plan.parts > 1) reduce_upd_parts(dw, groups, dw_elems, plan.parts, nt, run_shares);
  return {dw, group_stride};
}

}  // namespace dc
