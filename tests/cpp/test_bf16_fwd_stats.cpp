// The AMX bf16 forward's stats post-op (conv/bf16_fwd.h, jit/amx_fwd_kernel.h): every
// call's slot, from the JIT and from its scalar twin, against the same sums taken in the
// kernel's order over the output each stored, bit for bit (and on exact integer operands
// the JIT's output and slots against the twin's); the output itself unchanged by
// the post-op; the merged mean and variance against a float64 reference over the stored
// output, on ResNet-50's kinds of layers and awkward shapes, both output types, one and two
// threads, one and two images; a mean far from its shift reported unsound; and the bad
// plans and arguments refused. The shift and the sums lie between guard pages.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "check.h"
#include "conv/bf16_fwd.h"
#include "conv/fwd_stats.h"
#include "jit/isa.h"
#include "run_util.h"

using namespace dc;
using dc_test::Guarded;
using dc_test::serial;
using dc_test::threaded;
using dc_test::uni;

namespace {

constexpr int B = kAmxBlock;

float rnd() { return std::uniform_real_distribution<float>(-1.f, 1.f)(dc_test::rng()); }

float stored(const Bf16FwdPlan& p, const void* dst, size_t i) {
  return p.out_dt == DataType::bf16 ? float_from_bf16(static_cast<const uint16_t*>(dst)[i])
                                    : static_cast<const float*>(dst)[i];
}

// The slots as the kernels are to write them, from the output as stored: per call, lane
// and tile, d = y - shift summed over its stored rows of each parity in row order (d^2
// added by a fused multiply-add), then (tile 0 even + odd) + (tile 1 even + odd); lanes
// past the call's B tiles zero.
std::vector<float> slots_from_output(const Bf16FwdPlan& p, const void* dst, const float* shift) {
  std::vector<float> want(p.stats_floats, 0.f);
  const int64_t px_elems = p.strides.dst_px_stride / elem_bytes(p.out_dt);
  for (const auto& stream : p.streams)
    for (const Bf16FwdCall& c : stream) {
      const int lanes = p.kernels[c.kernel].n_b * 16;
      const float* sh = shift + c.bias_off / 4;
      float* slot = want.data() + c.stats_off;
      for (int lane = 0; lane < lanes; ++lane) {
        float sums[2][2] = {}, squares[2][2] = {};  // [tile][row parity]
        for (int j = 0; j < c.n_a; ++j) {
          size_t px = c.dst_off[j] / elem_bytes(p.out_dt);
          for (int row = 0; row < kAmxMaxRows; ++row) {
            if (!((c.rows[j] >> row) & 1)) continue;
            const float dv = stored(p, dst, px + lane) - sh[lane];
            sums[j][row % 2] += dv;
            squares[j][row % 2] = std::fma(dv, dv, squares[j][row % 2]);
            px += px_elems;
          }
        }
        slot[lane] = c.n_a == 2 ? (sums[0][0] + sums[0][1]) + (sums[1][0] + sums[1][1]) : sums[0][0] + sums[0][1];
        slot[B + lane] = c.n_a == 2 ? (squares[0][0] + squares[0][1]) + (squares[1][0] + squares[1][1])
                                    : squares[0][0] + squares[0][1];
      }
    }
  return want;
}

// Mean and biased variance of channel c of the stored (N, Kb, P, Q, 32) output, in double.
void channel_stats(const Bf16FwdPlan& p, const void* dst, int64_t c, double* mean, double* var) {
  const int64_t pixels = p.desc.p() * p.desc.q(), n = p.desc.n;
  auto at = [&](int64_t i, int64_t px) { return stored(p, dst, ((i * p.kb + c / B) * pixels + px) * B + c % B); };
  double m = 0, m2 = 0;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t px = 0; px < pixels; ++px) m += at(i, px);
  m /= n * pixels;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t px = 0; px < pixels; ++px) m2 += (at(i, px) - m) * (at(i, px) - m);
  *mean = m;
  *var = m2 / (n * pixels);
}

// Index of the first differing float (bitwise), or n.
size_t first_difference(const float* a, const float* b, size_t n) {
  size_t i = 0;
  while (i < n && std::memcmp(a + i, b + i, 4) == 0) ++i;
  return i;
}

