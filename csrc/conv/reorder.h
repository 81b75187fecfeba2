// Layout conversions between PyTorch's strided (N, C, H, W) tensors and the blocked
// layouts of DESIGN.md section 1. Each runs one thread's share (tid of nthreads).
// Strides are in elements, in the order of the logical dimensions.
#pragma once

#include <cstdint>

namespace dc {

// (N, C, H, W) with any strides -> (N, ceil(C/V), H, W, V); channels >= C become zero.
void reorder_to_blocked(const float* src, const int64_t src_strides[4], int64_t n, int64_t c, int64_t h, int64_t w,
                        int v, float* dst, int tid, int nthreads);
// (N, ceil(C/V), H, W, V) -> (N, C, H, W) with any strides; padded channels are dropped.
void reorder_from_blocked(const float* src, int64_t n, int64_t c, int64_t h, int64_t w, int v, float* dst,
                          const int64_t dst_strides[4], int tid, int nthreads);
// (K, C, R, S) with any strides -> (ceil(K/V), ceil(C/V), R, S, V(c), V(k)), zero-padded.
void reorder_weight_to_blocked(const float* src, const int64_t src_strides[4], int64_t k, int64_t c, int64_t r,
                               int64_t s, int v, float* dst, int tid, int nthreads);
// Its blocks [begin, end) alone (block i = K block * ceil(C/V) + C block), from dst on.
void reorder_weight_to_blocked_blocks(const float* src, const int64_t src_strides[4], int64_t k, int64_t c, int64_t r,
                                      int64_t s, int v, int64_t begin, int64_t end, float* dst);
// The inverse of reorder_weight_to_blocked, into (K, C, R, S) with any strides.
void reorder_weight_from_blocked(const float* src, int64_t k, int64_t c, int64_t r, int64_t s, int v, float* dst,
                                 const int64_t dst_strides[4], int tid, int nthreads);

// The weights of one phase of the input gradient (conv/bwd_data.h): from (K, C, R, S)
// with any strides to (ceil(C/V), ceil(K/V), n_r, n_s, V(k), V(c)), zero-padded, C and K
// swapped; tap (i, j) is the source tap (taps_r[n_r - 1 - i], taps_s[n_s - 1 - j]).
void reorder_weight_to_blocked_bwd(const float* src, const int64_t src_strides[4], int64_t k, int64_t c, int64_t r,
                                   int64_t s, const int64_t* taps_r, int64_t n_r, const int64_t* taps_s, int64_t n_s, int v,
                                   float* dst, int tid, int nthreads);
// Its blocks [begin, end) alone (block i = C block * ceil(K/V) + K block), from dst on.
void reorder_weight_to_blocked_bwd_blocks(const float* src, const int64_t src_strides[4], int64_t k, int64_t c,
                                          int64_t r, int64_t s, const int64_t* taps_r, int64_t n_r,
                                          const int64_t* taps_s, int64_t n_s, int v, int64_t begin, int64_t end,
                                          float* dst);
// The same from blocked weights (ceil(K/V), ceil(C/V), R, S, V(c), V(k)) with S columns.
void reorder_blocked_weight_to_bwd(const float* src, int64_t kb, int64_t cb, int64_t r, int64_t s,
                                   const int64_t* taps_r, int64_t n_r, const int64_t* taps_s, int64_t n_s, int v,
                                   float* dst, int tid, int nthreads);
// Its blocks [begin, end) alone (block i = C block * ceil(K/V) + K block), from dst on.
void reorder_blocked_weight_to_bwd_blocks(const float* src, int64_t kb, int64_t cb, int64_t r, int64_t s,
                                          const int64_t* taps_r, int64_t n_r, const int64_t* taps_s, int64_t n_s,
                                          int v, int64_t begin, int64_t end, float* dst);

// Depthwise weights (C, 1, R, S) with any strides -> (ceil(C/V), R, S, V), zero-padded.
void reorder_dw_weight_to_blocked(const float* src, const int64_t src_strides[4], int64_t c, int64_t r, int64_t s,
                                  int v, float* dst, int tid, int nthreads);

}  // namespace dc
