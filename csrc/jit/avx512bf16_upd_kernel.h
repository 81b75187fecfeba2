// The bf16 weight gradient on AVX512_BF16 (vdpbf16ps): the kernel of the plans made at the
// avx512_bf16 level (conv/bf16_upd.h), where the CPU has no AMX tiles.
//
// It reads and writes exactly what the AMX kernel does (jit/amx_upd_kernel.h), through the
// same argument, AmxUpdCallArgs: x transposed (a row holds one input channel's consecutive
// pixels), dy in VNNI over pixel pairs (a chunk of 32 pixels is [2 halves][16 pairs][16 k]
// [2 pixels]), and the [32 c][32 k] fp32 block of one tap, loaded first where the call
// accumulates. So the plan's copies, segments and shares serve both.
//
// Registers: one dword of a channel's row is a pixel pair of that channel, broadcast to
// every lane (vpbroadcastd, or {1to16} where a single vector reads it); one 64-byte row of
// a dy half is that pixel pair for 16 output channels. vdpbf16ps of the two adds both
// pixels' products to the channel's 16 fp32 sums. A call's input channels are taken in
// groups of at most g, one group after the other: a group's g channels x n_b vectors of 16
// output channels stay in zmm registers over every image and chunk of the call, and per
// pixel pair the kernel loads the n_b dy rows once and broadcasts each channel's pair once,
// so vector loads per product are (n_b + g) / (g n_b): 13 / 22 for the 11-channel groups
// of a full block. Channel rows are src_row_stride apart (a runtime stride): four channels
// share one base register, at 0, 1, 2 and 3 strides.
//
// vdpbf16ps rounds as jit/avx512bf16_fwd_kernel.h describes, and the scalar twin
// (avx512bf16_upd_kernel_ref, conv/reference.h) sums in the same order, so the kernel and
// its twin agree bit for bit.
#pragma once

#include <memory>
#include <string>

#include "jit/amx_upd_kernel.h"
#include "jit/jit_kernel.h"

namespace dc {

struct Avx512Bf16UpdKernelSpec {
  int n_a = 2;  // halves of the input block: 2 (32 channels), or 1 where it has 16 or fewer
  int n_b = 2;  // vectors of 16 output channels: 2, or 1 where the output block has 16 or fewer
  int g = 11;   // input channels per group (the last group may have fewer)
  // e.g. bf16_conv_upd_a2b2g11_of32__avx512_bf16: bf16 operands, fp32 sums out
  std::string name() const;
};

// The spec of an (n_a, n_b) block: the fewest groups whose accumulators, with the dy rows
// and broadcasts, fit the 32 zmm registers, as even as they split.
Avx512Bf16UpdKernelSpec avx512bf16_upd_spec(int n_a, int n_b);

// zmm registers the kernel of `spec` takes: at most 32 for a valid spec.
int avx512bf16_upd_vector_registers(const Avx512Bf16UpdKernelSpec& spec);

std::unique_ptr<JitGenerator> make_avx512bf16_upd_kernel(const Avx512Bf16UpdKernelSpec& spec);

}  // namespace dc
