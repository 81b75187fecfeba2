#include "conv/blocked_pool.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "conv/blocked_runs.h"
#include "conv/lanes.h"

namespace dc {

using lanes::DSum;
using lanes::keep;
using lanes::lane_mask;
using lanes::load;
using lanes::splat;
using lanes::store;
using lanes::Vec;

int64_t PoolDesc::out_size(int64_t size, int64_t k, int64_t s, int64_t pad, int64_t d) const {
  if (k < 1 || s < 1 || d < 1) return 0;
  const int64_t span = size + 2 * pad - d * (k - 1) - 1 + (ceil_mode ? s - 1 : 0);
  // Rounded towards minus infinity, as torch's div_rtn.
  int64_t out = (span >= 0 ? span / s : -((-span + s - 1) / s)) + 1;
  if (ceil_mode && (out - 1) * s >= size + pad) --out;
  return out;
}

std::string PoolDesc::validate() const {
  auto pair = [](int64_t a, int64_t b) { return "(" + std::to_string(a) + ", " + std::to_string(b) + ")"; };
  if (kh < 1 || kw < 1) return "expected 'kernel_size' >= 1, got " + pair(kh, kw);
  if (sh < 1 || sw < 1) return "expected 'stride' >= 1, got " + pair(sh, sw);
  if (dh < 1 || dw < 1) return "expected 'dilation' >= 1, got " + pair(dh, dw);
  if (ph < 0 || pw < 0) return "expected non-negative 'padding', got " + pair(ph, pw);
  if (ph > kh / 2 || pw > kw / 2)
    return "expected 'padding' at most half of 'kernel_size' " + pair(kh, kw) + ", got " + pair(ph, pw);
  if (p() < 1 || q() < 1)
    return "the input of " + pair(in.h, in.w) + " pixels gives an output of " + pair(p(), q()) +
           ", which is too small";
  // max_pool_bwd names a window's argmax by its pixel within the plane, in 32 bits.
  if (in.h * in.w > std::numeric_limits<int32_t>::max())
    return "expected fewer than 2^31 pixels per plane, got " + pair(in.h, in.w);
  return "";
}

namespace {

// The taps [lo, hi) of a window starting at `start` (maybe negative) with dilation d that
// land inside [0, size).
void tap_range(int64_t start, int64_t k, int64_t d, int64_t size, int64_t* lo, int64_t* hi) {
  *lo = start < 0 ? (-start + d - 1) / d : 0;
  *hi = start >= size ? 0 : std::min(k, (size - 1 - start) / d + 1);
  *hi = std::max(*hi, *lo);
}

// An average window clipped to the input ([h0, h1) x [w0, w1), maybe empty), with torch's
// rule that the padded extent counts up to the padding, not beyond it in ceil mode.
struct AvgWindow {
  int64_t h0, h1, w0, w1, padded_size;
};
AvgWindow avg_window(const PoolDesc& d, int64_t oh, int64_t ow) {
  AvgWindow a;
  a.h0 = oh * d.sh - d.ph;
  a.w0 = ow * d.sw - d.pw;
  a.h1 = std::min(a.h0 + d.kh, d.in.h + d.ph);
  a.w1 = std::min(a.w0 + d.kw, d.in.w + d.pw);
  a.padded_size = (a.h1 - a.h0) * (a.w1 - a.w0);
  a.h0 = std::max<int64_t>(a.h0, 0);
  a.w0 = std::max<int64_t>(a.w0, 0);
  a.h1 = std::min(a.h1, d.in.h);
  a.w1 = std::min(a.w1, d.in.w);
  return a;
}

template <int V>
DC_INLINE typename Vec<V>::i splat_i(int64_t v) {
  return typename Vec<V>::i{} + static_cast<int32_t>(v);
}

// As torch: a later value replaces the maximum when it is larger or NaN (so NaN propagates).
template <int V>
DC_INLINE typename Vec<V>::i replaces(typename Vec<V>::f v, typename Vec<V>::f m) {
  return (v > m) | (v != v);
}

// ---- max ----------------------------------------------------------------------------------

template <int V>
DC_INLINE void max_fwd(const PoolDesc& d, const float* x, float* y, int tid, int nthreads) {
  const int64_t P = d.p(), Q = d.q(), H = d.in.h, W = d.in.w, cb = d.in.cb();
  int64_t r, end;
  share_of(d.in.n * cb * P, tid, nthreads, &r, &end);
  for (; r < end; ++r) {
    const int64_t plane = r / P, oh = r % P;
    const auto mask = lane_mask<V>(d.in.c - plane % cb * V);
    const float* xp = x + plane * H * W * V;
    int64_t i0, i1;
    tap_range(oh * d.sh - d.ph, d.kh, d.dh, H, &i0, &i1);
    for (int64_t ow = 0; ow < Q; ++ow) {
      int64_t j0, j1;
      tap_range(ow * d.sw - d.pw, d.kw, d.dw, W, &j0, &j1);
      auto m = splat<V>(-std::numeric_limits<float>::infinity());
      for (int64_t i = i0; i < i1; ++i) {
        const float* row = xp + ((oh * d.sh - d.ph + i * d.dh) * W + ow * d.sw - d.pw) * V;
        for (int64_t j = j0; j < j1; ++j) {
          const auto v = load<V>(row + j * d.dw * V);
          m = replaces<V>(v, m) ? v : m;
        }
      }
      store<V>(y + (r * Q + ow) * V, keep<V>(m, mask));
    }
  }
}

// One output pixel's share of the max-pool backward: the argmax of each lane, found again,
// gets that lane of the output gradient.
template <int V>
DC_INLINE void max_bwd_pixel(const PoolDesc& d, const float* xp, typename Vec<V>::f g, int64_t oh, int64_t ow,
                             float* gxp) {
  const int64_t W = d.in.w, ih0 = oh * d.sh - d.ph, iw0 = ow * d.sw - d.pw;
  int64_t i0, i1, j0, j1;
  tap_range(ih0, d.kh, d.dh, d.in.h, &i0, &i1);
  tap_range(iw0, d.kw, d.dw, W, &j0, &j1);
  if (i0 == i1 || j0 == j1) return;
  auto m = splat<V>(-std::numeric_limits<float>::infinity());
  auto best = splat_i<V>((ih0 + i0 * d.dh) * W + iw0 + j0 * d.dw);
  for (int64_t i = i0; i < i1; ++i)
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t pix = (ih0 + i * d.dh) * W + iw0 + j * d.dw;
      const auto v = load<V>(xp + pix * V);
      const auto upd = replaces<V>(v, m);
      m = upd ? v : m;
      best = upd ? splat_i<V>(pix) : best;
    }
  for (int64_t i = i0; i < i1; ++i)
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t pix = (ih0 + i * d.dh) * W + iw0 + j * d.dw;
      float* at = gxp + pix * V;
      store<V>(at, load<V>(at) + (best == splat_i<V>(pix) ? g : lanes::zero<V>()));
    }
}

