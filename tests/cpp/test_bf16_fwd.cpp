// The bf16 forward convolution (conv/bf16_fwd.h) on both kernel families, AMX and
// AVX512_BF16 (each where this CPU has it), and their kernels' scalar twins against a
// float64 convolution of the same bf16-rounded operands, every tensor between guard pages:
// ResNet-50's kinds of layers and random awkward shapes (channel tails, padding, strides,
// dilation, tiny maps), both output types, the post-ops, one and two threads. The
// AVX512_BF16 kernels must also match their twins bit for bit.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "check.h"
#include "conv/bf16_fwd.h"
#include "jit/isa.h"
#include "conv/reference.h"
#include "run_util.h"

using namespace dc;
using dc_test::Guarded;
using dc_test::serial;
using dc_test::threaded;
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

float rnd() { return std::uniform_real_distribution<float>(-1.f, 1.f)(dc_test::rng()); }

// The JIT run and the twins' run of one plan against the reference.
void run_level(const Case& t, const Bf16FwdPlan& plan, const Guarded& g_src, const Guarded& g_wei,
               const Bf16FwdPostArgs& post, const Guarded& g_dst, void* scratch, const Reference& ref,
               const std::string& name, int threads) {
  auto prim = make_bf16_fwd_primitive(plan);
  std::vector<uint8_t> jit_out(g_dst.bytes());
  for (int variant = 0; variant < 2; ++variant) {
    std::memset(g_dst.as<void>(), 0xff, g_dst.bytes());  // NaN everywhere it must write
    if (variant == 0)
      bf16_fwd_run(*prim, g_src.as<uint16_t>(), g_wei.as<uint16_t>(), post, g_dst.as<void>(), scratch,
                   threads > 1 ? threaded() : serial());
    else
      bf16_fwd_run_reference(plan, g_src.as<uint16_t>(), g_wei.as<uint16_t>(), post, g_dst.as<void>(), scratch,
                             serial());
    const double e = worst(t, ref, g_dst.as<void>());
    CHECK(e <= 1.0, "%s (%s): error %.3g of the tolerance", name.c_str(), variant ? "twin" : "jit", e);
    if (variant == 0) std::memcpy(jit_out.data(), g_dst.as<void>(), jit_out.size());
  }
  if (plan.level == Isa::avx512_bf16) {
    size_t i = 0;
    while (i < jit_out.size() && jit_out[i] == g_dst.as<uint8_t>()[i]) ++i;
    CHECK(i == jit_out.size(), "%s: the kernels and their twins differ first at byte %zu of %zu", name.c_str(), i,
          jit_out.size());
  }
}

// The levels under test: the bf16 ones this process can run.
std::vector<Isa>& levels() {
  static std::vector<Isa> l;
  return l;
}

