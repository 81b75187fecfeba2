// What the op families of the torch layer share: argument checks, Tensor -> ConvDesc,
// torch's own convolution for what the kernels do not take, the layouts as ATen views, and
// the calling thread's scratch. Definitions (and their reasons) in common.cpp.
#pragma once

#include <ATen/ATen.h>

#include <atomic>
#include <cstdint>
#include <tuple>
#include <vector>

#include "conv/conv_desc.h"
#include "conv/fwd_plan.h"
#include "conv/scratch.h"
#include "jit/isa.h"

namespace dc_torch {

using at::Tensor;
using dc::ConvDesc;

// The active JIT ISA; an error naming op when there is none.
dc::Isa jit_isa(const char* op = "torch_directconv");

void check_float_cpu(const Tensor& t, const char* op, const char* name);
// On the CPU, float32 or bfloat16 (the drop-in ops take both).
void check_conv_dtype_cpu(const Tensor& t, const char* op, const char* name);

std::vector<int64_t> strides4(const Tensor& t);

ConvDesc fill_desc(const char* op, int64_t n, int64_t c, int64_t h, int64_t w, int64_t k, int64_t r, int64_t s,
                   at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation);
const ConvDesc& validated(const char* op, const ConvDesc& d);
ConvDesc make_desc(const char* op, int64_t n, int64_t c, int64_t h, int64_t w, int64_t k, int64_t r, int64_t s,
                   at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation);
bool jit_takes(const ConvDesc& d);

// Calls that ran on torch's convolution (jit_stats).
extern std::atomic<int64_t> aten_fallbacks;

Tensor aten_conv2d(const Tensor& input, const Tensor& weight, const c10::optional<Tensor>& bias,
                   at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool relu,
                   at::MemoryFormat format);
// aten_conv2d without the count and the warning: for callers that give their own reason.
Tensor torch_conv2d(const Tensor& input, const Tensor& weight, const c10::optional<Tensor>& bias,
                    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool relu,
                    at::MemoryFormat format);
std::tuple<Tensor, Tensor, Tensor> aten_backward(const Tensor& grad_output, const Tensor& input, const Tensor& weight,
                                                 at::IntArrayRef stride, at::IntArrayRef padding,
                                                 at::IntArrayRef dilation, int64_t groups, bool want_input,
                                                 bool want_weight);

Tensor unpack_weight(const Tensor& packed, int64_t kg, int64_t cg);
Tensor unblock(const Tensor& xb, int64_t channels);
Tensor block(const Tensor& x, int64_t V);
Tensor unblock_weight(const Tensor& wb);
Tensor block_weight(const Tensor& w, int64_t V);

Tensor padded_bias(const c10::optional<Tensor>& bias, int64_t k, int64_t padded, const char* op);

// Scratch of the calling thread (conv/scratch.h): kept between calls up to a process-wide
// cap, so repeated calls do not fault in fresh pages, and returned to the OS beyond it.
inline float* scratch(dc::ScratchSlot slot, int64_t floats) { return dc::scratch_floats(slot, floats); }

dc::FwdPlanOptions& fwd_options();
// Those, with a call's epilogue.
dc::FwdPlanOptions fwd_options(bool bias, bool residual, bool relu);

bool is_channels_last(const Tensor& t);
at::MemoryFormat output_format(const Tensor& input, bool weight_channels_last);
bool is_depthwise(const Tensor& weight, int64_t groups);

}  // namespace dc_torch