template <int V>
DC_INLINE void max_bwd(const PoolDesc& d, const float* x, const float* gy, float* gx, int tid, int nthreads) {
  const int64_t P = d.p(), Q = d.q(), hw = d.in.h * d.in.w, cb = d.in.cb();
  int64_t plane, end;
  share_of(d.in.n * cb, tid, nthreads, &plane, &end);
  for (; plane < end; ++plane) {
    float* gxp = gx + plane * hw * V;
    std::fill(gxp, gxp + hw * V, 0.f);
    const auto mask = lane_mask<V>(d.in.c - plane % cb * V);
    for (int64_t oh = 0; oh < P; ++oh)
      for (int64_t ow = 0; ow < Q; ++ow) {
        const auto g = keep<V>(load<V>(gy + ((plane * P + oh) * Q + ow) * V), mask);
        max_bwd_pixel<V>(d, x + plane * hw * V, g, oh, ow, gxp);
      }
  }
}

// ---- average ------------------------------------------------------------------------------

template <int V>
DC_INLINE void avg_fwd(const PoolDesc& d, const AvgPoolOpts& o, const float* x, float* y, int tid, int nthreads) {
  const int64_t P = d.p(), Q = d.q(), H = d.in.h, W = d.in.w, cb = d.in.cb();
  int64_t r, end;
  share_of(d.in.n * cb * P, tid, nthreads, &r, &end);
  for (; r < end; ++r) {
    const int64_t plane = r / P, oh = r % P;
    const auto mask = lane_mask<V>(d.in.c - plane % cb * V);
    const float* xp = x + plane * H * W * V;
    for (int64_t ow = 0; ow < Q; ++ow) {
      const AvgWindow a = avg_window(d, oh, ow);
      auto sum = lanes::zero<V>();
      for (int64_t ih = a.h0; ih < a.h1; ++ih)
        for (int64_t iw = a.w0; iw < a.w1; ++iw) sum += load<V>(xp + (ih * W + iw) * V);
      const bool empty = a.h0 >= a.h1 || a.w0 >= a.w1;
      const float div = static_cast<float>(d.avg_divisor(oh, ow, o.count_include_pad, o.divisor_override));
      store<V>(y + (r * Q + ow) * V, empty ? lanes::zero<V>() : keep<V>(sum / div, mask));
    }
  }
}