struct Tensors {
  Guarded src, wei, bias, res, dst, scratch;
  Tensors(size_t src_b, size_t wei_b, size_t bias_b, size_t out_b, size_t scratch_b, bool at_end)
      : src(src_b, at_end), wei(wei_b, at_end), bias(bias_b, at_end), res(out_b, at_end), dst(out_b, at_end),
        scratch(scratch_b, at_end) {}
};

// Random operands of d (padded lanes zero) for the plan's output type: in [-1, 1], or small
// integers, whose products and sums the tiles and the twin both compute exactly (so that
// they store the same output); bias_value, when given, is every channel's bias.
std::unique_ptr<Tensors> make_tensors(const Bf16FwdPlan& p, bool at_end, bool integers, float bias_value = NAN) {
  auto rnd = [&] { return integers ? static_cast<float>(uni(-3, 3)) : ::rnd(); };
  const ConvDesc& d = p.desc;
  const int64_t cb = div_up(d.c, B), P = d.p(), Q = d.q();
  const size_t out_elems = d.n * p.kb * P * Q * B;
  auto t = std::make_unique<Tensors>(d.n * cb * d.h * d.w * B * 2, bf16_fwd_weight_elems(d) * 2, p.kb * B * 4,
                                     out_elems * elem_bytes(p.out_dt), std::max<int64_t>(p.scratch_bytes, 64), at_end);
  uint16_t* src = t->src.as<uint16_t>();
  for (size_t i = 0; i < t->src.bytes() / 2; ++i)
    src[i] = (i % B) + (i / (d.h * d.w * B) % cb) * B < static_cast<size_t>(d.c) ? bf16_from_float(rnd()) : 0;
  std::vector<float> w(d.k * d.c * d.r * d.s);
  for (float& v : w) v = rnd();
  pack_bf16_fwd_weights(d, w.data(), t->wei.as<uint16_t>());
  for (int64_t k = 0; k < p.kb * B; ++k)
    t->bias.as<float>()[k] = k >= d.k ? 0.f : std::isnan(bias_value) ? rnd() : bias_value;
  for (size_t i = 0; i < out_elems; ++i) {
    const float v = static_cast<int64_t>((i % B) + (i / (P * Q * B) % p.kb) * B) < d.k ? rnd() : 0.f;
    if (p.out_dt == DataType::bf16) t->res.as<uint16_t>()[i] = bf16_from_float(v);
    else t->res.as<float>()[i] = v;
  }
  return t;
}

Bf16FwdPostArgs post_args(const Bf16FwdPlan& p, const Tensors& t, const float* shift, float* sums) {
  return {p.post.bias ? t.bias.as<float>() : nullptr, p.post.add ? t.res.as<void>() : nullptr, shift, sums};
}

