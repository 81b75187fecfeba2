#include "conv/blocked_eltwise.h"

#include <cmath>

#include <stdexcept>
#include <string>

#include "conv/isa_region.h"
#include "jit/amx_fwd_kernel.h"
#include "jit/isa.h"

namespace dc {

int eltwise_threads(int64_t floats, int max_threads) {
  constexpr int64_t kMinFloatsPerThread = 32 * 1024;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(max_threads, floats / kMinFloatsPerThread)));
}

namespace {

// What a backward pass does. kCentered: grad_x = k * g + b * (x - mean) + d (train); without
// it grad_x = k * g, and x is not read unless the sums need it.
enum BwdFlags : unsigned { kMask = 1, kSums = 2, kWriteG = 4, kWriteDx = 8, kCentered = 16, kBwdVariants = 32 };

// grad_x = k * g + b * (x - mean) + d per channel, padded with zeros to whole blocks.
struct BwdCoeffs {
  const float *mean, *k, *b, *d;
};

namespace avx512 {
DC_BEGIN_AVX512
constexpr int kV = 16, kP = 16;
using Act = float;
// clang-format off: lanes.inc defines what the loops use
#include "conv/lanes.inc"
#include "conv/blocked_eltwise_loops.inc"
// clang-format on
DC_END_ISA
}  // namespace avx512

namespace avx2 {
DC_BEGIN_AVX2
constexpr int kV = 8, kP = 8;
using Act = float;
// clang-format off: lanes.inc defines what the loops use
#include "conv/lanes.inc"
#include "conv/blocked_eltwise_loops.inc"
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
#include "conv/blocked_eltwise_loops.inc"
// clang-format on
DC_END_ISA
}  // namespace avx512_bf16

// An activation element as fp32, and an fp32 value stored as one (rounded for bf16).
inline float widen(float x) { return x; }
inline float widen(uint16_t b) { return float_from_bf16(b); }
inline void put(float* p, float v) { *p = v; }
inline void put(uint16_t* p, float v) { *p = bf16_from_float(v); }

std::vector<float> padded_copy(const float* src, int64_t c, int64_t padded, float fill) {
  std::vector<float> out(padded, 0.f);
  for (int64_t i = 0; i < c; ++i) out[i] = src ? src[i] : fill;
  return out;
}

// The sum over the threads' partial blocks (each `stride` doubles) of entry l.
inline double sum_partials(const double* partials, int nthreads, int64_t stride, int64_t l) {
  double t = 0;
  for (int i = 0; i < nthreads; ++i) t += partials[i * stride + l];
  return t;
}

}  // namespace

void check_bf16_shape(const BlockedShape& s, const char* who) {
  if (s.v != 32)
    throw std::invalid_argument(std::string(who) + ": bf16 activations are blocked by 32 channels, got a shape of " +
                                std::to_string(s.v));
  if (detected_isa() < Isa::avx512_bf16)
    throw std::runtime_error(std::string(who) +
                             ": bf16 activations need the avx512_bf16 level (AVX512_BF16), which this CPU lacks");
  if (active_isa() < Isa::avx512_bf16)
    throw std::runtime_error(std::string(who) +
                             ": bf16 activations need the avx512_bf16 level (AVX512_BF16); TORCH_DIRECTCONV_ISA caps "
                             "it at " +
                             isa_name(active_isa()));
}

// ---- statistics -----------------------------------------------------------------------------

int64_t bn_stats_partial_size(const BlockedShape& s) { return 2 * s.padded(); }

void bn_stats_share(const BlockedShape& s, const float* x, double* partial, int tid, int nthreads) {
  (s.v == 16 ? avx512::stats : avx2::stats)(s, x, partial, tid, nthreads);
}

void bn_stats_share(const BlockedShape& s, const uint16_t* x, double* partial, int tid, int nthreads) {
  check_bf16_shape(s, "bn_stats");
  avx512_bf16::stats(s, x, partial, tid, nthreads);
}

