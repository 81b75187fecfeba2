// One pixel's V channel lanes of a blocked tensor as one vector (GCC vector extensions),
// for the memory-bound loops of blocked_eltwise and blocked_pool.
//
// The helpers are always_inline and have no target of their own, so they compile for the
// ISA of the entry point that inlines them: DC_TARGET_AVX512 functions instantiate them with
// V = 16 (one zmm per pixel), DC_TARGET_AVX2 ones with V = 8 (one ymm). One template body
// thus serves both ISAs without intrinsics, and the core still builds without -mavx flags.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__GNUC__) && !defined(__clang__)
// Vector values cross no ABI boundary here: every helper is inlined into its entry point.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#define DC_INLINE __attribute__((always_inline)) inline
#define DC_TARGET_AVX512 __attribute__((target("avx512f")))
#define DC_TARGET_AVX2 __attribute__((target("avx2,fma")))

namespace dc {
namespace lanes {

template <int V>
struct Vec;
template <>
struct Vec<16> {
  typedef float f __attribute__((vector_size(64)));
  typedef int32_t i __attribute__((vector_size(64)));
  typedef float half __attribute__((vector_size(32)));
  typedef double d __attribute__((vector_size(64)));
};
template <>
struct Vec<8> {
  typedef float f __attribute__((vector_size(32)));
  typedef int32_t i __attribute__((vector_size(32)));
  typedef float half __attribute__((vector_size(16)));
  typedef double d __attribute__((vector_size(32)));
};

// memcpy, not a cast: blocked views need not be vector-aligned, and no aliasing rule is bent.
template <int V>
DC_INLINE typename Vec<V>::f load(const float* p) {
  typename Vec<V>::f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <int V>
DC_INLINE void store(float* p, typename Vec<V>::f v) {
  std::memcpy(p, &v, sizeof v);
}
template <int V>
DC_INLINE typename Vec<V>::f splat(float x) {
  return typename Vec<V>::f{} + x;
}
template <int V>
DC_INLINE typename Vec<V>::f zero() {
  return typename Vec<V>::f{};
}

// All ones in lanes [0, valid), zero above: the real channels of a channel block.
template <int V>
DC_INLINE typename Vec<V>::i lane_mask(int64_t valid) {
  // Lane by lane: GCC 12 fails (an internal error) on a vector compare whose result is unused.
  typename Vec<V>::i m;
  for (int l = 0; l < V; ++l) m[l] = l < valid ? -1 : 0;
  return m;
}
// v where mask is set, exactly +0 elsewhere (padded lanes never carry a value).
template <int V>
DC_INLINE typename Vec<V>::f keep(typename Vec<V>::f v, typename Vec<V>::i mask) {
  return reinterpret_cast<typename Vec<V>::f>(reinterpret_cast<typename Vec<V>::i>(v) & mask);
}
template <int V>
DC_INLINE typename Vec<V>::f relu(typename Vec<V>::f v) {
  return v > zero<V>() ? v : zero<V>();
}

// Per-lane sums in double, as two register-wide halves: a long fp32 sum would drift.
template <int V>
struct DSum {
  typename Vec<V>::d lo{}, hi{};

  DC_INLINE static void split(typename Vec<V>::f v, typename Vec<V>::half* a, typename Vec<V>::half* b) {
    std::memcpy(a, &v, sizeof *a);
    std::memcpy(b, reinterpret_cast<const char*>(&v) + sizeof *a, sizeof *b);
  }
  DC_INLINE void add(typename Vec<V>::f v) {
    typename Vec<V>::half a, b;
    split(v, &a, &b);
    lo += __builtin_convertvector(a, typename Vec<V>::d);
    hi += __builtin_convertvector(b, typename Vec<V>::d);
  }
  // Adds a * b, multiplied in double.
  DC_INLINE void add_product(typename Vec<V>::f a, typename Vec<V>::f b) {
    typename Vec<V>::half a0, a1, b0, b1;
    split(a, &a0, &a1);
    split(b, &b0, &b1);
    lo += __builtin_convertvector(a0, typename Vec<V>::d) * __builtin_convertvector(b0, typename Vec<V>::d);
    hi += __builtin_convertvector(a1, typename Vec<V>::d) * __builtin_convertvector(b1, typename Vec<V>::d);
  }
  DC_INLINE void add(const DSum& o) {
    lo += o.lo;
    hi += o.hi;
  }
  // Adds the V lane sums to out[0, V).
  DC_INLINE void flush(double* out) const {
    for (int l = 0; l < V / 2; ++l) {
      out[l] += lo[l];
      out[V / 2 + l] += hi[l];
    }
  }
};

}  // namespace lanes
}  // namespace dc
