// Scalar twins: plain C++ with the same arguments as the JIT code, for the tests.
#pragma once

#include "conv/conv_desc.h"
#include "jit/amx_fwd_kernel.h"
#include "jit/avx512bf16_fwd_kernel.h"
#include "jit/amx_upd_kernel.h"
#include "jit/avx512bf16_upd_kernel.h"
#include "jit/dw_kernel.h"
#include "jit/fwd_kernel.h"
#include "jit/upd_kernel.h"

namespace dc {

// Does exactly what the generated kernel of `spec` does with `args`.
void fwd_kernel_ref(const FwdKernelSpec& spec, const FwdCallArgs* args);

// Direct convolution on blocked tensors (layouts as fwd_execute), accumulated in double,
// with the post-ops `post` (bias and residual are read only when it names them).
void conv_fwd_ref_blocked(const ConvDesc& d, int v, const FwdPostOps& post, const float* src, const float* wei,
                          const float* bias, const float* residual, float* dst);

// Does what the generated AMX kernel of `spec` does with `args`: the same bf16 inputs
// (denormals read as zero, as tdpbf16ps does), sums in fp32 over input blocks, kernel
// rows, columns and channel pairs in that order, the same epilogue and rounding. The
// tiles' own order of summation may differ, so results agree to fp32 rounding.
void amx_fwd_kernel_ref(const AmxFwdKernelSpec& spec, const AmxFwdCallArgs* args);

// Does exactly what the generated avx512_bf16 kernel of `spec` does with `args`, bit for
// bit: per output lane, over input blocks, kernel rows, columns and pairs in that order,
// the pair's odd product added first and then the even one, each a fused multiply-add
// rounded to fp32, bf16 denormals read as zero and denormal sums flushed to
// zero, as vdpbf16ps does; then the same epilogue and rounding. It reads the pixel stride
// from the spec (args->src_px_stride is not read, as by the kernel).
void avx512bf16_fwd_kernel_ref(const Avx512Bf16FwdKernelSpec& spec, const AmxFwdCallArgs* args);

// Does what the generated AMX weight-gradient kernel of `spec` does with `args`: the same
// bf16 operands (denormals read as zero), sums in fp32 (from the block's, where the call
// accumulates) over images, chunks, pixel pairs and the pair's two pixels in that order,
// stored to the [32 c][32 k] block. The tiles' own
// order of summation may differ, so results agree to fp32 rounding.
void amx_upd_kernel_ref(const AmxUpdKernelSpec& spec, const AmxUpdCallArgs* args);

// Does exactly what the generated avx512_bf16 weight-gradient kernel of `spec` does with
// `args`, bit for bit: per sum, from zero or the block's (where the call accumulates), over
// images, chunks and pixel pairs in that order, the pair's odd pixel added first and then
// the even one, as vdpbf16ps does (avx512bf16_fwd_kernel_ref's rounding); stored to the
// [32 c][32 k] block's 16 n_a channels x 16 n_b output channels.
void avx512bf16_upd_kernel_ref(const Avx512Bf16UpdKernelSpec& spec, const AmxUpdCallArgs* args);

// Does exactly what the generated depthwise kernel of `spec` does with `args`.
void dw_kernel_ref(const DwKernelSpec& spec, const DwCallArgs* args);

// Depthwise convolution on blocked tensors (layouts as dw_execute), accumulated in double.
void dwconv_ref_blocked(const ConvDesc& d, int v, const float* src, const float* wei, const float* bias, float* dst,
                        bool relu);

// Does exactly what the generated weight-update kernel of `spec` does with `args`.
void upd_kernel_ref(const UpdKernelSpec& spec, const UpdCallArgs* args);

// The weight gradient on blocked tensors (layouts as upd_execute), accumulated in double.
void conv_upd_ref_blocked(const ConvDesc& d, int v, const float* x, const float* dy, float* dw);

}  // namespace dc
