// The blocked convolution ops on bf16 tensors: activations (N, ceil(C/32), H, W, 32) bf16
// (the AMX kernels' rows of 32 channels), weights (K, C, R, S) fp32 or bf16 (cast and
// packed within the call) or bf16 blocked (to_blocked_weight(w, 32): the forward kernels'
// packed pairs of the layer's own geometry), on the forward, input-gradient and
// weight-gradient kernels (conv/bf16_fwd.h, conv/bf16_bwd_data.h, conv/bf16_upd.h). Where
// the kernels do not take a geometry or the level lacks them (conv/paths.h), torch's bf16
// convolution runs on the unblocked tensors, blocked again.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <memory>
#include <string>
#include <tuple>

#include "common.h"
#include "conv/bf16_bwd_primitives.h"
#include "conv/bf16_fwd.h"
#include "conv/bf16_pack.h"
#include "conv/paths.h"
#include "jit/amx_fwd_kernel.h"
#include "jit/isa.h"
#include "ops.h"
#include "tensor_pool.h"
#include "threading.h"

namespace dc_torch {

namespace {

constexpr int64_t kLanes = dc::kAmxBlock;

void check_bf16(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kBFloat16, op, ": expected a bfloat16 '", name,
              "' (the bf16 blocked layout, as 'xb' is), got ", t.scalar_type(), " on ", t.device());
}

// The weight of a bf16 blocked op: (K, C, R, S) fp32 or bf16, or blocked bf16.
void check_bf16_weight(const Tensor& w, const char* op) {
  check_conv_dtype_cpu(w, op, "wb");
  TORCH_CHECK(w.dim() != 6 || w.scalar_type() == at::kBFloat16, op,
              ": a blocked 'wb' for bfloat16 activations must be bfloat16 (to_blocked_weight of the weight), got ",
              w.scalar_type());
}

dc::Bf16PackSource pack_source(const Tensor& w) {
  dc::Bf16PackSource src;
  src.w = w.const_data_ptr();
  src.dt = w.scalar_type() == at::kBFloat16 ? dc::DataType::bf16 : dc::DataType::f32;
  src.k = w.size(0), src.c = w.size(1), src.r = w.size(2), src.s = w.size(3);
  for (int i = 0; i < 4; ++i) src.st[i] = w.stride(i);
  return src;
}

// A blocked bf16 weight (Kb, Cb, R, S, 32, 32), [kb][cb][r][s][half][pair][n][e], as a
// (Kb * 32, Cb * 32, R, S) view-then-copy: k = kb, half, n; c = cb, pair, e.
Tensor unblocked_bf16_weight(const Tensor& wb) {
  const int64_t kb = wb.size(0), cb = wb.size(1), r = wb.size(2), s = wb.size(3);
  return wb.contiguous()
      .view({kb, cb, r, s, 2, 16, 16, 2})
      .permute({0, 4, 6, 1, 5, 7, 2, 3})
      .reshape({kb * kLanes, cb * kLanes, r, s});
}

// (K, C, R, S) fp32 or bf16, any strides, into out: the forward's packed pairs of the
// layer's own geometry (unfolded) or the folded one.
void pack_fwd_into(const Tensor& w, bool folded, uint16_t* out) {
  const dc::Bf16PackSource src = pack_source(w);
  run_shares(num_threads(), [&](int tid, int nt) { dc::pack_bf16_fwd(src, folded, out, tid, nt); });
}

uint16_t* bf16_ptr(const Tensor& t) { return reinterpret_cast<uint16_t*>(t.mutable_data_ptr()); }
const uint16_t* bf16_cptr(const Tensor& t) { return reinterpret_cast<const uint16_t*>(t.const_data_ptr()); }
uint16_t* bf16_scratch(dc::ScratchSlot slot, int64_t elems) {
  return reinterpret_cast<uint16_t*>(scratch(slot, dc::div_up(elems, 2)));  // the slots count floats
}

// The checked operands: the geometry (d.k: K of a (K, C, R, S) weight, Kb * 32 of a blocked
// one), and why the kernels do not take it ("" when they do).
struct Bf16Conv {
  ConvDesc d;
  int64_t c, cb, kb;
  bool kcrs;
  std::string fallback;
};

Bf16Conv bf16_conv(const char* op, at::IntArrayRef x_size, const char* w_arg, at::IntArrayRef w_size,
                   at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                   c10::optional<int64_t> in_channels) {
  TORCH_CHECK(x_size.size() == 5 && x_size[4] == kLanes, op, ": expected a bfloat16 blocked 'xb' (N, C/", kLanes,
              ", H, W, ", kLanes, "), got shape ", x_size);
  const int64_t cb = x_size[1];
  const auto [kb, c] = blocked_weight_geometry(op, w_arg, w_size, cb, in_channels, kLanes);
  Bf16Conv bc{fill_desc(op, x_size[0], c, x_size[2], x_size[3], w_size.size() == 4 ? w_size[0] : kb * kLanes,
                        w_size[2], w_size[3], stride, padding, dilation),
              c, cb, kb, w_size.size() == 4, ""};
  bc.d.dt = dc::DataType::bf16;
  bc.fallback = dc::bf16_conv_fallback_reason(dc::active_isa(), dc::detected_isa(), bc.d);
  return bc;
}

void note_fallback(const std::string& why) {
  ++aten_fallbacks;
  TORCH_WARN_ONCE("torch_directconv: ", why, "; using PyTorch's convolution");
}

// The weight as torch's convolution takes it: (Kb * 32, c, R, S) bf16, output channels
// zero-padded to whole blocks.
Tensor torch_weight(const Bf16Conv& bc, const Tensor& weight) {
  if (!bc.kcrs) return unblocked_bf16_weight(weight).narrow(1, 0, bc.c);
  return at::constant_pad_nd(weight.to(at::kBFloat16), {0, 0, 0, 0, 0, 0, 0, bc.kb * kLanes - weight.size(0)});
}

// The bias as the epilogue reads it: fp32, zero-padded to whole blocks.
Tensor bf16_epilogue_bias(const c10::optional<Tensor>& bias, int64_t kb, const char* op) {
  if (!bias.has_value() || !bias->defined()) return Tensor();
  check_conv_dtype_cpu(*bias, op, "bias");
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) <= kb * kLanes && bias->size(0) > (kb - 1) * kLanes, op,
              ": expected 'bias' of at most ", kb * kLanes, " values (", kb, " blocks), got shape ", bias->sizes());
  // Already padded (optimize() keeps its folded biases so): read as it is.
  if (bias->scalar_type() == at::kFloat && bias->size(0) == kb * kLanes && bias->is_contiguous()) return *bias;
  Tensor b = new_zeros({kb * kLanes}, bias->options().dtype(at::kFloat));
  b.narrow(0, 0, bias->size(0)).copy_(*bias);
  return b;
}

