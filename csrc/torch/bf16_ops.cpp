// The drop-in convolutions on bf16 tensors, on the bf16 kernels of the active level (AMX
// tiles, or vdpbf16ps at avx512_bf16: conv/bf16_fwd.h): conv2d's
// bf16 path, pack_weight_bf16 and conv2d_packed_bf16; the ops' autocast kernels; and the bf16
// gradients, which run on ATen until the bf16 backward kernels exist.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "common.h"
#include "conv/bf16_fwd.h"
#include "conv/bf16_layout.h"
#include "conv/paths.h"
#include "jit/amx_fwd_kernel.h"
#include "jit/isa.h"
#include "ops.h"
#include "tensor_pool.h"
#include "threading.h"

namespace dc_torch {

namespace {

constexpr int64_t kLanes = dc::kAmxBlock;

ConvDesc bf16_desc(const char* op, int64_t n, int64_t c, int64_t h, int64_t w, int64_t k, int64_t r, int64_t s,
                   at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  ConvDesc d = fill_desc(op, n, c, h, w, k, r, s, stride, padding, dilation);
  d.dt = dc::DataType::bf16;
  return d;
}

// Why this bf16 call runs on torch's convolution, or "" (the rule is conv/paths.h's).
std::string bf16_reason(const ConvDesc& d, int64_t groups) {
  if (groups != 1) return dc::bf16_fwd_fallback_reason(dc::active_isa(), dc::detected_isa(), groups);
  return dc::bf16_conv_fallback_reason(dc::active_isa(), dc::detected_isa(), d);
}

Tensor bf16_on_torch(const std::string& why, const Tensor& input, const Tensor& weight,
                     const c10::optional<Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                     at::IntArrayRef dilation, int64_t groups, bool relu, at::MemoryFormat format) {
  ++aten_fallbacks;
  TORCH_WARN_ONCE("torch_directconv: ", why, "; using PyTorch's convolution");
  // torch's convolution takes a bias of the input's type only; the ops take fp32 too.
  c10::optional<Tensor> b = bias;
  if (b.has_value() && b->defined()) b = b->to(input.scalar_type());
  return torch_conv2d(input, weight, b, stride, padding, dilation, groups, relu, format);
}

// The bias as the kernels' epilogue reads it: fp32, padded with zeros to whole blocks of 32.
Tensor bf16_bias(const c10::optional<Tensor>& bias, int64_t k, const char* op) {
  if (!bias.has_value() || !bias->defined()) return Tensor();
  check_conv_dtype_cpu(*bias, op, "bias");
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == k, op, ": expected 'bias' of shape (", k, "), got ",
              bias->sizes());
  Tensor b = new_zeros({dc::div_up(k, kLanes) * kLanes}, bias->options().dtype(at::kFloat));
  b.narrow(0, 0, k).copy_(*bias);
  return b;
}

dc::DataType weight_type(const Tensor& w) {
  return w.scalar_type() == at::kBFloat16 ? dc::DataType::bf16 : dc::DataType::f32;
}

// (K, C, R, S) fp32 or bf16 weights, any strides, into `packed` (bf16_fwd_weight_elems(d)).
void pack_into(const Tensor& weight, const ConvDesc& d, uint16_t* packed) {
  auto ws = strides4(weight);
  const void* w = weight.const_data_ptr();
  const dc::DataType dt = weight_type(weight);
  run_shares(num_threads(),
             [&](int tid, int nt) { dc::pack_bf16_fwd_weights(d, w, dt, ws.data(), packed, tid, nt); });
}

// input (N, C, H, W) bf16 with any strides: to rows of 32 channels, the kernels with the
// packed weights, and back into an output of `format`.
Tensor bf16_forward(const Tensor& input, const ConvDesc& d, const uint16_t* packed, const c10::optional<Tensor>& bias,
                    bool relu, at::MemoryFormat format) {
  const char* op = "conv2d";
  Tensor b = bf16_bias(bias, d.k, op);
  const int64_t P = d.p(), Q = d.q();
  Tensor out = new_tensor({d.n, d.k, P, Q}, input.options().memory_format(format));
  if (d.n == 0) return out;
  const int nt = num_threads();
  dc::FwdPostOps post_ops;
  post_ops.bias = b.defined();
  post_ops.relu = relu;
  auto prim = dc::get_bf16_fwd_primitive(validated(op, d), nt, dc::DataType::bf16, post_ops);
  const int64_t cb = dc::div_up(d.c, kLanes), kb = dc::div_up(d.k, kLanes);
  // The scratch slots count floats: two bf16 each.
  auto* src = reinterpret_cast<uint16_t*>(scratch(dc::kScratchSrc, dc::div_up(d.n * cb * d.h * d.w * kLanes, 2)));
  auto* dst = reinterpret_cast<uint16_t*>(scratch(dc::kScratchDst, dc::div_up(d.n * kb * P * Q * kLanes, 2)));
  void* copy = prim->plan.scratch_bytes ? scratch(dc::kScratchUnit, dc::div_up(prim->plan.scratch_bytes, 4)) : nullptr;
  auto xs = strides4(input), ys = strides4(out);
  const auto* x = reinterpret_cast<const uint16_t*>(input.const_data_ptr());
  auto* y = reinterpret_cast<uint16_t*>(out.mutable_data_ptr());
  run_shares(nt, [&](int tid, int n) { dc::bf16_to_rows32(x, xs.data(), d.n, d.c, d.h, d.w, src, tid, n); });
  dc::Bf16FwdPostArgs post;
  post.bias = b.defined() ? b.const_data_ptr<float>() : nullptr;
  dc::bf16_fwd_run(*prim, src, packed, post, dst, copy, torch_shares());
  run_shares(nt, [&](int tid, int n) { dc::rows32_to_bf16(dst, d.n, d.k, P, Q, y, ys.data(), tid, n); });
  return out;
}

// The weight description a packing depends on: its shape only.
ConvDesc weight_desc(int64_t k, int64_t c, int64_t r, int64_t s) {
  ConvDesc d;
  d.k = k;
  d.c = c;
  d.r = r;
  d.s = s;
  d.dt = dc::DataType::bf16;
  return d;
}

// pack_weight_bf16's layout back to (K, C, R, S) bf16, for torch's convolution.
Tensor unpack_bf16_weight(const Tensor& packed, int64_t k, int64_t c, int64_t r, int64_t s) {
  const ConvDesc in = dc::bf16_fwd_inner_desc(weight_desc(k, c, r, s));
  const int64_t kb = dc::div_up(in.k, kLanes), cb = dc::div_up(in.c, kLanes);
  // [kb][cb][r][s][half][pair][n][e] -> (k = kb, half, n; c = cb, pair, e).
  Tensor w = packed.view({kb, cb, in.r, in.s, 2, 16, 16, 2})
                 .permute({0, 4, 6, 1, 5, 7, 2, 3})
                 .reshape({kb * kLanes, cb * kLanes, in.r, in.s})
                 .narrow(0, 0, k)
                 .narrow(1, 0, in.c);
  if (!dc::bf16_fwd_folds_columns(weight_desc(k, c, r, s))) return w.contiguous();
  // Folded: inner channel j is kernel column j / C, channel j % C.
  return w.view({k, s, c, r}).permute({0, 2, 3, 1}).contiguous();
}

}  // namespace

