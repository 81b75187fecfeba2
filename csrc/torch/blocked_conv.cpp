// The blocked convolution (conv2d_blocked) and its two gradients: blocked in, blocked out, no
// layout conversion.
#include <ATen/ATen.h>

#include <cstring>

#include "common.h"
#include "conv/bwd_data.h"
#include "conv/drivers.h"
#include "conv/fwd_driver.h"
#include "conv/reorder.h"
#include "conv/scratch.h"
#include "jit/isa.h"
#include "ops.h"
#include "threading.h"

namespace dc_torch {

// Blocked in, blocked out: no layout conversion at all.
Tensor conv2d_blocked(const Tensor& input, const Tensor& weight, const c10::optional<Tensor>& bias,
                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, bool relu,
                      c10::optional<int64_t> in_channels) {
  dc::ScratchScope call;
  const char* op = "conv2d_blocked";
  check_float_cpu(input, op, "xb");
  check_float_cpu(weight, op, "wb");
  const int V = dc::vlen(jit_isa());
  TORCH_CHECK(input.dim() == 5 && input.size(4) == V, op, ": expected a blocked 'xb' (N, C/", V, ", H, W, ", V,
              "), got shape ", input.sizes());
  TORCH_CHECK(weight.dim() == 6 && weight.size(4) == V && weight.size(5) == V, op,
              ": expected a blocked 'wb' (K/", V, ", C/", V, ", R, S, ", V, ", ", V, "), got shape ",
              weight.sizes());
  TORCH_CHECK(input.size(1) == weight.size(1), op, ": 'xb' has ", input.size(1), " channel blocks, but 'wb' has ",
              weight.size(1));
  const int64_t cb = input.size(1), kb = weight.size(0);
  int64_t c = cb * V;
  if (in_channels.has_value()) {
    TORCH_CHECK(*in_channels > (cb - 1) * V && *in_channels <= cb * V, op, ": 'in_channels' (", *in_channels,
                ") does not fit ", cb, " channel blocks of ", V);
    c = *in_channels;
  }
  const ConvDesc d = fill_desc(op, input.size(0), c, input.size(2), input.size(3), kb * V, weight.size(2),
                               weight.size(3), stride, padding, dilation);
  Tensor b;
  if (bias.has_value() && bias->defined()) {
    check_float_cpu(*bias, op, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) <= kb * V && bias->size(0) > (kb - 1) * V, op,
                ": expected 'bias' of at most ", kb * V, " values (", kb, " blocks), got shape ", bias->sizes());
    b = padded_bias(bias, bias->size(0), kb * V, op);
  }
  if (!jit_takes(d))
    return block(aten_conv2d(unblock(input, c), unblock_weight(weight).narrow(1, 0, c), b, stride, padding, dilation, 1,
                             relu, at::MemoryFormat::Contiguous),
                 V);
  validated(op, d);
  Tensor x = input.contiguous(), w = weight.contiguous();
  Tensor out = at::empty({d.n, kb, d.p(), d.q(), V}, input.options());
  dc::run_fwd(*dc::get_fwd_primitive(d, jit_isa(), num_threads(), fwd_options()), x.data_ptr<float>(),
              w.data_ptr<float>(), b.defined() ? b.data_ptr<float>() : nullptr, out.data_ptr<float>(), relu, 1, 0, 0, 0,
              0, torch_shares());
  return out;
}

namespace {

// The geometry of a blocked convolution (conv2d_blocked): input (N, Cb, H, W, V) of
// in_channels (default Cb * V) channels, output (N, Kb, P, Q, V).
ConvDesc blocked_desc(const char* op, at::IntArrayRef x_size, int64_t kb, int64_t r, int64_t s,
                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                      c10::optional<int64_t> in_channels, int64_t V) {
  const int64_t cb = x_size[1];
  int64_t c = cb * V;
  if (in_channels.has_value()) {
    TORCH_CHECK(*in_channels > (cb - 1) * V && *in_channels <= cb * V, op, ": 'in_channels' (", *in_channels,
                ") does not fit ", cb, " channel blocks of ", V);
    c = *in_channels;
  }
  return fill_desc(op, x_size[0], c, x_size[2], x_size[3], kb * V, r, s, stride, padding, dilation);
}

void check_blocked_grad_output(const char* op, const Tensor& gy, const ConvDesc& d, int64_t kb, int64_t V) {
  check_float_cpu(gy, op, "grad_output");
  TORCH_CHECK(gy.dim() == 5 && gy.size(0) == d.n && gy.size(1) == kb && gy.size(2) == d.p() && gy.size(3) == d.q() &&
                  gy.size(4) == V,
              op, ": 'grad_output' of shape ", gy.sizes(), " does not match the blocked output (", d.n, ", ", kb, ", ",
              d.p(), ", ", d.q(), ", ", V, ")");
}

}  // namespace