// Torch's bf16 convolution on the unblocked tensors, blocked again; the bias, the residual
// and the ReLU after it in fp32, rounded once more.
Tensor torch_forward(const Bf16Conv& bc, const Tensor& input, const Tensor& weight, const Tensor& bias,
                     const Tensor& res, bool relu, at::IntArrayRef stride, at::IntArrayRef padding,
                     at::IntArrayRef dilation) {
  note_fallback(bc.fallback);
  Tensor y = block(torch_conv2d(unblock(input, bc.c), torch_weight(bc, weight), c10::nullopt, stride, padding,
                                dilation, 1, false, at::MemoryFormat::Contiguous),
                   kLanes);
  if (!bias.defined() && !res.defined()) return relu ? y.relu_() : y;
  Tensor y32 = y.to(at::kFloat);
  if (bias.defined()) y32.add_(bias.view({1, bc.kb, 1, 1, kLanes}));
  if (res.defined()) y32.add_(res);
  if (relu) y32.relu_();
  return y32.to(at::kBFloat16);
}

// The batch statistics of a forward from the stats post-op: the shift (fp32, padded to whole
// blocks) the kernels sum y - shift from, and the slots they fill.
struct Bf16Stats {
  Tensor shift;
  float* sums = nullptr;
  const dc::Bf16FwdPlan* plan = nullptr;  // set by kernel_forward: the plan that filled them
  std::shared_ptr<const dc::Bf16FwdPrimitive> prim_held;  // keeps `plan` alive
};

