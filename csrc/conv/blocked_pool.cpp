#include "conv/blocked_pool.h"

#include <cmath>
#include <vector>

#include "conv/isa_region.h"
#include "conv/scratch.h"
#include "jit/amx_fwd_kernel.h"

namespace dc {

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
    return "the input of " + pair(in.h, in.w) + " pixels gives an output of " + pair(p(), q()) + ", which is too small";
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

namespace avx512 {
DC_BEGIN_AVX512
constexpr int kV = 16, kP = 16;
using Act = float;
// clang-format off: lanes.inc defines what the loops use
#include "conv/lanes.inc"
#include "conv/blocked_pool_loops.inc"
// clang-format on
DC_END_ISA
}  // namespace avx512

namespace avx2 {
DC_BEGIN_AVX2
constexpr int kV = 8, kP = 8;
using Act = float;
// clang-format off: lanes.inc defines what the loops use
#include "conv/lanes.inc"
#include "conv/blocked_pool_loops.inc"
// clang-format on
DC_END_ISA
}  // namespace avx2

namespace avx512_bf16 {
DC_BEGIN_AVX512_BF16
constexpr int kV = 16, kP = 32;
using Act = uint16_t;
// clang-format off: lanes.inc defines what the loops use
#include "conv/lanes.inc"
#include "conv/lanes_bf16.inc"
#include "conv/blocked_pool_loops.inc"
// clang-format on
DC_END_ISA
}  // namespace avx512_bf16

// The fp32 sums of one input-gradient plane, for bf16 gradients (valid in the caller's ScratchScope).
float* grad_plane_scratch(const BlockedShape& in) { return scratch_floats(kScratchUnit, in.plane() * in.v); }

}  // namespace

int64_t PoolDesc::avg_divisor(int64_t oh, int64_t ow, bool count_include_pad, int64_t divisor_override) const {
  if (divisor_override) return divisor_override;
  const AvgWindow a = avg_window(*this, oh, ow);
  return count_include_pad ? a.padded_size : (a.h1 - a.h0) * (a.w1 - a.w0);
}

void max_pool_fwd_share(const PoolDesc& d, const float* x, float* y, int tid, int nthreads) {
  (d.in.v == 16 ? avx512::max_fwd : avx2::max_fwd)(d, x, y, tid, nthreads);
}
void max_pool_bwd_share(const PoolDesc& d, const float* x, const float* y, const float* grad_y, float* grad_x, int tid,
                        int nthreads) {
  (d.in.v == 16 ? avx512::max_bwd : avx2::max_bwd)(d, x, y, grad_y, grad_x, nullptr, tid, nthreads);
}
void avg_pool_fwd_share(const PoolDesc& d, const AvgPoolOpts& o, const float* x, float* y, int tid, int nthreads) {
  (d.in.v == 16 ? avx512::avg_fwd : avx2::avg_fwd)(d, o, x, y, tid, nthreads);
}
void avg_pool_bwd_share(const PoolDesc& d, const AvgPoolOpts& o, const float* grad_y, float* grad_x, int tid,
                        int nthreads) {
  (d.in.v == 16 ? avx512::avg_bwd : avx2::avg_bwd)(d, o, grad_y, grad_x, nullptr, tid, nthreads);
}
namespace {
// A mean over no pixels is NaN (torch's), with no loop to run.
bool gap_of_nothing(const BlockedShape& s, float* y, int tid, int nthreads) {
  if (s.plane() != 0) return false;
  int64_t b, e;
  share_of(s.n * s.c, tid, nthreads, &b, &e);
  std::fill(y + b, y + e, std::numeric_limits<float>::quiet_NaN());
  return true;
}
}  // namespace

void global_avg_pool_fwd_share(const BlockedShape& s, const float* x, float* y, int tid, int nthreads) {
  if (gap_of_nothing(s, y, tid, nthreads)) return;
  (s.v == 16 ? avx512::gap_fwd : avx2::gap_fwd)(s, x, y, tid, nthreads);
}
void global_avg_pool_bwd_share(const BlockedShape& s, const float* grad_y, float* grad_x, int tid, int nthreads) {
  (s.v == 16 ? avx512::gap_bwd : avx2::gap_bwd)(s, grad_y, grad_x, tid, nthreads);
}

