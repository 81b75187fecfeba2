// ISA regions: the blocked element-wise loops (blocked_eltwise.cpp, blocked_pool.cpp) are
// written once, in .inc files, and included once per region, each compiling every function
// in it for one ISA and one activation type: fp32 on AVX-512 with V = 16 (one zmm per
// pixel), fp32 on AVX2 with V = 8 (one ymm), and bf16 on AVX512_BF16 with 32 lanes per pixel
// (the bf16 kernels' layout) in two zmm halves of 16. The loops use GCC vector extensions
// rather than intrinsics, but for the bf16 rounding (conv/lanes_bf16.inc).
//
// Each region defines, before the .inc files:
//   kV   floats per vector,
//   kP   channel lanes per pixel (the layout's block; kV or a multiple of it),
//   Act  the activations' element type (float, or uint16_t holding bf16).
// A pixel is kH = kP / kV vectors, "halves"; with kP = kV the loops are those of one
// vector per pixel. (One 32-lane vector per pixel would not do: GCC 12 lowers a compare or
// select on a vector wider than the ISA's one lane at a time.)
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
#define DC_BEGIN_AVX512_BF16 \
  _Pragma("clang attribute push(__attribute__((target(\"avx512f,avx512bw,avx512bf16\"))), apply_to = function)")
#define DC_END_ISA _Pragma("clang attribute pop")
#else
#define DC_BEGIN_AVX512 _Pragma("GCC push_options") _Pragma("GCC target(\"avx512f\")")
#define DC_BEGIN_AVX2 _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma\")")
#define DC_BEGIN_AVX512_BF16 _Pragma("GCC push_options") _Pragma("GCC target(\"avx512f,avx512bw,avx512bf16\")")
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
