// The input gradient by phases on the forward kernels (conv/bwd_data.h), against a direct
// scalar reference, over random awkward shapes: strides larger than the kernel, paddings
// wider than it, dilation, tails.
#include <cmath>
#include <cstdio>
#include <vector>

#include "check.h"
#include "conv/bwd_data.h"
#include "conv/fwd_driver.h"
#include "conv/reorder.h"
#include "jit/isa.h"

using namespace dc;
using dc_test::fill;
using dc_test::max_rel_err;
using dc_test::uni;

namespace {

void phases_vs_reference(Isa isa) {
  int run = 0;
  for (int trial = 0; trial < 120; ++trial) {
    ConvDesc d = dc_test::random_desc(2, 36, 14, 14);
    d.pad_t = uni(0, d.dil_h * (d.r - 1) + 2);  // sometimes wider than the dilated kernel
    d.pad_l = uni(0, d.dil_w * (d.s - 1) + 2);
    if (!d.validate().empty() || d.p() < 1 || d.q() < 1) continue;
    const int V = vlen(isa);
    const int64_t cb = div_up(d.c, V), kb = div_up(d.k, V), P = d.p(), Q = d.q();
    std::vector<float> dy(d.n * kb * P * Q * V), w(kb * cb * d.r * d.s * V * V), dx(d.n * cb * d.h * d.w * V, NAN),
        ref(dx.size());
    fill(dy);
    fill(w);
    // Padded output channels of dy and padded weights must not leak into real channels.
    dc_test::bwd_data_ref(d, V, dy.data(), w.data(), ref.data());
    const std::vector<BwdDataPhase> phases = bwd_data_phases(d);
    CHECK(!phases.empty(), "%s: no phases", d.to_string().c_str());
    for (const BwdDataPhase& ph : phases) {
      if (ph.empty()) {
        for (int64_t n = 0; n < d.n * cb; ++n)
          for (int64_t y = ph.a; y < d.h; y += d.stride_h)
            for (int64_t x = ph.b; x < d.w; x += d.stride_w)
              std::fill_n(dx.begin() + ((n * d.h + y) * d.w + x) * V, V, 0.f);
        continue;
      }
      std::vector<float> wt(cb * kb * ph.sub.r * ph.sub.s * V * V);
      reorder_blocked_weight_to_bwd(w.data(), kb, cb, d.r, d.s, ph.taps_r.data(), ph.sub.r, ph.taps_s.data(),
                                    ph.sub.s, V, wt.data(), 0, 1);
      FwdPlanOptions options;
      options.c_chunk = uni(-1, 2);
      int64_t src_off, dst_off;
      bwd_data_phase_layout(d, ph, V, &options, &src_off, &dst_off);
      auto prim = get_fwd_primitive(ph.sub, isa, 1, options);
      const FwdKernels kernels = acquire_kernels(*prim);
      if (trial % 2) {
        fwd_execute(*prim, kernels, dy.data() + src_off, wt.data(), {}, dx.data() + dst_off, 0);
        continue;
      }
      // Each work unit packs its own output-channel group's weights just before its calls.
      const FwdPlan& plan = prim->plan;
      const int64_t per_kb = plan.cb * ph.sub.r * ph.sub.s * V * V;
      std::vector<float> unit_wei;
      auto prepare = [&](const FwdCall& first) {
        const int64_t kb0 = first.wei_off / per_kb, n = std::min<int64_t>(plan.n_oc, plan.kb - kb0);
        unit_wei.assign(n * per_kb, NAN);
        reorder_blocked_weight_to_bwd_blocks(w.data(), kb, cb, d.r, d.s, ph.taps_r.data(), ph.sub.r,
                                             ph.taps_s.data(), ph.sub.s, V, kb0 * plan.cb, (kb0 + n) * plan.cb,
                                             unit_wei.data());
        return reinterpret_cast<const float*>(reinterpret_cast<intptr_t>(unit_wei.data()) - kb0 * per_kb * 4);
      };
      fwd_execute_prepared(*prim, kernels, dy.data() + src_off, prepare, {}, dx.data() + dst_off, 0);
    }
    // Channels past d.c of the last block are garbage-free only where the reference is defined.
    for (size_t i = 0; i < dx.size(); ++i)
      if (static_cast<int64_t>(i % V) + ((i / V / d.w / d.h) % cb) * V >= d.c) dx[i] = ref[i] = 0;
    const double e = max_rel_err(dx, ref);
    CHECK(e < 1e-4, "%s %s: max rel err %g", d.to_string().c_str(), isa_name(isa), e);
    ++run;
  }
  std::printf("%s: %d problems\n", isa_name(isa), run);
}

}  // namespace

int main() {
  dc_test::rng().seed(4321);
  dc_test::for_each_isa([](Isa isa) { phases_vs_reference(isa); });
  TEST_MAIN_END("test_bwd_data");
}
