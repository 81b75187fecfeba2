// The blocked convolution (conv2d_blocked, conv2d_blocked_stats) and its two gradients:
// blocked in, blocked out, no layout conversion; the weight blocked, or (K, C, R, S) as a module
// holds it, packed within the call.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstring>
#include <tuple>
#include <utility>

#include "common.h"
#include "conv/bwd_data.h"
#include "conv/drivers.h"
#include "conv/fwd_driver.h"
#include "conv/fwd_stats.h"
#include "conv/reorder.h"
#include "conv/scratch.h"
#include "jit/isa.h"
#include "ops.h"
#include "tensor_pool.h"
#include "threading.h"

namespace dc_torch {

// The weight of a blocked op: blocked (Kb, Cb, R, S, V, V), or (K, C, R, S) as a module holds
// it, which the op packs within its call (no packing pass before it, no blocked weight
// gradient to unpack after it). Checks it against the input's cb channel blocks and returns
// (kb, the input channels read: in_channels, else those of a 4-D weight, else cb * V).
std::pair<int64_t, int64_t> blocked_weight_geometry(const char* op, const char* arg, at::IntArrayRef w, int64_t cb,
                                                    c10::optional<int64_t> in_channels, int64_t V) {
  if (w.size() == 4) {
    TORCH_CHECK(w[0] >= 1 && w[1] > (cb - 1) * V && w[1] <= cb * V, op, ": a (K, C, R, S) '", arg, "' of shape ", w,
                " does not fit ", cb, " input channel blocks of ", V);
    TORCH_CHECK(!in_channels.has_value() || *in_channels == w[1], op, ": 'in_channels' (", in_channels.value_or(0),
                ") differs from the ", w[1], " input channels of the (K, C, R, S) '", arg, "'");
    return {dc::div_up(w[0], V), w[1]};
  }
  TORCH_CHECK(w.size() == 6 && w[4] == V && w[5] == V, op, ": expected a blocked '", arg, "' (K/", V, ", C/", V, ", R, S, ",
              V, ", ", V, ") or a (K, C, R, S) one, got ", w);
  TORCH_CHECK(w[1] == cb, op, ": 'xb' has ", cb, " channel blocks, but '", arg, "' has ", w[1]);
  int64_t c = cb * V;
  if (in_channels.has_value()) {
    TORCH_CHECK(*in_channels > (cb - 1) * V && *in_channels <= cb * V, op, ": 'in_channels' (", *in_channels,
                ") does not fit ", cb, " channel blocks of ", V);
    c = *in_channels;
  }
  return {w[0], c};
}

namespace {

// A (K, C, R, S) weight with its output channels zero-padded to kb * V, for torch's convolution.
Tensor padded_out_channels(const Tensor& w, int64_t kb, int64_t V) {
  return at::constant_pad_nd(w, {0, 0, 0, 0, 0, 0, 0, kb * V - w.size(0)});
}

// The checked operands of a blocked convolution: its geometry (validated only when the
// kernels take it), its bias padded to whole blocks, and whether its weight is (K, C, R, S).
struct BlockedConv {
  ConvDesc d;
  Tensor bias;
  int64_t c, cb, kb;
  int V;
  bool kcrs;
};
BlockedConv check_blocked_conv(const char* op, const Tensor& input, const Tensor& weight,
                               const c10::optional<Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, c10::optional<int64_t> in_channels) {
  check_float_cpu(input, op, "xb");
  check_float_cpu(weight, op, "wb");
  const int V = dc::vlen(jit_isa());
  TORCH_CHECK(input.dim() == 5 && input.size(4) == V, op, ": expected a blocked 'xb' (N, C/", V, ", H, W, ", V,
              "), got shape ", input.sizes());
  const int64_t cb = input.size(1);
  const auto [kb, c] = blocked_weight_geometry(op, "wb", weight.sizes(), cb, in_channels, V);
  BlockedConv bc{fill_desc(op, input.size(0), c, input.size(2), input.size(3), kb * V, weight.size(2),
                           weight.size(3), stride, padding, dilation),
                 Tensor(), c, cb, kb, V, weight.dim() == 4};
  if (bias.has_value() && bias->defined()) {
    check_float_cpu(*bias, op, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) <= kb * V && bias->size(0) > (kb - 1) * V, op,
                ": expected 'bias' of at most ", kb * V, " values (", kb, " blocks), got shape ", bias->sizes());
    bc.bias = padded_bias(bias, bias->size(0), kb * V, op);
  }
  return bc;
}

// Torch's convolution for the blocked geometries the kernels do not take, blocked again.
Tensor aten_conv2d_blocked(const BlockedConv& bc, const Tensor& input, const Tensor& weight, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation) {
  const Tensor w = bc.kcrs ? padded_out_channels(weight, bc.kb, bc.V) : unblock_weight(weight).narrow(1, 0, bc.c);
  return block(aten_conv2d(unblock(input, bc.c), w, bc.bias, stride, padding, dilation, 1, false,
                           at::MemoryFormat::Contiguous),
               bc.V);
}

// The forward of a checked blocked convolution into out: a blocked weight as it is; a
// (K, C, R, S) one packed within the call, by each work unit for its own output channels
// where the plan allows, else in one pass into scratch (kept between calls, so no fresh pages
// to fault in).
void run_blocked_fwd(const BlockedConv& bc, const dc::FwdHandle& handle, const Tensor& x, const Tensor& weight,
                     const dc::FwdPostArgs& post, float* out) {
  const ConvDesc& d = bc.d;
  const int64_t V = bc.V;
  if (!bc.kcrs) {
    const Tensor w = weight.contiguous();
    dc::run_fwd(handle, x.data_ptr<float>(), w.data_ptr<float>(), post, out, 1, 0, 0, 0, 0, torch_shares());
    return;
  }
  const float* w = weight.data_ptr<float>();
  const auto ws = strides4(weight);
  const int64_t k = weight.size(0);
  const dc::PackBlockRange pack = [&](int64_t begin, int64_t end, float* dst) {
    dc::reorder_weight_to_blocked_blocks(w, ws.data(), k, bc.c, d.r, d.s, V, begin, end, dst);
  };
  if (dc::one_unit_per_kgroup(handle.prim->plan)) {
    dc::run_fwd(handle, x.data_ptr<float>(), nullptr, post, out, 1, 0, 0, 0, 0, torch_shares(), pack);
    return;
  }
  float* wei = scratch(dc::kScratchWei, bc.kb * bc.cb * d.r * d.s * V * V);
  run_shares(num_threads(), [&](int tid, int n_threads) {
    const int64_t blocks = bc.kb * bc.cb, begin = blocks * tid / n_threads, end = blocks * (tid + 1) / n_threads;
    pack(begin, end, wei + begin * d.r * d.s * V * V);
  });
  dc::run_fwd(handle, x.data_ptr<float>(), wei, post, out, 1, 0, 0, 0, 0, torch_shares());
}

}  // namespace

