// The bf16 forward convolution on AVX512_BF16 (vdpbf16ps): the kernel of the plans made at
// the avx512_bf16 level (conv/bf16_fwd.h), where the CPU has no AMX tiles.
//
// It reads and writes exactly what the AMX kernel does (jit/amx_fwd_kernel.h): the same
// activations (N, ceil(C/32), H, W, 32) bf16, the same packed weights and the same
// argument, AmxFwdCallArgs, so the plan's runs, the driver's input copies and the model's
// blocked tensors serve both. A B tile's row, [16 output channels][2 channels of a pair],
// is one zmm of 16 dwords, which is what vdpbf16ps multiplies: per lane n it adds
// w[n][0] x[2p] + w[n][1] x[2p+1] to an fp32 accumulator.
//
// Registers: a call computes n_a runs of m pixels x n_b vectors of 16 output channels, one
// fp32 accumulator each. Per kernel column and channel pair (unrolled) it loads the n_b
// weight rows of the pair once, broadcasts each pixel's pair (one dword, vpbroadcastd, or
// {1to16} where a single vector reads it) and issues n_b vdpbf16ps, as the fp32 kernel
// (jit/fwd_kernel.h) broadcasts one input channel to its output blocks. The reduction runs
// over input blocks and kernel rows (runtime loops) and kernel columns and pairs
// (unrolled); the accumulators never leave the registers before the epilogue.
//
// Pixels: run pixel i of run j is read at src[j] + i * px pixels (px = 1, or the layer's
// stride along a row; the call's src_px_stride is px * 64 bytes and is not read: the
// displacements are constants of the code). Which pixels are stored is the rows mask; each
// stored pixel goes dst_px_stride bytes after the one before (and its residual is read as
// far after), as the AMX kernel's: the pixel's own size for a dense output, a multiple of
// it where the input gradient's stride phases interleave their stores in dx.
//
// Epilogue, per stored pixel and in this order, as the AMX kernel's: + bias, + residual
// (laid out and typed as the output), max(0, .), then the store, bf16 rounded to nearest
// even (vcvtneps2bf16) or fp32. With one vector (a last output block of 16 channels or
// fewer) the block's upper 16 lanes are stored as zeros.
//
// vdpbf16ps rounds as the SDM describes it: per lane, the odd product is added first and
// then the even one, each sum rounded to nearest even in fp32, bf16 denormals read as zero
// and denormal sums flushed to zero. The scalar twin (conv/reference.h) does the same, in
// the same order, so the kernel and its twin agree bit for bit.
#pragma once

#include <memory>
#include <string>

#include "jit/amx_fwd_kernel.h"
#include "jit/dtype.h"
#include "jit/fwd_kernel.h"
#include "jit/jit_kernel.h"

namespace dc {

struct Avx512Bf16FwdKernelSpec {
  DataType out_dt = DataType::bf16;  // f32 or bf16
  int s = 1, dil_w = 1;              // kernel columns, unrolled, and their dilation
  int px = 1;                        // input pixels from one run pixel to the next
  int m = 14;                        // pixels of a run
  int n_a = 1;                       // runs: 1 or 2
  int n_b = 2;                       // vectors of 16 output channels: 2 or 1
  int pairs = 16;                    // channel pairs read per input block (< 16: a single, short block)
  FwdPostOps post;                   // bias, add, relu (stats are not taken)
  // e.g. bf16_conv_fwd_kw3d1_px1_m14a1b2_p16_obf16_post_bias_relu__avx512_bf16
  std::string name() const;
};

// zmm registers the kernel of `spec` takes (accumulators, weight rows, broadcasts; at least
// two beside the accumulators for the epilogue): at most 32 for a valid spec.
int avx512bf16_fwd_vector_registers(const Avx512Bf16FwdKernelSpec& spec);

std::unique_ptr<JitGenerator> make_avx512bf16_fwd_kernel(const Avx512Bf16FwdKernelSpec& spec);

}  // namespace dc