// The input gradient of conv2d_blocked, blocked like its input (input_size: N, Cb, H, W, V).
// Channels past in_channels get a zero gradient, as the forward does not read them.
Tensor conv2d_blocked_backward_data(const Tensor& grad_output, const Tensor& weight, at::IntArrayRef input_size,
                                    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                    c10::optional<int64_t> in_channels) {
  dc::ScratchScope call;
  const char* op = "conv2d_blocked_backward_data";
  const int64_t V = dc::vlen(jit_isa());
  check_float_cpu(weight, op, "wb");
  TORCH_CHECK(input_size.size() == 5 && input_size[4] == V, op, ": expected a blocked 'input_size' (N, C/", V,
              ", H, W, ", V, "), got ", input_size);
  TORCH_CHECK(weight.dim() == 6 && weight.size(1) == input_size[1] && weight.size(4) == V && weight.size(5) == V, op,
              ": expected a blocked 'wb' (K/", V, ", ", input_size[1], ", R, S, ", V, ", ", V, "), got shape ",
              weight.sizes());
  const int64_t kb = weight.size(0), cb = input_size[1];
  ConvDesc d = blocked_desc(op, input_size, kb, weight.size(2), weight.size(3), stride, padding, dilation,
                            in_channels, V);
  check_blocked_grad_output(op, grad_output, d, kb, V);
  if (!jit_takes(d)) {
    ++aten_fallbacks;
    Tensor input = at::empty({d.n, d.c, d.h, d.w}, grad_output.options());
    return block(std::get<0>(aten_backward(unblock(grad_output, kb * V), input,
                                           unblock_weight(weight).narrow(1, 0, d.c), stride, padding, dilation, 1,
                                           true, false)),
                 V);
  }
  validated(op, d);
  Tensor gy = grad_output.contiguous(), w = weight.contiguous();
  Tensor out = at::empty(input_size, gy.options());
  const float* wp = w.data_ptr<float>();
  // One group always fits its blocks, so every geometry has its phases.
  dc::run_bwd_data(
      d, dc::bwd_data_phases(d), gy.data_ptr<float>(), out.data_ptr<float>(), 1, 0, 0,
      [&](const dc::BwdDataPhase& ph, float* dst, int tid, int n_threads) {
        dc::reorder_blocked_weight_to_bwd(wp, kb, cb, d.r, d.s, ph.taps_r.data(), ph.sub.r, ph.taps_s.data(),
                                          ph.sub.s, static_cast<int>(V), dst, tid, n_threads);
      },
      jit_isa(), num_threads(), fwd_options(), torch_shares(),
      [&](const dc::BwdDataPhase& ph, int64_t begin, int64_t end, float* dst) {
        dc::reorder_blocked_weight_to_bwd_blocks(wp, kb, cb, d.r, d.s, ph.taps_r.data(), ph.sub.r, ph.taps_s.data(),
                                                 ph.sub.s, static_cast<int>(V), begin, end, dst);
      });
  if (d.c < cb * V && d.n > 0) out.select(1, cb - 1).narrow(3, d.c - (cb - 1) * V, cb * V - d.c).zero_();
  return out;
}

// The weight gradient of conv2d_blocked, blocked like its weight (weight_size: Kb, Cb, R, S, V, V).
// Input channels past in_channels get a zero gradient.
Tensor conv2d_blocked_backward_weight(const Tensor& grad_output, const Tensor& input, at::IntArrayRef weight_size,
                                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                      c10::optional<int64_t> in_channels) {
  dc::ScratchScope call;
  const char* op = "conv2d_blocked_backward_weight";
  const int64_t V = dc::vlen(jit_isa());
  check_float_cpu(input, op, "xb");
  TORCH_CHECK(input.dim() == 5 && input.size(4) == V, op, ": expected a blocked 'xb' (N, C/", V, ", H, W, ", V,
              "), got shape ", input.sizes());
  TORCH_CHECK(weight_size.size() == 6 && weight_size[1] == input.size(1) && weight_size[4] == V && weight_size[5] == V,
              op, ": expected a blocked 'weight_size' (K/", V, ", ", input.size(1), ", R, S, ", V, ", ", V, "), got ",
              weight_size);
  const int64_t kb = weight_size[0], cb = input.size(1);
  ConvDesc d = blocked_desc(op, input.sizes(), kb, weight_size[2], weight_size[3], stride, padding, dilation,
                            in_channels, V);
  check_blocked_grad_output(op, grad_output, d, kb, V);
  if (!jit_takes(d)) {
    ++aten_fallbacks;
    Tensor weight = at::empty({kb * V, d.c, d.r, d.s}, grad_output.options());
    return block_weight(std::get<1>(aten_backward(unblock(grad_output, kb * V), unblock(input, d.c), weight, stride,
                                                  padding, dilation, 1, false, true)),
                        V);
  }
  validated(op, d);
  Tensor out = at::empty(weight_size, input.options());
  if (d.n == 0) return out.zero_();
  Tensor x = input.contiguous(), gy = grad_output.contiguous();
  const float* dw = dc::run_upd(d, 1, x.data_ptr<float>(), 0, gy.data_ptr<float>(), 0, jit_isa(), num_threads(),
                                torch_shares(), out.data_ptr<float>())
                        .first;
  if (dw != out.data_ptr<float>()) std::memcpy(out.data_ptr<float>(), dw, sizeof(float) * out.numel());
  if (d.c < cb * V) out.select(1, cb - 1).narrow(3, d.c - (cb - 1) * V, cb * V - d.c).zero_();
  return out;
}

}  // namespace dc_torch
