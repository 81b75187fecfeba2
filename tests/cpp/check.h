// A minimal check harness for the C++ tests: CHECK records failures, main reports them.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "conv/conv_desc.h"
#include "jit/isa.h"

namespace dc_test {
inline int& failures() {
  static int f = 0;
  return f;
}

// Seeded random numbers for the sweeps: each test program seeds it once.
inline std::mt19937& rng() {
  static std::mt19937 r;
  return r;
}
inline int uni(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng()); }
inline void fill(std::vector<float>& v) {
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  for (float& x : v) x = u(rng());
}
// Infinite when a value is NaN where the reference has none (or the sizes differ).
inline double max_rel_err(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return INFINITY;
  double e = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double d = std::fabs(a[i] - b[i]) / (1.0 + std::fabs(b[i]));
    if (std::isnan(d) && !std::isnan(b[i])) return INFINITY;
    e = std::max(e, d);
  }
  return e;
}
// Runs fn(isa) for AVX-512 and AVX2, skipping (and saying so) what this CPU lacks.
template <typename F>
void for_each_isa(F fn) {
  for (dc::Isa isa : {dc::Isa::avx512, dc::Isa::avx2}) {
    if (static_cast<int>(dc::detected_isa()) < static_cast<int>(isa)) {
      std::printf("skipping %s: not supported by this CPU\n", dc::isa_name(isa));
      continue;
    }
    fn(isa);
  }
}

// A random problem with awkward tails, padding, strides and dilation; it may be invalid
// (a kernel larger than the padded input): callers skip those.
inline dc::ConvDesc random_desc(int max_n, int max_c, int max_h, int max_w) {
  dc::ConvDesc d;
  d.n = uni(1, max_n);
  d.c = uni(1, max_c);
  d.k = uni(1, max_c);
  d.r = uni(1, 5);
  d.s = uni(1, 5);
  d.stride_h = uni(1, 3);
  d.stride_w = uni(1, 3);
  d.dil_h = uni(1, 2);
  d.dil_w = uni(1, 2);
  d.pad_t = uni(0, 2);
  d.pad_b = uni(0, 2);
  d.pad_l = uni(0, 2);
  d.pad_r = uni(0, 2);
  d.h = uni(1, max_h);
  d.w = uni(1, max_w);
  return d;
}
// dx = the gradient of the forward convolution d with respect to its input, in double.
// Blocked layouts: dy (N, Kb, P, Q, V), w (Kb, Cb, R, S, V(c), V(k)), dx (N, Cb, H, W, V).
inline void bwd_data_ref(const dc::ConvDesc& d, int V, const float* dy, const float* w, float* dx) {
  const int64_t cb = dc::div_up(d.c, V), kb = dc::div_up(d.k, V), P = d.p(), Q = d.q();
  std::vector<double> acc(static_cast<size_t>(d.n * cb * d.h * d.w * V), 0.0);
  for (int64_t n = 0; n < d.n; ++n)
    for (int64_t k = 0; k < d.k; ++k)
      for (int64_t p = 0; p < P; ++p)
        for (int64_t q = 0; q < Q; ++q) {
          const double g = dy[(((n * kb + k / V) * P + p) * Q + q) * V + k % V];
          for (int64_t r = 0; r < d.r; ++r)
            for (int64_t s = 0; s < d.s; ++s) {
              const int64_t h = p * d.stride_h - d.pad_t + r * d.dil_h, x = q * d.stride_w - d.pad_l + s * d.dil_w;
              if (h < 0 || h >= d.h || x < 0 || x >= d.w) continue;
              for (int64_t c = 0; c < d.c; ++c)
                acc[(((n * cb + c / V) * d.h + h) * d.w + x) * V + c % V] +=
                    g * w[((((k / V) * cb + c / V) * d.r + r) * d.s + s) * V * V + (c % V) * V + k % V];
            }
        }
  for (size_t i = 0; i < acc.size(); ++i) dx[i] = static_cast<float>(acc[i]);
}

}  // namespace dc_test

#define CHECK(cond, ...)                                              \
  do {                                                                \
    if (!(cond)) {                                                    \
      ++dc_test::failures();                                          \
      std::fprintf(stderr, "%s:%d: CHECK(%s) failed: ", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                              \
      std::fprintf(stderr, "\n");                                     \
    }                                                                 \
  } while (0)

#define TEST_MAIN_END(name)                                                      \
  do {                                                                           \
    std::printf("%s: %s\n", name, dc_test::failures() ? "FAILED" : "passed");  \
    return dc_test::failures() ? 1 : 0;                                          \
  } while (0)
