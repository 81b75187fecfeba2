// JIT kernels against their scalar twins, and whole forward passes against a direct
// reference, over random awkward shapes: tails, padding, strides, dilation.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "check.h"
#include "conv/fwd_driver.h"
#include "conv/fwd_stats.h"
#include "conv/reference.h"
#include "jit/isa.h"

using namespace dc;
using dc_test::fill;
using dc_test::max_rel_err;
using dc_test::uni;

namespace {

// Mean and biased variance of channel c of a blocked (N, Kb, P, Q, V) output, in double.
void channel_stats(const FwdPlan& plan, const std::vector<float>& out, int64_t c, double* mean, double* var) {
  const int V = plan.v();
  const int64_t pixels = plan.desc.p() * plan.desc.q(), n = plan.desc.n;
  double m = 0, m2 = 0;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t p = 0; p < pixels; ++p) m += out[((i * plan.kb + c / V) * pixels + p) * V + c % V];
  m /= n * pixels;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t p = 0; p < pixels; ++p) {
      const double dv = out[((i * plan.kb + c / V) * pixels + p) * V + c % V] - m;
      m2 += dv * dv;
    }
  *mean = m;
  *var = m2 / (n * pixels);
}

// The stats post-op's merged mean and variance against the reference output's, in double;
// the merge must find them sound where every shift is well within kStatsMaxShiftStds
// standard deviations of its mean, and must not where one is well beyond.
double stats_err(const FwdPlan& plan, const std::vector<float>& sums, const std::vector<float>& shift,
                 const std::vector<float>& out) {
  const int64_t k = plan.desc.k;
  std::vector<float> mean(k), var(k);
  const bool sound = fwd_stats_finish(plan, sums.data(), shift.data(), k, mean.data(), var.data());
  bool all_near = true, one_far = false;
  double e = 0;
  for (int64_t c = 0; c < k; ++c) {
    double m, v;
    channel_stats(plan, out, c, &m, &v);
    const double dist = std::fabs(m - shift[c]) / std::sqrt(v);
    all_near = all_near && dist < 0.9 * kStatsMaxShiftStds;
    one_far = one_far || dist > 1.1 * kStatsMaxShiftStds;
    if (dist < kStatsMaxShiftStds)
      e = std::max({e, std::fabs(mean[c] - m) / (1 + std::sqrt(v)), std::fabs(var[c] - v) / (1e-3 + v)});
  }
  if ((all_near && !sound) || (one_far && sound)) return INFINITY;
  return e;
}

// A map of mean 1e3 and standard deviation about 1: with the shift at 0 the tile sums cancel
// and the merge must say so; with the shift at the mean it is exact to fp32.
void stats_far_from_shift(Isa isa) {
  const int V = vlen(isa);
  ConvDesc d = parse_conv_desc("mb2ic16ih12iw12oc20oh12ow12kh1kw1ph0pw0");
  const int64_t kb = div_up(d.k, V), cb = div_up(d.c, V);
  std::vector<float> src(d.n * cb * d.h * d.w * V), wei(kb * cb * V * V), bias(kb * V, 1e3f), out(d.n * kb * 144 * V);
  fill(src);
  fill(wei);
  for (float& w : wei) w *= 0.4f;
  FwdPlanOptions options;
  options.post.bias = options.post.stats = true;
  auto prim = get_fwd_primitive(d, isa, 1, options);
  const FwdKernels kernels = acquire_kernels(*prim);
  for (float at : {0.f, 1e3f}) {
    std::vector<float> shift(kb * V, at), sums(prim->plan.stats_floats), mean(d.k), var(d.k);
    fwd_execute(*prim, kernels, src.data(), wei.data(), {bias.data(), nullptr, shift.data(), sums.data()}, out.data(),
                0);
    const bool sound = fwd_stats_finish(prim->plan, sums.data(), shift.data(), d.k, mean.data(), var.data());
    CHECK(sound == (at != 0.f), "%s shift %g: sound=%d", isa_name(isa), at, sound);
    if (!sound) continue;
    for (int64_t c = 0; c < d.k; ++c) {
      double m, v;
      channel_stats(prim->plan, out, c, &m, &v);
      CHECK(v > 0.1 && std::fabs(mean[c] - m) < 1e-6 * m && std::fabs(var[c] - v) < 1e-5 * v,
            "%s channel %lld: mean %g var %g, want %g %g", isa_name(isa), static_cast<long long>(c), mean[c], var[c],
            m, v);
    }
  }
}