Tensor conv2d_bf16(const Tensor& input, const Tensor& weight, const c10::optional<Tensor>& bias,
                   at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                   bool relu) {
  const char* op = "conv2d";
  const at::MemoryFormat format = output_format(input, weight.suggest_memory_format() == at::MemoryFormat::ChannelsLast);
  const ConvDesc d = bf16_desc(op, input.size(0), weight.size(1), input.size(2), input.size(3), weight.size(0),
                               weight.size(2), weight.size(3), stride, padding, dilation);
  if (const std::string why = bf16_reason(d, groups); !why.empty())
    return bf16_on_torch(why, input, weight, bias, stride, padding, dilation, groups, relu, format);
  auto* packed = reinterpret_cast<uint16_t*>(scratch(dc::kScratchWei, dc::div_up(dc::bf16_fwd_weight_elems(d), 2)));
  pack_into(weight, d, packed);
  return bf16_forward(input, d, packed, bias, relu, format);
}

// (K, C, R, S) fp32 or bf16 to the bf16 kernels' packed weights (both levels'), flat
// (bf16_fwd_weight_elems of its shape), rounded to nearest even.
Tensor pack_weight_bf16(const Tensor& weight) {
  const char* op = "pack_weight_bf16";
  check_conv_dtype_cpu(weight, op, "weight");
  TORCH_CHECK(weight.dim() == 4, op, ": expected a 4-D 'weight' (K, C, R, S), got shape ", weight.sizes());
  TORCH_CHECK(weight.numel() > 0, op, ": expected a 'weight' with no empty dimension, got shape ", weight.sizes());
  const ConvDesc d = weight_desc(weight.size(0), weight.size(1), weight.size(2), weight.size(3));
  Tensor out = new_tensor({dc::bf16_fwd_weight_elems(d)}, weight.options().dtype(at::kBFloat16));
  pack_into(weight, d, reinterpret_cast<uint16_t*>(out.mutable_data_ptr()));
  return out;
}

