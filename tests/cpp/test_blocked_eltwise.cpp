// The blocked batch-norm and pooling loops against their scalar twins, over random shapes
// with channel tails, odd and unit sizes, empty batches, and 1 to 3 threads' shares (run one
// after the other). Inputs carry garbage in the padded lanes: outputs must still be zero there.
#include <cmath>
#include <cstdio>
#include <vector>

#include "check.h"
#include "conv/blocked_eltwise.h"
#include "conv/blocked_pool.h"

using namespace dc;
using dc_test::fill;
using dc_test::max_rel_err;
using dc_test::uni;

namespace {

BlockedShape random_shape(int v) {
  BlockedShape s;
  s.v = v;
  s.n = uni(0, 3);
  s.c = uni(1, 3 * v + 1);
  s.h = uni(1, 9);
  s.w = uni(1, 9);
  return s;
}

std::vector<float> random_blocked(const BlockedShape& s, float offset = 0.f) {
  std::vector<float> x(s.pixels() * s.v);
  fill(x);
  for (float& e : x) e += offset;
  return x;
}

std::string str(const BlockedShape& s) {
  return "n" + std::to_string(s.n) + "c" + std::to_string(s.c) + "h" + std::to_string(s.h) + "w" + std::to_string(s.w) +
         "v" + std::to_string(s.v);
}

// An output buffer of n floats (-7 to start with) between two fences of sentinels, so that
// a write past either end shows.
class Fenced {
 public:
  explicit Fenced(size_t n) : buf_(n + 2 * kFence, kSentinel), n_(n) { std::fill(data(), data() + n, -7.f); }
  float* data() { return buf_.data() + kFence; }
  std::vector<float> get() const { return {buf_.begin() + kFence, buf_.begin() + kFence + n_}; }
  bool intact() const {
    for (size_t i = 0; i < kFence; ++i)
      if (buf_[i] != kSentinel || buf_[kFence + n_ + i] != kSentinel) return false;
    return true;
  }