// One case at `threads` on every level, every tensor guarded (against its upper or lower
// page): the JIT run and the twins' run against the float64 reference (and, at the
// avx512_bf16 level, against each other exactly); and, for `drop_check`, the JIT output
// against a reference missing one tap must fail.
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

  int64_t scratch_bytes = 64;
  for (Isa level : levels())
    scratch_bytes = std::max(scratch_bytes, make_bf16_fwd_plan(d, threads, t.out_dt, t.post, level).scratch_bytes);
  Guarded g_src(src.size() * 2, at_end), g_wei(bf16_fwd_weight_elems(d) * 2, at_end), g_bias(bias.size() * 4, at_end),
      g_res(out_elems * out_es, at_end), g_dst(out_elems * out_es, at_end), g_scratch(scratch_bytes, at_end);
  std::memcpy(g_src.as<void>(), src.data(), g_src.bytes());
  pack_bf16_fwd_weights(d, w.data(), g_wei.as<uint16_t>());
  std::memcpy(g_bias.as<void>(), bias.data(), g_bias.bytes());
  for (size_t i = 0; i < out_elems; ++i) {
    if (t.out_dt == DataType::bf16) g_res.as<uint16_t>()[i] = bf16_from_float(res[i]);
    else g_res.as<float>()[i] = res[i];
  }
  const Bf16FwdPostArgs post{t.post.bias ? g_bias.as<float>() : nullptr, t.post.add ? g_res.as<void>() : nullptr};
  const Reference ref = reference(t, src, w_bf16, bias, res);
  for (Isa level : levels()) {
    const Bf16FwdPlan plan = make_bf16_fwd_plan(d, threads, t.out_dt, t.post, level);
    // A plan's scratch, against the guard page when it is below (the copy is all of it).
    void* scratch = g_scratch.as<uint8_t>() + (at_end ? scratch_bytes - std::max<int64_t>(plan.scratch_bytes, 64) : 0);
    const std::string name = d.to_string() + " " + isa_name(level) + " out " + dtype_name(t.out_dt) + t.post.name() +
                             " threads " + std::to_string(threads) + (at_end ? " guard above" : " guard below");
    run_level(t, plan, g_src, g_wei, post, g_dst, scratch, ref, name, threads);
    if (drop_check) {
      auto prim = make_bf16_fwd_primitive(plan);
      bf16_fwd_run(*prim, g_src.as<uint16_t>(), g_wei.as<uint16_t>(), post, g_dst.as<void>(), scratch, serial());
      const int64_t drop = (((d.k / 2) * d.c + d.c / 2) * d.r + d.r / 2) * d.s + d.s / 2;
      const double e = worst(t, reference(t, src, w_bf16, bias, res, drop), g_dst.as<void>());
      CHECK(e > 1.0, "%s: a reference missing one tap still passes (%.3g of the tolerance)", name.c_str(), e);
    }
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
      make_bf16_fwd_plan(d, 1, out, post, Isa::amx);
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
  try {
    make_bf16_fwd_plan(t.d, 1, DataType::bf16, stats, Isa::avx512_bf16);
    CHECK(false, "the plan took the stats post-op at the avx512_bf16 level");
  } catch (const std::invalid_argument&) {
  }
  for (Isa level : {Isa::none, Isa::avx2, Isa::avx512}) {
    try {
      make_bf16_fwd_plan(t.d, 1, DataType::bf16, {}, level);
      CHECK(false, "the plan took the level %s", isa_name(level));
    } catch (const std::invalid_argument&) {
    }
  }
}

// The tiles each level's plan takes (plans only: no code is generated).
void plan_tiles() {
  auto plan = [](const char* s, Isa level) {
    ConvDesc d = parse_conv_desc(s);
    d.dt = DataType::bf16;
    return make_bf16_fwd_plan(d, 1, DataType::bf16, {}, level);
  };
  // AMX: runs of 16 pixels, two a call.
  const Bf16FwdPlan amx = plan("mb1ic64ih56oc64oh56kh3ph1", Isa::amx);
  CHECK(amx.m == 16 && amx.n_a == 2 && !amx.kernels.empty() && amx.dot_kernels.empty(), "amx plan: %s",
        amx.to_string().c_str());
  struct Want {
    const char* desc;
    bool flat;
    int n_a, m, pairs;
  };
  // avx512_bf16: 14 pixels a call in rows that split evenly (on an unpadded 1x1 the flat
  // map runs in as many runs, and rows, found first, stay); 2 rows of 7 on the
  // 7 x 7 maps and the 7-pixel rows of res5a's stride 2; conv1, folded, reads its 11 pairs.
  const Want want[] = {
      {"mb1ic64ih56oc64oh56kh3ph1", false, 1, 14, 16},
      {"mb1ic256ih56oc64oh56kh1ph0", false, 1, 14, 16},
      {"mb1ic128ih56oc128oh28kh3sh2ph1", false, 1, 14, 16},
      {"mb1ic256ih14oc512oh7kh3sh2ph1", false, 2, 7, 16},
      {"mb1ic512ih7oc512oh7kh3ph1", false, 2, 7, 16},
      {"mb1ic3ih224oc64oh112kh7sh2ph3", false, 1, 14, 11},
  };
  for (const Want& w : want) {
    const Bf16FwdPlan p = plan(w.desc, Isa::avx512_bf16);
    CHECK(p.flat == w.flat && p.n_a == w.n_a && p.m == w.m && p.kernels.empty() && !p.dot_kernels.empty() &&
              p.dot_kernels[0].pairs == w.pairs,
          "avx512_bf16 plan of %s: want %s runs of %d pixels, %d a call, %d pairs; got %s", w.desc,
          w.flat ? "flat" : "row", w.m, w.n_a, w.pairs, p.to_string().c_str());
  }
  // Flat where rows are short and the map unpadded: a 3 x 3 map in one call of 9 pixels,
  // against two calls of rows (2 x 3 pixels, then 3).
  // Without a level the plan takes the active one, as TORCH_DIRECTCONV_ISA caps it.
  ConvDesc d = parse_conv_desc("mb1ic64ih8oc64oh8kh3ph1");
  d.dt = DataType::bf16;
  for (Isa cap : {Isa::avx512_bf16, Isa::amx}) {
    if (cap > detected_isa()) continue;
    set_isa_cap(cap);
    const Bf16FwdPlan p = make_bf16_fwd_plan(d, 1, DataType::bf16);
    CHECK(p.level == cap, "the plan under the cap %s took the level %s", isa_name(cap), isa_name(p.level));
  }
  set_isa_cap(Isa::amx);
  const Bf16FwdPlan flat = plan("mb1ic64ih3oc64oh3kh1ph0", Isa::avx512_bf16);
  CHECK(flat.flat && flat.m == 9 && flat.n_a == 1, "avx512_bf16 plan of a 3 x 3 1x1: want one flat run of 9, got %s",
        flat.to_string().c_str());
}