template <int V>
DC_INLINE void avg_bwd(const PoolDesc& d, const AvgPoolOpts& o, const float* gy, float* gx, int tid, int nthreads) {
  const int64_t P = d.p(), Q = d.q(), W = d.in.w, hw = d.in.h * d.in.w, cb = d.in.cb();
  int64_t plane, end;
  share_of(d.in.n * cb, tid, nthreads, &plane, &end);
  for (; plane < end; ++plane) {
    float* gxp = gx + plane * hw * V;
    std::fill(gxp, gxp + hw * V, 0.f);
    const auto mask = lane_mask<V>(d.in.c - plane % cb * V);
    for (int64_t oh = 0; oh < P; ++oh)
      for (int64_t ow = 0; ow < Q; ++ow) {
        const AvgWindow a = avg_window(d, oh, ow);
        if (a.h0 >= a.h1 || a.w0 >= a.w1) continue;
        const float div = static_cast<float>(d.avg_divisor(oh, ow, o.count_include_pad, o.divisor_override));
        const auto g = keep<V>(load<V>(gy + ((plane * P + oh) * Q + ow) * V) / div, mask);
        for (int64_t ih = a.h0; ih < a.h1; ++ih)
          for (int64_t iw = a.w0; iw < a.w1; ++iw) {
            float* at = gxp + (ih * W + iw) * V;
            store<V>(at, load<V>(at) + g);
          }
      }
  }
}

// ---- global average -----------------------------------------------------------------------

template <int V>
DC_INLINE void gap_fwd(const BlockedShape& s, const float* x, float* y, int tid, int nthreads) {
  const int64_t hw = s.plane(), cb = s.cb();
  int64_t plane, end;
  share_of(s.n * cb, tid, nthreads, &plane, &end);
  for (; plane < end; ++plane) {
    DSum<V> sum;
    const float* xp = x + plane * hw * V;
    for (int64_t p = 0; p < hw; ++p) sum.add(load<V>(xp + p * V));
    double lane[V] = {};
    sum.flush(lane);
    const int64_t n = plane / cb, c0 = plane % cb * V, valid = std::min<int64_t>(V, s.c - c0);
    for (int64_t l = 0; l < valid; ++l) y[n * s.c + c0 + l] = static_cast<float>(lane[l] / static_cast<double>(hw));
  }
}

template <int V>
DC_INLINE void gap_bwd(const BlockedShape& s, const float* gy, float* gx, int tid, int nthreads) {
  const int64_t hw = s.plane(), cb = s.cb();
  for_each_run(s, tid, nthreads, [&](int64_t b, int64_t first, int64_t count) {
    const int64_t n = first / hw / cb, c0 = b * V, valid = std::min<int64_t>(V, s.c - c0);
    // Only the real channels of grad_y exist: the row has C floats, not Cb * V.
    float lane[V] = {};
    for (int64_t l = 0; l < valid; ++l) lane[l] = gy[n * s.c + c0 + l] / static_cast<float>(hw);
    const auto g = load<V>(lane);
    for (int64_t i = 0; i < count; ++i) store<V>(gx + (first + i) * V, g);
  });
}

// The entry points, one per ISA: V = 16 is AVX-512's zmm, V = 8 AVX2's ymm.
#define DC_POOL_ENTRY(name, impl, params, args)                  \
  DC_TARGET_AVX512 void name##16 params { impl<16> args; }       \
  DC_TARGET_AVX2 void name##8 params { impl<8> args; }

