// bf16 activations between torch's layouts and the AMX kernels' rows of 32 channels
// (jit/amx_fwd_kernel.h): (N, C, H, W) with any strides <-> (N, ceil(C/32), H, W, 32).
// Each function does thread tid's share, whole (image, block, row) rows, so a driver runs
// them on its threads (conv/parallel.h).
#pragma once

#include <cstdint>

namespace dc {

// src (N, C, H, W) bf16, strides in elements, into dst (N, ceil(C/32), H, W, 32): the
// channels past C are zero.
void bf16_to_rows32(const uint16_t* src, const int64_t src_strides[4], int64_t n, int64_t c, int64_t h, int64_t w,
                    uint16_t* dst, int tid, int nthreads);

// The first c channels of src (N, ceil(C/32), H, W, 32) into dst (N, C, H, W) bf16 of any
// strides (in elements).
void rows32_to_bf16(const uint16_t* src, int64_t n, int64_t c, int64_t h, int64_t w, uint16_t* dst,
                    const int64_t dst_strides[4], int tid, int nthreads);

}  // namespace dc
