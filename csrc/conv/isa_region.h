// ISA regions: the blocked element-wise loops (blocked_eltwise.cpp, blocked_pool.cpp) are
// written once, in .inc files, and included twice, each time inside a region that compiles
// every function in it for one ISA: AVX-512 with V = 16 (one zmm per pixel), AVX2 with V = 8
// (one ymm). The loops use GCC vector extensions rather than intrinsics.
//
// Why regions rather than target attributes on the entry points alone: vector code in an
// always_inline helper without a target of its own is lowered for the baseline ISA (SSE2)
// before it is inlined, and a compare or select then comes out one lane at a time. Inside a
// region every helper, lambda and template is compiled for the region's ISA.
//
// Include this header first: the .inc files include nothing, as they are pasted inside a namespace.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>

#if defined(__clang__)
#define DC_BEGIN_AVX512 _Pragma("clang attribute push(__attribute__((target(\"avx512f\"))), apply_to = function)")
#define DC_BEGIN_AVX2 _Pragma("clang attribute push(__attribute__((target(\"avx2,fma\"))), apply_to = function)")
#define DC_END_ISA _Pragma("clang attribute pop")
#else
#define DC_BEGIN_AVX512 _Pragma("GCC push_options") _Pragma("GCC target(\"avx512f\")")
#define DC_BEGIN_AVX2 _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma\")")
#define DC_END_ISA _Pragma("GCC pop_options")
// Vector values never cross an ABI boundary in the regions: the helpers are all inlined.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#define DC_INLINE __attribute__((always_inline)) inline

namespace dc {

// kLaneRamp + 16 - n starts with n all-ones lanes, then zeros: the mask of a block's real channels.
alignas(64) inline constexpr int32_t kLaneRamp[32] = {-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                                      0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0};

// The [begin, end) share of `total` items for thread tid.
inline void share_of(int64_t total, int tid, int nthreads, int64_t* begin, int64_t* end) {
  *begin = total * tid / nthreads;
  *end = total * (tid + 1) / nthreads;
}

}  // namespace dc