DC_POOL_ENTRY(max_fwd_isa, max_fwd, (const PoolDesc& d, const float* x, float* y, int t, int nt), (d, x, y, t, nt))
DC_POOL_ENTRY(max_bwd_isa, max_bwd, (const PoolDesc& d, const float* x, const float* gy, float* gx, int t, int nt),
              (d, x, gy, gx, t, nt))
DC_POOL_ENTRY(avg_fwd_isa, avg_fwd,
              (const PoolDesc& d, const AvgPoolOpts& o, const float* x, float* y, int t, int nt),
              (d, o, x, y, t, nt))
DC_POOL_ENTRY(avg_bwd_isa, avg_bwd,
              (const PoolDesc& d, const AvgPoolOpts& o, const float* gy, float* gx, int t, int nt),
              (d, o, gy, gx, t, nt))
DC_POOL_ENTRY(gap_fwd_isa, gap_fwd, (const BlockedShape& s, const float* x, float* y, int t, int nt),
              (s, x, y, t, nt))
DC_POOL_ENTRY(gap_bwd_isa, gap_bwd, (const BlockedShape& s, const float* gy, float* gx, int t, int nt),
              (s, gy, gx, t, nt))
#undef DC_POOL_ENTRY

}  // namespace

int64_t PoolDesc::avg_divisor(int64_t oh, int64_t ow, bool count_include_pad, int64_t divisor_override) const {
  if (divisor_override) return divisor_override;
  const AvgWindow a = avg_window(*this, oh, ow);
  return count_include_pad ? a.padded_size : (a.h1 - a.h0) * (a.w1 - a.w0);
}

void max_pool_fwd_share(const PoolDesc& d, const float* x, float* y, int tid, int nthreads) {
  (d.in.v == 16 ? max_fwd_isa16 : max_fwd_isa8)(d, x, y, tid, nthreads);
}
void max_pool_bwd_share(const PoolDesc& d, const float* x, const float* grad_y, float* grad_x, int tid,
                        int nthreads) {
  (d.in.v == 16 ? max_bwd_isa16 : max_bwd_isa8)(d, x, grad_y, grad_x, tid, nthreads);
}
void avg_pool_fwd_share(const PoolDesc& d, const AvgPoolOpts& o, const float* x, float* y, int tid, int nthreads) {
  (d.in.v == 16 ? avg_fwd_isa16 : avg_fwd_isa8)(d, o, x, y, tid, nthreads);
}
void avg_pool_bwd_share(const PoolDesc& d, const AvgPoolOpts& o, const float* grad_y, float* grad_x, int tid,
                        int nthreads) {
  (d.in.v == 16 ? avg_bwd_isa16 : avg_bwd_isa8)(d, o, grad_y, grad_x, tid, nthreads);
}
void global_avg_pool_fwd_share(const BlockedShape& s, const float* x, float* y, int tid, int nthreads) {
  if (s.plane() == 0) {
    int64_t b, e;
    share_of(s.n * s.c, tid, nthreads, &b, &e);
    std::fill(y + b, y + e, std::numeric_limits<float>::quiet_NaN());
    return;
  }
  (s.v == 16 ? gap_fwd_isa16 : gap_fwd_isa8)(s, x, y, tid, nthreads);
}
void global_avg_pool_bwd_share(const BlockedShape& s, const float* grad_y, float* grad_x, int tid, int nthreads) {
  (s.v == 16 ? gap_bwd_isa16 : gap_bwd_isa8)(s, grad_y, grad_x, tid, nthreads);
}

// ---- scalar twins -------------------------------------------------------------------------

namespace {
int64_t at(const BlockedShape& s, int64_t n, int64_t c, int64_t h, int64_t w) {
  return (((n * s.cb() + c / s.v) * s.h + h) * s.w + w) * s.v + c % s.v;
}
}  // namespace

void max_pool_fwd_ref(const PoolDesc& d, const float* x, float* y) {
  const BlockedShape o = d.out();
  for (int64_t n = 0; n < o.n; ++n)
    for (int64_t c = 0; c < o.padded(); ++c)
      for (int64_t oh = 0; oh < o.h; ++oh)
        for (int64_t ow = 0; ow < o.w; ++ow) {
          float m = -std::numeric_limits<float>::infinity();
          for (int64_t i = 0; i < d.kh; ++i)
            for (int64_t j = 0; j < d.kw; ++j) {
              const int64_t ih = oh * d.sh - d.ph + i * d.dh, iw = ow * d.sw - d.pw + j * d.dw;
              if (ih < 0 || ih >= d.in.h || iw < 0 || iw >= d.in.w) continue;
              const float v = x[at(d.in, n, c, ih, iw)];
              if (v > m || std::isnan(v)) m = v;
            }
          y[at(o, n, c, oh, ow)] = c < o.c ? m : 0.f;
        }
}

