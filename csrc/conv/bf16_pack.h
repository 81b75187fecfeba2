// Weight packing for the bf16 kernels: (K, C, R, S) weights, fp32 (rounded to nearest even,
// as bf16_from_float) or bf16, of any strides, into the forward's packed pairs
// (conv/bf16_fwd.h) or the input gradient's rotated phases (conv/bf16_bwd_data.h). Each
// function does thread tid's share of whole (output block, input block) pairs, so a driver
// runs them on its threads. Weights whose taps are contiguous within a channel (stride
// (.., R * S, S, 1): a contiguous (K, C, R, S) tensor) take an AVX-512 path on full
// blocks where the CPU has it; the rest, and the *_scalar twins, a plain loop.
#pragma once

#include <cstdint>

#include "conv/conv_desc.h"

namespace dc {

struct Bf16PackSource {
  const void* w = nullptr;
  DataType dt = DataType::f32;  // f32 or bf16
  int64_t k = 0, c = 0, r = 0, s = 0;
  int64_t st[4] = {0, 0, 0, 0};  // strides in elements
};

// (ceil(K'/32), ceil(C'/32), R', S', 2, 16, 16, 2) for the forward: of the layer's own
// geometry (K, C, R, S), or folded (bf16_fwd_folds_columns): the R x 1 kernel whose inner
// channel j is kernel column j / C, channel j % C.
void pack_bf16_fwd(const Bf16PackSource& src, bool folded, uint16_t* packed, int tid, int nthreads);
void pack_bf16_fwd_scalar(const Bf16PackSource& src, bool folded, uint16_t* packed, int tid, int nthreads);

// The input gradient's layout of d's phases (bf16_bwd_data_weight_elems(d) elements); src
// holds d's (K, C, R, S).
void pack_bf16_bwd_data(const ConvDesc& d, const Bf16PackSource& src, uint16_t* packed, int tid, int nthreads);
void pack_bf16_bwd_data_scalar(const ConvDesc& d, const Bf16PackSource& src, uint16_t* packed, int tid,
                               int nthreads);

}  // namespace dc
