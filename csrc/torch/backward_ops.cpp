// The gradients of the drop-in convolution (conv2d_backward_data, conv2d_backward_weight).
#include <ATen/ATen.h>

#include "common.h"
#include "conv/bwd_data.h"
#include "conv/drivers.h"
#include "conv/paths.h"
#include "conv/reorder.h"
#include "conv/scratch.h"
#include "jit/isa.h"
#include "ops.h"
#include "tensor_pool.h"
#include "threading.h"

namespace dc_torch {

// --- backward passes --------------------------------------------------------------------
// For now these run on ATen's convolution_backward: exact, and the autograd wiring,
// fake kernels and torch.compile support are in place for the JIT kernels of issue 3.
// ATen takes one padding per dimension, so an asymmetric padding (padding='same' with an
// even kernel) is applied to the input explicitly and cut off the gradient again.

namespace {

void check_backward_args(const char* op, const Tensor& grad_output, const Tensor& other, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  check_conv_dtype_cpu(grad_output, op, "grad_output");
  TORCH_CHECK(grad_output.dim() == 4, op, ": expected a 4-D 'grad_output', got shape ", grad_output.sizes());
  TORCH_CHECK(other.dim() == 4, op, ": expected 4-D tensors, got shape ", other.sizes());
  TORCH_CHECK(stride.size() == 2 && dilation.size() == 2 && padding.size() == 4, op,
              ": expected 2 strides, 4 paddings and 2 dilations");
  TORCH_CHECK(groups >= 1, op, ": expected 'groups' >= 1, got ", groups);
}

// The other operand is on the CPU and of grad_output's dtype (float32 or bfloat16).
void check_same_dtype(const char* op, const Tensor& grad_output, const Tensor& t, const char* name) {
  check_conv_dtype_cpu(t, op, name);
  TORCH_CHECK(t.scalar_type() == grad_output.scalar_type(), op, ": 'grad_output' (", grad_output.scalar_type(),
              ") and '", name, "' (", t.scalar_type(), ") must have the same dtype");
}

// The convolution whose gradient a backward op computes, checked against 'grad_output'.
ConvDesc backward_desc(const char* op, const Tensor& grad_output, at::IntArrayRef input_size,
                       at::IntArrayRef weight_size, at::IntArrayRef stride, at::IntArrayRef padding,
                       at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(input_size.size() == 4, op, ": expected an input size of 4 values, got ", input_size);
  TORCH_CHECK(weight_size.size() == 4, op, ": expected a weight size of 4 values, got ", weight_size);
  const int64_t k = weight_size[0], cg = weight_size[1];
  TORCH_CHECK(k % groups == 0 && input_size[1] == cg * groups, op, ": an input of ", input_size[1],
              " channels does not match a weight of shape ", weight_size, " with groups=", groups);
  ConvDesc d = fill_desc(op, input_size[0], cg, input_size[2], input_size[3], k / groups, weight_size[2],
                         weight_size[3], stride, padding, dilation);
  TORCH_CHECK(grad_output.size(0) == d.n && grad_output.size(1) == k && grad_output.size(2) == d.p() &&
                  grad_output.size(3) == d.q(),
              op, ": 'grad_output' of shape ", grad_output.sizes(), " does not match the convolution's output (", d.n,
              ", ", k, ", ", d.p(), ", ", d.q(), ")");
  return d;
}

// The phases of the JIT input gradient; empty when it does not take the problem.
std::vector<dc::BwdDataPhase> jit_bwd_data_phases(const ConvDesc& d, int64_t groups) {
  if (dc::active_isa() == dc::Isa::none || !dc::groups_fit_blocks(groups, d.k, d.c, dc::vlen(dc::active_isa())))
    return {};
  return dc::bwd_data_phases(d);
}

// Depthwise, stride 1: the duality on the depthwise forward kernels.
Tensor depthwise_backward_data(const Tensor& grad_output, const Tensor& weight, at::IntArrayRef input_size,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                               int64_t groups) {
  if (dc::active_isa() == dc::Isa::none || stride[0] != 1 || stride[1] != 1 || !is_depthwise(weight, groups))
    return Tensor();
  const int64_t r = weight.size(2), s = weight.size(3);
  const std::vector<int64_t> pad = {dilation[0] * (r - 1) - padding[0], dilation[0] * (r - 1) - padding[1],
                                    dilation[1] * (s - 1) - padding[2], dilation[1] * (s - 1) - padding[3]};
  for (int64_t p : pad)
    if (p < 0) return Tensor();
  Tensor gi = conv2d(grad_output, weight.flip({2, 3}), c10::nullopt, {1, 1}, pad, dilation, groups, false);
  TORCH_CHECK(gi.sizes() == input_size, "conv2d_backward_data: internal shape mismatch ", gi.sizes(), " vs ",
              input_size);
  return gi;
}

// Empty when the JIT does not take the problem (see conv2d_backward_data).
Tensor backward_data_jit(const Tensor& grad_output, const Tensor& weight, at::IntArrayRef input_size,
                         at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const char* op = "conv2d_backward_data";
  if (dc::active_isa() == dc::Isa::none) return Tensor();
  const int64_t k = weight.size(0), cg = weight.size(1), kg = k / groups;
  ConvDesc d = make_desc(op, input_size[0], cg, input_size[2], input_size[3], kg, weight.size(2), weight.size(3),
                         stride, padding, dilation);
  const int64_t P = d.p(), Q = d.q();
  const std::vector<dc::BwdDataPhase> phases = jit_bwd_data_phases(d, groups);
  if (phases.empty()) return Tensor();
  // Each phase is a convolution of its own, over grad_output, that the kernels must take too.
  for (const dc::BwdDataPhase& ph : phases)
    if (!ph.empty() && !jit_takes(ph.sub)) return Tensor();
  const int V = dc::vlen(jit_isa());
  const int64_t cb = dc::div_up(cg, V), kb = dc::div_up(kg, V);
  Tensor out = new_tensor(input_size, grad_output.options().memory_format(output_format(
                                         grad_output, weight.suggest_memory_format() == at::MemoryFormat::ChannelsLast)));
  if (d.n == 0) return out;
  const int64_t dy_group = d.n * kb * P * Q * V, dx_group = d.n * cb * d.h * d.w * V;
  float* dy_blk = scratch(dc::kScratchSrc, groups * dy_group);
  float* dx_blk = scratch(dc::kScratchDst, groups * dx_group);
  const float* gy = grad_output.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  float* gx = out.data_ptr<float>();
  auto gs = strides4(grad_output), ws = strides4(weight), xs = strides4(out);
  const int nt = num_threads();
  run_shares(nt, [&](int tid, int n_threads) {
    for (int64_t g = 0; g < groups; ++g)
      dc::reorder_to_blocked(gy + g * kg * gs[1], gs.data(), d.n, kg, P, Q, V, dy_blk + g * dy_group, tid, n_threads);
  });
  dc::run_bwd_data(
      d, phases, dy_blk, dx_blk, groups, dy_group, dx_group,
      [&](const dc::BwdDataPhase& ph, float* dst, int tid, int n_threads) {
        const int64_t per_group = cb * kb * ph.sub.r * ph.sub.s * V * V;
        for (int64_t g = 0; g < groups; ++g)
          dc::reorder_weight_to_blocked_bwd(w + g * kg * ws[0], ws.data(), kg, cg, d.r, d.s, ph.taps_r.data(),
                                            ph.sub.r, ph.taps_s.data(), ph.sub.s, V, dst + g * per_group, tid,
                                            n_threads);
      },
      jit_isa(), num_threads(), fwd_options(), torch_shares(),
      [&](const dc::BwdDataPhase& ph, int64_t begin, int64_t end, float* dst) {  // one group
        dc::reorder_weight_to_blocked_bwd_blocks(w, ws.data(), kg, cg, d.r, d.s, ph.taps_r.data(), ph.sub.r,
                                                 ph.taps_s.data(), ph.sub.s, V, begin, end, dst);
      });
  run_shares(nt, [&](int tid, int n_threads) {
    for (int64_t g = 0; g < groups; ++g)
      dc::reorder_from_blocked(dx_blk + g * dx_group, d.n, cg, d.h, d.w, V, gx + g * cg * xs[1], xs.data(), tid,
                               n_threads);
  });
  return out;
}

// Empty when the JIT does not take the problem (see conv2d_backward_weight).
Tensor backward_weight_jit(const Tensor& grad_output, const Tensor& input, at::IntArrayRef weight_size,
                           at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const char* op = "conv2d_backward_weight";
  const dc::Isa isa = dc::fp32_isa(dc::active_isa());
  if (isa == dc::Isa::none) return Tensor();
  const int64_t k = weight_size[0], cg = weight_size[1], kg = k / groups, V = dc::vlen(isa);
  if (!dc::groups_fit_blocks(groups, kg, cg, V)) return Tensor();
  ConvDesc d = make_desc(op, input.size(0), cg, input.size(2), input.size(3), kg, weight_size[2], weight_size[3],
                         stride, padding, dilation);
  Tensor out = new_tensor(weight_size, grad_output.options());
  if (d.n == 0) return out.zero_();
  const int nt = num_threads();
  const int64_t P = d.p(), Q = d.q(), cb = dc::div_up(cg, V), kb = dc::div_up(kg, V);
  const int64_t x_group = d.n * cb * d.h * d.w * V, dy_group = d.n * kb * P * Q * V;
  float* x_blk = scratch(dc::kScratchSrc, groups * x_group);
  float* dy_blk = scratch(dc::kScratchDst, groups * dy_group);
  const float* x = input.data_ptr<float>();
  const float* gy = grad_output.data_ptr<float>();
  auto xs = strides4(input), gs = strides4(grad_output), ws = strides4(out);
  run_shares(nt, [&](int tid, int n_threads) {
    for (int64_t g = 0; g < groups; ++g) {
      dc::reorder_to_blocked(x + g * cg * xs[1], xs.data(), d.n, cg, d.h, d.w, static_cast<int>(V), x_blk + g * x_group,
                             tid, n_threads);
      dc::reorder_to_blocked(gy + g * kg * gs[1], gs.data(), d.n, kg, P, Q, static_cast<int>(V),
                             dy_blk + g * dy_group, tid, n_threads);
    }
  });
  auto [dw, group_stride] =
      dc::run_upd(d, groups, x_blk, x_group, dy_blk, dy_group, jit_isa(), num_threads(), torch_shares());
  float* o = out.data_ptr<float>();
  run_shares(nt, [&](int tid, int n_threads) {
    for (int64_t g = 0; g < groups; ++g)
      dc::reorder_weight_from_blocked(dw + g * group_stride, kg, cg, d.r, d.s, static_cast<int>(V), o + g * kg * ws[0],
                                      ws.data(), tid, n_threads);
  });
  return out;
}

Tensor backward_data_any_path(const Tensor& grad_output, const Tensor& weight, at::IntArrayRef input_size,
                              at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                              int64_t groups) {
  if (Tensor gi = depthwise_backward_data(grad_output, weight, input_size, stride, padding, dilation, groups);
      gi.defined())
    return gi;
  // 1x1, stride 1, unpadded, NCHW: the input gradient is W^T dY per image, the NCHW 1x1
  // GEMM with the (small) transposed weight matrix.
  if (groups == 1 && weight.size(2) == 1 && weight.size(3) == 1 && dc::active_isa() != dc::Isa::none &&
      weight.size(1) == input_size[1] && grad_output.size(2) == input_size[2] && grad_output.size(3) == input_size[3])
    if (Tensor gi = conv2d_nchw_1x1(grad_output, weight.view({weight.size(0), weight.size(1)}).t().contiguous().view(
                                                     {weight.size(1), weight.size(0), 1, 1}),
                                    c10::nullopt, stride, padding, dilation, false);
        gi.defined())
      return gi;
  if (Tensor gi = backward_data_jit(grad_output, weight, input_size, stride, padding, dilation, groups); gi.defined())
    return gi;
  // Only the input's shape matters for this gradient.
  Tensor input = new_tensor(input_size, grad_output.options());
  return std::get<0>(aten_backward(grad_output, input, weight, stride, padding, dilation, groups, true, false));
}

}  // namespace

// The gradient of conv2d with respect to its input, of shape input_size.
//
// On the forward JIT kernels (DESIGN.md section 5): stride 1 by duality, a forward
// convolution of grad_output with the weights flipped in R and S and C and K swapped in
// each group; strided layers by phases (conv/bwd_data.h), one such convolution per phase of
// the input pixels. 1x1 stride-1 NCHW layers take the NCHW 1x1 GEMM with the transposed
// weight matrix, stride-1 depthwise layers the depthwise kernels. Strided depthwise layers
// and groups that would waste most of a channel block take ATen's convolution_backward.
Tensor conv2d_backward_data(const Tensor& grad_output, const Tensor& weight, at::IntArrayRef input_size,
                            at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  dc::ScratchScope call;
  const char* op = "conv2d_backward_data";
  check_backward_args(op, grad_output, weight, stride, padding, dilation, groups);
  check_same_dtype(op, grad_output, weight, "weight");
  // Channels_last when grad_output or the weight is, whatever the path (the fake kernel says so).
  const at::MemoryFormat format = is_channels_last(grad_output) || is_channels_last(weight)
                                      ? at::MemoryFormat::ChannelsLast
                                      : at::MemoryFormat::Contiguous;
  // No input or no output channels: an empty or zero gradient (and torch's forward then
  // gives an output of 0 channels, whatever the weight says).
  if (input_size.size() == 4 && (input_size[1] == 0 || weight.size(0) == 0))
    return new_zeros(input_size, grad_output.options()).contiguous(format);
  const ConvDesc d = backward_desc(op, grad_output, input_size, weight.sizes(), stride, padding, dilation, groups);
  if (grad_output.scalar_type() == at::kBFloat16)
    return std::get<0>(bf16_conv2d_backward(grad_output, new_tensor(input_size, grad_output.options()), weight, stride,
                                            padding, dilation, groups, true, false))
        .contiguous(format);
  if (!jit_takes(d)) {
    ++aten_fallbacks;
    Tensor input = new_tensor(input_size, grad_output.options());
    return std::get<0>(aten_backward(grad_output, input, weight, stride, padding, dilation, groups, true, false))
        .contiguous(format);
  }
  return backward_data_any_path(grad_output, weight, input_size, stride, padding, dilation, groups).contiguous(format);
}

// The gradient of conv2d with respect to its weight, of shape weight_size: the JIT
// weight-update kernels, except for groups that would waste most of a channel block
// (depthwise included), which take ATen's convolution_backward for now.
Tensor conv2d_backward_weight(const Tensor& grad_output, const Tensor& input, at::IntArrayRef weight_size,
                              at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                              int64_t groups) {
  dc::ScratchScope call;
  const char* op = "conv2d_backward_weight";
  check_backward_args(op, grad_output, input, stride, padding, dilation, groups);
  check_same_dtype(op, grad_output, input, "input");
  if (weight_size.size() == 4 && (input.size(1) == 0 || weight_size[0] == 0))
    return new_zeros(weight_size, grad_output.options());
  const ConvDesc d = backward_desc(op, grad_output, input.sizes(), weight_size, stride, padding, dilation, groups);
  if (grad_output.scalar_type() == at::kBFloat16)
    return std::get<1>(bf16_conv2d_backward(grad_output, input, new_tensor(weight_size, grad_output.options()), stride,
                                            padding, dilation, groups, false, true))
        .contiguous();
  if (!jit_takes(d))
    ++aten_fallbacks;
  else if (Tensor gw = backward_weight_jit(grad_output, input, weight_size, stride, padding, dilation, groups);
           gw.defined())
    return gw;
  Tensor weight = new_tensor(weight_size, grad_output.options());
  return std::get<1>(aten_backward(grad_output, input, weight, stride, padding, dilation, groups, false, true))
      .contiguous();
}

}  // namespace dc_torch
