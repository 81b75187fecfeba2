// The drivers of whole passes (conv/drivers.h), on a serial loop and on plain threads: the
// NCHW-in/NCHW-out forward against a direct NCHW reference, the input gradient by phases and
// the weight update against the blocked scalar references, and the reduction of the weight
// update's private copies, over every group.
#include <cmath>
#include <cstdio>
#include <thread>
#include <vector>

#include "check.h"
#include "conv/bwd_data.h"
#include "conv/drivers.h"
#include "conv/fwd_driver.h"
#include "conv/reference.h"
#include "conv/reorder.h"
#include "conv/scratch.h"
#include "jit/isa.h"

using namespace dc;
using dc_test::fill;
using dc_test::max_rel_err;
using dc_test::uni;

namespace {

const RunShares serial = [](int nthreads, const ShareFn& fn) {
  for (int t = 0; t < nthreads; ++t) fn(t, nthreads);
};

const RunShares threaded = [](int nthreads, const ShareFn& fn) {
  std::vector<std::thread> pool;
  for (int t = 1; t < nthreads; ++t) pool.emplace_back(fn, t, nthreads);
  fn(0, nthreads);
  for (std::thread& t : pool) t.join();
};

// y = conv(x, w) + bias per group, NCHW (dense), in double. w is (G * kg, cg, R, S).
void conv_nchw_ref(const ConvDesc& d, int64_t groups, const std::vector<float>& x, const std::vector<float>& w,
                   const std::vector<float>& bias, bool relu, std::vector<float>& y) {
  const int64_t P = d.p(), Q = d.q(), C = d.c * groups, K = d.k * groups;
  for (int64_t n = 0; n < d.n; ++n)
    for (int64_t k = 0; k < K; ++k) {
      const int64_t g = k / d.k;
      for (int64_t p = 0; p < P; ++p)
        for (int64_t q = 0; q < Q; ++q) {
          double acc = bias.empty() ? 0.0 : bias[k];
          for (int64_t c = 0; c < d.c; ++c)
            for (int64_t r = 0; r < d.r; ++r)
              for (int64_t s = 0; s < d.s; ++s) {
                const int64_t h = p * d.stride_h - d.pad_t + r * d.dil_h, xx = q * d.stride_w - d.pad_l + s * d.dil_w;
                if (h < 0 || h >= d.h || xx < 0 || xx >= d.w) continue;
                acc += static_cast<double>(x[((n * C + g * d.c + c) * d.h + h) * d.w + xx]) *
                       w[((k * d.c + c) * d.r + r) * d.s + s];
              }
          y[((n * K + k) * P + p) * Q + q] = static_cast<float>(relu && acc < 0 ? 0.0 : acc);
        }
    }
}

void fwd_nchw_vs_reference(Isa isa) {
  const int V = vlen(isa);
  int run = 0;
  for (int trial = 0; trial < 40; ++trial) {
    ConvDesc d = dc_test::random_desc(2, 20, 11, 11);
    if (!d.validate().empty() || d.p() < 1 || d.q() < 1 || !jit_fits(d, V)) continue;
    const int64_t groups = uni(1, 3), C = d.c * groups, K = d.k * groups, P = d.p(), Q = d.q();
    const int64_t cb = div_up(d.c, V), kb = div_up(d.k, V);
    const bool relu = trial % 3 == 0, with_bias = trial % 2 == 0;
    // Half the trials pack every group beforehand, the other half (one group) at the call.
    const bool prepacked = groups > 1 || trial % 4 < 2;
    std::vector<float> x(d.n * C * d.h * d.w), w(K * d.c * d.r * d.s), bias(with_bias ? K : 0);
    fill(x);
    fill(w);
    fill(bias);
    std::vector<float> ref(d.n * K * P * Q), y(ref.size(), NAN);
    conv_nchw_ref(d, groups, x, w, bias, relu, ref);
    const int64_t xs[4] = {C * d.h * d.w, d.h * d.w, d.w, 1}, ys[4] = {K * P * Q, P * Q, Q, 1};
    const int64_t ws[4] = {d.c * d.r * d.s, d.r * d.s, d.s, 1};
    const int64_t per_group = kb * cb * d.r * d.s * V * V;
    std::vector<float> packed(groups * per_group);
    for (int64_t g = 0; g < groups; ++g)
      reorder_weight_to_blocked(w.data() + g * d.k * ws[0], ws, d.k, d.c, d.r, d.s, V, packed.data() + g * per_group,
                                0, 1);
    std::vector<float> bias_blk;
    if (with_bias) {
      bias_blk.assign(groups * kb * V, 0.f);
      for (int64_t k = 0; k < K; ++k) bias_blk[(k / d.k) * kb * V + k % d.k] = bias[k];
    }
    const int threads = uni(1, 3);
    FwdPlanOptions options;
    options.post = {with_bias, false, relu};
    auto handle = get_fwd_handle(d, isa, threads, options);
    const PackBlockRange pack = [&](int64_t begin, int64_t end, float* dst) {
      reorder_weight_to_blocked_blocks(w.data(), ws, d.k, d.c, d.r, d.s, V, begin, end, dst);
    };
    ScratchScope call;
    fwd_nchw_via_blocks(*handle, groups, x.data(), xs, prepacked ? packed.data() : nullptr,
                        prepacked ? nullptr : pack, with_bias ? bias_blk.data() : nullptr, y.data(), ys,
                        trial % 2 ? threaded : serial);
    const double e = max_rel_err(y, ref);
    CHECK(e < 1e-4, "%s g%lld %s: max rel err %g", d.to_string().c_str(), static_cast<long long>(groups),
          isa_name(isa), e);
    ++run;
  }
  std::printf("fwd_nchw_via_blocks %s: %d problems\n", isa_name(isa), run);
}

void bwd_data_vs_reference(Isa isa) {
  const int V = vlen(isa);
  int run = 0;
  for (int trial = 0; trial < 40; ++trial) {
    ConvDesc d = dc_test::random_desc(2, 20, 11, 11);
    if (!d.validate().empty() || d.p() < 1 || d.q() < 1) continue;
    const std::vector<BwdDataPhase> phases = bwd_data_phases(d);
    bool fits = true;
    for (const BwdDataPhase& ph : phases) fits = fits && (ph.empty() || jit_fits(ph.sub, V));
    if (!fits) continue;
    const int64_t groups = uni(1, 2), cb = div_up(d.c, V), kb = div_up(d.k, V), P = d.p(), Q = d.q();
    const int64_t dy_group = d.n * kb * P * Q * V, dx_group = d.n * cb * d.h * d.w * V,
                  w_group = kb * cb * d.r * d.s * V * V;
    std::vector<float> dy(groups * dy_group), w(groups * w_group), dx(groups * dx_group, NAN), ref(dx.size());
    fill(dy);
    fill(w);
    for (int64_t g = 0; g < groups; ++g)
      dc_test::bwd_data_ref(d, V, dy.data() + g * dy_group, w.data() + g * w_group, ref.data() + g * dx_group);
    const PackPhase pack = [&](const BwdDataPhase& ph, float* dst, int tid, int n_threads) {
      const int64_t per_group = cb * kb * ph.sub.r * ph.sub.s * V * V;
      for (int64_t g = 0; g < groups; ++g)
        reorder_blocked_weight_to_bwd(w.data() + g * w_group, kb, cb, d.r, d.s, ph.taps_r.data(), ph.sub.r,
                                      ph.taps_s.data(), ph.sub.s, V, dst + g * per_group, tid, n_threads);
    };
    const PackBlocks pack_blocks = [&](const BwdDataPhase& ph, int64_t begin, int64_t end, float* dst) {
      reorder_blocked_weight_to_bwd_blocks(w.data(), kb, cb, d.r, d.s, ph.taps_r.data(), ph.sub.r, ph.taps_s.data(),
                                           ph.sub.s, V, begin, end, dst);
    };
    ScratchScope call;
    run_bwd_data(d, phases, dy.data(), dx.data(), groups, dy_group, dx_group, pack, isa, uni(1, 3), {},
                 trial % 2 ? threaded : serial, trial % 4 < 2 ? pack_blocks : nullptr);
    // The padded channels of the last block hold no gradient the reference defines.
    for (size_t i = 0; i < dx.size(); ++i)
      if (static_cast<int64_t>(i % V) + ((i / V / d.w / d.h) % cb) * V >= d.c) dx[i] = ref[i] = 0;
    const double e = max_rel_err(dx, ref);
    CHECK(e < 1e-4, "%s g%lld %s: max rel err %g", d.to_string().c_str(), static_cast<long long>(groups),
          isa_name(isa), e);
    ++run;
  }
  std::printf("run_bwd_data %s: %d problems\n", isa_name(isa), run);
}

void upd_vs_reference(Isa isa) {
  const int V = vlen(isa);
  int run = 0;
  for (int trial = 0; trial < 30; ++trial) {
    ConvDesc d = dc_test::random_desc(4, 20, 11, 11);
    if (!d.validate().empty() || d.p() < 1 || d.q() < 1 || !jit_fits(d, V)) continue;
    const int64_t groups = uni(1, 2), cb = div_up(d.c, V), kb = div_up(d.k, V), P = d.p(), Q = d.q();
    const int64_t x_group = d.n * cb * d.h * d.w * V, dy_group = d.n * kb * P * Q * V,
                  dw_elems = kb * cb * d.r * d.s * V * V;
    std::vector<float> x(groups * x_group), dy(groups * dy_group), ref(groups * dw_elems);
    fill(x);
    fill(dy);
    // Padded lanes are zero in real blocked tensors, and the kernels may read them.
    for (size_t i = 0; i < x.size(); ++i)
      if (static_cast<int64_t>(i % V) + ((i / V / d.w / d.h) % cb) * V >= d.c) x[i] = 0;
    for (size_t i = 0; i < dy.size(); ++i)
      if (static_cast<int64_t>(i % V) + ((i / V / Q / P) % kb) * V >= d.k) dy[i] = 0;
    for (int64_t g = 0; g < groups; ++g)
      conv_upd_ref_blocked(d, V, x.data() + g * x_group, dy.data() + g * dy_group, ref.data() + g * dw_elems);
    const int threads = uni(1, 4);
    std::vector<float> out(groups == 1 ? dw_elems : 0, NAN);
    ScratchScope call;
    auto [dw, group_stride] = run_upd(d, groups, x.data(), x_group, dy.data(), dy_group, isa, threads,
                                      trial % 2 ? threaded : serial, out.empty() ? nullptr : out.data());
    std::vector<float> got(groups * dw_elems);
    for (int64_t g = 0; g < groups; ++g)
      std::copy(dw + g * group_stride, dw + g * group_stride + dw_elems, got.begin() + g * dw_elems);
    const double e = max_rel_err(got, ref);
    CHECK(e < 1e-4, "%s g%lld t%d %s: max rel err %g", d.to_string().c_str(), static_cast<long long>(groups), threads,
          isa_name(isa), e);
    ++run;
  }
  std::printf("run_upd %s: %d problems\n", isa_name(isa), run);
}

// Small integers, so that every sum is exact.
void reduce_parts_adds_every_copy() {
  for (int parts : {2, 3, 5})
    for (int64_t groups : {1, 3}) {
      const int64_t dw_elems = 37;
      std::vector<float> dw(groups * parts * dw_elems);
      for (size_t i = 0; i < dw.size(); ++i) dw[i] = static_cast<float>(i % 11);
      std::vector<float> want(groups * dw_elems, 0.f);
      for (int64_t g = 0; g < groups; ++g)
        for (int p = 0; p < parts; ++p)
          for (int64_t e = 0; e < dw_elems; ++e) want[g * dw_elems + e] += dw[(g * parts + p) * dw_elems + e];
      reduce_upd_parts(dw.data(), groups, dw_elems, parts, 3, threaded);
      for (int64_t g = 0; g < groups; ++g)
        for (int64_t e = 0; e < dw_elems; ++e)
          CHECK(dw[g * parts * dw_elems + e] == want[g * dw_elems + e], "parts %d groups %lld element %lld", parts,
                static_cast<long long>(g), static_cast<long long>(e));
    }
  std::printf("reduce_upd_parts: checked\n");
}

}  // namespace

int main() {
  dc_test::rng().seed(2468);
  reduce_parts_adds_every_copy();
  dc_test::for_each_isa([](Isa isa) {
    fwd_nchw_vs_reference(isa);
    bwd_data_vs_reference(isa);
    upd_vs_reference(isa);
  });
  TEST_MAIN_END("test_drivers");
}
