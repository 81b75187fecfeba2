// The torch layer of the blocked element-wise and pooling ops (conv/blocked_eltwise.h,
// conv/blocked_pool.h): schemas, argument checks, Tensor -> pointers, threads. Every op takes
// contiguous-able blocked activations of one dtype, that of xb, and the real channel count C:
// fp32 (N, C/V, H, W, V), V = the active ISA's vector width, or bf16 in the bf16 kernels'
// layout (N, C/32, H, W, 32), which needs the avx512_bf16 level (dc::check_bf16_shape).
// Per-channel tensors (statistics, parameters, their gradients) are fp32; bf16 ones given as
// inputs are read as fp32.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <cstdint>
#include <exception>
#include <tuple>
#include <vector>

#include "common.h"
#include "conv/blocked_eltwise.h"
#include "conv/blocked_pool.h"
#include "jit/amx_fwd_kernel.h"
#include "jit/isa.h"
#include "tensor_pool.h"
#include "threading.h"

namespace dc_torch {

using at::Tensor;

namespace {

bool is_bf16(const Tensor& t) { return t.scalar_type() == at::kBFloat16; }

// fn(T{}) with T the loops' element of xb's dtype: float, or uint16_t holding bf16.
template <typename F>
auto by_dtype(const Tensor& xb, F&& fn) {
  return is_bf16(xb) ? fn(uint16_t{}) : fn(float{});
}

template <typename T>
T* act_ptr(const Tensor& t);
template <>
float* act_ptr<float>(const Tensor& t) {
  return t.data_ptr<float>();
}
template <>
uint16_t* act_ptr<uint16_t>(const Tensor& t) {
  return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>());
}

at::TensorOptions f32_options(const Tensor& like) { return like.options().dtype(at::kFloat); }

// The channel block of a blocked activation of t's dtype: 32 for bf16, else the active ISA's
// fp32 vector width (an error naming op when no JIT level is active).
int blocked_vlen(const char* op, const Tensor& t) { return is_bf16(t) ? dc::kAmxBlock : dc::vlen(jit_isa(op)); }

// A blocked activation of `channels` real channels, as its shape; for bf16 also the level check.
dc::BlockedShape blocked_shape(const char* op, const char* name, const Tensor& t, int64_t channels) {
  check_conv_dtype_cpu(t, op, name);
  const int v = blocked_vlen(op, t);
  TORCH_CHECK(t.dim() == 5 && t.size(4) == v, op, ": expected a blocked '", name, "' (N, C/", v, ", H, W, ", v,
              ") for ", t.scalar_type(), ", got shape ", t.sizes());
  const int64_t cb = t.size(1);
  TORCH_CHECK(cb == 0 ? channels == 0 : channels > (cb - 1) * v && channels <= cb * v, op, ": 'channels' (", channels,
              ") does not fit the ", cb, " channel blocks of ", v, " of '", name, "' (expected ",
              cb == 0 ? 0 : (cb - 1) * v + 1, " to ", cb * v, ")");
  const dc::BlockedShape s{t.size(0), channels, t.size(2), t.size(3), v};
  if (is_bf16(t)) {
    try {
      dc::check_bf16_shape(s, op);
    } catch (const std::exception& e) {
      TORCH_CHECK(false, e.what());
    }
  }
  return s;
}

// An activation beside `like`: of its dtype and shape.
void check_like(const char* op, const char* name, const Tensor& t, const Tensor& like, const char* like_name) {
  check_conv_dtype_cpu(t, op, name);
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": expected '", name, "' of the dtype of '", like_name, "' (",
              like.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == like.sizes(), op, ": expected '", name, "' of the shape of '", like_name, "' ", like.sizes(),
              ", got ", t.sizes());
}

// A per-channel vector (C,), fp32 or bf16, as contiguous fp32 in *keep; null pointer when absent.
const float* channel_vector(const char* op, const char* name, const c10::optional<Tensor>& t, int64_t channels,
                            Tensor* keep) {
  if (!t.has_value() || !t->defined()) return nullptr;
  check_conv_dtype_cpu(*t, op, name);
  TORCH_CHECK(t->dim() == 1 && t->size(0) == channels, op, ": expected '", name, "' of shape (", channels, "), got ",
              t->sizes());
  *keep = t->to(at::kFloat).contiguous();
  return keep->data_ptr<float>();
}

