// The drop-in and packed NCHW convolutions (conv2d, conv2d_packed, pack_weight): NCHW in,
// NCHW out, through the blocked kernels, the depthwise kernels or the NCHW 1x1 GEMM.
#include <ATen/ATen.h>

#include "common.h"
#include "conv/drivers.h"
#include "conv/dw_conv.h"
#include "conv/fwd_driver.h"
#include "conv/paths.h"
#include "conv/reorder.h"
#include "conv/scratch.h"
#include "jit/isa.h"
#include "ops.h"
#include "tensor_pool.h"
#include "threading.h"

namespace dc_torch {

// (G, Kb, Cb, R, S, V, V) from (K, C/G, R, S); depthwise weights (C, 1, R, S), with one
// output channel per group, become (Cb, R, S, V) instead.
Tensor pack_weight(const Tensor& weight, int64_t groups) {
  const char* op = "pack_weight";
  check_float_cpu(weight, op, "weight");
  TORCH_CHECK(weight.dim() == 4, op, ": expected a 4-D 'weight' (K, C/groups, R, S), got shape ", weight.sizes());
  TORCH_CHECK(groups >= 1 && weight.size(0) % groups == 0, op, ": 'groups' (", groups,
              ") must divide the output channels (", weight.size(0), ")");
  const int V = dc::vlen(jit_isa());
  if (is_depthwise(weight, groups)) {
    const int64_t c = weight.size(0), r = weight.size(2), s = weight.size(3);
    Tensor out = new_tensor({dc::div_up(c, V), r, s, V}, weight.options());
    auto st = strides4(weight);
    run_shares(num_threads(), [&](int tid, int nt) {
      dc::reorder_dw_weight_to_blocked(weight.data_ptr<float>(), st.data(), c, r, s, V, out.data_ptr<float>(), tid, nt);
    });
    return out;
  }
  const int64_t kg = weight.size(0) / groups, c = weight.size(1), r = weight.size(2), s = weight.size(3);
  const int64_t kb = dc::div_up(kg, V), cb = dc::div_up(c, V);
  Tensor out = new_tensor({groups, kb, cb, r, s, V, V}, weight.options());
  auto st = strides4(weight);
  const float* src = weight.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const int64_t per_group = kb * cb * r * s * V * V;
  run_shares(num_threads(), [&](int tid, int nt) {
    for (int64_t g = 0; g < groups; ++g)
      dc::reorder_weight_to_blocked(src + g * kg * st[0], st.data(), kg, c, r, s, V, dst + g * per_group, tid, nt);
  });
  return out;
}

// Depthwise: input (N, C, H, W) any strides, packed weight (Cb, R, S, V).
Tensor depthwise_packed(const Tensor& input, const Tensor& weight, const c10::optional<Tensor>& bias,
                        int64_t out_channels, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                        int64_t groups, bool relu, bool channels_last, int V) {
  const char* op = "conv2d";
  const int64_t c = input.size(1);
  TORCH_CHECK(groups == c && out_channels == c, op, ": a packed depthwise 'weight' needs groups == input channels == ",
              "output channels, got groups=", groups, ", ", c, " input and ", out_channels, " output channels");
  TORCH_CHECK(weight.size(0) == dc::div_up(c, V) && weight.size(3) == V && weight.is_contiguous(), op,
              ": expected a packed depthwise 'weight' (C/", V, ", R, S, ", V, ") for ", c, " channels, got shape ",
              weight.sizes());
  ConvDesc d = make_desc(op, input.size(0), c, input.size(2), input.size(3), c, weight.size(1), weight.size(2), stride,
                         padding, dilation);
  const int64_t cb = weight.size(0), P = d.p(), Q = d.q();
  Tensor b = padded_bias(bias, c, cb * V, op);
  Tensor out = new_tensor({d.n, c, P, Q}, input.options().memory_format(output_format(input, channels_last)));
  if (d.n == 0) return out;
  float* src_blk = scratch(dc::kScratchSrc, d.n * cb * d.h * d.w * V);
  float* dst_blk = scratch(dc::kScratchDst, d.n * cb * P * Q * V);
  auto xs = strides4(input), ys = strides4(out);
  auto prim = dc::get_dw_primitive(d, jit_isa(), num_threads());
  const int nt = prim->plan.threads;
  const dc::DwKernels kernels = dc::acquire_kernels(*prim);
  const float* x = input.data_ptr<float>();
  float* y = out.data_ptr<float>();
  run_shares(nt, [&](int tid, int n_threads) { dc::reorder_to_blocked(x, xs.data(), d.n, c, d.h, d.w, V, src_blk, tid, n_threads); });
  run_shares(nt, [&](int tid, int) {
    dc::dw_execute(*prim, kernels, src_blk, weight.data_ptr<float>(), b.defined() ? b.data_ptr<float>() : nullptr, dst_blk, relu,
                   tid);
  });
  run_shares(nt, [&](int tid, int n_threads) { dc::reorder_from_blocked(dst_blk, d.n, c, P, Q, V, y, ys.data(), tid, n_threads); });
  return out;
}

namespace {

// NCHW (any strides) in, NCHW out (channels_last when asked), through the blocked kernels
// (dc::fwd_nchw_via_blocks). The weights are `packed` (every group, as pack_weight gives
// them), or, when that is null, packed at this call by `pack` (one group).
Tensor conv2d_via_blocks(const Tensor& input, const ConvDesc& d, int64_t groups, int64_t out_channels,
                         const c10::optional<Tensor>& bias, bool relu, bool channels_last, const float* packed,
                         const dc::PackBlockRange& pack) {
  const char* op = "conv2d";
  const int V = dc::vlen(jit_isa());
  const int64_t kg = d.k, kb = dc::div_up(kg, V), P = d.p(), Q = d.q();
  Tensor b = padded_bias(bias, out_channels, out_channels, op);
  Tensor bias_blk;
  if (b.defined() && groups == 1 && kg == kb * V) {
    bias_blk = b;  // whole blocks already (padded_bias made it contiguous)
  } else if (b.defined()) {
    bias_blk = new_zeros({groups, kb * V}, b.options());
    bias_blk.narrow(1, 0, kg).copy_(b.view({groups, kg}));
  }
  Tensor out = new_tensor({d.n, out_channels, P, Q}, input.options().memory_format(output_format(input, channels_last)));
  if (d.n == 0) return out;
  auto handle = dc::get_fwd_handle(d, jit_isa(), num_threads(), fwd_options(b.defined(), false, relu));
  auto xs = strides4(input), ys = strides4(out);
  dc::fwd_nchw_via_blocks(*handle, groups, input.data_ptr<float>(), xs.data(), packed, pack,
                          bias_blk.defined() ? bias_blk.data_ptr<float>() : nullptr, out.data_ptr<float>(),
                          ys.data(), torch_shares());
  return out;
}

}  // namespace

// NCHW (any strides) in, NCHW out (channels_last when the input is), weights pre-packed.
Tensor conv2d_packed(const Tensor& input, const Tensor& weight, const c10::optional<Tensor>& bias, int64_t out_channels,
                     at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                     bool relu, bool channels_last) {
  dc::ScratchScope call;
  const char* op = "conv2d";
  check_float_cpu(input, op, "input");
  check_float_cpu(weight, op, "weight");
  TORCH_CHECK(input.dim() == 4, op, ": expected a 4-D 'input' (N, C, H, W), got shape ", input.sizes());
  const int V = dc::vlen(jit_isa());
  if (weight.dim() == 4) {
    // Depthwise (Cb, R, S, V): back to (C, 1, R, S) where the kernels cannot take it.
    const int64_t c = input.size(1), r = weight.size(1), s = weight.size(2);
    if (!jit_takes(fill_desc(op, input.size(0), c, input.size(2), input.size(3), c, r, s, stride, padding, dilation)))
      return aten_conv2d(input, weight.permute({0, 3, 1, 2}).reshape({-1, r, s}).narrow(0, 0, c).unsqueeze(1), bias,
                         stride, padding, dilation, groups, relu, output_format(input, channels_last));
    return depthwise_packed(input, weight, bias, out_channels, stride, padding, dilation, groups, relu, channels_last, V);
  }
  TORCH_CHECK(weight.dim() == 7 && weight.size(5) == V && weight.size(6) == V, op,
              ": expected a packed 'weight' (groups, K/", V, ", C/", V, ", R, S, ", V, ", ", V, "), got shape ",
              weight.sizes());
  TORCH_CHECK(groups >= 1 && weight.size(0) == groups, op, ": packed 'weight' holds ", weight.size(0),
              " groups, but 'groups' is ", groups);
  TORCH_CHECK(input.size(1) % groups == 0, op, ": 'groups' (", groups, ") must divide the input channels (",
              input.size(1), ")");
  TORCH_CHECK(out_channels % groups == 0, op, ": 'groups' (", groups, ") must divide the output channels (",
              out_channels, ")");
  const int64_t cg = input.size(1) / groups, kg = out_channels / groups;
  TORCH_CHECK(dc::div_up(cg, V) == weight.size(2) && dc::div_up(kg, V) == weight.size(1), op, ": 'input' has ",
              input.size(1), " channels and ", out_channels, " output channels in ", groups,
              " groups, which does not match the packed 'weight' of shape ", weight.sizes());
  TORCH_CHECK(weight.is_contiguous(), op, ": the packed 'weight' must be contiguous");
  if (!jit_takes(fill_desc(op, input.size(0), cg, input.size(2), input.size(3), kg, weight.size(3), weight.size(4),
                           stride, padding, dilation)))
    return aten_conv2d(input, unpack_weight(weight, kg, cg), bias, stride, padding, dilation, groups, relu,
                       output_format(input, channels_last));
  ConvDesc d = make_desc(op, input.size(0), cg, input.size(2), input.size(3), kg, weight.size(3), weight.size(4),
                         stride, padding, dilation);
  return conv2d_via_blocks(input, d, groups, out_channels, bias, relu, channels_last, weight.data_ptr<float>(),
                           nullptr);
}

// 1x1, stride 1, no padding, NCHW in and out: the GEMM plan (make_fwd_plan_nchw_1x1) reads
// the weights and the input as they are and writes the output in place, with no packing
// and no layout conversion. Empty when it does not apply.
Tensor conv2d_nchw_1x1(const Tensor& input, const Tensor& weight, const c10::optional<Tensor>& bias,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, bool relu) {
  const dc::Isa isa = jit_isa();
  if (weight.size(2) != 1 || weight.size(3) != 1 || !input.is_contiguous() || !weight.is_contiguous() ||
      output_format(input, weight.suggest_memory_format() == at::MemoryFormat::ChannelsLast) !=
          at::MemoryFormat::Contiguous)
    return Tensor();
  const int64_t k = weight.size(0);
  ConvDesc d = make_desc("conv2d", input.size(0), input.size(1), input.size(2), input.size(3), k, 1, 1, stride,
                         padding, dilation);
  if (!dc::nchw_1x1_applies(d, isa)) return Tensor();
  Tensor b = padded_bias(bias, k, k, "conv2d");
  Tensor out = new_tensor({d.n, k, d.h, d.w}, input.options());
  if (b.defined()) out.copy_(b.view({1, k, 1, 1}).expand_as(out));  // the kernels add to it
  auto prim = dc::get_fwd_nchw_1x1_primitive(d, isa, num_threads(), b.defined(), relu);
  const int nt = prim->plan.threads;
  const dc::FwdKernels kernels = dc::acquire_kernels(*prim);
  dc::FwdWorkQueue queue(nt);
  const float* w = weight.data_ptr<float>();
  const float* x = input.data_ptr<float>();
  float* y = out.data_ptr<float>();
  run_shares(nt, [&](int tid, int) {
    dc::fwd_execute(*prim, kernels, w, x, {}, y, tid, nt > 1 ? &queue : nullptr);
  });
  return out;
}

Tensor conv2d(const Tensor& input, const Tensor& weight, const c10::optional<Tensor>& bias, at::IntArrayRef stride,
              at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool relu) {
  dc::ScratchScope call;
  const char* op = "conv2d";
  check_conv_dtype_cpu(weight, op, "weight");
  TORCH_CHECK(weight.dim() == 4, op, ": expected a 4-D 'weight' (K, C/groups, R, S), got shape ", weight.sizes());
  TORCH_CHECK(input.dim() == 4, op, ": expected a 4-D 'input' (N, C, H, W), got shape ", input.sizes());
  TORCH_CHECK(groups >= 1, op, ": expected 'groups' >= 1, got ", groups);
  TORCH_CHECK(input.size(1) == weight.size(1) * groups, op, ": 'input' has ", input.size(1),
              " channels, but 'weight' expects ", weight.size(1) * groups, " (", weight.size(1), " per group x ",
              groups, " groups)");
  check_conv_dtype_cpu(input, op, "input");
  TORCH_CHECK(input.scalar_type() == weight.scalar_type(), op, ": 'input' (", input.scalar_type(), ") and 'weight' (",
              weight.scalar_type(), ") must have the same dtype");
  TORCH_CHECK(weight.size(0) >= 1, op, ": expected 'weight' with at least one output channel, got shape ",
              weight.sizes());
  if (weight.scalar_type() == at::kBFloat16)
    return conv2d_bf16(input, weight, bias, stride, padding, dilation, groups, relu);
  const bool weight_channels_last = weight.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
  if (weight.size(0) % groups != 0 ||
      !jit_takes(fill_desc(op, input.size(0), weight.size(1), input.size(2), input.size(3), weight.size(0) / groups,
                           weight.size(2), weight.size(3), stride, padding, dilation)))
    return aten_conv2d(input, weight, bias, stride, padding, dilation, groups, relu,
                       output_format(input, weight_channels_last));
  // The NCHW 1x1 GEMM on images of 28x28 and more; on smaller ones it has too few pixels
  // per output channel, and the blocked kernels with their conversions measured faster.
  if (groups == 1 && input.size(2) * input.size(3) >= dc::kNchwGemmMinPixels)
    if (Tensor y = conv2d_nchw_1x1(input, weight, bias, stride, padding, dilation, relu); y.defined()) return y;
  if (groups > 1)
    return conv2d_packed(input, pack_weight(weight, groups), bias, weight.size(0), stride, padding, dilation, groups,
                         relu, weight_channels_last);
  // One group: the weights are packed within the call, by the work units where they can.
  const int64_t k = weight.size(0), c = weight.size(1), r = weight.size(2), s = weight.size(3);
  ConvDesc d = make_desc(op, input.size(0), c, input.size(2), input.size(3), k, r, s, stride, padding, dilation);
  auto ws = strides4(weight);
  const float* w = weight.data_ptr<float>();
  const int V = dc::vlen(jit_isa());
  return conv2d_via_blocks(input, d, 1, k, bias, relu, weight_channels_last, nullptr,
                           [&](int64_t begin, int64_t end, float* dst) {
                             dc::reorder_weight_to_blocked_blocks(w, ws.data(), k, c, r, s, V, begin, end, dst);
                           });
}

}  // namespace dc_torch
