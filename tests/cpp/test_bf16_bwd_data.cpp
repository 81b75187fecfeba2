// The bf16 input gradient (conv/bf16_bwd_data.h) at each level this process can run (amx,
// avx512_bf16) and its kernels' scalar twins against a float64 transposed convolution of
// the same bf16-rounded operands (and, at the avx512_bf16 level, against each other bit for
// bit), every tensor between guard pages: each kind of ResNet-50 layer (1 x 1 and 3 x 3 at strides 1 and 2, conv1's
// 7 x 7 stride 2 on 3 channels) and awkward shapes (channel tails, maps that the stride
// does not divide, strides wider than the kernel, dilation, paddings that crop), both
// output types, fp32 and bf16 weights, one and two threads.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "check.h"
#include "conv/bf16_bwd_data.h"
#include "jit/isa.h"
#include "run_util.h"

using namespace dc;
using dc_test::Guarded;
using dc_test::serial;
using dc_test::threaded;
using dc_test::uni;

namespace {

constexpr int B = kAmxBlock;

// dx and sum |terms| per element, in double, from the blocked bf16 dy and the (K, C, R, S)
// weights as rounded to bf16; optionally without one weight element.
struct Reference {
  std::vector<double> dx, mag;
};
Reference reference(const ConvDesc& d, const std::vector<uint16_t>& dy, const std::vector<float>& w_bf16,
                    int64_t drop = -1) {
  const int64_t cb = div_up(d.c, B), kb = div_up(d.k, B), P = d.p(), Q = d.q();
  Reference out;
  out.dx.assign(d.n * cb * d.h * d.w * B, 0.0);
  out.mag.assign(out.dx.size(), 0.0);
  for (int64_t n = 0; n < d.n; ++n)
    for (int64_t k = 0; k < d.k; ++k)
      for (int64_t p = 0; p < P; ++p)
        for (int64_t q = 0; q < Q; ++q) {
          const double g = float_from_bf16(dy[(((n * kb + k / B) * P + p) * Q + q) * B + k % B]);
          for (int64_t r = 0; r < d.r; ++r)
            for (int64_t s = 0; s < d.s; ++s) {
              const int64_t h = p * d.stride_h - d.pad_t + r * d.dil_h, x = q * d.stride_w - d.pad_l + s * d.dil_w;
              if (h < 0 || h >= d.h || x < 0 || x >= d.w) continue;
              for (int64_t c = 0; c < d.c; ++c) {
                const int64_t wi = ((k * d.c + c) * d.r + r) * d.s + s;
                if (wi == drop) continue;
                const size_t o = (((n * cb + c / B) * d.h + h) * d.w + x) * B + c % B;
                out.dx[o] += g * w_bf16[wi];
                out.mag[o] += std::fabs(g * w_bf16[wi]);
              }
            }
        }
  return out;
}

// Largest |error| / tolerance over dx (> 1 fails), infinite for a NaN. The tolerance is
// fp32 summation's bound over the fan-in, (K R S + 2) 2^-24 sum |terms|, plus bf16
// output's rounding to nearest, 2^-8 |dx|; padded lanes must be exactly zero.
double worst(const ConvDesc& d, DataType out_dt, const Reference& ref, const void* dx) {
  const double u = std::ldexp(1.0, -24), n = static_cast<double>(d.k * d.r * d.s) + 2;
  double e = 0;
  for (size_t i = 0; i < ref.dx.size(); ++i) {
    const double got = out_dt == DataType::bf16 ? float_from_bf16(static_cast<const uint16_t*>(dx)[i])
                                                : static_cast<const float*>(dx)[i];
    if (std::isnan(got)) return INFINITY;
    const double acc_err = n * u * ref.mag[i];
    const double tol = acc_err + (out_dt == DataType::bf16 ? std::ldexp(std::fabs(ref.dx[i]) + acc_err, -8) : 0);
    const double err = std::fabs(got - ref.dx[i]);
    e = std::max(e, tol > 0 ? err / tol : (err > 0 ? INFINITY : 0));
  }
  return e;
}

// Plans of each way to store a strided layer's phases, counted so that main can check
// that both ran.
int& interleaved_plans() {
  static int n = 0;
  return n;
}
int& scattered_plans() {
  static int n = 0;
  return n;
}

float rnd() { return std::uniform_real_distribution<float>(-1.f, 1.f)(dc_test::rng()); }

struct Options {
  int threads = 1;
  bool at_end = true;       // guard pages against the upper (or lower) end of each tensor
  bool bf16_weights = false;  // pack from bf16 (K, C, R, S) weights rather than fp32
  bool drop_check = false;  // the output against a reference missing one tap must fail
};

// The levels under test: the bf16 ones this process can run.
std::vector<Isa>& levels() {
  static std::vector<Isa> l;
  return l;
}

// One case on every level, every tensor guarded: the JIT run and the twins' run against
// the float64 reference.
void run_level(const ConvDesc& d, DataType out_dt, const Options& o, Isa level);
void run_case(const ConvDesc& d, DataType out_dt, const Options& o) {
  for (Isa level : levels()) run_level(d, out_dt, o, level);
}

void run_level(const ConvDesc& d, DataType out_dt, const Options& o, Isa level) {
  const int64_t cb = div_up(d.c, B), kb = div_up(d.k, B), P = d.p(), Q = d.q();
  const int out_es = elem_bytes(out_dt);
  std::vector<uint16_t> dy(d.n * kb * P * Q * B, 0);
  for (int64_t i = 0; i < static_cast<int64_t>(dy.size()); ++i)
    if ((i % B) + (i / (P * Q * B) % kb) * B < d.k) dy[i] = bf16_from_float(rnd());
  std::vector<float> w(d.k * d.c * d.r * d.s), w_bf16(w.size());
  std::vector<uint16_t> w_bits(w.size());
  for (size_t i = 0; i < w.size(); ++i) {
    w[i] = rnd();
    w_bits[i] = bf16_from_float(w[i]);
    w_bf16[i] = float_from_bf16(w_bits[i]);
  }
  const size_t dx_elems = d.n * cb * d.h * d.w * B;

  const Bf16BwdDataPlan plan = make_bf16_bwd_data_plan(d, o.threads, out_dt, level);
  CHECK(plan.level == level, "%s: the plan took the level %s", d.to_string().c_str(), isa_name(plan.level));
  interleaved_plans() += plan.interleaved;
  scattered_plans() += plan.scattered;
  CHECK(plan.weight_elems == bf16_bwd_data_weight_elems(d), "%s: weight sizes disagree", d.to_string().c_str());
  Guarded g_dy(dy.size() * 2, o.at_end), g_wei(plan.weight_elems * 2, o.at_end), g_dx(dx_elems * out_es, o.at_end),
      g_scratch(std::max<int64_t>(plan.scratch_bytes, 64), o.at_end);
  std::memcpy(g_dy.as<void>(), dy.data(), g_dy.bytes());
  if (o.bf16_weights) pack_bf16_bwd_data_weights(d, w_bits.data(), g_wei.as<uint16_t>());
  else pack_bf16_bwd_data_weights(d, w.data(), g_wei.as<uint16_t>());
  const Reference ref = reference(d, dy, w_bf16);
  const std::string name = d.to_string() + " " + isa_name(level) + " out " + dtype_name(out_dt) + (o.bf16_weights ? " wei bf16" : "") +
                           " threads " + std::to_string(o.threads) + (o.at_end ? " guard above" : " guard below");

  auto prim = make_bf16_bwd_data_primitive(plan);
  void* scratch = plan.scratch_bytes ? g_scratch.as<void>() : nullptr;
  std::vector<uint8_t> jit_out(g_dx.bytes());
  for (int variant = 0; variant < 2; ++variant) {
    std::memset(g_dx.as<void>(), 0xff, g_dx.bytes());  // NaN everywhere it must write
    if (variant == 0)
      bf16_bwd_data_run(*prim, g_dy.as<uint16_t>(), g_wei.as<uint16_t>(), g_dx.as<void>(), scratch,
                        o.threads > 1 ? threaded() : serial());
    else
      bf16_bwd_data_run_reference(plan, g_dy.as<uint16_t>(), g_wei.as<uint16_t>(), g_dx.as<void>(), scratch,
                                  serial());
    const double e = worst(d, out_dt, ref, g_dx.as<void>());
    CHECK(e <= 1.0, "%s (%s): error %.3g of the tolerance [%s]", name.c_str(), variant ? "twin" : "jit", e,
          plan.to_string().c_str());
    if (variant == 0) std::memcpy(jit_out.data(), g_dx.as<void>(), jit_out.size());
  }
  if (level == Isa::avx512_bf16) {
    size_t i = 0;
    while (i < jit_out.size() && jit_out[i] == g_dx.as<uint8_t>()[i]) ++i;
    CHECK(i == jit_out.size(), "%s: the kernels and their twins differ first at byte %zu of %zu [%s]", name.c_str(),
          i, jit_out.size(), plan.to_string().c_str());
  }
  if (o.drop_check) {
    bf16_bwd_data_run(*prim, g_dy.as<uint16_t>(), g_wei.as<uint16_t>(), g_dx.as<void>(), scratch, serial());
    const int64_t drop = (((d.k / 2) * d.c + d.c / 2) * d.r + d.r / 2) * d.s + d.s / 2;
    const double e = worst(d, out_dt, reference(d, dy, w_bf16, drop), g_dx.as<void>());
    CHECK(e > 1.0, "%s: a reference missing one tap still passes (%.3g of the tolerance)", name.c_str(), e);
  }
}

ConvDesc desc(const std::string& s) {
  ConvDesc d = parse_conv_desc(s);
  d.dt = DataType::bf16;
  return d;
}

// Every stride, padding and kernel size of ResNet-50 v1.5's layers, at their channel
// counts (smaller maps where the reference would take long).
void resnet_kinds() {
  const char* layers[] = {
      "mb1ic64ih56oc64oh56kh3ph1",       // res2 3x3
      "mb1ic256ih56oc64oh56kh1ph0",      // res2 1x1a
      "mb1ic64ih28oc256kh1ph0",          // res2 1x1c (a smaller map)
      "mb1ic128ih28oc128kh3sh2ph1",      // res3a 3x3 stride 2 (a smaller map)
      "mb1ic256ih28oc512kh1sh2ph0",      // res3a projection (a smaller map)
      "mb1ic256ih14oc256kh3sh2ph1",      // res5a 3x3 stride 2: 7 x 7 phases (fewer channels)
      "mb1ic512ih7oc512oh7kh3ph1",       // res5 3x3
      "mb1ic2048ih7oc512oh7kh1ph0",      // res5 1x1a
      "mb1ic1024ih14oc2048kh1sh2ph0",    // res5a projection
      "mb1ic3ih56oc64kh7sh2ph3",         // conv1's 7x7 stride 2 on a smaller image
  };
  int i = 0;
  for (const char* l : layers) {
    Options o;
    o.threads = 1 + i % 2;
    o.at_end = i % 2 == 0;
    o.bf16_weights = i % 3 == 1;
    o.drop_check = i == 0 || i == 3 || i == 9;
    run_case(desc(l), i % 2 ? DataType::f32 : DataType::bf16, o);
    ++i;
  }
}

// Shapes random padded ones rarely give.
void odd_kinds() {
  const char* shapes[] = {
      "mb2ic40ih9iw11oc50kh1sh2sw3ph0",         // 1x1, uneven strides that do not divide the map
      "mb2ic17ih9iw10oc33kh3sh2ph1",            // tails of 17 and 33, odd map
      "mb1ic5ih11oc20kh3sh3ph0",                // stride 3 = kernel
      "mb1ic36ih8oc12kh2sh3ph0",                // stride wider than the kernel: phases without taps
      "mb1ic20ih12oc24kh3dh1ph0",               // dilation 2, stride 1, no padding
      "mb1ic24ih13oc20kh3sh2dh1ph2",            // dilation 2 at stride 2
      "mb2ic7ih10iw9oc40kh3kw4sh1sw2ph2pw1dw1",  // stride (1, 2), dilation (1, 2)
      "mb1ic16ih6oc16kh1ph1",                   // a padding wider than the kernel: crops
      "mb1ic33ih2iw3oc70kh3ph1",                // a map smaller than a tile
      "mb1ic16ih1oc16kh1sh2ph0",                // one pixel, stride 2
      "mb2ic17ih30iw29oc33kh3sh2ph1",           // phases 15 and 14 wide: stored straight into dx
      "mb1ic40ih5iw33oc20kh2kw3sh1sw2ph1pw0",   // stride (1, 2), phases 17 and 16 wide, into dx
  };
  int i = 0;
  for (const char* s : shapes) {
    Options o;
    o.threads = 1 + i % 2;
    o.at_end = i % 2 == 1;
    o.bf16_weights = i % 3 == 0;
    o.drop_check = i == 1 || i == 3;
    run_case(desc(s), i % 2 ? DataType::f32 : DataType::bf16, o);
    ++i;
  }
}

void random_shapes() {
  for (int i = 0; i < 40; ++i) {
    ConvDesc d = dc_test::random_desc(2, 80, 20, 20);
    d.dt = DataType::bf16;
    if (uni(0, 2) == 0) d.stride_h = d.stride_w = 1;
    if (!d.validate().empty() || d.p() < 1 || d.q() < 1) {
      --i;
      continue;
    }
    Options o;
    o.threads = uni(1, 2);
    o.at_end = uni(0, 1);
    o.bf16_weights = uni(0, 1);
    run_case(d, uni(0, 1) ? DataType::bf16 : DataType::f32, o);
  }
}

void bad_plans() {
  const ConvDesc d = desc("mb1ic16ih8oc16oh8kh3ph1");
  auto refused = [&](const ConvDesc& bad, DataType out, int threads, const char* what) {
    try {
      make_bf16_bwd_data_plan(bad, threads, out);
      CHECK(false, "the plan took %s", what);
    } catch (const std::invalid_argument&) {
    }
  };
  ConvDesc f32 = d;
  f32.dt = DataType::f32;
  refused(f32, DataType::bf16, 1, "an fp32 description");
  ConvDesc g = d;
  g.groups = 2;
  refused(g, DataType::bf16, 1, "groups");
  refused(d, DataType::bf16, 0, "no threads");
  for (Isa level : {Isa::none, Isa::avx2, Isa::avx512}) {
    try {
      make_bf16_bwd_data_plan(d, 1, DataType::bf16, level);
      CHECK(false, "the plan took the level %s", isa_name(level));
    } catch (const std::invalid_argument&) {
    }
  }
}

}  // namespace

int main() {
  // The AMX level needs the CPU's tiles and the OS's permission for tile data (asked once).
  if (tiles_usable()) levels().push_back(Isa::amx);
  else std::printf("skipping the amx level: this process cannot use AMX tiles (level %s)\n", isa_name(detected_isa()));
  if (detected_isa() >= Isa::avx512_bf16) levels().push_back(Isa::avx512_bf16);
  else std::printf("skipping the avx512_bf16 level: this CPU has %s\n", isa_name(detected_isa()));
  if (levels().empty()) return 0;
  dc_test::rng().seed(11);
  bad_plans();
  resnet_kinds();
  odd_kinds();
  random_shapes();
  CHECK(interleaved_plans() > 0 && scattered_plans() > 0, "strided plans: %d interleaved, %d scattered",
        interleaved_plans(), scattered_plans());
  TEST_MAIN_END("test_bf16_bwd_data");
}
