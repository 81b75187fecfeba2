// JIT kernels against their scalar twins, and whole forward passes against a direct
// reference, over random awkward shapes: tails, padding, strides, dilation.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "check.h"
#include "conv/fwd_driver.h"
#include "conv/reference.h"
#include "jit/isa.h"

using namespace dc;
using dc_test::fill;
using dc_test::max_rel_err;
using dc_test::uni;

namespace {

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
        bias(sp.n_oc * V), dst(static_cast<size_t>(sp.n_oc) * 2 * DW * V), ref;
    fill(src);
    fill(wei);
    fill(bias);
    fill(dst);
    ref = dst;
    FwdCallArgs a{};
    const int shift = sp.border ? -sp.iw0 : 0;  // keep the tile's first column inside the buffer
    a.src = src.data() + shift * V;
    a.wei = wei.data();
    a.bias = uni(0, 1) ? bias.data() : nullptr;
    a.n_r = n_r;
    a.n_cb = n_cb;
    a.flags = uni(0, 3);
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
    k->entry<FwdKernelFn>()(&a);
    a.dst = ref.data();
    fwd_kernel_ref(sp, &a);
    double e = max_rel_err(dst, ref);
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
        out(d.n * kb * d.p() * d.q() * V), ref(out.size());
    fill(src);
    fill(wei);
    fill(bias);
    const bool relu = uni(0, 1);
    const float* b = uni(0, 1) ? bias.data() : nullptr;
    FwdPlanOptions options;
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
      for (int t = 0; t < threads; ++t)
        fwd_execute(*prim, kernels, src.data(), wei.data(), b, out.data(), relu, t, trial % 2 ? &queue : nullptr);
      conv_fwd_ref_blocked(d, V, src.data(), wei.data(), b, ref.data(), relu);
      double e = max_rel_err(out, ref);
      CHECK(e < 1e-4, "%s %s threads=%d relu=%d: max rel err %g (%s)", d.to_string().c_str(), isa_name(isa), threads,
            relu, e, prim->plan.to_string().c_str());
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
      auto prim = get_fwd_nchw_1x1_primitive(d, isa, threads, accumulate);
      const FwdKernels kernels = acquire_kernels(*prim);
      FwdWorkQueue queue(threads);
      for (int t = 0; t < threads; ++t) fwd_execute(*prim, kernels, w.data(), x.data(), nullptr, out.data(), relu, t, &queue);
      const double e = max_rel_err(out, ref);
      CHECK(e < 1e-4, "%s %s nchw1x1 threads=%d acc=%d relu=%d: max rel err %g", d.to_string().c_str(),
            isa_name(isa), threads, accumulate, relu, e);
    }
    ++run;
  }
  CHECK(run > 20, "only %d NCHW 1x1 problems ran", run);
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
  fwd_execute(*h1->prim, h1->kernels, src.data(), wei.data(), nullptr, out.data(), false, 0);
  conv_fwd_ref_blocked(d, V, src.data(), wei.data(), nullptr, ref.data(), false);
  CHECK(max_rel_err(out, ref) < 1e-4, "a handle's kernels stopped working when the cache dropped them");
}

int main() {
  dc_test::rng().seed(1234);
  dc_test::for_each_isa([](Isa isa) {
    kernel_vs_twin(isa);
    conv_vs_reference(isa);
    nchw_1x1_vs_reference(isa);
    handles(isa);
  });
  TEST_MAIN_END("test_fwd_kernel");
}
