// The torch layer of the blocked element-wise and pooling ops (conv/blocked_eltwise.h,
// conv/blocked_pool.h): schemas, argument checks, Tensor -> pointers, threads. Every op takes
// contiguous-able fp32 blocked tensors (N, C/V, H, W, V), V = the active ISA's vector width,
// and the real channel count C.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <tuple>
#include <vector>

#include "common.h"
#include "conv/blocked_eltwise.h"
#include "conv/blocked_pool.h"
#include "jit/isa.h"
#include "tensor_pool.h"
#include "threading.h"

namespace dc_torch {

using at::Tensor;

namespace {

int blocked_vlen(const char* op) { return dc::vlen(jit_isa(op)); }

// A blocked activation of `channels` real channels, as its shape.
dc::BlockedShape blocked_shape(const char* op, const char* name, const Tensor& t, int64_t channels) {
  const int v = blocked_vlen(op);
  check_float_cpu(t, op, name);
  TORCH_CHECK(t.dim() == 5 && t.size(4) == v, op, ": expected a blocked '", name, "' (N, C/", v, ", H, W, ", v,
              "), got shape ", t.sizes());
  const int64_t cb = t.size(1);
  TORCH_CHECK(cb == 0 ? channels == 0 : channels > (cb - 1) * v && channels <= cb * v, op, ": 'channels' (", channels,
              ") does not fit the ", cb, " channel blocks of ", v, " of '", name, "' (expected ",
              cb == 0 ? 0 : (cb - 1) * v + 1, " to ", cb * v, ")");
  return {t.size(0), channels, t.size(2), t.size(3), v};
}

void check_like(const char* op, const char* name, const Tensor& t, const Tensor& like, const char* like_name) {
  check_float_cpu(t, op, name);
  TORCH_CHECK(t.sizes() == like.sizes(), op, ": expected '", name, "' of the shape of '", like_name, "' ", like.sizes(),
              ", got ", t.sizes());
}

// A per-channel vector (C,), contiguous on return; null pointer when absent.
const float* channel_vector(const char* op, const char* name, const c10::optional<Tensor>& t, int64_t channels,
                            Tensor* keep) {
  if (!t.has_value() || !t->defined()) return nullptr;
  check_float_cpu(*t, op, name);
  TORCH_CHECK(t->dim() == 1 && t->size(0) == channels, op, ": expected '", name, "' of shape (", channels, "), got ",
              t->sizes());
  *keep = t->contiguous();
  return keep->data_ptr<float>();
}

const float* optional_like(const char* op, const char* name, const c10::optional<Tensor>& t, const Tensor& like,
                           const char* like_name, Tensor* keep) {
  if (!t.has_value() || !t->defined()) return nullptr;
  check_like(op, name, *t, like, like_name);
  *keep = t->contiguous();
  return keep->data_ptr<float>();
}

int threads_for(int64_t floats) { return dc::eltwise_threads(floats, num_threads()); }

// 2 values (int[2] in the schema).
void check_pair(const char* op, const char* name, at::IntArrayRef v) {
  TORCH_CHECK(v.size() == 2, op, ": expected '", name, "' of 2 values, got ", v);
}

dc::PoolDesc pool_desc(const char* op, const dc::BlockedShape& in, at::IntArrayRef kernel, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation, bool ceil_mode) {
  check_pair(op, "kernel_size", kernel);
  check_pair(op, "stride", stride);
  check_pair(op, "padding", padding);
  check_pair(op, "dilation", dilation);
  dc::PoolDesc d;
  d.in = in;
  d.kh = kernel[0];
  d.kw = kernel[1];
  d.sh = stride[0];
  d.sw = stride[1];
  d.ph = padding[0];
  d.pw = padding[1];
  d.dh = dilation[0];
  d.dw = dilation[1];
  d.ceil_mode = ceil_mode;
  const std::string err = d.validate();
  TORCH_CHECK(err.empty(), op, ": ", err);
  return d;
}

Tensor blocked_like(const Tensor& t, const dc::BlockedShape& s) {
  return new_tensor({s.n, s.cb(), s.h, s.w, s.v}, t.options());
}

}  // namespace

// ---- batch norm ---------------------------------------------------------------------------

std::tuple<Tensor, Tensor> bn_stats_blocked(const Tensor& xb, int64_t channels) {
  const char* op = "bn_stats_blocked";
  const dc::BlockedShape s = blocked_shape(op, "xb", xb, channels);
  Tensor x = xb.contiguous();
  Tensor mean = new_tensor({channels}, xb.options()), var = new_tensor({channels}, xb.options());
  const int nt = threads_for(x.numel());
  const int64_t size = dc::bn_stats_partial_size(s);
  std::vector<double> partials(nt * size);
  const float* xp = x.data_ptr<float>();
  if (s.pixels() > 0)
    run_shares(nt, [&](int tid, int n) { dc::bn_stats_share(s, xp, partials.data() + tid * size, tid, n); });
  dc::bn_stats_finish(s, xp, partials.data(), nt, mean.data_ptr<float>(), var.data_ptr<float>());
  return {mean, var};
}

namespace {

Tensor run_apply(const char* op, const Tensor& xb, const dc::BlockedShape& s, const dc::ChannelAffine& a,
                 const c10::optional<Tensor>& residual, bool relu) {
  Tensor x = xb.contiguous(), r;
  const float* rp = optional_like(op, "residual", residual, xb, "xb", &r);
  Tensor y = blocked_like(xb, s);
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  run_shares(threads_for(x.numel()), [&](int tid, int n) { dc::bn_apply_share(s, a, xp, rp, relu, yp, tid, n); });
  return y;
}

}  // namespace

Tensor bn_apply_blocked(const Tensor& xb, const Tensor& scale, const Tensor& shift,
                        const c10::optional<Tensor>& residual, bool relu, int64_t channels) {
  const char* op = "bn_apply_blocked";
  const dc::BlockedShape s = blocked_shape(op, "xb", xb, channels);
  Tensor sc, sh;
  const float* scp = channel_vector(op, "scale", scale, channels, &sc);
  const float* shp = channel_vector(op, "shift", shift, channels, &sh);
  return run_apply(op, xb, s, dc::scale_shift_affine(channels, s.v, scp, shp), residual, relu);
}

Tensor batch_norm_blocked(const Tensor& xb, const Tensor& mean, const Tensor& var, const c10::optional<Tensor>& weight,
                          const c10::optional<Tensor>& bias, const c10::optional<Tensor>& residual, double eps,
                          bool relu, bool train, int64_t channels) {
  const char* op = "batch_norm_blocked";
  (void)train;  // the forward is the same in both modes; only the backward differs
  const dc::BlockedShape s = blocked_shape(op, "xb", xb, channels);
  Tensor m, v, w, b;
  const float* mp = channel_vector(op, "mean", mean, channels, &m);
  const float* vp = channel_vector(op, "var", var, channels, &v);
  const float* wp = channel_vector(op, "weight", weight, channels, &w);
  const float* bp = channel_vector(op, "bias", bias, channels, &b);
  return run_apply(op, xb, s, dc::bn_affine(channels, s.v, mp, vp, eps, wp, bp), residual, relu);
}

// In place: the running statistics and the batch counter, as nn.BatchNorm2d updates them after a
// training batch of `count` values per channel with batch mean and biased variance (the rule:
// dc::running_stats_factor, dc::update_running_stats). One call, not a chain of small ops.
void bn_update_running_stats(const c10::optional<Tensor>& running_mean, const c10::optional<Tensor>& running_var,
                             const c10::optional<Tensor>& num_batches_tracked, const Tensor& mean, const Tensor& var,
                             int64_t count, c10::optional<double> momentum) {
  const char* op = "bn_update_running_stats";
  check_float_cpu(mean, op, "mean");
  TORCH_CHECK(mean.dim() == 1, op, ": expected a 1-D 'mean' (C,), got shape ", mean.sizes());
  const int64_t c = mean.size(0);
  Tensor m, v, dummy;
  const float* mp = channel_vector(op, "mean", mean, c, &m);
  const float* vp = channel_vector(op, "var", var, c, &v);
  // The running statistics are written where they are: they must be contiguous already.
  auto running = [&](const c10::optional<Tensor>& t, const char* name) -> float* {
    if (!t.has_value() || !t->defined()) return nullptr;
    channel_vector(op, name, t, c, &dummy);
    TORCH_CHECK(t->is_contiguous(), op, ": expected a contiguous '", name, "'");
    return t->data_ptr<float>();
  };
  float* rm = running(running_mean, "running_mean");
  float* rv = running(running_var, "running_var");
  int64_t* batches = nullptr;
  if (num_batches_tracked.has_value() && num_batches_tracked->defined()) {
    const Tensor& t = *num_batches_tracked;
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong && t.numel() == 1, op,
                ": expected 'num_batches_tracked' to be a CPU int64 tensor of one element, got ", t.scalar_type(),
                " of shape ", t.sizes());
    batches = t.data_ptr<int64_t>();
  }
  const double factor = dc::running_stats_factor(momentum.has_value(), momentum.value_or(0.0), batches);
  dc::update_running_stats(c, mp, vp, count, factor, rm, rv);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> bn_backward_blocked(const Tensor& grad_y, const c10::optional<Tensor>& yb,
                                                               const Tensor& xb, const Tensor& mean, const Tensor& var,
                                                               const c10::optional<Tensor>& weight, double eps,
                                                               bool train, int64_t channels,
                                                               std::array<bool, 4> output_mask) {
  const char* op = "bn_backward_blocked";
  dc::BnBackwardArgs a;
  a.shape = blocked_shape(op, "xb", xb, channels);
  check_like(op, "grad_y", grad_y, xb, "xb");
  Tensor gy = grad_y.contiguous(), x = xb.contiguous(), y, m, v, w;
  a.grad_y = gy.data_ptr<float>();
  a.y = optional_like(op, "yb", yb, xb, "xb", &y);
  a.x = x.data_ptr<float>();
  a.mean = channel_vector(op, "mean", mean, channels, &m);
  a.var = channel_vector(op, "var", var, channels, &v);
  a.weight = channel_vector(op, "weight", weight, channels, &w);
  a.eps = eps;
  a.train = train;
  // Gradients not asked for are empty (0,) tensors, never computed.
  const Tensor none = new_tensor({0}, xb.options());
  Tensor gx = output_mask[0] ? blocked_like(xb, a.shape) : none;
  Tensor gw = output_mask[1] ? new_tensor({channels}, xb.options()) : none;
  Tensor gb = output_mask[2] ? new_tensor({channels}, xb.options()) : none;
  Tensor gr = output_mask[3] ? blocked_like(xb, a.shape) : none;
  a.grad_x = output_mask[0] ? gx.data_ptr<float>() : nullptr;
  a.grad_weight = output_mask[1] ? gw.data_ptr<float>() : nullptr;
  a.grad_bias = output_mask[2] ? gb.data_ptr<float>() : nullptr;
  a.grad_residual = output_mask[3] ? gr.data_ptr<float>() : nullptr;
  dc::BnBackward bwd(a);
  const int nt = threads_for(3 * x.numel());
  std::vector<double> partials(nt * bwd.partial_size());
  for (int pass = 0; pass < bwd.passes(); ++pass) {
    if (a.shape.pixels() > 0)
      run_shares(nt, [&](int tid, int n) { bwd.run_share(pass, partials.data() + tid * bwd.partial_size(), tid, n); });
    bwd.finish_pass(pass, partials.data(), nt);
  }
  return {gx, gw, gb, gr};
}

// ---- pooling ------------------------------------------------------------------------------

Tensor max_pool2d_blocked(const Tensor& xb, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation, bool ceil_mode, int64_t channels) {
  const char* op = "max_pool2d_blocked";
  const dc::PoolDesc d =
      pool_desc(op, blocked_shape(op, "xb", xb, channels), kernel_size, stride, padding, dilation, ceil_mode);
  Tensor x = xb.contiguous(), y = blocked_like(xb, d.out());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  run_shares(threads_for(x.numel()), [&](int tid, int n) { dc::max_pool_fwd_share(d, xp, yp, tid, n); });
  return y;
}

// yb is the forward's output (of this xb and geometry): the backward finds each window's
// argmax as the first tap equal to it, so no indices are kept.
Tensor max_pool2d_blocked_backward(const Tensor& grad_output, const Tensor& xb, const Tensor& yb,
                                   at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                   at::IntArrayRef dilation, bool ceil_mode, int64_t channels) {
  const char* op = "max_pool2d_blocked_backward";
  const dc::PoolDesc d =
      pool_desc(op, blocked_shape(op, "xb", xb, channels), kernel_size, stride, padding, dilation, ceil_mode);
  Tensor expect = blocked_like(xb, d.out());
  check_like(op, "grad_output", grad_output, expect, "the output");
  check_like(op, "yb", yb, expect, "the output");
  Tensor x = xb.contiguous(), y = yb.contiguous(), gy = grad_output.contiguous(), gx = blocked_like(xb, d.in);
  const float *xp = x.data_ptr<float>(), *yp = y.data_ptr<float>(), *gyp = gy.data_ptr<float>();
  float* gxp = gx.data_ptr<float>();
  run_shares(threads_for(2 * x.numel()), [&](int tid, int n) { dc::max_pool_bwd_share(d, xp, yp, gyp, gxp, tid, n); });
  return gx;
}

namespace {

dc::AvgPoolOpts avg_opts(const char* op, bool count_include_pad, c10::optional<int64_t> divisor_override) {
  TORCH_CHECK(!divisor_override.has_value() || *divisor_override != 0, op, ": 'divisor_override' must not be zero");
  return {count_include_pad, divisor_override.value_or(0)};
}

}  // namespace

Tensor avg_pool2d_blocked(const Tensor& xb, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                          at::IntArrayRef padding, bool ceil_mode, bool count_include_pad,
                          c10::optional<int64_t> divisor_override, int64_t channels) {
  const char* op = "avg_pool2d_blocked";
  const dc::PoolDesc d =
      pool_desc(op, blocked_shape(op, "xb", xb, channels), kernel_size, stride, padding, {1, 1}, ceil_mode);
  const dc::AvgPoolOpts o = avg_opts(op, count_include_pad, divisor_override);
  Tensor x = xb.contiguous(), y = blocked_like(xb, d.out());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  run_shares(threads_for(x.numel()), [&](int tid, int n) { dc::avg_pool_fwd_share(d, o, xp, yp, tid, n); });
  return y;
}

Tensor avg_pool2d_blocked_backward(const Tensor& grad_output, at::IntArrayRef input_size, at::IntArrayRef kernel_size,
                                   at::IntArrayRef stride, at::IntArrayRef padding, bool ceil_mode,
                                   bool count_include_pad, c10::optional<int64_t> divisor_override, int64_t channels) {
  const char* op = "avg_pool2d_blocked_backward";
  Tensor gx = new_tensor(input_size, grad_output.options());
  const dc::PoolDesc d =
      pool_desc(op, blocked_shape(op, "input_size", gx, channels), kernel_size, stride, padding, {1, 1}, ceil_mode);
  const dc::AvgPoolOpts o = avg_opts(op, count_include_pad, divisor_override);
  Tensor expect = blocked_like(gx, d.out());
  check_like(op, "grad_output", grad_output, expect, "the output");
  Tensor gy = grad_output.contiguous();
  const float* gyp = gy.data_ptr<float>();
  float* gxp = gx.data_ptr<float>();
  run_shares(threads_for(gx.numel()), [&](int tid, int n) { dc::avg_pool_bwd_share(d, o, gyp, gxp, tid, n); });
  return gx;
}

Tensor global_avg_pool_blocked(const Tensor& xb, int64_t channels) {
  const char* op = "global_avg_pool_blocked";
  const dc::BlockedShape s = blocked_shape(op, "xb", xb, channels);
  Tensor x = xb.contiguous(), y = new_tensor({s.n, channels}, xb.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  run_shares(threads_for(x.numel()), [&](int tid, int n) { dc::global_avg_pool_fwd_share(s, xp, yp, tid, n); });
  return y;
}

Tensor global_avg_pool_blocked_backward(const Tensor& grad_output, at::IntArrayRef input_size, int64_t channels) {
  const char* op = "global_avg_pool_blocked_backward";
  Tensor gx = new_tensor(input_size, grad_output.options());
  const dc::BlockedShape s = blocked_shape(op, "input_size", gx, channels);
  check_float_cpu(grad_output, op, "grad_output");
  TORCH_CHECK(grad_output.dim() == 2 && grad_output.size(0) == s.n && grad_output.size(1) == channels, op,
              ": expected 'grad_output' of shape (", s.n, ", ", channels, "), got ", grad_output.sizes());
  Tensor gy = grad_output.contiguous();
  const float* gyp = gy.data_ptr<float>();
  float* gxp = gx.data_ptr<float>();
  run_shares(threads_for(gx.numel()), [&](int tid, int n) { dc::global_avg_pool_bwd_share(s, gyp, gxp, tid, n); });
  return gx;
}

}  // namespace dc_torch

TORCH_LIBRARY_FRAGMENT(directconv, m) {
  m.def("bn_stats_blocked(Tensor xb, int channels) -> (Tensor mean, Tensor var)");
  m.def(
      "bn_update_running_stats(Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, "
      "Tensor mean, Tensor var, int count, float? momentum) -> ()");
  m.def("bn_apply_blocked(Tensor xb, Tensor scale, Tensor shift, Tensor? residual, bool relu, int channels) -> Tensor");
  m.def(
      "batch_norm_blocked(Tensor xb, Tensor mean, Tensor var, Tensor? weight, Tensor? bias, Tensor? residual, "
      "float eps, bool relu, bool train, int channels) -> Tensor");
  m.def(
      "bn_backward_blocked(Tensor grad_y, Tensor? yb, Tensor xb, Tensor mean, Tensor var, Tensor? weight, "
      "float eps, bool train, int channels, bool[4] output_mask) "
      "-> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias, Tensor grad_residual)");
  m.def(
      "max_pool2d_blocked(Tensor xb, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, "
      "bool ceil_mode, int channels) -> Tensor");
  m.def(
      "max_pool2d_blocked_backward(Tensor grad_output, Tensor xb, Tensor yb, int[2] kernel_size, int[2] stride, "
      "int[2] padding, int[2] dilation, bool ceil_mode, int channels) -> Tensor");
  m.def(
      "avg_pool2d_blocked(Tensor xb, int[2] kernel_size, int[2] stride, int[2] padding, bool ceil_mode, "
      "bool count_include_pad, int? divisor_override, int channels) -> Tensor");
  m.def(
      "avg_pool2d_blocked_backward(Tensor grad_output, SymInt[5] input_size, int[2] kernel_size, int[2] stride, "
      "int[2] padding, bool ceil_mode, bool count_include_pad, int? divisor_override, int channels) -> Tensor");
  m.def("global_avg_pool_blocked(Tensor xb, int channels) -> Tensor");
  m.def("global_avg_pool_blocked_backward(Tensor grad_output, SymInt[5] input_size, int channels) -> Tensor");
}

TORCH_LIBRARY_IMPL(directconv, CPU, m) {
  m.impl("bn_stats_blocked", &dc_torch::bn_stats_blocked);
  m.impl("bn_update_running_stats", &dc_torch::bn_update_running_stats);
  m.impl("bn_apply_blocked", &dc_torch::bn_apply_blocked);
  m.impl("batch_norm_blocked", &dc_torch::batch_norm_blocked);
  m.impl("bn_backward_blocked", &dc_torch::bn_backward_blocked);
  m.impl("max_pool2d_blocked", &dc_torch::max_pool2d_blocked);
  m.impl("max_pool2d_blocked_backward", &dc_torch::max_pool2d_blocked_backward);
  m.impl("avg_pool2d_blocked", &dc_torch::avg_pool2d_blocked);
  m.impl("avg_pool2d_blocked_backward", &dc_torch::avg_pool2d_blocked_backward);
  m.impl("global_avg_pool_blocked", &dc_torch::global_avg_pool_blocked);
  m.impl("global_avg_pool_blocked_backward", &dc_torch::global_avg_pool_blocked_backward);
}