// One layer: the plan without stats gives the output and its statistics (float64); shifts
// drawn within 2 standard deviations of each mean; then the stats plan's JIT run and twin
// run, each slot checked bit for bit against the sums over the output it stored, the JIT's
// output against the run without stats, and the merge against the float64 statistics; on
// integer operands also the JIT's output and slots against the twin's, bit for bit.
void stats_case(const std::string& s, int n, DataType out_dt, bool bias, bool add, bool relu, int threads,
                bool at_end, bool integers) {
  ConvDesc d = parse_conv_desc(s);
  d.dt = DataType::bf16;
  d.n = n;
  FwdPostOps post;
  post.bias = bias;
  post.add = add;
  post.relu = relu;
  const Bf16FwdPlan plain = make_bf16_fwd_plan(d, threads, out_dt, post, Isa::amx);
  post.stats = true;
  const Bf16FwdPlan plan = make_bf16_fwd_plan(d, threads, out_dt, post, Isa::amx);
  const std::string name = d.to_string() + " out " + dtype_name(out_dt) + post.name() + " threads " +
                           std::to_string(threads) + (at_end ? " guard above" : " guard below") +
                           (integers ? " integers" : "");
  auto t = make_tensors(plan, at_end, integers);
  const RunShares run = threads > 1 ? threaded() : serial();
  const size_t out_bytes = t->dst.bytes();
  std::vector<uint8_t> plain_out(out_bytes);
  bf16_fwd_run(*make_bf16_fwd_primitive(plain), t->src.as<uint16_t>(), t->wei.as<uint16_t>(),
               post_args(plain, *t, nullptr, nullptr), t->dst.as<void>(), t->scratch.as<void>(), run);
  std::memcpy(plain_out.data(), t->dst.as<void>(), out_bytes);

  Guarded g_shift(plan.kb * B * 4, at_end), g_sums(plan.stats_floats * 4, !at_end);
  float* shift = g_shift.as<float>();
  std::vector<double> ref_mean(d.k), ref_var(d.k);
  for (int64_t c = 0; c < plan.kb * B; ++c) {
    shift[c] = 0.f;
    if (c >= d.k) continue;
    channel_stats(plan, plain_out.data(), c, &ref_mean[c], &ref_var[c]);
    shift[c] = static_cast<float>(ref_mean[c] + 2 * rnd() * std::sqrt(ref_var[c]));
  }
  std::vector<uint8_t> jit_out(out_bytes);
  std::vector<float> jit_sums(plan.stats_floats);
  for (int variant = 0; variant < 2; ++variant) {
    const char* who = variant ? "twin" : "jit";
    std::memset(t->dst.as<void>(), 0xff, out_bytes);
    std::memset(g_sums.as<void>(), 0xff, g_sums.bytes());  // NaN in every slot not written
    const Bf16FwdPostArgs args = post_args(plan, *t, shift, g_sums.as<float>());
    if (variant == 0)
      bf16_fwd_run(*make_bf16_fwd_primitive(plan), t->src.as<uint16_t>(), t->wei.as<uint16_t>(), args,
                   t->dst.as<void>(), t->scratch.as<void>(), run);
    else
      bf16_fwd_run_reference(plan, t->src.as<uint16_t>(), t->wei.as<uint16_t>(), args, t->dst.as<void>(),
                             t->scratch.as<void>(), serial());
    if (variant == 0)
      CHECK(std::memcmp(plain_out.data(), t->dst.as<void>(), out_bytes) == 0,
            "%s: the output with stats differs from the one without", name.c_str());
    const std::vector<float> want = slots_from_output(plan, t->dst.as<void>(), shift);
    const size_t i = first_difference(want.data(), g_sums.as<float>(), want.size());
    CHECK(i == want.size(), "%s (%s): slot float %zu of %zu is %g, want %g", name.c_str(), who, i, want.size(),
          i < want.size() ? g_sums.as<float>()[i] : 0.f, i < want.size() ? want[i] : 0.f);
    if (variant == 1) {
      if (!integers) continue;
      CHECK(std::memcmp(jit_out.data(), t->dst.as<void>(), out_bytes) == 0,
            "%s: the twin's output differs from the kernels' on exact operands", name.c_str());
      const size_t k = first_difference(jit_sums.data(), g_sums.as<float>(), jit_sums.size());
      CHECK(k == jit_sums.size(), "%s: the twin's slot float %zu of %zu is %g, the kernels' %g", name.c_str(), k,
            jit_sums.size(), k < jit_sums.size() ? g_sums.as<float>()[k] : 0.f,
            k < jit_sums.size() ? jit_sums[k] : 0.f);
      continue;
    }
    std::memcpy(jit_out.data(), t->dst.as<void>(), out_bytes);
    std::memcpy(jit_sums.data(), g_sums.as<float>(), jit_sums.size() * 4);
    std::vector<float> mean(d.k), var(d.k);
    const bool sound = bf16_fwd_stats_finish(plan, g_sums.as<float>(), shift, d.k, mean.data(), var.data());
    CHECK(sound, "%s: every shift within 2 standard deviations, yet unsound", name.c_str());
    double e = 0;
    for (int64_t c = 0; c < d.k; ++c) {
      const double mean_tol = 1e-6 * std::fabs(ref_mean[c]) + 1e-5 * std::sqrt(ref_var[c]);
      e = std::max({e, std::fabs(mean[c] - ref_mean[c]) / mean_tol,
                    std::fabs(var[c] - ref_var[c]) / (1e-5 * ref_var[c] + 1e-30)});
    }
    CHECK(e <= 1.0, "%s: mean or variance off by %.3g of the tolerance", name.c_str(), e);
    std::printf("%s: %zu slots, merge error %.3g of the tolerance\n", name.c_str(), plan.stats_tiles.size(), e);
  }
}

