// Depthwise kernels against their scalar twins, and whole depthwise convolutions against
// the direct reference, over random shapes with tails, padding, strides and dilation.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "check.h"
#include "conv/dw_conv.h"
#include "conv/reference.h"
#include "jit/fwd_kernel.h"

using namespace dc;
using dc_test::fill;
using dc_test::max_rel_err;
using dc_test::uni;

namespace {

void kernel_vs_twin(Isa isa) {
  for (int trial = 0; trial < 40; ++trial) {
    DwKernelSpec sp;
    sp.isa = isa;
    const int V = sp.v();
    sp.s = uni(1, 7);
    sp.stride_w = uni(1, 2);
    sp.dil_w = uni(1, 2);
    sp.ow = uni(1, dw_max_ow(isa));
    const int row_px = (sp.ow - 1) * sp.stride_w + (sp.s - 1) * sp.dil_w + 1;
    if (uni(0, 1)) {
      sp.border = true;
      sp.iw0 = -uni(0, 3);
      sp.w = std::max(1, row_px + sp.iw0 - uni(0, 3));
    }
    const int n_r = uni(0, 4), R = std::max(n_r, 1), W = row_px + 3;
    std::vector<float> src(static_cast<size_t>(R) * W * V), wei(static_cast<size_t>(R) * sp.s * V), bias(V),
        dst(static_cast<size_t>(sp.ow) * V), ref(dst.size());
    fill(src);
    fill(wei);
    fill(bias);
    DwCallArgs a{};
    a.src = src.data() + (sp.border ? -sp.iw0 : 0) * V;
    a.wei = wei.data();
    a.bias = uni(0, 1) ? bias.data() : nullptr;
    a.n_r = n_r;
    a.flags = uni(0, 1) ? kRelu : 0;
    a.src_r_stride = W * V * 4;
    auto k = make_dw_kernel(sp)->build();
    a.dst = dst.data();
    k->entry<DwKernelFn>()(&a);
    a.dst = ref.data();
    dw_kernel_ref(sp, &a);
    double e = max_rel_err(dst, ref);
    CHECK(e < 1e-5, "%s n_r=%d: max rel err %g", sp.name().c_str(), n_r, e);
  }
}

void conv_vs_reference(Isa isa) {
  for (int trial = 0; trial < 60; ++trial) {
    ConvDesc d = dc_test::random_desc(2, 40, 16, 40);
    d.k = d.c;  // depthwise: one output channel per channel
    if (!d.validate().empty()) continue;
    const int V = vlen(isa);
    const int64_t cb = div_up(d.c, V);
    std::vector<float> src(d.n * cb * d.h * d.w * V), wei(cb * d.r * d.s * V), bias(cb * V),
        out(d.n * cb * d.p() * d.q() * V), ref(out.size());
    fill(src);
    fill(wei);
    fill(bias);
    const bool relu = uni(0, 1);
    const float* b = uni(0, 1) ? bias.data() : nullptr;
    for (int threads : {1, 3}) {
      auto prim = get_dw_primitive(d, isa, threads);
      std::fill(out.begin(), out.end(), NAN);
      const DwKernels kernels = acquire_kernels(*prim);
      for (int t = 0; t < threads; ++t) dw_execute(*prim, kernels, src.data(), wei.data(), b, out.data(), relu, t);
      dwconv_ref_blocked(d, V, src.data(), wei.data(), b, ref.data(), relu);
      double e = max_rel_err(out, ref);
      CHECK(e < 1e-4, "%s %s threads=%d: max rel err %g (%s)", d.to_string().c_str(), isa_name(isa), threads, e,
            prim->plan.to_string().c_str());
    }
  }
}

}  // namespace

int main() {
  dc_test::rng().seed(99);
  dc_test::for_each_isa([](Isa isa) {
    kernel_vs_twin(isa);
    conv_vs_reference(isa);
  });
  TEST_MAIN_END("test_dw_kernel");
}