// One kernel call on a standalone tile, JIT vs scalar twin.
void kernel_vs_twin(Isa isa) {
  for (int trial = 0; trial < 60; ++trial) {
    FwdKernelSpec sp;
    sp.isa = isa;
    const int V = sp.v();
    sp.s = uni(1, 5);
    sp.stride_w = uni(1, 2);
    sp.dil_w = uni(1, 2);
    sp.n_oc = uni(1, 4);
    sp.oh = uni(1, 2);
    int budget = isa_vector_registers(isa) - sp.n_oc - 1;
    sp.ow = uni(1, std::max(1, budget / (sp.oh * sp.n_oc)));
    while (fwd_vector_registers(sp) > isa_vector_registers(isa) && sp.ow > 1) --sp.ow;
    if (fwd_vector_registers(sp) > isa_vector_registers(isa)) continue;
    sp.c_valid = uni(1, V);
    sp.prefetch = uni(0, 1);
    sp.dst_px = uni(1, 3);  // a strided output view, as the input-gradient phases write
    // Weight vectors of consecutive channels further apart than a packed block, as the NCHW
    // 1x1 plan reads them (rows of the image).
    const int wc = uni(0, 1) ? 0 : V * uni(1, 3) + V * V;
    sp.wei_c_stride = wc * 4;
    const size_t wei_block = wc ? static_cast<size_t>(V) * wc : static_cast<size_t>(V) * V;
    // Output pixels a byte stride apart that is no whole number of vectors, and a partial last
    // output block under a mask (AVX-512), as the NCHW 1x1 plan writes rows of channels.
    if (uni(0, 2) == 0) sp.dst_px_bytes = (sp.dst_px * V + uni(1, V - 1)) * 4;
    if (isa == Isa::avx512 && uni(0, 2) == 0) sp.last_oc_lanes = uni(1, V - 1);
    // Every combination of the post-ops; the bias and the residual need whole blocks.
    sp.post.bias = !sp.last_oc_lanes && uni(0, 1);
    sp.post.add = !sp.last_oc_lanes && uni(0, 1);
    sp.post.relu = uni(0, 1);
    sp.post.stats = !sp.last_oc_lanes && uni(0, 1);
    const int row_px = (sp.ow - 1) * sp.stride_w + (sp.s - 1) * sp.dil_w + 1;
    if (uni(0, 1)) {
      sp.border = true;
      sp.iw0 = -uni(0, 2);
      sp.w = std::max(1, row_px + sp.iw0 - uni(0, 2));
    }
    const int n_cb = uni(1, 3), n_r = uni(0, 3), R = std::max(n_r, 1);
    const int W = row_px + 2;  // room for every column the tile may touch
    const int H = R + 2;
    const int DW = sp.ow * (sp.dst_px + 1);  // output row
    std::vector<float> src(static_cast<size_t>(n_cb) * H * W * V), wei(static_cast<size_t>(sp.n_oc) * n_cb * R * sp.s * wei_block),
        bias(sp.n_oc * V), dst(static_cast<size_t>(sp.n_oc) * 2 * DW * V), residual(dst.size()), ref,
        stats_shift(sp.n_oc * V), stats(2 * sp.n_oc * V, NAN), stats_ref(stats.size(), NAN);
    fill(stats_shift);
    fill(src);
    fill(wei);
    fill(bias);
    fill(dst);
    fill(residual);
    ref = dst;
    FwdCallArgs a{};
    const int shift = sp.border ? -sp.iw0 : 0;  // keep the tile's first column inside the buffer
    a.src = src.data() + shift * V;
    a.wei = wei.data();
    a.bias = sp.post.bias ? bias.data() : nullptr;
    a.residual = sp.post.add ? residual.data() : nullptr;
    a.stats_shift = sp.post.stats ? stats_shift.data() : nullptr;
    a.n_r = n_r;
    a.n_cb = n_cb;
    a.flags = uni(0, 1) ? kAccumulate : 0;
    a.src_r_stride = W * V * 4;
    a.src_row_stride = W * V * 4;
    a.src_cb_stride = H * W * V * 4;
    a.wei_cb_stride = R * sp.s * wei_block * 4;
    a.wei_kb_stride = n_cb * a.wei_cb_stride;
    a.dst_row_stride = DW * V * 4;
    a.dst_kb_stride = 2 * DW * V * 4;
    a.pf_src = src.data();
    auto k = make_fwd_kernel(sp)->build();
    a.dst = dst.data();
    a.stats = sp.post.stats ? stats.data() : nullptr;
    k->entry<FwdKernelFn>()(&a);
    a.dst = ref.data();
    a.stats = sp.post.stats ? stats_ref.data() : nullptr;
    fwd_kernel_ref(sp, &a);
    double e = sp.post.stats ? std::max(max_rel_err(dst, ref), max_rel_err(stats, stats_ref)) : max_rel_err(dst, ref);
    CHECK(e < 1e-5, "%s n_cb=%d n_r=%d flags=%lld: max rel err %g", sp.name().c_str(), n_cb, n_r,
          static_cast<long long>(a.flags), e);
  }
}