// The forward on the kernels: a blocked weight as it is (repacked for a folded geometry), a
// (K, C, R, S) one cast and packed within the call; with `stats`, the stats post-op too.
Tensor kernel_forward(const char* op, const Bf16Conv& bc, const Tensor& input, const Tensor& weight,
                      const Tensor& bias, const Tensor& res, bool relu, Bf16Stats* stats = nullptr) {
  const ConvDesc& d = validated(op, bc.d);
  Tensor out = new_tensor({d.n, bc.kb, d.p(), d.q(), kLanes}, input.options());
  if (d.n == 0) return out;
  const int nt = num_threads();
  dc::FwdPostOps post_ops;
  post_ops.bias = bias.defined();
  post_ops.add = res.defined();
  post_ops.relu = relu;
  post_ops.stats = stats != nullptr;
  auto prim = dc::get_bf16_fwd_primitive(d, nt, dc::DataType::bf16, post_ops);
  const bool folded = dc::bf16_fwd_folds_columns(d);
  const uint16_t* wei;
  Tensor w_held;
  if (!bc.kcrs && !folded) {
    w_held = weight.contiguous();
    wei = bf16_cptr(w_held);
  } else {
    uint16_t* packed = bf16_scratch(dc::kScratchWei, dc::bf16_fwd_weight_elems(d));
    pack_fwd_into(bc.kcrs ? weight : unblocked_bf16_weight(weight).narrow(1, 0, bc.c), folded, packed);
    wei = packed;
  }
  void* copy = prim->plan.scratch_bytes ? scratch(dc::kScratchUnit, dc::div_up(prim->plan.scratch_bytes, 4)) : nullptr;
  Tensor x = input.contiguous();
  dc::Bf16FwdPostArgs post;
  post.bias = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
  post.residual = res.defined() ? res.const_data_ptr() : nullptr;
  if (stats) {
    // The slots, in the calling thread's scratch (the packing and the copy use other slots):
    // no fresh pages at every call.
    stats->sums = scratch(dc::kScratchDst, prim->plan.stats_floats);
    stats->plan = &prim->plan;
    post.shift = stats->shift.const_data_ptr<float>();
    post.sums = stats->sums;
  }
  dc::bf16_fwd_run(*prim, bf16_cptr(x), wei, post, out.mutable_data_ptr(), copy, torch_shares());
  if (stats) stats->prim_held = prim;
  return out;
}

// The forward; with `stats` (given when the active level's kernels have the stats post-op),
// the statistics from the kernels' epilogue where the kernels run: stats->plan stays null when
// the call went to torch's convolution.
Tensor forward(const char* op, const Tensor& input, const Tensor& weight, const c10::optional<Tensor>& bias,
               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, bool relu,
               c10::optional<int64_t> in_channels, const c10::optional<Tensor>& residual,
               Bf16Stats* stats = nullptr) {
  check_bf16(input, op, "xb");
  check_bf16_weight(weight, op);
  const Bf16Conv bc = bf16_conv(op, input.sizes(), "wb", weight.sizes(), stride, padding, dilation, in_channels);
  const Tensor b = bf16_epilogue_bias(bias, bc.kb, op);
  Tensor res;
  if (residual.has_value() && residual->defined()) {
    check_bf16(*residual, op, "residual");
    const std::vector<int64_t> shape{bc.d.n, bc.kb, bc.d.p(), bc.d.q(), kLanes};
    TORCH_CHECK(residual->sizes() == at::IntArrayRef(shape), op, ": expected a blocked 'residual' of the output's shape ",
                shape, ", got ", residual->sizes());
    res = residual->contiguous();
  }
  if (!bc.fallback.empty()) return torch_forward(bc, input, weight, b, res, relu, stride, padding, dilation);
  if (stats && bc.d.n == 0) stats = nullptr;  // no pixels: the statistics are NaN
  if (stats) {
    // The shift as the epilogue reads it: fp32, zero-padded to whole blocks.
    const int64_t channels = stats->shift.size(0);
    TORCH_CHECK(channels > (bc.kb - 1) * kLanes && channels <= bc.kb * kLanes, op, ": 'channels' (", channels,
                ") does not fit ", bc.kb, " output blocks of ", kLanes);
    Tensor padded = new_zeros({bc.kb * kLanes}, stats->shift.options().dtype(at::kFloat));
    padded.narrow(0, 0, channels).copy_(stats->shift);
    stats->shift = padded;
  }
  return kernel_forward(op, bc, input, weight, b, res, relu, stats);
}

void check_grad_output(const char* op, const Tensor& gy, const Bf16Conv& bc) {
  check_bf16(gy, op, "grad_output");
  const ConvDesc& d = bc.d;
  TORCH_CHECK(gy.dim() == 5 && gy.size(0) == d.n && gy.size(1) == bc.kb && gy.size(2) == d.p() &&
                  gy.size(3) == d.q() && gy.size(4) == kLanes,
              op, ": 'grad_output' of shape ", gy.sizes(), " does not match the blocked output (", d.n, ", ", bc.kb,
              ", ", d.p(), ", ", d.q(), ", ", kLanes, ")");
}

}  // namespace

Tensor conv2d_blocked_bf16(const Tensor& input, const Tensor& weight, const c10::optional<Tensor>& bias,
                           at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, bool relu,
                           c10::optional<int64_t> in_channels, const c10::optional<Tensor>& residual) {
  dc::ScratchScope call;
  return forward("conv2d_blocked", input, weight, bias, stride, padding, dilation, relu, in_channels, residual);
}