void max_pool_bwd_ref(const PoolDesc& d, const float* x, const float* grad_y, float* grad_x) {
  const BlockedShape o = d.out();
  std::fill(grad_x, grad_x + d.in.pixels() * d.in.v, 0.f);
  for (int64_t n = 0; n < o.n; ++n)
    for (int64_t c = 0; c < o.c; ++c)
      for (int64_t oh = 0; oh < o.h; ++oh)
        for (int64_t ow = 0; ow < o.w; ++ow) {
          float m = -std::numeric_limits<float>::infinity();
          int64_t best = -1;
          for (int64_t i = 0; i < d.kh; ++i)
            for (int64_t j = 0; j < d.kw; ++j) {
              const int64_t ih = oh * d.sh - d.ph + i * d.dh, iw = ow * d.sw - d.pw + j * d.dw;
              if (ih < 0 || ih >= d.in.h || iw < 0 || iw >= d.in.w) continue;
              const float v = x[at(d.in, n, c, ih, iw)];
              // The first tap in the window is the argmax until a larger value (or a NaN) comes.
              if (best < 0) best = at(d.in, n, c, ih, iw);
              if (v > m || std::isnan(v)) {
                m = v;
                best = at(d.in, n, c, ih, iw);
              }
            }
          if (best >= 0) grad_x[best] += grad_y[at(o, n, c, oh, ow)];
        }
}

void avg_pool_fwd_ref(const PoolDesc& d, const AvgPoolOpts& op, const float* x, float* y) {
  const BlockedShape o = d.out();
  for (int64_t n = 0; n < o.n; ++n)
    for (int64_t c = 0; c < o.padded(); ++c)
      for (int64_t oh = 0; oh < o.h; ++oh)
        for (int64_t ow = 0; ow < o.w; ++ow) {
          const AvgWindow a = avg_window(d, oh, ow);
          double sum = 0;
          for (int64_t ih = a.h0; ih < a.h1; ++ih)
            for (int64_t iw = a.w0; iw < a.w1; ++iw) sum += x[at(d.in, n, c, ih, iw)];
          const double div = static_cast<double>(d.avg_divisor(oh, ow, op.count_include_pad, op.divisor_override));
          y[at(o, n, c, oh, ow)] = c < o.c && a.h0 < a.h1 && a.w0 < a.w1 ? static_cast<float>(sum / div) : 0.f;
        }
}

void avg_pool_bwd_ref(const PoolDesc& d, const AvgPoolOpts& op, const float* grad_y, float* grad_x) {
  const BlockedShape o = d.out();
  std::vector<double> acc(d.in.pixels() * d.in.v, 0.0);
  for (int64_t n = 0; n < o.n; ++n)
    for (int64_t c = 0; c < o.c; ++c)
      for (int64_t oh = 0; oh < o.h; ++oh)
        for (int64_t ow = 0; ow < o.w; ++ow) {
          const AvgWindow a = avg_window(d, oh, ow);
          const double div = static_cast<double>(d.avg_divisor(oh, ow, op.count_include_pad, op.divisor_override));
          for (int64_t ih = a.h0; ih < a.h1; ++ih)
            for (int64_t iw = a.w0; iw < a.w1; ++iw) acc[at(d.in, n, c, ih, iw)] += grad_y[at(o, n, c, oh, ow)] / div;
        }
  std::transform(acc.begin(), acc.end(), grad_x, [](double v) { return static_cast<float>(v); });
}

void global_avg_pool_fwd_ref(const BlockedShape& s, const float* x, float* y) {
  for (int64_t n = 0; n < s.n; ++n)
    for (int64_t c = 0; c < s.c; ++c) {
      double sum = 0;
      for (int64_t h = 0; h < s.h; ++h)
        for (int64_t w = 0; w < s.w; ++w) sum += x[at(s, n, c, h, w)];
      y[n * s.c + c] = static_cast<float>(sum / static_cast<double>(s.h * s.w));
    }
}

}  // namespace dc