template <typename T>
const T* optional_like(const char* op, const char* name, const c10::optional<Tensor>& t, const Tensor& like,
                       const char* like_name, Tensor* keep) {
  if (!t.has_value() || !t->defined()) return nullptr;
  check_like(op, name, *t, like, like_name);
  *keep = t->contiguous();
  return act_ptr<T>(*keep);
}

// Threads for a loop that streams `passes` times the bytes of t (a bf16 value counts as half a
// float).
int threads_for(const Tensor& t, int64_t passes = 1) {
  return dc::eltwise_threads(passes * t.numel() * static_cast<int64_t>(t.element_size()) / 4, num_threads());
}

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

// mean and var are fp32 for either dtype of xb.
std::tuple<Tensor, Tensor> bn_stats_blocked(const Tensor& xb, int64_t channels) {
  const char* op = "bn_stats_blocked";
  const dc::BlockedShape s = blocked_shape(op, "xb", xb, channels);
  Tensor x = xb.contiguous();
  Tensor mean = new_tensor({channels}, f32_options(xb)), var = new_tensor({channels}, f32_options(xb));
  const int nt = threads_for(x);
  const int64_t size = dc::bn_stats_partial_size(s);
  std::vector<double> partials(nt * size);
  by_dtype(xb, [&](auto tag) {
    using T = decltype(tag);
    const T* xp = act_ptr<T>(x);
    if (s.pixels() > 0)
      run_shares(nt, [&](int tid, int n) { dc::bn_stats_share(s, xp, partials.data() + tid * size, tid, n); });
    dc::bn_stats_finish(s, xp, partials.data(), nt, mean.data_ptr<float>(), var.data_ptr<float>());
    return 0;
  });
  return {mean, var};
}