// The statistics of the output as stored (its bf16 values, which the batch norm normalizes):
// mean and biased variance in fp32 of the first `channels`, from the kernels' epilogue where
// the level has the stats post-op (relative to `shift`; recomputed exactly where a mean lies
// too far from it, as the fp32 op does), else from one more pass (bn_stats_blocked).
std::tuple<Tensor, Tensor, Tensor> conv2d_blocked_stats_bf16(const Tensor& input, const Tensor& weight,
                                                             const c10::optional<Tensor>& bias, at::IntArrayRef stride,
                                                             at::IntArrayRef padding, at::IntArrayRef dilation,
                                                             c10::optional<int64_t> in_channels, const Tensor& shift,
                                                             int64_t channels) {
  dc::ScratchScope call;
  const char* op = "conv2d_blocked_stats";
  check_conv_dtype_cpu(shift, op, "shift");
  TORCH_CHECK(shift.dim() == 1 && shift.size(0) == channels, op, ": expected 'shift' of shape (", channels, "), got ",
              shift.sizes());
  static const auto bn_stats = c10::Dispatcher::singleton()
                                   .findSchemaOrThrow("directconv::bn_stats_blocked", "")
                                   .typed<std::tuple<Tensor, Tensor>(const Tensor&, int64_t)>();
  Bf16Stats stats;
  stats.shift = shift;
  const bool epilogue = dc::bf16_fwd_has_stats(dc::active_isa());
  Tensor y = forward(op, input, weight, bias, stride, padding, dilation, false, in_channels, c10::nullopt,
                     epilogue ? &stats : nullptr);
  TORCH_CHECK(channels > (y.size(1) - 1) * kLanes && channels <= y.size(1) * kLanes, op, ": 'channels' (", channels,
              ") does not fit ", y.size(1), " output blocks of ", kLanes);
  if (stats.plan != nullptr) {
    Tensor mean = new_tensor({channels}, shift.options().dtype(at::kFloat));
    Tensor var = new_tensor({channels}, shift.options().dtype(at::kFloat));
    if (dc::bf16_fwd_stats_finish(*stats.plan, stats.sums, stats.shift.const_data_ptr<float>(), channels,
                                  mean.data_ptr<float>(), var.data_ptr<float>()))
      return {y, mean, var};
    ++conv_stats_recomputed;
  }
  auto [mean, var] = bn_stats.call(y, channels);
  return {y, mean, var};
}

// dx bf16 blocked like the input (every lane written, those past in_channels zero), on the
// input-gradient kernels with the weight packed within the call.
Tensor conv2d_blocked_backward_data_bf16(const Tensor& grad_output, const Tensor& weight, at::IntArrayRef input_size,
                                         at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                         c10::optional<int64_t> in_channels) {
  dc::ScratchScope call;
  const char* op = "conv2d_blocked_backward_data";
  check_bf16_weight(weight, op);
  TORCH_CHECK(input_size.size() == 5 && input_size[4] == kLanes, op, ": expected a blocked 'input_size' (N, C/",
              kLanes, ", H, W, ", kLanes, "), got ", input_size);
  const Bf16Conv bc = bf16_conv(op, input_size, "wb", weight.sizes(), stride, padding, dilation, in_channels);
  check_grad_output(op, grad_output, bc);
  const ConvDesc& d = bc.d;
  if (!bc.fallback.empty()) {
    note_fallback(bc.fallback);
    Tensor input = new_tensor({d.n, bc.c, d.h, d.w}, grad_output.options());
    return block(std::get<0>(aten_backward(unblock(grad_output, bc.kb * kLanes), input, torch_weight(bc, weight),
                                           stride, padding, dilation, 1, true, false)),
                 kLanes);
  }
  validated(op, d);
  Tensor out = new_tensor(input_size, grad_output.options());
  if (d.n == 0) return out;
  const int nt = num_threads();
  auto prim = dc::get_bf16_bwd_data_primitive(d, nt, dc::DataType::bf16);
  uint16_t* packed = bf16_scratch(dc::kScratchWei, prim->plan.weight_elems);
  const Tensor w = bc.kcrs ? weight : unblocked_bf16_weight(weight).narrow(1, 0, bc.c);
  const dc::Bf16PackSource src = pack_source(w);
  run_shares(nt, [&](int tid, int n) { dc::pack_bf16_bwd_data(d, src, packed, tid, n); });
  void* sc = prim->plan.scratch_bytes ? scratch(dc::kScratchUnit, dc::div_up(prim->plan.scratch_bytes, 4)) : nullptr;
  const Tensor gy = grad_output.contiguous();
  dc::bf16_bwd_data_run(*prim, bf16_cptr(gy), packed, out.mutable_data_ptr(), sc, torch_shares());
  return out;
}