template <typename T>
void stats_finish(const BlockedShape& s, const T* x, const double* partials, int nthreads, float* mean, float* var) {
  const int64_t m = s.per_channel(), stride = bn_stats_partial_size(s);
  if (m == 0) {
    std::fill(mean, mean + s.c, std::numeric_limits<float>::quiet_NaN());
    std::fill(var, var + s.c, std::numeric_limits<float>::quiet_NaN());
    return;
  }
  const double inv_m = 1.0 / static_cast<double>(m);
  // By block and lane: the shifts lie one plane apart, and no channel needs a division.
  for (int64_t cb = 0, c = 0; cb < s.cb(); ++cb) {
    const T* shift = x + cb * s.plane() * s.v;
    for (int l = 0; l < s.v && c < s.c; ++l, ++c) {
      const double mu = sum_partials(partials, nthreads, stride, c) * inv_m;
      const double sq = sum_partials(partials, nthreads, stride, s.padded() + c) * inv_m;
      mean[c] = static_cast<float>(widen(shift[l]) + mu);
      var[c] = static_cast<float>(std::max(0.0, sq - mu * mu));
    }
  }
}
void bn_stats_finish(const BlockedShape& s, const float* x, const double* partials, int nthreads, float* mean,
                     float* var) {
  stats_finish(s, x, partials, nthreads, mean, var);
}
void bn_stats_finish(const BlockedShape& s, const uint16_t* x, const double* partials, int nthreads, float* mean,
                     float* var) {
  stats_finish(s, x, partials, nthreads, mean, var);
}

template <typename T>
void stats_ref(const BlockedShape& s, const T* x, float* mean, float* var) {
  const int64_t m = s.per_channel(), cb = s.cb(), hw = s.plane();
  for (int64_t c = 0; c < s.c; ++c) {
    const int64_t b = c / s.v, l = c % s.v;
    double sum = 0, sq = 0;
    for (int64_t n = 0; n < s.n; ++n)
      for (int64_t p = 0; p < hw; ++p) sum += widen(x[((n * cb + b) * hw + p) * s.v + l]);
    const double mu = sum / m;
    for (int64_t n = 0; n < s.n; ++n)
      for (int64_t p = 0; p < hw; ++p) {
        const double d = widen(x[((n * cb + b) * hw + p) * s.v + l]) - mu;
        sq += d * d;
      }
    mean[c] = static_cast<float>(mu);
    var[c] = static_cast<float>(sq / m);
  }
}
void bn_stats_ref(const BlockedShape& s, const float* x, float* mean, float* var) { stats_ref(s, x, mean, var); }
void bn_stats_ref(const BlockedShape& s, const uint16_t* x, float* mean, float* var) { stats_ref(s, x, mean, var); }

// ---- apply ----------------------------------------------------------------------------------

double running_stats_factor(bool has_momentum, double momentum, int64_t* batches) {
  if (batches != nullptr) *batches += 1;
  if (has_momentum) return momentum;
  return batches != nullptr ? 1.0 / static_cast<double>(*batches) : 0.0;
}

void update_running_stats(int64_t c, const float* mean, const float* var, int64_t count, double factor,
                          float* running_mean, float* running_var) {
  const double keep = 1.0 - factor;
  const double unbias = static_cast<double>(count) / static_cast<double>(count - 1);
  for (int64_t i = 0; i < c; ++i) {
    if (running_mean != nullptr)
      running_mean[i] = static_cast<float>(factor * mean[i] + keep * running_mean[i]);
    if (running_var != nullptr)
      running_var[i] = static_cast<float>(factor * (var[i] * unbias) + keep * running_var[i]);
  }
}

void inv_std(const float* var, double eps, int64_t c, float* out) {
  switch (fp32_isa(detected_isa())) {
    case Isa::avx512:
      return avx512::inv_std(var, eps, c, out);
    case Isa::avx2:
      return avx2::inv_std(var, eps, c, out);
    default:
      for (int64_t i = 0; i < c; ++i) out[i] = static_cast<float>(1.0 / std::sqrt(static_cast<double>(var[i]) + eps));
  }
}

