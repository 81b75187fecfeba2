// Which path a convolution takes: the choices that the torch layer and the Python API both
// make, kept here once (Python asks through torch_directconv._C).
#pragma once

#include <cstdint>
#include <string>

#include "conv/conv_desc.h"
#include "jit/isa.h"

namespace dc {

// Depthwise: one input and one output channel per group (cg == 1, k == groups), which the
// depthwise kernels take.
inline bool is_depthwise(int64_t groups, int64_t k, int64_t cg) { return groups > 1 && cg == 1 && k == groups; }

// Whether the blocked kernels take groups of kg x cg channels: each group is padded to whole
// channel blocks of V, and past a 2x waste torch's convolution is faster.
bool groups_fit_blocks(int64_t groups, int64_t kg, int64_t cg, int64_t V);

// Whether the JIT covers a convolution of `groups` groups of cg input channels, k output
// channels in all: one group, depthwise, or groups that fit their blocks.
bool jit_covers_groups(int64_t groups, int64_t k, int64_t cg, int64_t V);

// The NCHW 1x1 GEMM (make_fwd_plan_nchw_1x1) runs on images of at least this many pixels;
// on smaller ones it has too few pixels per output channel, and the blocked kernels with
// their layout conversions measured faster.
constexpr int64_t kNchwGemmMinPixels = 28 * 28;

// Whether a one-group convolution on NCHW tensors (input and weight contiguous, output
// NCHW) takes the NCHW 1x1 GEMM rather than the blocked kernels.
bool nchw_gemm_preferred(const ConvDesc& d, Isa isa);

// Why the bf16 forward (conv/bf16_fwd.h) does not take a bf16 convolution of `groups` groups
// at the `active` level (on a CPU and OS whose best is `detected`), or "" when it does: at
// amx on the tiles, at avx512_bf16 on vdpbf16ps. Its geometry is bf16_fwd_fits's. Below
// avx512_bf16, bf16 runs on torch's convolution.
std::string bf16_fwd_fallback_reason(Isa active, Isa detected, int64_t groups);

// Whether the bf16 forward's plans and kernels (either level's) take this geometry (d.dt = bf16): offsets
// within 32 bits (jit_fits) and the plan's kernel-size limits.
bool bf16_fwd_fits(const ConvDesc& d);

// Why the bf16 kernels do not take a one-group bf16 convolution d (d.dt = bf16) at the
// `active` level, or "": bf16_fwd_fallback_reason, then bf16_fwd_fits. The input-gradient and
// weight-gradient plans (conv/bf16_bwd_data.h, conv/bf16_upd.h) have the forward's limits, so
// this is the rule of all three passes.
std::string bf16_conv_fallback_reason(Isa active, Isa detected, const ConvDesc& d);

}  // namespace dc