// ResNet-50's kinds of layers (as test_bf16_fwd's) and awkward ones: stride 1 and 2,
// padding, the projections (subsampled), conv1 (folded), channel tails, flat runs whose
// last run overlaps, rows of 20 split in two overlapping runs.
void layers() {
  struct L {
    const char* desc;
    int n;
  };
  const L ls[] = {
      {"mb1ic64ih56oc64oh56kh3ph1", 1},        // res2 3x3
      {"mb1ic256ih56oc64oh56kh1ph0", 2},       // res2 1x1a
      {"mb1ic128ih56oc128oh28kh3sh2ph1", 1},   // res3a 3x3 stride 2
      {"mb1ic256ih56oc512oh28kh1sh2ph0", 1},   // res3a projection
      {"mb1ic512ih7oc512oh7kh3ph1", 2},        // res5 3x3
      {"mb1ic2048ih7oc512oh7kh1ph0", 1},       // res5 1x1a
      {"mb1ic3ih56oc64oh28kh7sh2ph3", 2},      // conv1's 7x7 stride 2, folded
      {"mb1ic40ih9iw11oc50kh1sh2sw3ph0", 2},   // subsampled, uneven strides, 50 channels
      {"mb1ic33ih5iw13oc17kh2kw3ph0", 2},      // flat, one B tile (17 channels)
      {"mb1ic7ih10iw9oc40kh3kw4sh1sw2ph2pw1dw1", 1},  // folded, stride (1, 2), dilation
      {"mb1ic70ih3iw40oc33kh3sh1sw2ph1", 2},   // rows of 20, the last run overlapping
      {"mb1ic16ih3oc8kh3ph1", 3},              // a map smaller than a run
  };
  int i = 0;
  for (const L& l : ls) {
    const DataType out = i % 2 ? DataType::f32 : DataType::bf16;
    // The blocked model's stats go without other post-ops; others keep the epilogue's order.
    const bool others = i % 3 == 2;
    for (bool integers : {false, true})
      stats_case(l.desc, l.n, out, others, others, others, 1 + (i / 2) % 2, (i % 2 == 0) != integers, integers);
    ++i;
  }
}

// A map of mean 1e3 and standard deviation about 5: with the shift at 0 the fp32 sums
// cancel and the merge must say so; with the shift at each channel's mean it is sound and
// close to the float64 statistics.
void far_from_shift() {
  for (DataType out_dt : {DataType::f32, DataType::bf16}) {
    ConvDesc d = parse_conv_desc("mb2ic64ih12oc40oh12kh1ph0");
    d.dt = DataType::bf16;
    FwdPostOps post;
    post.bias = post.stats = true;
    const Bf16FwdPlan plan = make_bf16_fwd_plan(d, 1, out_dt, post, Isa::amx);
    auto t = make_tensors(plan, true, false, 1e3f);
    Guarded g_shift(plan.kb * B * 4, false), g_sums(plan.stats_floats * 4, true);
    auto prim = make_bf16_fwd_primitive(plan);
    std::vector<double> ref_mean(d.k), ref_var(d.k);
    for (int at_mean = 0; at_mean < 2; ++at_mean) {
      for (int64_t c = 0; c < plan.kb * B; ++c)
        g_shift.as<float>()[c] = at_mean && c < d.k ? static_cast<float>(ref_mean[c]) : 0.f;
      bf16_fwd_run(*prim, t->src.as<uint16_t>(), t->wei.as<uint16_t>(),
                   post_args(plan, *t, g_shift.as<float>(), g_sums.as<float>()), t->dst.as<void>(),
                   t->scratch.as<void>(), serial());
      if (!at_mean)
        for (int64_t c = 0; c < d.k; ++c) channel_stats(plan, t->dst.as<void>(), c, &ref_mean[c], &ref_var[c]);
      std::vector<float> mean(d.k), var(d.k);
      const bool sound =
          bf16_fwd_stats_finish(plan, g_sums.as<float>(), g_shift.as<float>(), d.k, mean.data(), var.data());
      CHECK(sound == (at_mean == 1), "out %s, shift %s: sound=%d", dtype_name(out_dt), at_mean ? "at the mean" : "0",
            sound);
      if (!at_mean) continue;
      for (int64_t c = 0; c < d.k; ++c)
        CHECK(ref_var[c] > 1 && std::fabs(mean[c] - ref_mean[c]) < 1e-6 * ref_mean[c] &&
                  std::fabs(var[c] - ref_var[c]) < 1e-5 * ref_var[c],
              "out %s channel %lld: mean %g var %g, want %g %g", dtype_name(out_dt), static_cast<long long>(c), mean[c],
              var[c], ref_mean[c], ref_var[c]);
    }
  }
}