std::atomic<int64_t> conv_stats_recomputed{0};

// Blocked in, blocked out: no layout conversion at all.
Tensor conv2d_blocked(const Tensor& input, const Tensor& weight, const c10::optional<Tensor>& bias,
                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, bool relu,
                      c10::optional<int64_t> in_channels, const c10::optional<Tensor>& residual) {
  if (input.scalar_type() == at::kBFloat16)
    return conv2d_blocked_bf16(input, weight, bias, stride, padding, dilation, relu, in_channels, residual);
  dc::ScratchScope call;
  const char* op = "conv2d_blocked";
  const BlockedConv bc = check_blocked_conv(op, input, weight, bias, stride, padding, dilation, in_channels);
  const ConvDesc& d = bc.d;
  // The residual is added after the bias and before the ReLU, in the epilogue.
  Tensor res;
  auto check_residual = [&](at::IntArrayRef out_shape) {
    TORCH_CHECK(res.sizes() == out_shape, op, ": expected a blocked 'residual' of the output's shape ", out_shape,
                ", got ", res.sizes());
  };
  if (residual.has_value() && residual->defined()) {
    check_float_cpu(*residual, op, "residual");
    res = residual->contiguous();
  }
  if (!jit_takes(d)) {
    Tensor y = aten_conv2d_blocked(bc, input, weight, stride, padding, dilation);
    if (res.defined()) {
      check_residual(y.sizes());
      y.add_(res);
    }
    return relu ? y.relu_() : y;
  }
  validated(op, d);
  if (res.defined()) check_residual({d.n, bc.kb, d.p(), d.q(), bc.V});
  Tensor x = input.contiguous();
  Tensor out = new_tensor({d.n, bc.kb, d.p(), d.q(), bc.V}, input.options());
  auto handle = dc::get_fwd_handle(d, jit_isa(), num_threads(), fwd_options(bc.bias.defined(), res.defined(), relu));
  run_blocked_fwd(bc, *handle, x, weight,
                  {bc.bias.defined() ? bc.bias.data_ptr<float>() : nullptr, res.defined() ? res.data_ptr<float>() : nullptr},
                  out.data_ptr<float>());
  return out;
}