// ---- bf16 ----------------------------------------------------------------------------------

void max_pool_fwd_share(const PoolDesc& d, const uint16_t* x, uint16_t* y, int tid, int nthreads) {
  check_bf16_shape(d.in, "max_pool_fwd");
  avx512_bf16::max_fwd(d, x, y, tid, nthreads);
}
void max_pool_bwd_share(const PoolDesc& d, const uint16_t* x, const uint16_t* y, const uint16_t* grad_y,
                        uint16_t* grad_x, int tid, int nthreads) {
  check_bf16_shape(d.in, "max_pool_bwd");
  ScratchScope scope;
  avx512_bf16::max_bwd(d, x, y, grad_y, grad_x, grad_plane_scratch(d.in), tid, nthreads);
}
void avg_pool_fwd_share(const PoolDesc& d, const AvgPoolOpts& o, const uint16_t* x, uint16_t* y, int tid,
                        int nthreads) {
  check_bf16_shape(d.in, "avg_pool_fwd");
  avx512_bf16::avg_fwd(d, o, x, y, tid, nthreads);
}
void avg_pool_bwd_share(const PoolDesc& d, const AvgPoolOpts& o, const uint16_t* grad_y, uint16_t* grad_x, int tid,
                        int nthreads) {
  check_bf16_shape(d.in, "avg_pool_bwd");
  ScratchScope scope;
  avx512_bf16::avg_bwd(d, o, grad_y, grad_x, grad_plane_scratch(d.in), tid, nthreads);
}
void global_avg_pool_fwd_share(const BlockedShape& s, const uint16_t* x, float* y, int tid, int nthreads) {
  check_bf16_shape(s, "global_avg_pool_fwd");
  if (gap_of_nothing(s, y, tid, nthreads)) return;
  avx512_bf16::gap_fwd(s, x, y, tid, nthreads);
}
void global_avg_pool_bwd_share(const BlockedShape& s, const float* grad_y, uint16_t* grad_x, int tid, int nthreads) {
  check_bf16_shape(s, "global_avg_pool_bwd");
  avx512_bf16::gap_bwd(s, grad_y, grad_x, tid, nthreads);
}

// ---- scalar twins -------------------------------------------------------------------------

namespace {
int64_t at(const BlockedShape& s, int64_t n, int64_t c, int64_t h, int64_t w) {
  return (((n * s.cb() + c / s.v) * s.h + h) * s.w + w) * s.v + c % s.v;
}
// An activation element as fp32, and an fp32 value stored as one (rounded for bf16).
inline float widen(float x) { return x; }
inline float widen(uint16_t b) { return float_from_bf16(b); }
inline void put(float* p, float v) { *p = v; }
inline void put(uint16_t* p, float v) { *p = bf16_from_float(v); }

template <typename T>
void max_fwd_ref(const PoolDesc& d, const T* x, T* y) {
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
              const float v = widen(x[at(d.in, n, c, ih, iw)]);
              if (v > m || std::isnan(v)) m = v;
            }
          put(y + at(o, n, c, oh, ow), c < o.c ? m : 0.f);
        }
}

// The sums in fp32, in the loops' order (window by window), rounded once at the end.
template <typename T>
void max_bwd_ref(const PoolDesc& d, const T* x, const T* grad_y, T* grad_x) {
  const BlockedShape o = d.out();
  std::vector<float> acc(d.in.pixels() * d.in.v, 0.f);
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
              const float v = widen(x[at(d.in, n, c, ih, iw)]);
              // The first tap in the window is the argmax until a larger value (or a NaN) comes.
              if (best < 0) best = at(d.in, n, c, ih, iw);
              if (v > m || std::isnan(v)) {
                m = v;
                best = at(d.in, n, c, ih, iw);
              }
            }
          if (best >= 0) acc[best] += widen(grad_y[at(o, n, c, oh, ow)]);
        }
  for (size_t i = 0; i < acc.size(); ++i) put(grad_x + i, acc[i]);
}

