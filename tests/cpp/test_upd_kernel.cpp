// Weight-update kernels against their scalar twins, and whole weight gradients against the
// direct reference, over random shapes with tails, padding, strides and dilation.
#include <cmath>
#include <cstdio>
#include <vector>

#include "check.h"
#include "conv/reference.h"
#include "conv/upd_conv.h"
#include "jit/fwd_kernel.h"

using namespace dc;
using dc_test::fill;
using dc_test::max_rel_err;
using dc_test::uni;

namespace {

void kernel_vs_twin(Isa isa) {
  for (int trial = 0; trial < 40; ++trial) {
    UpdKernelSpec sp;
    sp.isa = isa;
    const int V = sp.v();
    sp.n_kb = uni(1, 4);
    sp.n_c = uni(1, V);
    while (upd_vector_registers(sp) > isa_vector_registers(isa)) --sp.n_c;
    const int rows = uni(1, 3), px = uni(1, 9), xstride = uni(1, 2), W = px * xstride + 1;
    std::vector<float> x(static_cast<size_t>(rows) * W * V), dy(static_cast<size_t>(sp.n_kb) * rows * px * V),
        dw(static_cast<size_t>(sp.n_kb) * V * V * 2), ref;
    fill(x);
    fill(dy);
    fill(dw);
    ref = dw;
    UpdCallArgs a{};
    a.x = x.data() + uni(0, V - sp.n_c);
    a.dy = dy.data();
    a.n_imgs = 1;
    a.n_rows = uni(0, 4) ? rows : 0;
    a.n_px = px;
    a.flags = uni(0, 1) ? kAccumulate : 0;
    a.x_row_stride = W * V * 4;
    a.x_px_stride = xstride * V * 4;
    a.dy_row_stride = px * V * 4;
    a.dy_kb_stride = rows * px * V * 4;
    a.dw_kb_stride = 2 * V * V * 4;
    auto k = make_upd_kernel(sp)->build();
    a.dw = dw.data();
    k->entry<UpdKernelFn>()(&a);
    a.dw = ref.data();
    upd_kernel_ref(sp, &a);
    CHECK(max_rel_err(dw, ref) < 1e-5, "%s: max rel err %g", sp.name().c_str(), max_rel_err(dw, ref));
  }
}

void conv_vs_reference(Isa isa) {
  int row_splits = 0;  // plans that split one image's rows into private copies
  for (int trial = 0; trial < 64; ++trial) {
    ConvDesc d = dc_test::random_desc(3, 40, 14, 16);
    if (trial >= 60) {  // one image, one weight block: the threads split the image's rows
      d = parse_conv_desc("mb1ic3ih30oc16oh30kh3ph1");
      d.stride_h = d.stride_w = 1 + trial % 2;
      d.pad_b = trial % 3;
    }
    if (!d.validate().empty()) continue;
    const int V = vlen(isa);
    const int64_t cb = div_up(d.c, V), kb = div_up(d.k, V);
    std::vector<float> x(d.n * cb * d.h * d.w * V), dy(d.n * kb * d.p() * d.q() * V), ref(kb * cb * d.r * d.s * V * V);
    fill(x);
    fill(dy);
    for (int64_t i = 0; i < d.n * cb * d.h * d.w; ++i)  // padded channels are zero, as to_blocked leaves them
      for (int64_t j = 0; j < V; ++j)
        if (((i / (d.h * d.w)) % cb) * V + j >= d.c) x[i * V + j] = 0;
    conv_upd_ref_blocked(d, V, x.data(), dy.data(), ref.data());
    for (int threads : {1, 2, 5}) {
      auto prim = get_upd_primitive(d, isa, threads);
      const UpdKernels kernels = acquire_kernels(*prim);
      std::vector<float> dw(prim->plan.parts * prim->plan.dw_elements(), NAN);  // every element must be written
      for (int t = 0; t < threads; ++t) upd_execute(*prim, kernels, x.data(), dy.data(), dw.data(), t);
      for (int p = 1; p < prim->plan.parts; ++p)
        for (int64_t i = 0; i < prim->plan.dw_elements(); ++i) dw[i] += dw[p * prim->plan.dw_elements() + i];
      dw.resize(prim->plan.dw_elements());
      row_splits += prim->plan.parts > 1 && d.n == 1;
      double e = max_rel_err(dw, ref);
      CHECK(e < 1e-4, "%s %s threads=%d: max rel err %g (%s)", d.to_string().c_str(), isa_name(isa), threads, e,
            prim->plan.to_string().c_str());
    }
  }
  CHECK(row_splits > 0, "no plan split one image's rows (%s)", isa_name(isa));
}

}  // namespace

int main() {
  dc_test::rng().seed(7);
  dc_test::for_each_isa([](Isa isa) {
    kernel_vs_twin(isa);
    conv_vs_reference(isa);
  });
  TEST_MAIN_END("test_upd_kernel");
}