// NCHW bf16 (any strides) in, the input's memory format out (channels_last when asked, as
// torch gives when the weight is), weights packed by pack_weight_bf16 for weight_size.
Tensor conv2d_packed_bf16(const Tensor& input, const Tensor& packed, const c10::optional<Tensor>& bias,
                          at::IntArrayRef weight_size, at::IntArrayRef stride, at::IntArrayRef padding,
                          at::IntArrayRef dilation, bool relu, bool channels_last) {
  dc::ScratchScope call;
  const char* op = "conv2d_packed_bf16";
  TORCH_CHECK(input.device().is_cpu() && input.scalar_type() == at::kBFloat16, op,
              ": expected a bfloat16 'input' on the CPU, got ", input.scalar_type(), " on ", input.device());
  TORCH_CHECK(input.dim() == 4, op, ": expected a 4-D 'input' (N, C, H, W), got shape ", input.sizes());
  TORCH_CHECK(weight_size.size() == 4 && weight_size[0] >= 1 && weight_size[1] >= 1 && weight_size[2] >= 1 &&
                  weight_size[3] >= 1,
              op, ": expected 'weight_size' (K, C, R, S) of positive sizes, got ", weight_size);
  const int64_t k = weight_size[0], c = weight_size[1], r = weight_size[2], s = weight_size[3];
  TORCH_CHECK(input.size(1) == c, op, ": 'input' has ", input.size(1), " channels, but the packed weight expects ", c);
  const int64_t elems = dc::bf16_fwd_weight_elems(weight_desc(k, c, r, s));
  TORCH_CHECK(packed.device().is_cpu() && packed.scalar_type() == at::kBFloat16 && packed.dim() == 1 &&
                  packed.numel() == elems && packed.is_contiguous(),
              op, ": expected a packed 'weight' from pack_weight_bf16 (", elems, " contiguous bfloat16 values for ",
              weight_size, "), got ", packed.scalar_type(), " of shape ", packed.sizes());
  const at::MemoryFormat format = output_format(input, channels_last);
  const ConvDesc d = bf16_desc(op, input.size(0), c, input.size(2), input.size(3), k, r, s, stride, padding, dilation);
  if (const std::string why = bf16_reason(d, 1); !why.empty())
    return bf16_on_torch(why, input, unpack_bf16_weight(packed, k, c, r, s), bias, stride, padding, dilation, 1, relu,
                         format);
  return bf16_forward(input, d, reinterpret_cast<const uint16_t*>(packed.const_data_ptr()), bias, relu, format);
}

