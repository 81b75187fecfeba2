// The column fold of a layer with few input channels and a wide kernel (conv1's 3 x 7 x 7),
// made straight from the model's (N, C, H, W) input: the one pass that enters the blocked
// bf16 model for it.
//
// Where C * S <= 32 (bf16_fwd_folds_columns), a layer is an R x 1 convolution of the input
// with its kernel columns folded into the channels (conv/bf16_fwd.h). The forward makes that
// copy from a blocked input; this makes it from fp32 or bf16 NCHW, rounding fp32 as torch's
// `x.to(torch.bfloat16)` does (bf16_from_float_as_torch: nearest even, denormals kept, NaN
// `nan`), so the model
// never writes the 32-lane rows of a 3-channel image. The copy is (N, 1, H + pad_t + pad_b,
// Q, 32), on which the layer is an ordinary convolution (bf16_fwd_inner_desc: C * S
// channels, R x 1, stride (stride_h, 1), dilation (dil_h, 1), no padding) with weights
// (K, S * C, R, 1): inner channel s * C + c is channel c at kernel column s.
#pragma once

#include <cstdint>

#include "conv/conv_desc.h"

namespace dc {

// Thread tid's share of the copy, whole (image, padded row) rows: row (n, hp), pixel q, lane
// s * C + c holds src[n, c, hp - pad_t, q * stride_w + s * dil_w - pad_l] rounded to bf16
// (a NaN as `nan`), zero where that falls outside the input; the lanes past C * S are zero.
// src is fp32 (or bf16 when src_bf16, copied as it is), with strides in elements. Throws
// std::invalid_argument unless bf16_fwd_folds_columns(d).
void bf16_fold_nchw(const ConvDesc& d, const void* src, bool src_bf16, const int64_t src_strides[4], uint16_t nan,
                    uint16_t* dst, int tid, int nthreads);

}  // namespace dc
