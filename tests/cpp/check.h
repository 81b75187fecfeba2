// A minimal check harness for the C++ tests: CHECK records failures, main reports them.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

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