// Whole problems through plan + driver, against the direct reference.
void conv_vs_reference(Isa isa) {
  for (int trial = 0; trial < 80; ++trial) {
    ConvDesc d = dc_test::random_desc(2, 40, 16, 20);
    if (!d.validate().empty()) continue;
    const int V = vlen(isa);
    const int64_t cb = div_up(d.c, V), kb = div_up(d.k, V);
    std::vector<float> src(d.n * cb * d.h * d.w * V), wei(kb * cb * d.r * d.s * V * V), bias(kb * V),
        out(d.n * kb * d.p() * d.q() * V), ref(out.size()), residual(out.size());
    fill(src);
    fill(wei);
    fill(bias);
    fill(residual);
    FwdPlanOptions options;
    options.post.bias = uni(0, 1);
    options.post.add = uni(0, 1);
    options.post.relu = uni(0, 1);
    options.post.stats = uni(0, 1);
    const float* b = options.post.bias ? bias.data() : nullptr;
    const float* res = options.post.add ? residual.data() : nullptr;
    std::vector<float> shift(kb * V);
    fill(shift);
    options.prefetch = uni(-1, 1);
    options.c_chunk = uni(-1, 3);
    if (uni(0, 2) == 0) {  // a forced tile, as a benchmark may ask for
      options.tile_oh = uni(1, 2);
      options.n_oc = uni(1, isa == Isa::avx512 ? 4 : 2);
      options.tile_ow = uni(1, (isa_vector_registers(isa) - 1 - options.n_oc) / (options.tile_oh * options.n_oc));
    }
    for (int threads : {1, 2}) {
      auto prim = get_fwd_primitive(d, isa, threads, options);
      std::fill(out.begin(), out.end(), NAN);
      const FwdKernels kernels = acquire_kernels(*prim);
      // Serially, with a work queue: thread 0 takes every unit, the others find none left.
      FwdWorkQueue queue(threads);
      // NaN where the tiles' sums go, and a sentinel beyond them that no tile may touch.
      std::vector<float> sums(prim->plan.stats_floats + 64, NAN);
      std::fill(sums.end() - 64, sums.end(), 7.f);
      FwdPostArgs post{b, res, shift.data(), sums.data()};
      for (int t = 0; t < threads; ++t)
        fwd_execute(*prim, kernels, src.data(), wei.data(), post, out.data(), t, trial % 2 ? &queue : nullptr);
      conv_fwd_ref_blocked(d, V, options.post, src.data(), wei.data(), b, res, ref.data());
      double e = max_rel_err(out, ref);
      if (options.post.stats) {
        e = std::max(e, stats_err(prim->plan, sums, shift, ref));
        CHECK(std::all_of(sums.end() - 64, sums.end(), [](float f) { return f == 7.f; }),
              "%s: a tile wrote past the tile sums", d.to_string().c_str());
      }
      CHECK(e < 1e-4, "%s %s threads=%d%s: max rel err %g (%s)", d.to_string().c_str(), isa_name(isa), threads,
            options.post.name().c_str(), e, prim->plan.to_string().c_str());
      // Only the calls that finish a tile run the post-ops.
      for (const auto& stream : prim->plan.streams)
        for (const FwdCall& c : stream)
          CHECK(prim->plan.kernels[c.kernel].post == ((c.flags & kLastChunk) ? options.post : FwdPostOps{}),
                "%s: call with flags %d runs %s", d.to_string().c_str(), c.flags,
                prim->plan.kernels[c.kernel].name().c_str());
      if (options.tile_ow > 0)
        CHECK(prim->plan.tile_oh == options.tile_oh && prim->plan.tile_ow == options.tile_ow &&
                  prim->plan.n_oc == std::min<int64_t>(options.n_oc, kb),
              "forced tile %dx%dx%d not taken: %s", options.tile_oh, options.tile_ow, options.n_oc,
              prim->plan.to_string().c_str());
    }
  }
}