ChannelAffine bn_affine(int64_t c, int v, const float* mean, const float* var, double eps, const float* weight,
                        const float* bias) {
  const int64_t padded = (c + v - 1) / v * v;
  ChannelAffine a{padded_copy(mean, c, padded, 0.f), std::vector<float>(padded, 0.f),
                  padded_copy(bias, c, padded, 0.f)};
  inv_std(var, eps, c, a.scale.data());
  if (weight)
    for (int64_t i = 0; i < c; ++i) a.scale[i] *= weight[i];
  return a;
}

ChannelAffine scale_shift_affine(int64_t c, int v, const float* scale, const float* shift) {
  const int64_t padded = (c + v - 1) / v * v;
  return {std::vector<float>(padded, 0.f), padded_copy(scale, c, padded, 0.f), padded_copy(shift, c, padded, 0.f)};
}

void bn_apply_share(const BlockedShape& s, const ChannelAffine& a, const float* x, const float* residual, bool relu,
                    float* y, int tid, int nthreads) {
  (s.v == 16 ? avx512::apply : avx2::apply)(s, a, x, residual, relu, y, tid, nthreads);
}

void bn_apply_share(const BlockedShape& s, const ChannelAffine& a, const uint16_t* x, const uint16_t* residual,
                    bool relu, uint16_t* y, int tid, int nthreads) {
  check_bf16_shape(s, "bn_apply");
  avx512_bf16::apply(s, a, x, residual, relu, y, tid, nthreads);
}

template <typename T>
void apply_ref(const BlockedShape& s, const ChannelAffine& a, const T* x, const T* residual, bool relu, T* y) {
  const int64_t cb = s.cb(), hw = s.plane();
  for (int64_t n = 0; n < s.n; ++n)
    for (int64_t b = 0; b < cb; ++b)
      for (int64_t p = 0; p < hw; ++p)
        for (int l = 0; l < s.v; ++l) {
          const int64_t c = b * s.v + l, o = ((n * cb + b) * hw + p) * s.v + l;
          float v = (widen(x[o]) - a.center[c]) * a.scale[c] + a.shift[c];
          if (residual) v += widen(residual[o]);
          if (relu && v < 0) v = 0;
          put(y + o, c < s.c ? v : 0.f);
        }
}
void bn_apply_ref(const BlockedShape& s, const ChannelAffine& a, const float* x, const float* residual, bool relu,
                  float* y) {
  apply_ref(s, a, x, residual, relu, y);
}
void bn_apply_ref(const BlockedShape& s, const ChannelAffine& a, const uint16_t* x, const uint16_t* residual, bool relu,
                  uint16_t* y) {
  apply_ref(s, a, x, residual, relu, y);
}

// ---- backward -------------------------------------------------------------------------------

template <typename T>
BnBackwardT<T>::BnBackwardT(const BnBackwardArgsT<T>& a) : a_(a) {
  if constexpr (std::is_same_v<T, uint16_t>) check_bf16_shape(a.shape, "bn_backward");
  const int64_t c = a.shape.c, padded = a.shape.padded();
  sums_ = a.grad_weight || a.grad_bias || (a.train && a.grad_x);
  passes_ = a.train && a.grad_x ? 2 : 1;
  mean_ = padded_copy(a.mean, c, padded, 0.f);
  invstd_.assign(padded, 0.f);
  k_.assign(padded, 0.f);
  inv_std(a.var, a.eps, c, invstd_.data());
  for (int64_t i = 0; i < c; ++i) k_[i] = (a.weight ? a.weight[i] : 1.f) * invstd_[i];
  // Until the sums are known (train), grad_x = k * g alone.
  b_.assign(padded, 0.f);
  d_.assign(padded, 0.f);
}

template <typename T>
typename BnBackwardT<T>::Pass BnBackwardT<T>::pass(int i) const {
  if (i == 1) {
    // g is grad_residual when pass 0 wrote it: masked already, one tensor fewer to read.
    if (a_.grad_residual) return {a_.grad_residual, nullptr, a_.x, nullptr, a_.grad_x, false};
    return {a_.grad_y, a_.y, a_.x, nullptr, a_.grad_x, false};
  }
  return {a_.grad_y, a_.y, a_.x, a_.grad_residual, passes_ == 1 ? a_.grad_x : nullptr, sums_};
}