 private:
  static constexpr size_t kFence = 64;
  static constexpr float kSentinel = 12345.f;
  std::vector<float> buf_;
  size_t n_;
};

// max_rel_err, where equal values (the -inf of a max-pool window with no tap inside the
// input, or NaN and NaN) count as no error.
double pool_err(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return INFINITY;
  double e = 0;
  for (size_t i = 0; i < a.size(); ++i)
    if (!(a[i] == b[i] || (std::isnan(a[i]) && std::isnan(b[i])))) e = std::max(e, max_rel_err({a[i]}, {b[i]}));
  return e;
}

// Whether every padded lane (channel >= c) of a blocked tensor is exactly zero.
bool padding_is_zero(const BlockedShape& s, const std::vector<float>& t) {
  for (int64_t i = 0; i < static_cast<int64_t>(t.size()); ++i) {
    const int64_t cb = i / s.v / s.plane() % s.cb(), l = i % s.v;
    if (cb * s.v + l >= s.c && t[i] != 0.f) return false;
  }
  return true;
}

void stats_vs_twin(int v) {
  for (int trial = 0; trial < 40; ++trial) {
    BlockedShape s = random_shape(v);
    if (s.n == 0) s.n = 1;
    // A large mean: the naive E[x^2] - E[x]^2 in fp32 would lose every digit of the variance.
    std::vector<float> x = random_blocked(s, trial % 2 ? 1000.f : 0.f);
    // Now and then a shift (the first pixel) far from the mean, as a zero border would be.
    if (trial % 4 == 1)
      for (int64_t b = 0; b < s.cb(); ++b) std::fill_n(x.begin() + b * s.plane() * v, v, 0.f);
    std::vector<float> mean(s.c), var(s.c), mean_ref(s.c), var_ref(s.c);
    bn_stats_ref(s, x.data(), mean_ref.data(), var_ref.data());
    const int nt = uni(1, 3);
    std::vector<double> partials(nt * bn_stats_partial_size(s));
    for (int t = 0; t < nt; ++t) bn_stats_share(s, x.data(), partials.data() + t * bn_stats_partial_size(s), t, nt);
    bn_stats_finish(s, x.data(), partials.data(), nt, mean.data(), var.data());
    CHECK(max_rel_err(mean, mean_ref) < 1e-6, "%s mean: %g", str(s).c_str(), max_rel_err(mean, mean_ref));
    CHECK(max_rel_err(var, var_ref) < 1e-5, "%s var: %g", str(s).c_str(), max_rel_err(var, var_ref));
  }
}

void apply_vs_twin(int v) {
  for (int trial = 0; trial < 40; ++trial) {
    const BlockedShape s = random_shape(v);
    const std::vector<float> x = random_blocked(s), r = random_blocked(s);
    std::vector<float> mean(s.c), var(s.c), w(s.c), b(s.c);
    fill(mean);
    fill(w);
    fill(b);
    for (float& e : var) e = uni(1, 100) / 50.f;
    const ChannelAffine a = trial % 2 ? bn_affine(s.c, v, mean.data(), var.data(), 1e-5, w.data(), b.data())
                                      : scale_shift_affine(s.c, v, w.data(), b.data());
    const bool relu = uni(0, 1), res = uni(0, 1);
    Fenced out(x.size());
    std::vector<float> ref(x.size());
    const int nt = uni(1, 3);
    for (int t = 0; t < nt; ++t) bn_apply_share(s, a, x.data(), res ? r.data() : nullptr, relu, out.data(), t, nt);
    bn_apply_ref(s, a, x.data(), res ? r.data() : nullptr, relu, ref.data());
    const std::vector<float> y = out.get();
    CHECK(max_rel_err(y, ref) < 1e-6, "%s relu=%d res=%d: %g", str(s).c_str(), relu, res, max_rel_err(y, ref));
    CHECK(padding_is_zero(s, y) && out.intact(), "%s: padded lanes of y, or a write outside it", str(s).c_str());
  }
}

void backward_vs_twin(int v) {
  for (int trial = 0; trial < 80; ++trial) {
    const BlockedShape s = random_shape(v);
    const std::vector<float> gy = random_blocked(s), y = random_blocked(s), x = random_blocked(s, 3.f);
    std::vector<float> mean(s.c), var(s.c), w(s.c);
    fill(mean);
    fill(w);
    for (float& e : mean) e += 3.f;
    for (float& e : var) e = uni(1, 100) / 50.f;
    BnBackwardArgs a;
    a.shape = s;
    a.grad_y = gy.data();
    a.y = uni(0, 1) ? y.data() : nullptr;
    a.x = x.data();
    a.mean = mean.data();
    a.var = var.data();
    a.eps = 1e-5;
    a.weight = uni(0, 1) ? w.data() : nullptr;
    a.train = uni(0, 1);
    const size_t size = x.size();
    Fenced fgx(size), fgr(size), fgw(s.c), fgb(s.c);
    std::vector<float> gx_ref(size), gr_ref(size), gw_ref(s.c), gb_ref(s.c);
    const bool want_x = uni(0, 3) > 0, want_r = uni(0, 1), want_w = uni(0, 1), want_b = uni(0, 1);
    BnBackwardArgs ref = a;
    ref.grad_x = gx_ref.data();
    ref.grad_residual = gr_ref.data();
    ref.grad_weight = gw_ref.data();
    ref.grad_bias = gb_ref.data();
    bn_backward_ref(ref);
    a.grad_x = want_x ? fgx.data() : nullptr;
    a.grad_residual = want_r ? fgr.data() : nullptr;
    a.grad_weight = want_w ? fgw.data() : nullptr;
    a.grad_bias = want_b ? fgb.data() : nullptr;
    BnBackward bwd(a);
    const int nt = uni(1, 3);
    std::vector<double> partials(nt * bwd.partial_size());
    for (int pass = 0; pass < bwd.passes(); ++pass) {
      for (int t = 0; t < nt; ++t) bwd.run_share(pass, partials.data() + t * bwd.partial_size(), t, nt);
      bwd.finish_pass(pass, partials.data(), nt);
    }
    const std::string name = str(s) + (a.train ? " train" : " eval") + (a.y ? " relu" : "");
    const std::vector<float> gx = fgx.get(), gr = fgr.get(), gw = fgw.get(), gb = fgb.get();
    CHECK(fgx.intact() && fgr.intact() && fgw.intact() && fgb.intact(), "%s: a write outside the outputs",
          name.c_str());
    if (want_x) {
      CHECK(max_rel_err(gx, gx_ref) < 2e-5, "%s grad_x: %g", name.c_str(), max_rel_err(gx, gx_ref));
      CHECK(padding_is_zero(s, gx), "%s: padded lanes of grad_x", name.c_str());
    }
    if (want_r) {
      CHECK(max_rel_err(gr, gr_ref) == 0, "%s grad_residual: %g", name.c_str(), max_rel_err(gr, gr_ref));
      CHECK(padding_is_zero(s, gr), "%s: padded lanes of grad_residual", name.c_str());
    }
    if (want_w) CHECK(max_rel_err(gw, gw_ref) < 1e-5, "%s grad_weight: %g", name.c_str(), max_rel_err(gw, gw_ref));
    if (want_b) CHECK(max_rel_err(gb, gb_ref) < 1e-5, "%s grad_bias: %g", name.c_str(), max_rel_err(gb, gb_ref));
  }
}

PoolDesc random_pool(int v, bool dilated) {
  PoolDesc d;
  d.in = random_shape(v);
  d.kh = uni(1, 4);
  d.kw = uni(1, 4);
  d.sh = uni(1, 3);
  d.sw = uni(1, 3);
  d.ph = uni(0, d.kh / 2);
  d.pw = uni(0, d.kw / 2);
  d.dh = dilated ? uni(1, 2) : 1;
  d.dw = dilated ? uni(1, 2) : 1;
  d.ceil_mode = uni(0, 1);
  return d;
}

std::string str(const PoolDesc& d) {
  char b[160];
  std::snprintf(b, sizeof b, " k%ldx%ld s%ldx%ld p%ldx%ld d%ldx%ld%s", long(d.kh), long(d.kw), long(d.sh), long(d.sw),
                long(d.ph), long(d.pw), long(d.dh), long(d.dw), d.ceil_mode ? " ceil" : "");
  return str(d.in) + b;
}

void pool_vs_twin(int v) {
  for (int trial = 0; trial < 120; ++trial) {
    const bool is_max = trial % 2;
    const PoolDesc d = random_pool(v, is_max);
    if (!d.validate().empty()) continue;
    const BlockedShape o = d.out();
    std::vector<float> x = random_blocked(d.in);
    const std::vector<float> gy = random_blocked(o);
    Fenced fy(o.pixels() * v), fgx(x.size());
    std::vector<float> y_ref(o.pixels() * v), gx_ref(x.size());
    float *y = fy.data(), *gx = fgx.data();
    AvgPoolOpts op;
    op.count_include_pad = uni(0, 1);
    op.divisor_override = uni(0, 2) == 0 ? uni(1, 5) : 0;
    const int nt = uni(1, 3);
    if (is_max) {
      // Ties, as after a ReLU, and now and then a NaN: the backward must pick torch's argmax.
      for (float& e : x) e = std::max(e, 0.f);
      if (uni(0, 3) == 0 && !x.empty()) x[uni(0, static_cast<int>(x.size()) - 1)] = NAN;
    }
    for (int t = 0; t < nt; ++t) {
      if (is_max) {
        max_pool_fwd_share(d, x.data(), y, t, nt);
      } else {
        avg_pool_fwd_share(d, op, x.data(), y, t, nt);
        avg_pool_bwd_share(d, op, gy.data(), gx, t, nt);
      }
    }
    if (is_max)
      for (int t = 0; t < nt; ++t) max_pool_bwd_share(d, x.data(), y, gy.data(), gx, t, nt);
    if (is_max) {
      max_pool_fwd_ref(d, x.data(), y_ref.data());
      max_pool_bwd_ref(d, x.data(), gy.data(), gx_ref.data());
    } else {
      avg_pool_fwd_ref(d, op, x.data(), y_ref.data());
      avg_pool_bwd_ref(d, op, gy.data(), gx_ref.data());
    }
    const std::string name = (is_max ? "max " : "avg ") + str(d);
    CHECK(fy.intact() && fgx.intact(), "%s: a write outside the outputs", name.c_str());
    CHECK(pool_err(fy.get(), y_ref) < 1e-6, "%s fwd: %g", name.c_str(), pool_err(fy.get(), y_ref));
    CHECK(pool_err(fgx.get(), gx_ref) < 1e-6, "%s bwd: %g", name.c_str(), pool_err(fgx.get(), gx_ref));
    CHECK(padding_is_zero(o, fy.get()) && padding_is_zero(d.in, fgx.get()), "%s: padded lanes", name.c_str());
  }
}

void global_pool_vs_twin(int v) {
  for (int trial = 0; trial < 30; ++trial) {
    const BlockedShape s = random_shape(v);
    const std::vector<float> x = random_blocked(s);
    Fenced fy(s.n * s.c), fgx(x.size());
    std::vector<float> y_ref(s.n * s.c), gy(s.n * s.c);
    fill(gy);
    const int nt = uni(1, 3);
    for (int t = 0; t < nt; ++t) {
      global_avg_pool_fwd_share(s, x.data(), fy.data(), t, nt);
      global_avg_pool_bwd_share(s, gy.data(), fgx.data(), t, nt);
    }
    CHECK(fy.intact() && fgx.intact(), "%s: a write outside the outputs", str(s).c_str());
    const std::vector<float> y = fy.get(), gx = fgx.get();
    global_avg_pool_fwd_ref(s, x.data(), y_ref.data());
    CHECK(max_rel_err(y, y_ref) < 1e-6, "%s fwd: %g", str(s).c_str(), max_rel_err(y, y_ref));
    bool ok = padding_is_zero(s, gx);
    for (size_t i = 0; i < gx.size() && ok; ++i) {
      const int64_t c = i / v / s.plane() % s.cb() * v + i % v, n = i / v / s.plane() / s.cb();
      if (c < s.c) ok = gx[i] == gy[n * s.c + c] / static_cast<float>(s.plane());
    }
    CHECK(ok, "%s bwd", str(s).c_str());
  }
}

void pool_rules() {
  PoolDesc d;
  d.in = {1, 16, 112, 112, 16};
  d.kh = d.kw = 3;
  d.sh = d.sw = 2;
  d.ph = d.pw = 1;
  CHECK(d.p() == 56 && d.q() == 56 && d.validate().empty(), "ResNet max pool: %ld", long(d.p()));
  // Ceil mode keeps the last window only where it starts inside the input or left padding.
  d.in.h = d.in.w = 5;
  d.kh = d.kw = 2;
  d.ph = d.pw = 1;
  d.ceil_mode = true;
  CHECK(d.p() == 3, "ceil mode drops a window that starts in the padding: %ld", long(d.p()));
  d.ph = 2;
  CHECK(!d.validate().empty(), "padding above half the kernel is refused");
}

}  // namespace

int main() {
  dc_test::rng().seed(20261201);
  pool_rules();
  for (int v : {16, 8}) {
    if (v == 16 && fp32_isa(detected_isa()) != Isa::avx512) {
      std::printf("skipping V=16: this CPU lacks AVX-512\n");
      continue;
    }
    if (detected_isa() == Isa::none) {
      std::printf("skipping V=%d: this CPU lacks AVX2\n", v);
      continue;
    }
    stats_vs_twin(v);
    apply_vs_twin(v);
    backward_vs_twin(v);
    pool_vs_twin(v);
    global_pool_vs_twin(v);
  }
  TEST_MAIN_END("test_blocked_eltwise");
}
