// bf16 activations between torch's layouts and the AMX kernels' rows of 32 channels
// (jit/amx_fwd_kernel.h): (N, C, H, W) with any strides <-> (N, ceil(C/32), H, W, 32).
// Each function does thread tid's share, whole (image, block, row) rows, so a driver runs
// them on its threads (conv/parallel.h).
#pragma once

#include <cstdint>
#include <cstring>

namespace dc {

// fp32 -> bf16 as torch's CPU tensor conversion (x.to(torch.bfloat16)) rounds: to nearest even
// on the bits, denormals kept (no flush, whatever MXCSR says), every NaN `nan`: 0xffff where
// torch runs its vectorized loop, 0x7fc0 where it runs its scalar one (c10::BFloat16). The
// bf16 kernels' own rounding (bf16_from_float) flushes denormals instead.
inline uint16_t bf16_from_float_as_torch(float x, uint16_t nan) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return nan;
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// src (N, C, H, W) bf16, strides in elements, into dst (N, ceil(C/32), H, W, 32): the
// channels past C are zero.
void bf16_to_rows32(const uint16_t* src, const int64_t src_strides[4], int64_t n, int64_t c, int64_t h, int64_t w,
                    uint16_t* dst, int tid, int nthreads);

// src (N, C, H, W) fp32, strides in elements, into dst (N, ceil(C/32), H, W, 32) bf16 in one
// pass, each value rounded as torch's tensor conversion rounds (bf16_from_float_as_torch, NaN
// `nan`); the channels past C are zero.
void f32_to_rows32(const float* src, const int64_t src_strides[4], int64_t n, int64_t c, int64_t h, int64_t w,
                   uint16_t nan, uint16_t* dst, int tid, int nthreads);

// count contiguous fp32 values into bf16, each rounded as bf16_from_float_as_torch (NaN `nan`);
// AVX-512 (the bf16 layouts' callers have it).
void f32_row_to_bf16(const float* src, int64_t count, uint16_t nan, uint16_t* dst);

// The first c channels of src (N, ceil(C/32), H, W, 32) into dst (N, C, H, W) bf16 of any
// strides (in elements).
void rows32_to_bf16(const uint16_t* src, int64_t n, int64_t c, int64_t h, int64_t w, uint16_t* dst,
                    const int64_t dst_strides[4], int tid, int nthreads);

}  // namespace dc