// The bf16 gradients of conv2d, each computed only when wanted: on the bf16 input-gradient
// and weight-gradient kernels, through the blocked ops (rows of 32 channels in, the weight
// packed within the call; those fall back to torch's convolution_backward themselves where the
// kernels do not take a geometry), dx in NCHW (the caller gives its memory format) and dW of
// the weight's type (from the kernels' fp32, rounded once). Grouped convolutions, and grad
// tensors that are not 4-D, run ATen's convolution_backward on the same bf16 tensors. Only the
// shape of the operand whose gradient is not asked for matters.
std::tuple<Tensor, Tensor> bf16_conv2d_backward(const Tensor& grad_output, const Tensor& input, const Tensor& weight,
                                                at::IntArrayRef stride, at::IntArrayRef padding,
                                                at::IntArrayRef dilation, int64_t groups, bool want_input,
                                                bool want_weight) {
  if (groups != 1 || grad_output.dim() != 4 || input.dim() != 4 || input.numel() == 0 || grad_output.numel() == 0) {
    auto [gi, gw, unused] =
        aten_backward(grad_output, input, weight, stride, padding, dilation, groups, want_input, want_weight);
    return {gi, gw};
  }
  const int64_t c = weight.size(1);
  const Tensor gyb = to_blocked(grad_output, kLanes);
  Tensor gi, gw;
  if (want_input) {
    const std::vector<int64_t> xb_size{input.size(0), dc::div_up(c, kLanes), input.size(2), input.size(3), kLanes};
    gi = from_blocked(conv2d_blocked_backward_data_bf16(gyb, weight, xb_size, stride, padding, dilation, c), c);
  }
  if (want_weight)
    gw = conv2d_blocked_backward_weight_bf16(gyb, to_blocked(input, kLanes), weight.sizes(), stride, padding, dilation,
                                             c)
             .to(weight.scalar_type());
  return {gi, gw};
}

namespace {

// --- autocast: cast as torch's convolution does (input, weight and bias to the autocast
// type; float64 stays), then run the op below autocast.

using Conv2dFn = Tensor(const Tensor&, const Tensor&, const c10::optional<Tensor>&, at::IntArrayRef, at::IntArrayRef,
                        at::IntArrayRef, int64_t, bool);
using PackedBf16Fn = Tensor(const Tensor&, const Tensor&, const c10::optional<Tensor>&, at::IntArrayRef,
                            at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, bool, bool);

template <typename Fn>
const c10::TypedOperatorHandle<Fn>& find(const char* name) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
  return op;
}

Tensor conv2d_autocast(const Tensor& input, const Tensor& weight, const c10::optional<Tensor>& bias,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                       bool relu) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKey::AutocastCPU);
  const at::ScalarType to = at::autocast::get_autocast_dtype(at::kCPU);
  using at::autocast::cached_cast;
  return find<Conv2dFn>("directconv::conv2d")
      .call(cached_cast(to, input, c10::DeviceType::CPU), cached_cast(to, weight, c10::DeviceType::CPU),
            cached_cast(to, bias, c10::DeviceType::CPU), stride, padding, dilation, groups, relu);
}

// The weight is packed bf16 already; the input and the bias are cast.
Tensor conv2d_packed_bf16_autocast(const Tensor& input, const Tensor& packed, const c10::optional<Tensor>& bias,
                                   at::IntArrayRef weight_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                   at::IntArrayRef dilation, bool relu, bool channels_last) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKey::AutocastCPU);
  const at::ScalarType to = at::autocast::get_autocast_dtype(at::kCPU);
  using at::autocast::cached_cast;
  return find<PackedBf16Fn>("directconv::conv2d_packed_bf16")
      .call(cached_cast(to, input, c10::DeviceType::CPU), packed, cached_cast(to, bias, c10::DeviceType::CPU),
            weight_size, stride, padding, dilation, relu, channels_last);
}

}  // namespace

}  // namespace dc_torch

TORCH_LIBRARY_IMPL(directconv, AutocastCPU, m) {
  m.impl("conv2d", &dc_torch::conv2d_autocast);
  m.impl("conv2d_packed_bf16", &dc_torch::conv2d_packed_bf16_autocast);
}