template <typename T>
void BnBackwardT<T>::run_share(int i, double* partial, int tid, int nthreads) const {
  const Pass p = pass(i);
  const unsigned flags = (p.y ? kMask : 0u) | (p.sums ? kSums : 0u) | (p.g_out ? kWriteG : 0u) |
                         (p.grad_x ? kWriteDx : 0u) | (p.grad_x && a_.train ? kCentered : 0u);
  const BwdCoeffs coeffs{mean_.data(), k_.data(), b_.data(), d_.data()};
  if constexpr (std::is_same_v<T, uint16_t>)
    avx512_bf16::backward(a_.shape, p, coeffs, flags, partial, tid, nthreads);
  else
    (a_.shape.v == 16 ? avx512::backward : avx2::backward)(a_.shape, p, coeffs, flags, partial, tid, nthreads);
}

template <typename T>
void BnBackwardT<T>::finish_pass(int i, const double* partials, int nthreads) {
  if (i != 0 || !sums_) return;
  const int64_t stride = partial_size(), padded = a_.shape.padded();
  const int64_t m = a_.shape.per_channel();
  const double inv_m = m > 0 ? 1.0 / static_cast<double>(m) : 0.0;
  for (int64_t c = 0; c < a_.shape.c; ++c) {
    const double s1 = sum_partials(partials, nthreads, stride, c);
    const double gw = invstd_[c] * sum_partials(partials, nthreads, stride, padded + c);  // sum of g * xhat
    if (a_.grad_bias) a_.grad_bias[c] = static_cast<float>(s1);
    if (a_.grad_weight) a_.grad_weight[c] = static_cast<float>(gw);
    if (a_.train) {
      b_[c] = static_cast<float>(-static_cast<double>(k_[c]) * invstd_[c] * gw * inv_m);
      d_[c] = static_cast<float>(-static_cast<double>(k_[c]) * s1 * inv_m);
    }
  }
}

template class BnBackwardT<float>;
template class BnBackwardT<uint16_t>;

template <typename T>
void bn_backward_ref(const BnBackwardArgsT<T>& a) {
  const BlockedShape& s = a.shape;
  const int64_t cb = s.cb(), hw = s.plane(), m = s.per_channel();
  auto offset = [&](int64_t n, int64_t c, int64_t p) { return ((n * cb + c / s.v) * hw + p) * s.v + c % s.v; };
  auto g_at = [&](int64_t o) { return a.y && widen(a.y[o]) <= 0 ? 0.0 : static_cast<double>(widen(a.grad_y[o])); };
  for (int64_t c = 0; c < s.padded(); ++c) {
    const bool real = c < s.c;
    const double invstd = real ? 1.0 / std::sqrt(static_cast<double>(a.var[c]) + a.eps) : 0.0;
    const double gamma = real && a.weight ? a.weight[c] : 1.0, mu = real ? a.mean[c] : 0.0;
    double sg = 0, sgx = 0;
    for (int64_t n = 0; n < s.n; ++n)
      for (int64_t p = 0; p < hw; ++p) {
        const int64_t o = offset(n, c, p);
        sg += g_at(o);
        sgx += g_at(o) * (widen(a.x[o]) - mu) * invstd;
      }
    if (real && a.grad_bias) a.grad_bias[c] = static_cast<float>(sg);
    if (real && a.grad_weight) a.grad_weight[c] = static_cast<float>(sgx);
    for (int64_t n = 0; n < s.n; ++n)
      for (int64_t p = 0; p < hw; ++p) {
        const int64_t o = offset(n, c, p);
        const double g = g_at(o), xhat = (widen(a.x[o]) - mu) * invstd;
        double gx = gamma * invstd * g;
        if (a.train) gx = gamma * invstd * (g - sg / m - xhat * sgx / m);
        if (a.grad_x) put(a.grad_x + o, real ? static_cast<float>(gx) : 0.f);
        if (a.grad_residual) put(a.grad_residual + o, real ? static_cast<float>(g) : 0.f);
      }
  }
}
template void bn_backward_ref(const BnBackwardArgsT<float>& a);
template void bn_backward_ref(const BnBackwardArgsT<uint16_t>& a);

}  // namespace dc