template <typename F>
void refused(const char* what, F f) {
  try {
    f();
    CHECK(false, "took %s", what);
  } catch (const std::invalid_argument& e) {
    std::printf("refused %s: %s\n", what, e.what());
  }
}

void bad_uses() {
  ConvDesc d = parse_conv_desc("mb1ic16ih8oc16oh8kh3ph1");
  d.dt = DataType::bf16;
  FwdPostOps stats;
  stats.stats = true;
  refused("stats at the avx512_bf16 level",
          [&] { make_bf16_fwd_plan(d, 1, DataType::bf16, stats, Isa::avx512_bf16); });
  const Bf16FwdPlan plan = make_bf16_fwd_plan(d, 1, DataType::bf16, stats, Isa::amx);
  const Bf16FwdPlan plain = make_bf16_fwd_plan(d, 1, DataType::bf16, {}, Isa::amx);
  auto t = make_tensors(plan, true, false);
  std::vector<float> shift(plan.kb * B, 0.f), sums(plan.stats_floats), mean(d.k), var(d.k);
  auto run = [&](const float* sh, float* sm) {
    bf16_fwd_run_reference(plan, t->src.as<uint16_t>(), t->wei.as<uint16_t>(), {nullptr, nullptr, sh, sm},
                           t->dst.as<void>(), t->scratch.as<void>(), serial());
  };
  refused("a stats run without sums", [&] { run(shift.data(), nullptr); });
  refused("a stats run without a shift", [&] { run(nullptr, sums.data()); });
  refused("finishing a plan without stats",
          [&] { bf16_fwd_stats_finish(plain, sums.data(), shift.data(), d.k, mean.data(), var.data()); });
  refused("more channels than the layer's",
          [&] { bf16_fwd_stats_finish(plan, sums.data(), shift.data(), d.k + 1, mean.data(), var.data()); });
  // Every call has its slot, in stream order, and its kernel's name says it sums.
  int64_t next = 0;
  for (const auto& stream : plan.streams)
    for (const Bf16FwdCall& c : stream) {
      CHECK(c.stats_off == next, "call slot at %lld, want %lld", static_cast<long long>(c.stats_off),
            static_cast<long long>(next));
      next += kAmxStatsFloats;
    }
  CHECK(next == plan.stats_floats && plan.stats_tiles.size() * kAmxStatsFloats == static_cast<size_t>(next),
        "the plan's slots: %lld floats, %zu tiles", static_cast<long long>(plan.stats_floats), plan.stats_tiles.size());
  for (const AmxFwdKernelSpec& sp : plan.kernels)
    CHECK(sp.name().find("_stats") != std::string::npos, "kernel %s does not name its stats", sp.name().c_str());
}

}  // namespace

int main() {
  if (!tiles_usable()) {
    std::printf("skipping: this process cannot use AMX tiles (level %s)\n", isa_name(detected_isa()));
    return 0;
  }
  dc_test::rng().seed(11);
  bad_uses();
  far_from_shift();
  layers();
  TEST_MAIN_END("test_bf16_fwd_stats");
}
