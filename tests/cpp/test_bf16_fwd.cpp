// The AMX bf16 forward convolution (conv/bf16_fwd.h) and its kernels' scalar twins against
// a float64 convolution of the same bf16-rounded operands, every tensor between guard
// pages: ResNet-50's kinds of layers and random awkward shapes (channel tails, padding,
// strides, dilation, tiny maps), both output types, the post-ops, one and two threads.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "check.h"
#include "guarded.h"
#include "conv/bf16_fwd.h"
#include "jit/isa.h"
#include "conv/reference.h"

using namespace dc;
using dc_test::Guarded;
using dc_test::uni;

namespace {

constexpr int B = kAmxBlock;

struct Case {
  ConvDesc d;
  DataType out_dt;
  FwdPostOps post;
};

// y and sum |terms| per output element, in double, from the blocked bf16 input and the
// (K, C, R, S) weights as rounded to bf16; optionally without one weight element.
struct Reference {
  std::vector<double> y, mag;
};
Reference reference(const Case& t, const std::vector<uint16_t>& src, const std::vector<float>& w_bf16,
                    const std::vector<float>& bias, const std::vector<float>& res, int64_t drop = -1) {
  const ConvDesc& d = t.d;
  const int64_t cb = div_up(d.c, B), kb = div_up(d.k, B), P = d.p(), Q = d.q();
  Reference out;
  out.y.assign(d.n * kb * P * Q * B, 0.0);
  out.mag.assign(out.y.size(), 0.0);
  for (int64_t n = 0; n < d.n; ++n)
    for (int64_t k = 0; k < d.k; ++k)
      for (int64_t p = 0; p < P; ++p)
        for (int64_t q = 0; q < Q; ++q) {
          double acc = 0, mag = 0;
          for (int64_t c = 0; c < d.c; ++c)
            for (int64_t r = 0; r < d.r; ++r)
              for (int64_t s = 0; s < d.s; ++s) {
                const int64_t ih = p * d.stride_h - d.pad_t + r * d.dil_h, iw = q * d.stride_w - d.pad_l + s * d.dil_w;
                if (ih < 0 || ih >= d.h || iw < 0 || iw >= d.w) continue;
                const int64_t wi = ((k * d.c + c) * d.r + r) * d.s + s;
                if (wi == drop) continue;
                const double x = float_from_bf16(src[(((n * cb + c / B) * d.h + ih) * d.w + iw) * B + c % B]);
                acc += x * w_bf16[wi];
                mag += std::fabs(x * w_bf16[wi]);
              }
          const size_t o = (((n * kb + k / B) * P + p) * Q + q) * B + k % B;
          if (t.post.bias) acc += bias[k], mag += std::fabs(bias[k]);
          if (t.post.add) acc += res[o], mag += std::fabs(res[o]);
          if (t.post.relu) acc = acc > 0 ? acc : 0;
          out.y[o] = acc;
          out.mag[o] = mag;
        }
  return out;
}

// Largest |error| / tolerance over the output (> 1 fails), infinite for a NaN. The
// tolerance is fp32 summation's bound over the fan-in, (n + 2) 2^-24 sum |terms| (n taps,
// then bias and residual), plus bf16 output's rounding to nearest, 2^-8 |y|; padded lanes
// must be exactly zero.
double worst(const Case& t, const Reference& ref, const void* dst) {
  const double u = std::ldexp(1.0, -24), n = static_cast<double>(t.d.c * t.d.r * t.d.s) + 2;
  double e = 0;
  for (size_t i = 0; i < ref.y.size(); ++i) {
    const double got = t.out_dt == DataType::bf16 ? float_from_bf16(static_cast<const uint16_t*>(dst)[i])
                                                  : static_cast<const float*>(dst)[i];
    if (std::isnan(got)) return INFINITY;
    const double acc_err = n * u * ref.mag[i];
    const double tol = acc_err + (t.out_dt == DataType::bf16 ? std::ldexp(std::fabs(ref.y[i]) + acc_err, -8) : 0);
    const double err = std::fabs(got - ref.y[i]);
    e = std::max(e, tol > 0 ? err / tol : (err > 0 ? INFINITY : 0));
  }
  return e;
}

RunShares serial() {
  return [](int n, const ShareFn& fn) {
    for (int t = 0; t < n; ++t) fn(t, n);
  };
}
RunShares threaded() {
  return [](int n, const ShareFn& fn) {
    std::vector<std::thread> ts;
    for (int t = 0; t < n; ++t) ts.emplace_back([&, t] { fn(t, n); });
    for (auto& th : ts) th.join();
  };
}

float rnd() { return std::uniform_real_distribution<float>(-1.f, 1.f)(dc_test::rng()); }

// One case at `threads`, every tensor guarded (against its upper or lower page): the JIT
// run and the twins' run against the float64 reference; and, for `drop_check`, the JIT
// output against a reference missing one tap must fail.
void run_case(const Case& t, int threads, bool at_end, bool drop_check = false) {
  const ConvDesc& d = t.d;
  const int64_t cb = div_up(d.c, B), kb = div_up(d.k, B), P = d.p(), Q = d.q();
  const int out_es = elem_bytes(t.out_dt);
  std::vector<uint16_t> src(d.n * cb * d.h * d.w * B, 0);
  for (int64_t i = 0; i < static_cast<int64_t>(src.size()); ++i)
    if ((i % B) + (i / (d.h * d.w * B) % cb) * B < d.c) src[i] = bf16_from_float(rnd());
  std::vector<float> w(d.k * d.c * d.r * d.s), w_bf16(w.size()), bias(kb * B, 0.f);
  for (size_t i = 0; i < w.size(); ++i) w[i] = rnd(), w_bf16[i] = float_from_bf16(bf16_from_float(w[i]));
  for (int64_t k = 0; k < d.k; ++k) bias[k] = rnd();
  const size_t out_elems = d.n * kb * P * Q * B;
  std::vector<float> res(out_elems, 0.f);  // the residual's values, as its type holds them
  for (size_t i = 0; i < out_elems; ++i)
    if (static_cast<int64_t>((i % B) + (i / (P * Q * B) % kb) * B) < d.k) {
      const float v = rnd();
      res[i] = t.out_dt == DataType::bf16 ? float_from_bf16(bf16_from_float(v)) : v;
    }

  Bf16FwdPlan plan = make_bf16_fwd_plan(d, threads, t.out_dt, t.post);
  Guarded g_src(src.size() * 2, at_end), g_wei(bf16_fwd_weight_elems(d) * 2, at_end), g_bias(bias.size() * 4, at_end),
      g_res(out_elems * out_es, at_end), g_dst(out_elems * out_es, at_end),
      g_scratch(std::max<int64_t>(plan.scratch_bytes, 64), at_end);
  std::memcpy(g_src.as<void>(), src.data(), g_src.bytes());
  pack_bf16_fwd_weights(d, w.data(), g_wei.as<uint16_t>());
  std::memcpy(g_bias.as<void>(), bias.data(), g_bias.bytes());
  for (size_t i = 0; i < out_elems; ++i) {
    if (t.out_dt == DataType::bf16) g_res.as<uint16_t>()[i] = bf16_from_float(res[i]);
    else g_res.as<float>()[i] = res[i];
  }
  const Bf16FwdPostArgs post{t.post.bias ? g_bias.as<float>() : nullptr, t.post.add ? g_res.as<void>() : nullptr};
  const Reference ref = reference(t, src, w_bf16, bias, res);
  const std::string name = d.to_string() + " out " + dtype_name(t.out_dt) + t.post.name() + " threads " +
                           std::to_string(threads) + (at_end ? " guard above" : " guard below");

  auto prim = make_bf16_fwd_primitive(plan);
  for (int variant = 0; variant < 2; ++variant) {
    std::memset(g_dst.as<void>(), 0xff, g_dst.bytes());  // NaN everywhere it must write
    if (variant == 0)
      bf16_fwd_run(*prim, g_src.as<uint16_t>(), g_wei.as<uint16_t>(), post, g_dst.as<void>(), g_scratch.as<void>(),
                   threads > 1 ? threaded() : serial());
    else
      bf16_fwd_run_reference(plan, g_src.as<uint16_t>(), g_wei.as<uint16_t>(), post, g_dst.as<void>(),
                             g_scratch.as<void>(), serial());
    const double e = worst(t, ref, g_dst.as<void>());
    CHECK(e <= 1.0, "%s (%s): error %.3g of the tolerance", name.c_str(), variant ? "twin" : "jit", e);
  }
  if (drop_check) {
    bf16_fwd_run(*prim, g_src.as<uint16_t>(), g_wei.as<uint16_t>(), post, g_dst.as<void>(), g_scratch.as<void>(),
                 serial());
    const int64_t drop = (((d.k / 2) * d.c + d.c / 2) * d.r + d.r / 2) * d.s + d.s / 2;
    const double e = worst(t, reference(t, src, w_bf16, bias, res, drop), g_dst.as<void>());
    CHECK(e > 1.0, "%s: a reference missing one tap still passes (%.3g of the tolerance)", name.c_str(), e);
  }
}

Case make_case(const std::string& s, DataType out_dt, bool bias, bool add, bool relu) {
  Case t{parse_conv_desc(s), out_dt, {}};
  t.d.dt = DataType::bf16;
  t.post.bias = bias;
  t.post.add = add;
  t.post.relu = relu;
  return t;
}

void resnet_kinds() {
  const char* layers[] = {
      "mb1ic64ih56oc64oh56kh3ph1",      // res2 3x3
      "mb1ic256ih56oc64oh56kh1ph0",     // res2 1x1a
      "mb1ic128ih56oc128oh28kh3sh2ph1",  // res3a 3x3 stride 2
      "mb1ic256ih56oc512oh28kh1sh2ph0",  // res3a projection
      "mb1ic512ih7oc512oh7kh3ph1",       // res5 3x3
      "mb1ic2048ih7oc512oh7kh1ph0",      // res5 1x1a
      "mb1ic3ih56oc64oh28kh7sh2ph3",     // conv1's 7x7 stride 2 on a smaller image
  };
  int i = 0;
  for (const char* l : layers) {
    const DataType out = i % 2 ? DataType::f32 : DataType::bf16;
    run_case(make_case(l, out, i % 3 != 1, i % 3 == 2, i % 2 == 0), 1 + i % 2, i % 2 == 0, i == 0);
    ++i;
  }
}

// Each input the kernels may read (Bf16FwdInput) with tails, strides and dilation that
// random padded shapes rarely give.
void input_kinds() {
  const char* shapes[] = {
      "mb2ic40ih9iw11oc50kh1sh2sw3ph0",  // subsampled, uneven strides
      "mb2ic33ih5iw13oc17kh2kw3ph0",     // direct, flat, 2 x 3
      "mb1ic20ih12oc24kh3dh1ph0",        // direct, flat, dilation 2
      "mb1ic5ih9oc20kh3sh2ph0",          // folded (5 x 3 channels), unpadded
      "mb2ic7ih10iw9oc40kh3kw4sh1sw2ph2pw1dw1",  // folded, stride (1, 2), dilation (1, 2)
      "mb1ic70ih3iw40oc33kh3sh1sw2ph1",  // padded, rows of 20 (two runs, the last overlapping)
  };
  int i = 0;
  for (const char* s : shapes) {
    run_case(make_case(s, i % 2 ? DataType::f32 : DataType::bf16, i % 2 == 0, i % 3 == 0, i % 3 != 2), 1 + i % 2,
             i % 2 == 1);
    ++i;
  }
}

void random_shapes() {
  for (int i = 0; i < 40; ++i) {
    Case t{dc_test::random_desc(2, 80, 20, 20), uni(0, 1) ? DataType::bf16 : DataType::f32, {}};
    t.d.dt = DataType::bf16;
    if (uni(0, 2) == 0) t.d.stride_h = t.d.stride_w = 1;  // the flat runs, more often
    if (!t.d.validate().empty() || t.d.p() < 1 || t.d.q() < 1) {
      --i;
      continue;
    }
    t.post.bias = uni(0, 1);
    t.post.add = uni(0, 1);
    t.post.relu = uni(0, 1);
    run_case(t, uni(1, 2), uni(0, 1));
  }
}

void bad_plans() {
  Case t = make_case("mb1ic16ih8oc16oh8kh3ph1", DataType::bf16, false, false, false);
  auto refused = [&](ConvDesc d, DataType out, FwdPostOps post, const char* what) {
    try {
      make_bf16_fwd_plan(d, 1, out, post);
      CHECK(false, "the plan took %s", what);
    } catch (const std::invalid_argument&) {
    }
  };
  ConvDesc f32 = t.d;
  f32.dt = DataType::f32;
  refused(f32, DataType::bf16, {}, "an fp32 description");
  ConvDesc g = t.d;
  g.groups = 2;
  refused(g, DataType::bf16, {}, "groups");
  FwdPostOps stats;
  stats.stats = true;
  refused(t.d, DataType::bf16, stats, "the stats post-op");
}

}  // namespace

int main() {
  // The AMX level needs the CPU's tiles and the OS's permission for tile data (asked once).
  if (!tiles_usable()) {
    std::printf("skipping test_bf16_fwd: this process cannot use AMX tiles (level %s)\n", isa_name(detected_isa()));
    return 0;
  }
  dc_test::rng().seed(10);
  bad_plans();
  resnet_kinds();
  input_kinds();
  random_shapes();
  TEST_MAIN_END("test_bf16_fwd");
}