// The NCHW 1x1 plan (no packing: weights (K, C), input (N, C, H*W), output (N, K, H*W))
// against a direct GEMM.
void nchw_1x1_vs_reference(Isa isa) {
  const int V = vlen(isa);
  int run = 0;
  for (int trial = 0; trial < 40; ++trial) {
    ConvDesc d;
    d.n = uni(1, 2);
    d.c = V * uni(1, 5);
    d.k = uni(1, 40);
    d.h = uni(1, 6);
    d.w = V * uni(1, 3) / d.h + 1;
    if (isa != Isa::avx512)  // AVX2 takes whole vectors of pixels only
      while ((d.h * d.w) % V) ++d.w;
    else if (uni(0, 1))
      d.w = uni(1, 9);
    if (!nchw_1x1_applies(d, isa)) continue;
    const int64_t pq = d.h * d.w;
    std::vector<float> w(d.k * d.c), x(d.n * d.c * pq), y(d.n * d.k * pq), ref(y.size());
    fill(w);
    fill(x);
    fill(y);  // the prefilled bias when accumulating
    const bool accumulate = uni(0, 1), relu = uni(0, 1);
    for (int64_t n = 0; n < d.n; ++n)
      for (int64_t k = 0; k < d.k; ++k)
        for (int64_t p = 0; p < pq; ++p) {
          double acc = accumulate ? y[(n * d.k + k) * pq + p] : 0.0;
          for (int64_t c = 0; c < d.c; ++c) acc += static_cast<double>(w[k * d.c + c]) * x[(n * d.c + c) * pq + p];
          ref[(n * d.k + k) * pq + p] = static_cast<float>(relu && acc < 0 ? 0.0 : acc);
        }
    for (int threads : {1, 2}) {
      std::vector<float> out = y;
      auto prim = get_fwd_nchw_1x1_primitive(d, isa, threads, accumulate, relu);
      const FwdKernels kernels = acquire_kernels(*prim);
      FwdWorkQueue queue(threads);
      for (int t = 0; t < threads; ++t) fwd_execute(*prim, kernels, w.data(), x.data(), {}, out.data(), t, &queue);
      const double e = max_rel_err(out, ref);
      CHECK(e < 1e-4, "%s %s nchw1x1 threads=%d acc=%d relu=%d: max rel err %g", d.to_string().c_str(),
            isa_name(isa), threads, accumulate, relu, e);
    }
    ++run;
  }
  CHECK(run > 20, "only %d NCHW 1x1 problems ran", run);
}