// The same (no ReLU, no residual) with the per-channel batch statistics of the output, biased
// variance, from the kernels' epilogue (conv/fwd_stats.h); where a mean lies too far from its
// `shift` for the fp32 tile sums, they are recomputed exactly by bn_stats_blocked.
std::tuple<Tensor, Tensor, Tensor> conv2d_blocked_stats(const Tensor& input, const Tensor& weight,
                                                        const c10::optional<Tensor>& bias, at::IntArrayRef stride,
                                                        at::IntArrayRef padding, at::IntArrayRef dilation,
                                                        c10::optional<int64_t> in_channels, const Tensor& shift,
                                                        int64_t channels) {
  if (input.scalar_type() == at::kBFloat16)
    return conv2d_blocked_stats_bf16(input, weight, bias, stride, padding, dilation, in_channels, shift, channels);
  dc::ScratchScope call;
  const char* op = "conv2d_blocked_stats";
  const BlockedConv bc = check_blocked_conv(op, input, weight, bias, stride, padding, dilation, in_channels);
  const ConvDesc& d = bc.d;
  TORCH_CHECK(channels > (bc.kb - 1) * bc.V && channels <= bc.kb * bc.V, op, ": 'channels' (", channels,
              ") does not fit ", bc.kb, " output blocks of ", bc.V);
  check_float_cpu(shift, op, "shift");
  TORCH_CHECK(shift.dim() == 1 && shift.size(0) == channels, op, ": expected 'shift' of shape (", channels, "), got ",
              shift.sizes());
  static const auto bn_stats = c10::Dispatcher::singleton()
                                   .findSchemaOrThrow("directconv::bn_stats_blocked", "")
                                   .typed<std::tuple<Tensor, Tensor>(const Tensor&, int64_t)>();
  if (!jit_takes(d)) {
    Tensor y = aten_conv2d_blocked(bc, input, weight, stride, padding, dilation);
    auto [mean, var] = bn_stats.call(y, channels);
    return {y, mean, var};
  }
  validated(op, d);
  Tensor x = input.contiguous();
  Tensor out = new_tensor({d.n, bc.kb, d.p(), d.q(), bc.V}, input.options());
  Tensor mean = new_tensor({channels}, input.options()), var = new_tensor({channels}, input.options());
  if (d.n == 0) return {out, mean.fill_(NAN), var.fill_(NAN)};
  dc::FwdPlanOptions options = fwd_options(bc.bias.defined(), false, false);
  options.post.stats = true;
  auto handle = dc::get_fwd_handle(d, jit_isa(), num_threads(), options);
  const dc::FwdPrimitive* prim = handle->prim.get();
  Tensor shift_blk = padded_bias(shift, channels, bc.kb * bc.V, op);
  // The tiles' sums, in the calling thread's scratch (this op converts no layout, and packs a
  // (K, C, R, S) weight into another slot): no fresh pages at every call.
  float* sums = scratch(dc::kScratchDst, prim->plan.stats_floats);
  run_blocked_fwd(bc, *handle, x, weight,
                  {bc.bias.defined() ? bc.bias.data_ptr<float>() : nullptr, nullptr, shift_blk.data_ptr<float>(), sums},
                  out.data_ptr<float>());
  if (!dc::fwd_stats_finish(prim->plan, sums, shift_blk.data_ptr<float>(), channels, mean.data_ptr<float>(),
                            var.data_ptr<float>())) {
    ++conv_stats_recomputed;
    std::tie(mean, var) = bn_stats.call(out, channels);
  }
  return {out, mean, var};
}