namespace {

Tensor run_apply(const char* op, const Tensor& xb, const dc::BlockedShape& s, const dc::ChannelAffine& a,
                 const c10::optional<Tensor>& residual, bool relu) {
  return by_dtype(xb, [&](auto tag) {
    using T = decltype(tag);
    Tensor x = xb.contiguous(), r;
    const T* rp = optional_like<T>(op, "residual", residual, xb, "xb", &r);
    Tensor y = blocked_like(xb, s);
    const T* xp = act_ptr<T>(x);
    T* yp = act_ptr<T>(y);
    run_shares(threads_for(x), [&](int tid, int n) { dc::bn_apply_share(s, a, xp, rp, relu, yp, tid, n); });
    return y;
  });
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
// Running statistics of bf16 (a model moved to bf16) are updated in fp32 and written back
// rounded to nearest even.
void bn_update_running_stats(const c10::optional<Tensor>& running_mean, const c10::optional<Tensor>& running_var,
                             const c10::optional<Tensor>& num_batches_tracked, const Tensor& mean, const Tensor& var,
                             int64_t count, c10::optional<double> momentum) {
  const char* op = "bn_update_running_stats";
  check_conv_dtype_cpu(mean, op, "mean");
  TORCH_CHECK(mean.dim() == 1, op, ": expected a 1-D 'mean' (C,), got shape ", mean.sizes());
  const int64_t c = mean.size(0);
  Tensor m, v;
  const float* mp = channel_vector(op, "mean", mean, c, &m);
  const float* vp = channel_vector(op, "var", var, c, &v);
  // The running statistics are written where they are: they must be contiguous already.
  struct Running {
    Tensor t;
    std::vector<float> f32;  // bf16's fp32 copy
    float* p = nullptr;
  };
  auto running = [&](const c10::optional<Tensor>& t, const char* name) {
    Running r;
    if (!t.has_value() || !t->defined()) return r;
    Tensor unused;
    channel_vector(op, name, t, c, &unused);
    TORCH_CHECK(t->is_contiguous(), op, ": expected a contiguous '", name, "'");
    r.t = *t;
    if (is_bf16(r.t)) {
      const at::BFloat16* b = r.t.data_ptr<at::BFloat16>();
      r.f32.assign(b, b + c);
      r.p = r.f32.data();
    } else {
      r.p = r.t.data_ptr<float>();
    }
    return r;
  };
  Running rm = running(running_mean, "running_mean");
  Running rv = running(running_var, "running_var");
  int64_t* batches = nullptr;
  if (num_batches_tracked.has_value() && num_batches_tracked->defined()) {
    const Tensor& t = *num_batches_tracked;
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong && t.numel() == 1, op,
                ": expected 'num_batches_tracked' to be a CPU int64 tensor of one element, got ", t.scalar_type(),
                " of shape ", t.sizes());
    batches = t.data_ptr<int64_t>();
  }
  const double factor = dc::running_stats_factor(momentum.has_value(), momentum.value_or(0.0), batches);
  dc::update_running_stats(c, mp, vp, count, factor, rm.p, rv.p);
  for (Running* r : {&rm, &rv}) {
    if (r->f32.empty()) continue;
    at::BFloat16* b = r->t.data_ptr<at::BFloat16>();
    for (int64_t i = 0; i < c; ++i) b[i] = at::BFloat16(r->f32[i]);  // rounds to nearest even
  }
}

// grad_x and grad_residual are of xb's dtype, grad_weight and grad_bias fp32.
std::tuple<Tensor, Tensor, Tensor, Tensor> bn_backward_blocked(const Tensor& grad_y, const c10::optional<Tensor>& yb,
                                                               const Tensor& xb, const Tensor& mean, const Tensor& var,
                                                               const c10::optional<Tensor>& weight, double eps,
                                                               bool train, int64_t channels,
                                                               std::array<bool, 4> output_mask) {
  const char* op = "bn_backward_blocked";
  const dc::BlockedShape shape = blocked_shape(op, "xb", xb, channels);
  check_like(op, "grad_y", grad_y, xb, "xb");
  return by_dtype(xb, [&](auto tag) {
    using T = decltype(tag);
    dc::BnBackwardArgsT<T> a;
    a.shape = shape;
    Tensor gy = grad_y.contiguous(), x = xb.contiguous(), y, m, v, w;
    a.grad_y = act_ptr<T>(gy);
    a.y = optional_like<T>(op, "yb", yb, xb, "xb", &y);
    a.x = act_ptr<T>(x);
    a.mean = channel_vector(op, "mean", mean, channels, &m);
    a.var = channel_vector(op, "var", var, channels, &v);
    a.weight = channel_vector(op, "weight", weight, channels, &w);
    a.eps = eps;
    a.train = train;
    // Gradients not asked for are empty (0,) tensors of their dtype, never computed.
    auto activation = [&](bool want) { return want ? blocked_like(xb, a.shape) : new_tensor({0}, xb.options()); };
    auto per_channel = [&](bool want) { return new_tensor({want ? channels : 0}, f32_options(xb)); };
    Tensor gx = activation(output_mask[0]), gw = per_channel(output_mask[1]), gb = per_channel(output_mask[2]),
           gr = activation(output_mask[3]);
    a.grad_x = output_mask[0] ? act_ptr<T>(gx) : nullptr;
    a.grad_weight = output_mask[1] ? gw.data_ptr<float>() : nullptr;
    a.grad_bias = output_mask[2] ? gb.data_ptr<float>() : nullptr;
    a.grad_residual = output_mask[3] ? act_ptr<T>(gr) : nullptr;
    dc::BnBackwardT<T> bwd(a);
    const int nt = threads_for(x, 3);
    std::vector<double> partials(nt * bwd.partial_size());
    for (int pass = 0; pass < bwd.passes(); ++pass) {
      if (a.shape.pixels() > 0)
        run_shares(nt,
                   [&](int tid, int n) { bwd.run_share(pass, partials.data() + tid * bwd.partial_size(), tid, n); });
      bwd.finish_pass(pass, partials.data(), nt);
    }
    return std::tuple<Tensor, Tensor, Tensor, Tensor>{gx, gw, gb, gr};
  });
}

// ---- pooling ------------------------------------------------------------------------------

Tensor max_pool2d_blocked(const Tensor& xb, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation, bool ceil_mode, int64_t channels) {
  const char* op = "max_pool2d_blocked";
  const dc::PoolDesc d =
      pool_desc(op, blocked_shape(op, "xb", xb, channels), kernel_size, stride, padding, dilation, ceil_mode);
  return by_dtype(xb, [&](auto tag) {
    using T = decltype(tag);
    Tensor x = xb.contiguous(), y = blocked_like(xb, d.out());
    const T* xp = act_ptr<T>(x);
    T* yp = act_ptr<T>(y);
    run_shares(threads_for(x), [&](int tid, int n) { dc::max_pool_fwd_share(d, xp, yp, tid, n); });
    return y;
  });
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
  return by_dtype(xb, [&](auto tag) {
    using T = decltype(tag);
    Tensor x = xb.contiguous(), y = yb.contiguous(), gy = grad_output.contiguous(), gx = blocked_like(xb, d.in);
    const T *xp = act_ptr<T>(x), *yp = act_ptr<T>(y), *gyp = act_ptr<T>(gy);
    T* gxp = act_ptr<T>(gx);
    run_shares(threads_for(x, 2), [&](int tid, int n) { dc::max_pool_bwd_share(d, xp, yp, gyp, gxp, tid, n); });
    return gx;
  });
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
  return by_dtype(xb, [&](auto tag) {
    using T = decltype(tag);
    Tensor x = xb.contiguous(), y = blocked_like(xb, d.out());
    const T* xp = act_ptr<T>(x);
    T* yp = act_ptr<T>(y);
    run_shares(threads_for(x), [&](int tid, int n) { dc::avg_pool_fwd_share(d, o, xp, yp, tid, n); });
    return y;
  });
}

// grad_x is of grad_output's dtype.
Tensor avg_pool2d_blocked_backward(const Tensor& grad_output, at::IntArrayRef input_size, at::IntArrayRef kernel_size,
                                   at::IntArrayRef stride, at::IntArrayRef padding, bool ceil_mode,
                                   bool count_include_pad, c10::optional<int64_t> divisor_override, int64_t channels) {
  const char* op = "avg_pool2d_blocked_backward";
  check_conv_dtype_cpu(grad_output, op, "grad_output");
  Tensor gx = new_tensor(input_size, grad_output.options());
  const dc::PoolDesc d =
      pool_desc(op, blocked_shape(op, "input_size", gx, channels), kernel_size, stride, padding, {1, 1}, ceil_mode);
  const dc::AvgPoolOpts o = avg_opts(op, count_include_pad, divisor_override);
  Tensor expect = blocked_like(gx, d.out());
  check_like(op, "grad_output", grad_output, expect, "the output");
  return by_dtype(gx, [&](auto tag) {
    using T = decltype(tag);
    Tensor gy = grad_output.contiguous();
    const T* gyp = act_ptr<T>(gy);
    T* gxp = act_ptr<T>(gx);
    run_shares(threads_for(gx), [&](int tid, int n) { dc::avg_pool_bwd_share(d, o, gyp, gxp, tid, n); });
    return gx;
  });
}

// (N, C) of xb's dtype: for bf16 the fp32 mean rounded once (as torch's mean of bf16).
Tensor global_avg_pool_blocked(const Tensor& xb, int64_t channels) {
  const char* op = "global_avg_pool_blocked";
  const dc::BlockedShape s = blocked_shape(op, "xb", xb, channels);
  Tensor x = xb.contiguous(), y = new_tensor({s.n, channels}, f32_options(xb));
  float* yp = y.data_ptr<float>();
  by_dtype(xb, [&](auto tag) {
    using T = decltype(tag);
    const T* xp = act_ptr<T>(x);
    run_shares(threads_for(x), [&](int tid, int n) { dc::global_avg_pool_fwd_share(s, xp, yp, tid, n); });
    return 0;
  });
  if (!is_bf16(xb)) return y;
  Tensor out = new_tensor({s.n, channels}, xb.options());
  out.copy_(y);
  return out;
}

// The gradient is blocked in input_size's layout: bf16 when its last dimension is the bf16
// layout's 32, else fp32. grad_output (N, C) may be fp32 or bf16; the loop reads it as fp32.
Tensor global_avg_pool_blocked_backward(const Tensor& grad_output, at::IntArrayRef input_size, int64_t channels) {
  const char* op = "global_avg_pool_blocked_backward";
  check_conv_dtype_cpu(grad_output, op, "grad_output");
  const bool bf16 = input_size.size() == 5 && input_size[4] == dc::kAmxBlock;
  Tensor gx = new_tensor(input_size, grad_output.options().dtype(bf16 ? at::kBFloat16 : at::kFloat));
  const dc::BlockedShape s = blocked_shape(op, "input_size", gx, channels);
  TORCH_CHECK(grad_output.dim() == 2 && grad_output.size(0) == s.n && grad_output.size(1) == channels, op,
              ": expected 'grad_output' of shape (", s.n, ", ", channels, "), got ", grad_output.sizes());
  Tensor gy = grad_output.to(at::kFloat).contiguous();
  const float* gyp = gy.data_ptr<float>();
  by_dtype(gx, [&](auto tag) {
    using T = decltype(tag);
    T* gxp = act_ptr<T>(gx);
    run_shares(threads_for(gx), [&](int tid, int n) { dc::global_avg_pool_bwd_share(s, gyp, gxp, tid, n); });
    return 0;
  });
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