template <typename T>
void avg_fwd_ref(const PoolDesc& d, const AvgPoolOpts& op, const T* x, T* y) {
  const BlockedShape o = d.out();
  for (int64_t n = 0; n < o.n; ++n)
    for (int64_t c = 0; c < o.padded(); ++c)
      for (int64_t oh = 0; oh < o.h; ++oh)
        for (int64_t ow = 0; ow < o.w; ++ow) {
          const AvgWindow a = avg_window(d, oh, ow);
          double sum = 0;
          for (int64_t ih = a.h0; ih < a.h1; ++ih)
            for (int64_t iw = a.w0; iw < a.w1; ++iw) sum += widen(x[at(d.in, n, c, ih, iw)]);
          const double div = static_cast<double>(d.avg_divisor(oh, ow, op.count_include_pad, op.divisor_override));
          put(y + at(o, n, c, oh, ow), c < o.c && a.h0 < a.h1 && a.w0 < a.w1 ? static_cast<float>(sum / div) : 0.f);
        }
}

template <typename T>
void avg_bwd_ref(const PoolDesc& d, const AvgPoolOpts& op, const T* grad_y, T* grad_x) {
  const BlockedShape o = d.out();
  std::vector<double> acc(d.in.pixels() * d.in.v, 0.0);
  for (int64_t n = 0; n < o.n; ++n)
    for (int64_t c = 0; c < o.c; ++c)
      for (int64_t oh = 0; oh < o.h; ++oh)
        for (int64_t ow = 0; ow < o.w; ++ow) {
          const AvgWindow a = avg_window(d, oh, ow);
          const double div = static_cast<double>(d.avg_divisor(oh, ow, op.count_include_pad, op.divisor_override));
          for (int64_t ih = a.h0; ih < a.h1; ++ih)
            for (int64_t iw = a.w0; iw < a.w1; ++iw)
              acc[at(d.in, n, c, ih, iw)] += widen(grad_y[at(o, n, c, oh, ow)]) / div;
        }
  for (size_t i = 0; i < acc.size(); ++i) put(grad_x + i, static_cast<float>(acc[i]));
}

template <typename T>
void gap_fwd_ref(const BlockedShape& s, const T* x, float* y) {
  for (int64_t n = 0; n < s.n; ++n)
    for (int64_t c = 0; c < s.c; ++c) {
      double sum = 0;
      for (int64_t h = 0; h < s.h; ++h)
        for (int64_t w = 0; w < s.w; ++w) sum += widen(x[at(s, n, c, h, w)]);
      y[n * s.c + c] = static_cast<float>(sum / static_cast<double>(s.h * s.w));
    }
}
}  // namespace

void max_pool_fwd_ref(const PoolDesc& d, const float* x, float* y) { max_fwd_ref(d, x, y); }
void max_pool_fwd_ref(const PoolDesc& d, const uint16_t* x, uint16_t* y) { max_fwd_ref(d, x, y); }
void max_pool_bwd_ref(const PoolDesc& d, const float* x, const float* grad_y, float* grad_x) {
  max_bwd_ref(d, x, grad_y, grad_x);
}
void max_pool_bwd_ref(const PoolDesc& d, const uint16_t* x, const uint16_t* grad_y, uint16_t* grad_x) {
  max_bwd_ref(d, x, grad_y, grad_x);
}
void avg_pool_fwd_ref(const PoolDesc& d, const AvgPoolOpts& o, const float* x, float* y) { avg_fwd_ref(d, o, x, y); }
void avg_pool_fwd_ref(const PoolDesc& d, const AvgPoolOpts& o, const uint16_t* x, uint16_t* y) {
  avg_fwd_ref(d, o, x, y);
}
void avg_pool_bwd_ref(const PoolDesc& d, const AvgPoolOpts& o, const float* grad_y, float* grad_x) {
  avg_bwd_ref(d, o, grad_y, grad_x);
}
void avg_pool_bwd_ref(const PoolDesc& d, const AvgPoolOpts& o, const uint16_t* grad_y, uint16_t* grad_x) {
  avg_bwd_ref(d, o, grad_y, grad_x);
}
void global_avg_pool_fwd_ref(const BlockedShape& s, const float* x, float* y) { gap_fwd_ref(s, x, y); }
void global_avg_pool_fwd_ref(const BlockedShape& s, const uint16_t* x, float* y) { gap_fwd_ref(s, x, y); }

}  // namespace dc