namespace {

// The geometry of a blocked convolution (conv2d_blocked): input (N, Cb, H, W, V) of c
// channels (blocked_weight_geometry), output (N, Kb, P, Q, V).
ConvDesc blocked_desc(const char* op, at::IntArrayRef x_size, int64_t kb, int64_t r, int64_t s,
                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t c,
                      int64_t V) {
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

// The input gradient of conv2d_blocked, blocked like its input (input_size: N, Cb, H, W, V),
// with its weight blocked or (K, C, R, S) as conv2d_blocked takes it.
// Channels past in_channels get a zero gradient, as the forward does not read them.
Tensor conv2d_blocked_backward_data(const Tensor& grad_output, const Tensor& weight, at::IntArrayRef input_size,
                                    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                    c10::optional<int64_t> in_channels) {
  if (grad_output.scalar_type() == at::kBFloat16)
    return conv2d_blocked_backward_data_bf16(grad_output, weight, input_size, stride, padding, dilation, in_channels);
  dc::ScratchScope call;
  const char* op = "conv2d_blocked_backward_data";
  const int64_t V = dc::vlen(jit_isa());
  check_float_cpu(weight, op, "wb");
  TORCH_CHECK(input_size.size() == 5 && input_size[4] == V, op, ": expected a blocked 'input_size' (N, C/", V,
              ", H, W, ", V, "), got ", input_size);
  const int64_t cb = input_size[1];
  const std::pair<int64_t, int64_t> geometry = blocked_weight_geometry(op, "wb", weight.sizes(), cb, in_channels, V);
  const int64_t kb = geometry.first, c = geometry.second;
  const bool kcrs = weight.dim() == 4;
  ConvDesc d = blocked_desc(op, input_size, kb, weight.size(2), weight.size(3), stride, padding, dilation, c, V);
  check_blocked_grad_output(op, grad_output, d, kb, V);
  if (!jit_takes(d)) {
    ++aten_fallbacks;
    Tensor input = new_tensor({d.n, d.c, d.h, d.w}, grad_output.options());
    Tensor w = kcrs ? padded_out_channels(weight, kb, V) : unblock_weight(weight).narrow(1, 0, d.c);
    return block(std::get<0>(aten_backward(unblock(grad_output, kb * V), input, w, stride, padding, dilation, 1, true,
                                           false)),
                 V);
  }
  validated(op, d);
  Tensor gy = grad_output.contiguous(), w = kcrs ? weight : weight.contiguous();
  Tensor out = new_tensor(input_size, gy.options());
  const float* wp = w.data_ptr<float>();
  auto ws = strides4(w);
  const int64_t k = w.size(0);
  // One group always fits its blocks, so every geometry has its phases.
  dc::run_bwd_data(
      d, dc::bwd_data_phases(d), gy.data_ptr<float>(), out.data_ptr<float>(), 1, 0, 0,
      [&](const dc::BwdDataPhase& ph, float* dst, int tid, int n_threads) {
        if (kcrs)
          dc::reorder_weight_to_blocked_bwd(wp, ws.data(), k, c, d.r, d.s, ph.taps_r.data(), ph.sub.r,
                                            ph.taps_s.data(), ph.sub.s, static_cast<int>(V), dst, tid, n_threads);
        else
          dc::reorder_blocked_weight_to_bwd(wp, kb, cb, d.r, d.s, ph.taps_r.data(), ph.sub.r, ph.taps_s.data(),
                                            ph.sub.s, static_cast<int>(V), dst, tid, n_threads);
      },
      jit_isa(), num_threads(), fwd_options(), torch_shares(),
      [&](const dc::BwdDataPhase& ph, int64_t begin, int64_t end, float* dst) {
        if (kcrs)
          dc::reorder_weight_to_blocked_bwd_blocks(wp, ws.data(), k, c, d.r, d.s, ph.taps_r.data(), ph.sub.r,
                                                   ph.taps_s.data(), ph.sub.s, static_cast<int>(V), begin, end, dst);
        else
          dc::reorder_blocked_weight_to_bwd_blocks(wp, kb, cb, d.r, d.s, ph.taps_r.data(), ph.sub.r, ph.taps_s.data(),
                                                   ph.sub.s, static_cast<int>(V), begin, end, dst);
      });
  if (d.c < cb * V && d.n > 0) out.select(1, cb - 1).narrow(3, d.c - (cb - 1) * V, cb * V - d.c).zero_();
  return out;
}

// The weight gradient of conv2d_blocked: blocked when weight_size is (Kb, Cb, R, S, V, V),
// (K, C, R, S) when it is that, written straight from the kernels' blocks (no blocked
// gradient to unpack). Input channels past in_channels get a zero gradient.
Tensor conv2d_blocked_backward_weight(const Tensor& grad_output, const Tensor& input, at::IntArrayRef weight_size,
                                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                      c10::optional<int64_t> in_channels) {
  if (grad_output.scalar_type() == at::kBFloat16)
    return conv2d_blocked_backward_weight_bf16(grad_output, input, weight_size, stride, padding, dilation,
                                               in_channels);
  dc::ScratchScope call;
  const char* op = "conv2d_blocked_backward_weight";
  const int64_t V = dc::vlen(jit_isa());
  check_float_cpu(input, op, "xb");
  TORCH_CHECK(input.dim() == 5 && input.size(4) == V, op, ": expected a blocked 'xb' (N, C/", V, ", H, W, ", V,
              "), got shape ", input.sizes());
  TORCH_CHECK(weight_size.size() == 4 || weight_size.size() == 6, op,
              ": expected a 'weight_size' of 6 values (blocked) or 4 (K, C, R, S), got ", weight_size);
  const int64_t cb = input.size(1);
  const std::pair<int64_t, int64_t> geometry = blocked_weight_geometry(op, "weight_size", weight_size, cb, in_channels, V);
  const int64_t kb = geometry.first, c = geometry.second;
  const bool kcrs = weight_size.size() == 4;
  ConvDesc d = blocked_desc(op, input.sizes(), kb, weight_size[2], weight_size[3], stride, padding, dilation, c, V);
  check_blocked_grad_output(op, grad_output, d, kb, V);
  if (!jit_takes(d)) {
    ++aten_fallbacks;
    Tensor weight = new_tensor({kb * V, d.c, d.r, d.s}, grad_output.options());
    Tensor gw = std::get<1>(aten_backward(unblock(grad_output, kb * V), unblock(input, d.c), weight, stride, padding,
                                          dilation, 1, false, true));
    return kcrs ? gw.narrow(0, 0, weight_size[0]).contiguous() : block_weight(gw, V);
  }
  validated(op, d);
  Tensor out = new_tensor(weight_size, input.options());
  if (d.n == 0) return out.zero_();
  Tensor x = input.contiguous(), gy = grad_output.contiguous();
  if (kcrs) {
    const float* dw =
        dc::run_upd(d, 1, x.data_ptr<float>(), 0, gy.data_ptr<float>(), 0, jit_isa(), num_threads(), torch_shares())
            .first;
    auto ws = strides4(out);
    run_shares(num_threads(), [&](int tid, int n_threads) {
      dc::reorder_weight_from_blocked(dw, weight_size[0], c, d.r, d.s, static_cast<int>(V), out.data_ptr<float>(),
                                      ws.data(), tid, n_threads);
    });
    return out;
  }
  const float* dw = dc::run_upd(d, 1, x.data_ptr<float>(), 0, gy.data_ptr<float>(), 0, jit_isa(), num_threads(),
                                torch_shares(), out.data_ptr<float>())
                        .first;
  if (dw != out.data_ptr<float>()) std::memcpy(out.data_ptr<float>(), dw, sizeof(float) * out.numel());
  if (d.c < cb * V) out.select(1, cb - 1).narrow(3, d.c - (cb - 1) * V, cb * V - d.c).zero_();
  return out;
}

}  // namespace dc_torch