// The post-ops are part of the kernel's name (its cache key), in their order.
void post_op_names() {
  FwdKernelSpec sp;
  const std::string plain = sp.name();
  CHECK(plain.find("_post") == std::string::npos, "no post-ops, yet named %s", plain.c_str());
  sp.post = {true, true, true, true};
  CHECK(sp.name().find("_post_bias_add_relu_stats__") != std::string::npos, "named %s", sp.name().c_str());
  sp.post = {false, true, false};
  CHECK(sp.name().find("_post_add__") != std::string::npos, "named %s", sp.name().c_str());
  FwdPlanOptions a, b;
  b.post.relu = true;
  CHECK(a.key() != b.key(), "plan key %s ignores the post-ops", a.key().c_str());
}

// A plan whose post-ops read a bias or a residual refuses to run without it.
void missing_operand_refused(Isa isa) {
  ConvDesc d = parse_conv_desc("mb1ic16ih4oc16oh4kh1ph0");
  FwdPlanOptions options;
  options.post.add = true;
  auto prim = get_fwd_primitive(d, isa, 1, options);
  const FwdKernels kernels = acquire_kernels(*prim);
  std::vector<float> x(16 * 16 * 16), w(16 * 16 * 16), y(16 * 16 * 16);
  bool refused = false;
  try {
    fwd_execute(*prim, kernels, x.data(), w.data(), {}, y.data(), 0);
  } catch (const std::invalid_argument&) {
    refused = true;
  }
  CHECK(refused, "%s: a residual plan ran without a residual", isa_name(isa));
}

}  // namespace

// The handles: one per (problem, ISA, threads, options) on a thread, found again by its
// integers; a new one after clear_fwd_primitives; and a handle keeps its kernels runnable
// when the kernel cache drops them.
void handles(Isa isa) {
  const int V = vlen(isa);
  ConvDesc d;
  d.n = 1, d.c = V, d.h = 4, d.w = 5, d.k = V, d.r = 3, d.s = 3, d.pad_t = d.pad_b = d.pad_l = d.pad_r = 1;
  auto h1 = get_fwd_handle(d, isa, 1);
  CHECK(get_fwd_handle(d, isa, 1) == h1, "the same problem did not find its handle");
  CHECK(get_fwd_handle(d, isa, 2) != h1, "another thread count took the same handle");
  ConvDesc wider = d;
  wider.w = 6;
  CHECK(get_fwd_handle(wider, isa, 1) != h1 && get_fwd_handle(wider, isa, 1)->prim->plan.desc.w == 6,
        "another width took the same handle");
  FwdPlanOptions options;
  options.prefetch = 1;
  CHECK(get_fwd_handle(d, isa, 1, options) != h1, "other options took the same handle");
  clear_fwd_primitives();
  clear_kernel_cache();
  auto h2 = get_fwd_handle(d, isa, 1);
  CHECK(h2 != h1, "clear_fwd_primitives left the handle in place");
  // h1's kernels were dropped by the cache but are held by h1: it still computes the convolution.
  std::vector<float> src(d.n * d.h * d.w * V), wei(d.r * d.s * V * V), out(d.n * d.h * d.w * V), ref(out.size());
  fill(src);
  fill(wei);
  fwd_execute(*h1->prim, h1->kernels, src.data(), wei.data(), {}, out.data(), 0);
  conv_fwd_ref_blocked(d, V, FwdPostOps{}, src.data(), wei.data(), nullptr, nullptr, ref.data());
  CHECK(max_rel_err(out, ref) < 1e-4, "a handle's kernels stopped working when the cache dropped them");
}

int main() {
  post_op_names();
  dc_test::rng().seed(1234);
  dc_test::for_each_isa([](Isa isa) {
    kernel_vs_twin(isa);
    conv_vs_reference(isa);
    nchw_1x1_vs_reference(isa);
    missing_operand_refused(isa);
    stats_far_from_shift(isa);
    handles(isa);
  });
  TEST_MAIN_END("test_fwd_kernel");
}
