// The bf16 weight gradient (conv/bf16_upd.h) at each level this process can run (amx,
// avx512_bf16), and its copies' and kernels' scalar twins, against a float64 weight
// gradient of the same bf16-rounded operands (and, at the avx512_bf16 level, against each
// other bit for bit), every tensor between guard pages: ResNet-50's kinds of layers and
// awkward shapes (channel tails, odd maps, padding, strides, dilation), both dW types, one
// and two threads.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "check.h"
#include "conv/bf16_upd.h"
#include "conv/reference.h"
#include "run_util.h"
#include "jit/isa.h"

using namespace dc;
using dc_test::Guarded;
using dc_test::serial;
using dc_test::threaded;
using dc_test::uni;

namespace {

constexpr int B = kAmxBlock;

// dW (K, C, R, S) and sum |terms| per element, in double, from the blocked bf16 operands;
// optionally without one tap (r, s) of every weight, or without one output pixel of image 0.
struct Reference {
  std::vector<double> dw, mag;
};
struct Drop {
  int64_t tap = -1;    // r * S + s
  int64_t pixel = -1;  // p * Q + q of image 0
};
Reference reference(const ConvDesc& d, const std::vector<uint16_t>& x, const std::vector<uint16_t>& dy,
                    Drop drop = {}) {
  const int64_t cb = div_up(d.c, B), kb = div_up(d.k, B), P = d.p(), Q = d.q();
  Reference out;
  out.dw.assign(d.k * d.c * d.r * d.s, 0.0);
  out.mag.assign(out.dw.size(), 0.0);
  for (int64_t k = 0; k < d.k; ++k)
    for (int64_t c = 0; c < d.c; ++c)
      for (int64_t r = 0; r < d.r; ++r)
        for (int64_t s = 0; s < d.s; ++s) {
          if (r * d.s + s == drop.tap) continue;
          double acc = 0, mag = 0;
          for (int64_t n = 0; n < d.n; ++n)
            for (int64_t p = 0; p < P; ++p) {
              const int64_t ih = p * d.stride_h - d.pad_t + r * d.dil_h;
              if (ih < 0 || ih >= d.h) continue;
              for (int64_t q = 0; q < Q; ++q) {
                const int64_t iw = q * d.stride_w - d.pad_l + s * d.dil_w;
                if (iw < 0 || iw >= d.w || (n == 0 && p * Q + q == drop.pixel)) continue;
                const double g = float_from_bf16(dy[(((n * kb + k / B) * P + p) * Q + q) * B + k % B]);
                const double v = float_from_bf16(x[(((n * cb + c / B) * d.h + ih) * d.w + iw) * B + c % B]);
                acc += g * v;
                mag += std::fabs(g * v);
              }
            }
          const size_t o = ((k * d.c + c) * d.r + r) * d.s + s;
          out.dw[o] = acc;
          out.mag[o] = mag;
        }
  return out;
}

// Largest |error| / tolerance over dW (> 1 fails), infinite for a NaN. The tolerance is
// fp32 summation's bound over the fan-in, (n + 2) 2^-24 sum |terms| with n = N * P * Q
// products, plus bf16's rounding to nearest, 2^-8 |dW|, for a bf16 dW.
double worst(const ConvDesc& d, DataType dt, const Reference& ref, const void* dw) {
  const double u = std::ldexp(1.0, -24), n = static_cast<double>(d.n * d.p() * d.q()) + 2;
  double e = 0;
  for (size_t i = 0; i < ref.dw.size(); ++i) {
    const double got = dt == DataType::bf16 ? float_from_bf16(static_cast<const uint16_t*>(dw)[i])
                                            : static_cast<const float*>(dw)[i];
    if (std::isnan(got)) return INFINITY;
    const double acc_err = n * u * ref.mag[i];
    const double tol = acc_err + (dt == DataType::bf16 ? std::ldexp(std::fabs(ref.dw[i]) + acc_err, -8) : 0);
    const double err = std::fabs(got - ref.dw[i]);
    e = std::max(e, tol > 0 ? err / tol : (err > 0 ? INFINITY : 0));
  }
  return e;
}

float rnd() { return std::uniform_real_distribution<float>(-1.f, 1.f)(dc_test::rng()); }

// Blocked bf16 values, zeros on the padded lanes of the last block.
std::vector<uint16_t> blocked(int64_t n, int64_t channels, int64_t pixels) {
  const int64_t blocks = div_up(channels, B);
  std::vector<uint16_t> v(n * blocks * pixels * B, 0);
  for (int64_t i = 0; i < static_cast<int64_t>(v.size()); ++i)
    if (i % B + (i / (pixels * B) % blocks) * B < channels) v[i] = bf16_from_float(rnd());
  return v;
}

// The levels under test: the bf16 ones this process can run.
std::vector<Isa>& levels() {
  static std::vector<Isa> l;
  return l;
}

// One case at `threads` on every level, every tensor guarded (against its upper or lower
// page): the JIT run and the twins' run against the float64 reference; with `drop_check`,
// the JIT result against references missing one tap, or one pixel, must fail.
void run_level(const ConvDesc& d, DataType dt, int threads, bool at_end, bool drop_check, Isa level,
               const std::vector<uint16_t>& x, const std::vector<uint16_t>& dy);
void run_case(ConvDesc d, DataType dt, int threads, bool at_end, bool drop_check = false) {
  d.dt = DataType::bf16;
  const std::vector<uint16_t> x = blocked(d.n, d.c, d.h * d.w), dy = blocked(d.n, d.k, d.p() * d.q());
  for (Isa level : levels()) run_level(d, dt, threads, at_end, drop_check, level, x, dy);
}

void run_level(const ConvDesc& d, DataType dt, int threads, bool at_end, bool drop_check, Isa level,
               const std::vector<uint16_t>& x, const std::vector<uint16_t>& dy) {
  const int64_t P = d.p(), Q = d.q();
  const Bf16UpdPlan plan = make_bf16_upd_plan(d, threads, dt, level);
  CHECK(plan.level == level, "%s: the plan took the level %s", d.to_string().c_str(), isa_name(plan.level));
  const size_t dw_bytes = d.k * d.c * d.r * d.s * elem_bytes(dt);
  Guarded g_x(x.size() * 2, at_end), g_dy(dy.size() * 2, at_end), g_dw(dw_bytes, at_end),
      g_scratch(plan.scratch_bytes, at_end);
  std::memcpy(g_x.as<void>(), x.data(), g_x.bytes());
  std::memcpy(g_dy.as<void>(), dy.data(), g_dy.bytes());
  const Reference ref = reference(d, x, dy);
  const std::string name = d.to_string() + " " + isa_name(level) + " dw " + dtype_name(dt) + " threads " +
                           std::to_string(threads) +
                           (at_end ? " guard above" : " guard below");
  auto prim = make_bf16_upd_primitive(plan);
  std::vector<uint8_t> jit_out(g_dw.bytes());
  for (int variant = 0; variant < 2; ++variant) {
    std::memset(g_dw.as<void>(), 0xff, g_dw.bytes());  // NaN everywhere it must write
    std::memset(g_scratch.as<void>(), 0xff, g_scratch.bytes());
    if (variant == 0)
      bf16_upd_run(*prim, g_x.as<uint16_t>(), g_dy.as<uint16_t>(), g_dw.as<void>(), g_scratch.as<void>(),
                   threads > 1 ? threaded() : serial());
    else
      bf16_upd_run_reference(plan, g_x.as<uint16_t>(), g_dy.as<uint16_t>(), g_dw.as<void>(), g_scratch.as<void>(),
                             serial());
    const double e = worst(d, dt, ref, g_dw.as<void>());
    CHECK(e <= 1.0, "%s (%s): error %.3g of the tolerance", name.c_str(), variant ? "twin" : "jit", e);
    if (variant == 0) std::memcpy(jit_out.data(), g_dw.as<void>(), jit_out.size());
  }
  if (level == Isa::avx512_bf16) {
    size_t i = 0;
    while (i < jit_out.size() && jit_out[i] == g_dw.as<uint8_t>()[i]) ++i;
    CHECK(i == jit_out.size(), "%s: the kernels and their twins differ first at byte %zu of %zu [%s]", name.c_str(),
          i, jit_out.size(), plan.to_string().c_str());
  }
  if (drop_check) {
    bf16_upd_run(*prim, g_x.as<uint16_t>(), g_dy.as<uint16_t>(), g_dw.as<void>(), g_scratch.as<void>(), serial());
    Drop tap;
    tap.tap = d.r * d.s / 2;
    double e = worst(d, dt, reference(d, x, dy, tap), g_dw.as<void>());
    CHECK(e > 1.0, "%s: a reference missing one tap still passes (%.3g of the tolerance)", name.c_str(), e);
    Drop pixel;
    pixel.pixel = (P / 2) * Q + Q / 2;
    e = worst(d, dt, reference(d, x, dy, pixel), g_dw.as<void>());
    CHECK(e > 1.0, "%s: a reference missing one pixel still passes (%.3g of the tolerance)", name.c_str(), e);
  }
}

ConvDesc desc(const std::string& s) { return parse_conv_desc(s); }

void resnet_kinds() {
  const char* layers[] = {
      "mb1ic64ih56oc64oh56kh3ph1",        // res2 3x3
      "mb1ic256ih56oc64oh56kh1ph0",       // res2 1x1a
      "mb1ic128ih56oc128oh28kh3sh2ph1",   // res3a 3x3 stride 2
      "mb1ic256ih56oc512oh28kh1sh2ph0",   // res3a projection
      "mb1ic512ih7oc512oh7kh3ph1",        // res5 3x3
      "mb1ic2048ih7oc512oh7kh1ph0",       // res5 1x1a
      "mb1ic3ih112oc64oh56kh7sh2ph3",     // conv1's 7x7 stride 2, C = 3, on a smaller image
  };
  int i = 0;
  for (const char* l : layers) {
    run_case(desc(l), i % 2 ? DataType::bf16 : DataType::f32, 1 + i % 2, i % 2 == 0, i == 4);
    ++i;
  }
}

// Tails, odd maps, uneven strides, dilation, images split over the threads.
void awkward_kinds() {
  const char* shapes[] = {
      "mb2ic40ih9iw11oc50kh1sh2sw3ph0",          // strided 1x1, uneven strides, tails
      "mb2ic33ih5iw13oc17kh2kw3ph0",             // odd map, K of 17 (one B tile)
      "mb1ic20ih12oc24kh3dh1ph0",                // dilation 2, blocks of 20 and 24
      "mb3ic5ih9oc20kh3sh2ph0",                  // 3 images, C of 5
      "mb2ic7ih10iw9oc40kh3kw4sh1sw2ph2pw1dw1",  // stride (1, 2), dilation (1, 2), odd pads
      "mb1ic70ih3iw40oc33kh3sh1sw2ph1",          // three input blocks, a 1-channel output tail
      "mb4ic16ih7oc16oh7kh3ph1",                 // one block each: the images split
  };
  int i = 0;
  for (const char* s : shapes) {
    run_case(desc(s), i % 2 ? DataType::f32 : DataType::bf16, 1 + i % 2, i % 2 == 1, i == 3);
    ++i;
  }
}

void random_shapes() {
  for (int i = 0; i < 30; ++i) {
    ConvDesc d = dc_test::random_desc(3, 80, 20, 20);
    d.dt = DataType::bf16;
    if (!d.validate().empty() || d.p() < 1 || d.q() < 1) {
      --i;
      continue;
    }
    run_case(d, uni(0, 1) ? DataType::bf16 : DataType::f32, uni(1, 2), uni(0, 1));
  }
}

void bad_plans() {
  ConvDesc d = desc("mb1ic16ih8oc16oh8kh3ph1");
  d.dt = DataType::bf16;
  auto refused = [&](ConvDesc bad, DataType dt, const char* what) {
    try {
      make_bf16_upd_plan(bad, 1, dt);
      CHECK(false, "the plan took %s", what);
    } catch (const std::invalid_argument&) {
    }
  };
  ConvDesc f32 = d;
  f32.dt = DataType::f32;
  refused(f32, DataType::f32, "an fp32 description");
  ConvDesc g = d;
  g.groups = 2;
  refused(g, DataType::f32, "groups");
  for (Isa level : {Isa::none, Isa::avx2, Isa::avx512}) {
    try {
      make_bf16_upd_plan(d, 1, DataType::f32, level);
      CHECK(false, "the plan took the level %s", isa_name(level));
    } catch (const std::invalid_argument&) {
    }
  }
}

// The kernel specs of the avx512_bf16 level: the fewest channel groups that fit the
// registers, as even as they split (plans and specs only: no code is generated).
void dot_specs() {
  struct Want {
    int n_a, n_b, g;
  } wants[] = {{2, 2, 11}, {1, 2, 8}, {2, 1, 16}, {1, 1, 16}};
  for (const Want& w : wants) {
    const Avx512Bf16UpdKernelSpec sp = avx512bf16_upd_spec(w.n_a, w.n_b);
    CHECK(sp.g == w.g && avx512bf16_upd_vector_registers(sp) <= 32, "%s: expected g%d", sp.name().c_str(), w.g);
  }
  ConvDesc d = desc("mb1ic64ih56oc40oh56kh3ph1");
  d.dt = DataType::bf16;
  const Bf16UpdPlan p = make_bf16_upd_plan(d, 1, DataType::f32, Isa::avx512_bf16);
  CHECK(p.kernels.empty() && p.dot_kernels.size() == 2, "%s", p.to_string().c_str());
  CHECK(p.dot_kernels[p.kernel_of[1][1]].name() == "bf16_conv_upd_a2b2g11_of32__avx512_bf16" &&
            p.dot_kernels[p.kernel_of[1][0]].name() == "bf16_conv_upd_a2b1g16_of32__avx512_bf16",
        "%s", p.to_string().c_str());
}

}  // namespace

int main() {
  dc_test::rng().seed(11);
  bad_plans();
  dot_specs();
  // The AMX level needs the CPU's tiles and the OS's permission for tile data (asked once).
  if (tiles_usable()) levels().push_back(Isa::amx);
  else std::printf("skipping the amx level: this process cannot use AMX tiles (level %s)\n", isa_name(detected_isa()));
  if (detected_isa() >= Isa::avx512_bf16) levels().push_back(Isa::avx512_bf16);
  else std::printf("skipping the avx512_bf16 level: this CPU has %s\n", isa_name(detected_isa()));
  resnet_kinds();
  awkward_kinds();
  random_shapes();
  TEST_MAIN_END("test_bf16_upd");
}