// The call order: image-major by default; block-major where the layer's weights do not fit
// L2 and several images would each read them again (bf16_fwd_blocks_outer). Such a layer,
// on one and two threads, against the reference.
void call_orders() {
  const int64_t l2 = 2 << 20;
  CHECK(bf16_fwd_blocks_outer(4718592, 82944, 4, 16, 2, l2), "res5's 3x3 at N=4 on 2 threads should be block-major");
  CHECK(!bf16_fwd_blocks_outer(32768, 1605632, 4, 2, 2, l2), "res2's 1x1 at N=4 should stay image-major");
  CHECK(!bf16_fwd_blocks_outer(4718592, 82944, 1, 16, 2, l2), "one image: the orders are the same, image-major");
  const Case t = make_case("mb2ic384ih3oc384oh3kh3ph1", DataType::bf16, true, false, true);
  for (int threads : {1, 2}) {
    const bool outer = make_bf16_fwd_plan(t.d, threads, t.out_dt, t.post, levels()[0]).blocks_outer;
    CHECK(outer == (bf16_fwd_weight_elems(t.d) * 2 > l2_bytes() / 2),
          "%s on %d threads: block-major %d, with %lld bytes of weights and an L2 of %lld", t.d.to_string().c_str(),
          threads, outer, static_cast<long long>(bf16_fwd_weight_elems(t.d) * 2), static_cast<long long>(l2_bytes()));
    run_case(t, threads, threads == 2);
  }
}

// The primitive cache keys on the level: under the caps amx -> avx512_bf16 -> amx the same
// problem gets each level's kernels (and tiles only at amx), never the other level's.
void primitives_key_on_the_level() {
  if (detected_isa() < Isa::amx) {
    std::printf("skipping the primitive cache's levels: this CPU has %s\n", isa_name(detected_isa()));
    return;
  }
  ConvDesc d = parse_conv_desc("mb1ic64ih8oc64oh8kh3ph1");
  d.dt = DataType::bf16;
  FwdPostOps post;
  post.relu = true;
  for (Isa cap : {Isa::amx, Isa::avx512_bf16, Isa::amx}) {
    set_isa_cap(cap);
    const auto prim = get_bf16_fwd_primitive(d, 1, DataType::bf16, post);
    const std::string names = prim->plan.to_string(), suffix = std::string("__") + isa_name(cap);
    const std::string other = cap == Isa::amx ? "__avx512_bf16" : "__amx";
    CHECK(prim->plan.level == cap && names.find(suffix) != std::string::npos &&
              names.find(other) == std::string::npos,
          "under the cap %s the cached primitive is %s", isa_name(cap), names.c_str());
    CHECK((prim->tile_config != nullptr) == (cap == Isa::amx), "under the cap %s: tiles %s", isa_name(cap),
          prim->tile_config ? "configured" : "not configured");
  }
  set_isa_cap(Isa::amx);
}

}  // namespace

int main() {
  // The AMX level needs the CPU's tiles and the OS's permission for tile data (asked once).
  if (tiles_usable()) levels().push_back(Isa::amx);
  else std::printf("skipping the amx level: this process cannot use AMX tiles (level %s)\n", isa_name(detected_isa()));
  if (detected_isa() >= Isa::avx512_bf16) levels().push_back(Isa::avx512_bf16);
  else std::printf("skipping the avx512_bf16 level: this CPU has %s\n", isa_name(detected_isa()));
  if (levels().empty()) return 0;
  dc_test::rng().seed(10);
  bad_plans();
  plan_tiles();
  primitives_key_on_the_level();
  call_orders();
  resnet_kinds();
  input_kinds();
  random_shapes();
  TEST_MAIN_END("test_bf16_fwd");
}
