// The bf16 blocked batch norm and pooling (conv/blocked_eltwise.h, conv/blocked_pool.h; the
// layout (N, ceil(C/32), H, W, 32)) and their scalar twins against float64 references from
// the same bf16 inputs: a bf16 output must be the float64 value rounded once (within half a
// bf16 ulp, plus the fp32 math's own error), exactly equal where the math is exact (ReLU, a
// residual add of values whose sum bf16 holds, pooling maxima, the masked gradient), and +0
// in every padded lane whatever the inputs hold there. Channel tails, 1, 2 and 3 threads'
// shares (run one after the other), every tensor against a guard page above or below it.
#include <cmath>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

#include "check.h"
#include "conv/blocked_eltwise.h"
#include "conv/blocked_pool.h"
#include "run_util.h"
#include "jit/amx_fwd_kernel.h"
#include "jit/isa.h"

using namespace dc;
using dc_test::GuardedArray;
using dc_test::uni;

namespace {

constexpr int V = 32;
using Bf = std::vector<uint16_t>;
using Dv = std::vector<double>;

double f64(uint16_t b) { return float_from_bf16(b); }
float uniform(float lo, float hi) { return std::uniform_real_distribution<float>(lo, hi)(dc_test::rng()); }

std::string str(const BlockedShape& s) {
  return "n" + std::to_string(s.n) + "c" + std::to_string(s.c) + "h" + std::to_string(s.h) + "w" + std::to_string(s.w);
}

int64_t channel(const BlockedShape& s, int64_t i) { return i / V / s.plane() % s.cb() * V + i % V; }

// Real lanes uniform in [lo, hi) rounded to bf16; padded lanes hold garbage (-3), which no
// output may show.
Bf random_bf16(const BlockedShape& s, float lo, float hi) {
  Bf x(s.pixels() * V);
  for (size_t i = 0; i < x.size(); ++i) x[i] = bf16_from_float(channel(s, i) < s.c ? uniform(lo, hi) : -3.f);
  return x;
}
// Small integers: sums of two of them are exact in bf16.
Bf random_ints(const BlockedShape& s) {
  Bf x(s.pixels() * V);
  for (size_t i = 0; i < x.size(); ++i) x[i] = bf16_from_float(channel(s, i) < s.c ? uni(-60, 60) : -3.f);
  return x;
}
Dv widened(const Bf& x) {
  Dv d(x.size());
  for (size_t i = 0; i < x.size(); ++i) d[i] = f64(x[i]);
  return d;
}

// Whether b is e rounded once to bf16, up to `slack` of fp32 error (exact: b == e).
bool rounded_once(uint16_t b, double e, double slack, bool exact = false) {
  const double got = f64(b);
  if (std::isnan(e)) return std::isnan(got);
  if (exact) return got == e;
  const double a = std::fabs(e);
  // Half an ulp of e's binade (8 significant bits); below the normal range the rounding
  // flushes to zero.
  const double half_ulp = a < 0x1p-126 ? 0x1p-126 : std::ldexp(1.0, std::ilogb(a) - 8);
  return std::fabs(got - e) <= half_ulp + slack;
}

// The elements of a blocked bf16 output that are not `exact` rounded once (within slack), or,
// in a padded lane, not +0; the first one's index in *first.
int64_t bad_bf16(const BlockedShape& s, const Bf& got, const Dv& e, const Dv& slack, bool exact, int64_t* first) {
  int64_t bad = 0;
  *first = -1;
  for (size_t i = 0; i < got.size(); ++i) {
    const bool ok = channel(s, i) < s.c ? rounded_once(got[i], e[i], slack.empty() ? 0.0 : slack[i], exact)
                                        : got[i] == 0;
    if (!ok && bad++ == 0) *first = static_cast<int64_t>(i);
  }
  return bad;
}

#define CHECK_BF16(s, got, e, slack, exact, what)                                                                \
  do {                                                                                                           \
    int64_t first_;                                                                                              \
    const int64_t bad_ = bad_bf16(s, got, e, slack, exact, &first_);                                             \
    CHECK(bad_ == 0, "%s: %ld bad, first at %ld: got %.9g, want %.9g", what, long(bad_), long(first_),           \
          bad_ ? f64((got)[first_]) : 0.0, bad_ ? (e)[first_] : 0.0);                                            \
  } while (0)

BlockedShape random_shape() {
  BlockedShape s;
  s.v = V;
  s.n = uni(1, 3);
  s.c = uni(0, 3) == 0 ? 32 * uni(1, 3) : uni(1, 97);
  s.h = uni(1, 9);
  s.w = uni(1, 9);
  return s;
}

// ---- batch norm ---------------------------------------------------------------------------

void stats(const BlockedShape& s, int nt, bool at_end, float offset) {
  const Bf xv = random_bf16(s, offset - 1.f, offset + 1.f);
  const GuardedArray<uint16_t> x(xv, at_end);
  const int64_t size = bn_stats_partial_size(s);
  std::vector<double> partials(nt * size);
  std::vector<float> mean(s.c), var(s.c), mean_ref(s.c), var_ref(s.c);
  for (int t = 0; t < nt; ++t) bn_stats_share(s, x.data(), partials.data() + t * size, t, nt);
  bn_stats_finish(s, x.data(), partials.data(), nt, mean.data(), var.data());
  bn_stats_ref(s, x.data(), mean_ref.data(), var_ref.data());
  const Dv xd = widened(xv);
  Dv m64(s.c, 0.0), v64(s.c, 0.0);
  const double m = static_cast<double>(s.per_channel());
  for (size_t i = 0; i < xd.size(); ++i)
    if (channel(s, i) < s.c) m64[channel(s, i)] += xd[i] / m;
  for (size_t i = 0; i < xd.size(); ++i)
    if (channel(s, i) < s.c) v64[channel(s, i)] += (xd[i] - m64[channel(s, i)]) * (xd[i] - m64[channel(s, i)]) / m;
  int bad = 0, bad_ref = 0;
  auto ok = [&](float mu, float v, int64_t c) {
    return std::fabs(mu - m64[c]) <= 0x1p-23 * std::fabs(m64[c]) + 1e-12 &&
           std::fabs(v - v64[c]) <= 0x1p-22 * v64[c] + 1e-12;
  };
  for (int64_t c = 0; c < s.c; ++c) {
    bad += !ok(mean[c], var[c], c);
    bad_ref += !ok(mean_ref[c], var_ref[c], c);
  }
  CHECK(bad == 0 && bad_ref == 0, "stats %s threads %d offset %g: %d channels off (twin: %d)", str(s).c_str(), nt,
        offset, bad, bad_ref);
}

void apply(const BlockedShape& s, int nt, bool at_end, int trial) {
  // Every third case: integers through y = x + residual, exact in bf16, so exactly equal.
  const bool exact = trial % 3 == 0, res = exact || uni(0, 1), relu = uni(0, 1);
  const Bf xv = exact ? random_ints(s) : random_bf16(s, -2.f, 2.f), rv = exact ? random_ints(s) : random_bf16(s, -1, 1);
  std::vector<float> mean(s.c), var(s.c), w(s.c), b(s.c);
  for (int64_t c = 0; c < s.c; ++c) {
    mean[c] = uniform(-1, 1);
    var[c] = uniform(0.1f, 2.f);
    w[c] = exact ? 1.f : uniform(-2, 2);
    b[c] = exact ? 0.f : uniform(-1, 1);
  }
  const ChannelAffine a = !exact && trial % 2 ? bn_affine(s.c, V, mean.data(), var.data(), 1e-5, w.data(), b.data())
                                              : scale_shift_affine(s.c, V, w.data(), b.data());
  const GuardedArray<uint16_t> x(xv, at_end), r(rv, !at_end), y(xv.size(), at_end);
  Bf y_ref(xv.size());
  for (int t = 0; t < nt; ++t) bn_apply_share(s, a, x.data(), res ? r.data() : nullptr, relu, y.data(), t, nt);
  bn_apply_ref(s, a, xv.data(), res ? rv.data() : nullptr, relu, y_ref.data());
  Dv e(xv.size()), slack(xv.size());
  for (size_t i = 0; i < xv.size(); ++i) {
    const int64_t c = channel(s, i);
    if (c >= s.c) continue;
    const double t = (f64(xv[i]) - a.center[c]) * a.scale[c], rr = res ? f64(rv[i]) : 0.0;
    e[i] = t + a.shift[c] + rr;
    if (relu) e[i] = std::max(e[i], 0.0);
    slack[i] = 0x1p-22 * (std::fabs(t) + std::fabs(a.shift[c]) + std::fabs(rr));
  }
  const std::string name = "apply " + str(s) + " threads " + std::to_string(nt) + (relu ? " relu" : "") +
                           (res ? " residual" : "") + (exact ? " exact" : "");
  CHECK_BF16(s, y.get(), e, slack, exact, name.c_str());
  CHECK_BF16(s, y_ref, e, slack, exact, (name + " (twin)").c_str());
}

void backward(const BlockedShape& s, int nt, bool at_end) {
  const Bf gyv = random_bf16(s, -1, 1), yv = random_bf16(s, -1, 1), xv = random_bf16(s, 2, 4);
  std::vector<float> mean(s.c), var(s.c), w(s.c);
  for (int64_t c = 0; c < s.c; ++c) {
    mean[c] = uniform(2, 4);
    var[c] = uniform(0.1f, 2.f);
    w[c] = uniform(-2, 2);
  }
  const size_t size = xv.size();
  const GuardedArray<uint16_t> gy(gyv, at_end), y(yv, !at_end), x(xv, at_end), gx(size, !at_end), gr(size, at_end);
  const GuardedArray<float> gw(s.c, at_end), gb(s.c, !at_end);
  BnBackwardArgsBf16 a;
  a.shape = s;
  a.grad_y = gy.data();
  a.y = uni(0, 1) ? y.data() : nullptr;
  a.x = x.data();
  a.mean = mean.data();
  a.var = var.data();
  a.eps = 1e-5;
  a.weight = uni(0, 1) ? w.data() : nullptr;
  a.train = uni(0, 1);
  const bool want_x = uni(0, 3) > 0, want_r = uni(0, 1), want_w = uni(0, 1), want_b = uni(0, 1);
  a.grad_x = want_x ? gx.data() : nullptr;
  a.grad_residual = want_r ? gr.data() : nullptr;
  a.grad_weight = want_w ? gw.data() : nullptr;
  a.grad_bias = want_b ? gb.data() : nullptr;
  BnBackwardBf16 bwd(a);
  std::vector<double> partials(nt * bwd.partial_size());
  for (int pass = 0; pass < bwd.passes(); ++pass) {
    for (int t = 0; t < nt; ++t) bwd.run_share(pass, partials.data() + t * bwd.partial_size(), t, nt);
    bwd.finish_pass(pass, partials.data(), nt);
  }
  // The twin, every output asked for.
  Bf gx_ref(size), gr_ref(size);
  std::vector<float> gw_ref(s.c), gb_ref(s.c);
  BnBackwardArgsBf16 ra = a;
  ra.grad_y = gyv.data();
  ra.y = a.y ? yv.data() : nullptr;
  ra.x = xv.data();
  ra.grad_x = gx_ref.data();
  ra.grad_residual = gr_ref.data();
  ra.grad_weight = gw_ref.data();
  ra.grad_bias = gb_ref.data();
  bn_backward_ref(ra);
  // float64: per channel sums, then each element.
  const double m = static_cast<double>(s.per_channel());
  Dv g(size, 0.0), sg(s.c, 0.0), sgx(s.c, 0.0), abs_g(s.c, 0.0), abs_gx(s.c, 0.0), invstd(s.c), k(s.c);
  for (int64_t c = 0; c < s.c; ++c) {
    invstd[c] = 1.0 / std::sqrt(static_cast<double>(var[c]) + a.eps);
    k[c] = (a.weight ? w[c] : 1.0) * invstd[c];
  }
  for (size_t i = 0; i < size; ++i) {
    const int64_t c = channel(s, i);
    if (c >= s.c) continue;
    g[i] = a.y && f64(yv[i]) <= 0 ? 0.0 : f64(gyv[i]);
    const double xhat = (f64(xv[i]) - mean[c]) * invstd[c];
    sg[c] += g[i];
    sgx[c] += g[i] * xhat;
    abs_g[c] += std::fabs(g[i]);
    abs_gx[c] += std::fabs(g[i] * xhat);
  }
  Dv e_x(size), slack_x(size);
  for (size_t i = 0; i < size; ++i) {
    const int64_t c = channel(s, i);
    if (c >= s.c) continue;
    const double diff = f64(xv[i]) - mean[c], xhat = diff * invstd[c];
    if (!a.train) {
      e_x[i] = k[c] * g[i];
      slack_x[i] = 0x1p-22 * std::fabs(e_x[i]);
      continue;
    }
    const double b = -k[c] * invstd[c] * sgx[c] / m, d = -k[c] * sg[c] / m;
    e_x[i] = k[c] * g[i] + b * diff + d;
    // fp32 terms and coefficients, and the coefficients' fp32 sums (4-pixel partials).
    slack_x[i] = 0x1p-20 * (std::fabs(k[c] * g[i]) + std::fabs(b * diff) + std::fabs(d)) +
                 std::fabs(k[c]) / m * 0x1p-20 * (abs_g[c] + std::fabs(xhat) * abs_gx[c]);
  }
  const std::string name = "backward " + str(s) + " threads " + std::to_string(nt) + (a.train ? " train" : " eval") +
                           (a.y ? " relu" : "") + (a.weight ? " weight" : "");
  if (want_x) CHECK_BF16(s, gx.get(), e_x, slack_x, false, (name + " grad_x").c_str());
  CHECK_BF16(s, gx_ref, e_x, slack_x, false, (name + " grad_x (twin)").c_str());
  if (want_r) CHECK_BF16(s, gr.get(), g, Dv{}, true, (name + " grad_residual").c_str());
  CHECK_BF16(s, gr_ref, g, Dv{}, true, (name + " grad_residual (twin)").c_str());
  int bad = 0;
  for (int64_t c = 0; c < s.c; ++c) {
    if (want_w) bad += std::fabs(gw.data()[c] - sgx[c]) > 0x1p-21 * abs_gx[c] + 1e-30;
    if (want_b) bad += std::fabs(gb.data()[c] - sg[c]) > 0x1p-21 * abs_g[c] + 1e-30;
    bad += std::fabs(gw_ref[c] - sgx[c]) > 0x1p-21 * abs_gx[c] + 1e-30;
    bad += std::fabs(gb_ref[c] - sg[c]) > 0x1p-21 * abs_g[c] + 1e-30;
  }
  CHECK(bad == 0, "%s: %d parameter gradients off", name.c_str(), bad);
}

// ---- pooling ------------------------------------------------------------------------------

PoolDesc random_pool(bool dilated) {
  PoolDesc d;
  d.in = random_shape();
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
PoolDesc resnet_max_pool(int64_t n, int64_t c, int64_t hw) {
  PoolDesc d;
  d.in = {n, c, hw, hw, V};
  d.kh = d.kw = 3;
  d.sh = d.sw = 2;
  d.ph = d.pw = 1;
  return d;
}

std::string str(const PoolDesc& d) {
  char b[160];
  std::snprintf(b, sizeof b, " k%ldx%ld s%ldx%ld p%ldx%ld d%ldx%ld%s", long(d.kh), long(d.kw), long(d.sh), long(d.sw),
                long(d.ph), long(d.pw), long(d.dh), long(d.dw), d.ceil_mode ? " ceil" : "");
  return str(d.in) + b;
}

// The references of the pools: the fp32 twins (the fp32 ops' own rules: windows, divisors,
// argmax) on the bf16 values widened, which are the float64 results to within fp32
// rounding; the same twins on |values| bound the fp32 sums' error.
std::vector<float> as_floats(const Dv& v) { return {v.begin(), v.end()}; }
Dv as_doubles(const std::vector<float>& v) { return {v.begin(), v.end()}; }
Dv scaled_abs(const std::vector<float>& v, double k) {
  Dv out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = k * std::fabs(v[i]) + 0x1p-24 * std::fabs(v[i]);
  return out;
}
PoolDesc fp32_view(PoolDesc d) {
  d.in.v = V;  // the twins index by in.v alone: the layout is the same with fp32 elements
  return d;
}

void max_pool(const PoolDesc& d, int nt, bool at_end, bool with_nan) {
  const BlockedShape o = d.out();
  // Ties (as after a ReLU) and now and then a NaN: the backward must pick torch's argmax.
  Bf xv = random_bf16(d.in, -1, 1);
  for (size_t i = 0; i < xv.size(); ++i)
    if (channel(d.in, i) < d.in.c && f64(xv[i]) < 0) xv[i] = 0;
  if (with_nan) xv[uni(0, static_cast<int>(xv.size()) - 1)] = 0x7fc0;
  const Bf gyv = random_bf16(o, -1, 1);
  const GuardedArray<uint16_t> x(xv, at_end), y(o.pixels() * V, !at_end), gy(gyv, at_end), gx(xv.size(), !at_end);
  for (int t = 0; t < nt; ++t) max_pool_fwd_share(d, x.data(), y.data(), t, nt);
  for (int t = 0; t < nt; ++t) max_pool_bwd_share(d, x.data(), y.data(), gy.data(), gx.data(), t, nt);
  Bf y_ref(o.pixels() * V), gx_ref(xv.size());
  max_pool_fwd_ref(d, xv.data(), y_ref.data());
  max_pool_bwd_ref(d, xv.data(), gyv.data(), gx_ref.data());
  const std::vector<float> xf = as_floats(widened(xv)), gyf = as_floats(widened(gyv));
  std::vector<float> ye(y_ref.size()), gxe(xv.size()), gx_abs(xv.size()), gy_abs(gyf.size());
  for (size_t i = 0; i < gyf.size(); ++i) gy_abs[i] = std::fabs(gyf[i]);
  max_pool_fwd_ref(fp32_view(d), xf.data(), ye.data());
  max_pool_bwd_ref(fp32_view(d), xf.data(), gyf.data(), gxe.data());
  max_pool_bwd_ref(fp32_view(d), xf.data(), gy_abs.data(), gx_abs.data());
  const std::string name = "max pool " + str(d) + " threads " + std::to_string(nt) + (with_nan ? " NaN" : "");
  CHECK_BF16(o, y.get(), as_doubles(ye), Dv{}, true, (name + " fwd").c_str());
  CHECK_BF16(o, y_ref, as_doubles(ye), Dv{}, true, (name + " fwd (twin)").c_str());
  const Dv slack = scaled_abs(gx_abs, 0x1p-22);
  CHECK_BF16(d.in, gx.get(), as_doubles(gxe), slack, false, (name + " bwd").c_str());
  CHECK_BF16(d.in, gx_ref, as_doubles(gxe), slack, false, (name + " bwd (twin)").c_str());
}

void avg_pool(const PoolDesc& d, int nt, bool at_end) {
  const BlockedShape o = d.out();
  AvgPoolOpts op;
  op.count_include_pad = uni(0, 1);
  op.divisor_override = uni(0, 2) == 0 ? uni(1, 5) : 0;
  const Bf xv = random_bf16(d.in, -1, 1), gyv = random_bf16(o, -1, 1);
  const GuardedArray<uint16_t> x(xv, at_end), y(o.pixels() * V, !at_end), gy(gyv, !at_end), gx(xv.size(), at_end);
  for (int t = 0; t < nt; ++t) {
    avg_pool_fwd_share(d, op, x.data(), y.data(), t, nt);
    avg_pool_bwd_share(d, op, gy.data(), gx.data(), t, nt);
  }
  Bf y_ref(o.pixels() * V), gx_ref(xv.size());
  avg_pool_fwd_ref(d, op, xv.data(), y_ref.data());
  avg_pool_bwd_ref(d, op, gyv.data(), gx_ref.data());
  std::vector<float> xf = as_floats(widened(xv)), gyf = as_floats(widened(gyv));
  std::vector<float> ye(y_ref.size()), gxe(xv.size()), y_abs(y_ref.size()), gx_abs(xv.size());
  avg_pool_fwd_ref(fp32_view(d), op, xf.data(), ye.data());
  avg_pool_bwd_ref(fp32_view(d), op, gyf.data(), gxe.data());
  for (float& v : xf) v = std::fabs(v);
  for (float& v : gyf) v = std::fabs(v);
  avg_pool_fwd_ref(fp32_view(d), op, xf.data(), y_abs.data());
  avg_pool_bwd_ref(fp32_view(d), op, gyf.data(), gx_abs.data());
  const std::string name = "avg pool " + str(d) + " threads " + std::to_string(nt);
  // Up to 16 fp32 adds per window, and a division.
  CHECK_BF16(o, y.get(), as_doubles(ye), scaled_abs(y_abs, 0x1p-19), false, (name + " fwd").c_str());
  CHECK_BF16(o, y_ref, as_doubles(ye), scaled_abs(y_abs, 0x1p-19), false, (name + " fwd (twin)").c_str());
  CHECK_BF16(d.in, gx.get(), as_doubles(gxe), scaled_abs(gx_abs, 0x1p-19), false, (name + " bwd").c_str());
  CHECK_BF16(d.in, gx_ref, as_doubles(gxe), scaled_abs(gx_abs, 0x1p-19), false, (name + " bwd (twin)").c_str());
}

void global_pool(const BlockedShape& s, int nt, bool at_end) {
  const Bf xv = random_bf16(s, -1, 1);
  std::vector<float> gyv(s.n * s.c);
  for (float& v : gyv) v = uniform(-1, 1);
  const GuardedArray<uint16_t> x(xv, at_end), gx(xv.size(), !at_end);
  const GuardedArray<float> y(s.n * s.c, !at_end), gy(gyv, at_end);
  for (int t = 0; t < nt; ++t) {
    global_avg_pool_fwd_share(s, x.data(), y.data(), t, nt);
    global_avg_pool_bwd_share(s, gy.data(), gx.data(), t, nt);
  }
  std::vector<float> y_ref(s.n * s.c);
  global_avg_pool_fwd_ref(s, xv.data(), y_ref.data());
  Dv sum(s.n * s.c, 0.0), abs_sum(s.n * s.c, 0.0), e_gx(xv.size(), 0.0);
  const double hw = static_cast<double>(s.plane());
  for (size_t i = 0; i < xv.size(); ++i) {
    const int64_t c = channel(s, i), n = i / V / s.plane() / s.cb();
    if (c >= s.c) continue;
    sum[n * s.c + c] += f64(xv[i]) / hw;
    abs_sum[n * s.c + c] += std::fabs(f64(xv[i])) / hw;
    e_gx[i] = gyv[n * s.c + c] / hw;
  }
  int bad = 0;
  for (int64_t i = 0; i < s.n * s.c; ++i) {
    bad += std::fabs(y.data()[i] - sum[i]) > 0x1p-22 * abs_sum[i] + 0x1p-24 * std::fabs(sum[i]);
    bad += std::fabs(y_ref[i] - sum[i]) > 0x1p-22 * abs_sum[i] + 0x1p-24 * std::fabs(sum[i]);
  }
  const std::string name = "global avg pool " + str(s) + " threads " + std::to_string(nt);
  CHECK(bad == 0, "%s fwd: %d means off", name.c_str(), bad);
  Dv slack(xv.size());
  for (size_t i = 0; i < slack.size(); ++i) slack[i] = 0x1p-23 * std::fabs(e_gx[i]);
  CHECK_BF16(s, gx.get(), e_gx, slack, false, (name + " bwd").c_str());
}

}  // namespace

int main() {
  dc_test::rng().seed(20261202);
  if (detected_isa() < Isa::avx512_bf16) {
    std::printf("skipping: this CPU lacks AVX512_BF16\n");
    TEST_MAIN_END("test_blocked_eltwise_bf16");
  }
  // ResNet-50's kinds: 64 channels at the stem, a tail of a block, many blocks.
  const BlockedShape fixed[] = {{2, 64, 15, 15, V}, {1, 40, 7, 7, V}, {1, 256, 7, 7, V}, {3, 33, 1, 1, V}};
  for (int nt = 1; nt <= 3; ++nt) {
    for (int trial = 0; trial < 24; ++trial) {
      const BlockedShape s = trial < 4 ? fixed[trial] : random_shape();
      const bool at_end = (trial + nt) % 2;
      stats(s, nt, at_end, trial % 3 == 1 ? 1000.f : 0.f);
      apply(s, nt, at_end, trial);
      backward(s, nt, at_end);
      global_pool(s, nt, at_end);
    }
    max_pool(resnet_max_pool(2, 64, 16), nt, nt % 2, false);
    max_pool(resnet_max_pool(1, 40, 11), nt, nt % 2 == 0, true);
    for (int trial = 0; trial < 40; ++trial) {
      const PoolDesc d = random_pool(trial % 2);
      if (!d.validate().empty()) continue;
      if (trial % 2)
        max_pool(d, nt, trial % 4 == 1, uni(0, 3) == 0);
      else
        avg_pool(d, nt, trial % 4 == 0);
    }
  }
  // The layout is checked: a bf16 tensor blocked by 16 is refused.
  bool refused = false;
  try {
    BlockedShape s{1, 16, 1, 1, 16};
    std::vector<double> p(bn_stats_partial_size(s));
    uint16_t x[16] = {};
    bn_stats_share(s, x, p.data(), 0, 1);
  } catch (const std::invalid_argument&) {
    refused = true;
  }
  CHECK(refused, "a bf16 shape blocked by 16 is refused");
  // The level is the active one: capped below avx512_bf16, a bf16 pass is refused.
  for (Isa cap : {Isa::avx512, Isa::avx2}) {
    set_isa_cap(cap);
    bool capped = false;
    try {
      check_bf16_shape(BlockedShape{1, 16, 1, 1, V}, "bn_stats");
    } catch (const std::runtime_error& e) {
      capped = std::string(e.what()).find(std::string("caps it at ") + isa_name(cap)) != std::string::npos;
    }
    CHECK(capped, "a bf16 pass below the avx512_bf16 level is refused, naming the cap");
  }
  set_isa_cap(Isa::amx);
  check_bf16_shape(BlockedShape{1, 16, 1, 1, V}, "bn_stats");  // and runs again
  TEST_MAIN_END("test_blocked_eltwise_bf16");
}