// dW: (K, C, R, S) fp32 for a 4-D weight_size (fp32 master weights; autograd casts it to a
// bf16 weight's type), the blocked bf16 layout for a blocked one. Input channels past
// in_channels get zero gradients.
Tensor conv2d_blocked_backward_weight_bf16(const Tensor& grad_output, const Tensor& input, at::IntArrayRef weight_size,
                                           at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                           c10::optional<int64_t> in_channels) {
  dc::ScratchScope call;
  const char* op = "conv2d_blocked_backward_weight";
  check_bf16(input, op, "xb");
  TORCH_CHECK(weight_size.size() == 4 || weight_size.size() == 6, op,
              ": expected a 'weight_size' of 6 values (blocked) or 4 (K, C, R, S), got ", weight_size);
  const Bf16Conv bc = bf16_conv(op, input.sizes(), "weight_size", weight_size, stride, padding, dilation, in_channels);
  check_grad_output(op, grad_output, bc);
  const ConvDesc& d = bc.d;
  const auto f32 = input.options().dtype(at::kFloat);
  // The (d.k, c, R, S) gradient, then the layout asked for.
  Tensor gw;
  if (!bc.fallback.empty()) {
    note_fallback(bc.fallback);
    Tensor weight = new_tensor({d.k, bc.c, d.r, d.s}, grad_output.options());
    gw = std::get<1>(aten_backward(unblock(grad_output, d.k), unblock(input, bc.c),
                                   weight, stride, padding, dilation, 1, false, true));
    if (bc.kcrs) return gw.to(at::kFloat);
  } else {
    validated(op, d);
    gw = new_tensor({d.k, bc.c, d.r, d.s}, bc.kcrs ? f32 : input.options());
    if (d.n == 0) {
      gw.zero_();
    } else {
      const int nt = num_threads();
      auto prim = dc::get_bf16_upd_primitive(d, nt, bc.kcrs ? dc::DataType::f32 : dc::DataType::bf16);
      void* sc = scratch(dc::kScratchUnit, dc::div_up(prim->plan.scratch_bytes, 4));
      const Tensor x = input.contiguous(), gy = grad_output.contiguous();
      dc::bf16_upd_run(*prim, bf16_cptr(x), bf16_cptr(gy), gw.mutable_data_ptr(), sc, torch_shares());
    }
    if (bc.kcrs) return gw;
  }
  Tensor out = new_tensor(weight_size, input.options());
  pack_fwd_into(gw, false, bf16_ptr(out));
  return out;
}

// (K, C, R, S) fp32 or bf16 to (ceil(K/32), ceil(C/32), R, S, 32, 32) bf16: the forward
// kernels' packed pairs of the layer's own geometry, rounded to nearest even.
Tensor to_blocked_weight_bf16(const Tensor& w) {
  const char* op = "to_blocked_weight";
  check_conv_dtype_cpu(w, op, "w");
  TORCH_CHECK(w.dim() == 4, op, ": expected a 4-D 'w' (K, C, R, S), got shape ", w.sizes());
  const int64_t k = w.size(0), c = w.size(1), r = w.size(2), s = w.size(3);
  Tensor out = new_tensor({dc::div_up(k, kLanes), dc::div_up(c, kLanes), r, s, kLanes, kLanes},
                          w.options().dtype(at::kBFloat16));
  if (out.numel() > 0) pack_fwd_into(w, false, bf16_ptr(out));
  return out;
}

// Its inverse: bf16 (k, c, R, S).
Tensor from_blocked_weight_bf16(const Tensor& wb, int64_t k, int64_t c) {
  const char* op = "from_blocked_weight";
  TORCH_CHECK(wb.dim() == 6 && wb.size(4) == kLanes && wb.size(5) == kLanes, op,
              ": expected a bfloat16 blocked 'wb' (K/32, C/32, R, S, 32, 32), got shape ", wb.sizes());
  TORCH_CHECK(k > (wb.size(0) - 1) * kLanes && k <= wb.size(0) * kLanes, op, ": 'k' (", k, ") does not fit ",
              wb.size(0), " blocks of ", kLanes);
  TORCH_CHECK(c > (wb.size(1) - 1) * kLanes && c <= wb.size(1) * kLanes, op, ": 'c' (", c, ") does not fit ",
              wb.size(1), " blocks of ", kLanes);
  return unblocked_bf16_weight(wb).narrow(0, 0, k).narrow(1, 0, c).contiguous();
}

}  // namespace dc_torch
